"""Weighted mixtures (data.sources): the sampler's proportions, determinism and exact resume, the
prepared combined directory, per-source validation batches and metrics, and a training run killed
with SIGKILL that resumes to the same weights and the same batches."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from data.sampler import MIXTURE_SALT, MixtureBatchSampler, unit_hashes
from data.shards import TokenShards, read_metadata
from data.split import unit_hash
from lm.errors import DataError

from tests.data.conftest import paragraph, run_cli, write_data_config


def test_vectorised_hash_matches_the_scalar_one():
    idx = np.array([0, 1, 2, 12345, 2**40 + 7], dtype=np.int64)
    assert unit_hashes(99, MIXTURE_SALT, idx).tolist() == [unit_hash(99, MIXTURE_SALT, int(i)) for i in idx]


def draw_sources(sampler: MixtureBatchSampler, n_batches: int):
    out = []
    it = iter(sampler)
    for _ in range(n_batches):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(sampler)
            batch = next(it)
        out.append(batch)
    return out


def source_of(sampler, index):
    return int(np.searchsorted(sampler.offsets, index, side="right")) - 1


def test_proportions_within_sampling_error_over_1e4_windows():
    sizes, weights = [50, 400, 30], [0.5, 0.3, 0.2]
    sampler = MixtureBatchSampler(sizes, weights, batch_size=8, seed=7)
    batches = draw_sources(sampler, 1250)  # 10^4 windows, several epochs of the mixture
    src = np.array([source_of(sampler, i) for b in batches for i in b])
    assert len(src) == 10_000
    for s, w in enumerate(weights):
        n, p = int((src == s).sum()), w / sum(weights)
        sigma = math.sqrt(len(src) * p * (1 - p))
        assert abs(n - len(src) * p) < 4 * sigma, (s, n, len(src) * p)
    assert sampler.counts.tolist() == np.bincount(src, minlength=3).tolist()
    # each source is read in full before any of its windows repeats (its own epochs)
    flat = [i for b in batches for i in b]
    for s, n in enumerate(sizes):
        mine = [i for i in flat if source_of(sampler, i) == s]
        first = mine[:n]
        assert sorted(first) == list(range(int(sampler.offsets[s]), int(sampler.offsets[s]) + n))
    # deterministic from the seed, different for another seed
    again = draw_sources(MixtureBatchSampler(sizes, weights, batch_size=8, seed=7), 1250)
    assert again == batches
    assert draw_sources(MixtureBatchSampler(sizes, weights, batch_size=8, seed=8), 50) != batches[:50]


def test_ranks_split_the_global_draws_and_resume_is_exact():
    sizes, weights = [40, 70], [1.0, 3.0]
    whole = draw_sources(MixtureBatchSampler(sizes, weights, batch_size=6, seed=3), 30)
    ranks = [draw_sources(MixtureBatchSampler(sizes, weights, 3, 3, rank=r, world_size=2), 30) for r in (0, 1)]
    for b, (r0, r1) in enumerate(zip(*ranks)):
        assert [x for pair in zip(r0, r1) for x in pair] == whole[b]
    # stop after 13 batches (mid-epoch), save, load into a fresh sampler: the same continuation
    first = MixtureBatchSampler(sizes, weights, batch_size=6, seed=3)
    it = iter(first)
    seen = [next(it) for _ in range(13)]
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    second = MixtureBatchSampler(sizes, weights, batch_size=6, seed=3)
    second.load_state_dict(state)
    assert second.counts.tolist() == state["counts"]
    rest = list(second)
    assert seen + rest + draw_sources(second, 30 - len(seen) - len(rest)) == whole
    with pytest.raises(DataError, match="weights"):
        MixtureBatchSampler(sizes, [1.0, 2.0], batch_size=6, seed=3).load_state_dict(state)
    with pytest.raises(DataError, match="batch_size"):
        MixtureBatchSampler(sizes, weights, batch_size=3, seed=3).load_state_dict(state)


def _mixture_config(tmp_path: Path, weights=(3.0, 1.0)) -> Path:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n\n".join(paragraph(i) for i in range(80)) + "\n")
    b.write_text("\n\n".join(paragraph(1000 + i, 15) for i in range(60)) + "\n")
    return write_data_config(
        tmp_path / "mix.yaml",
        out_dir=str(tmp_path / "mix"),
        shard_tokens=800,
        sources=[
            {
                "name": "alpha",
                "weight": weights[0],
                "source": {"kind": "text", "paths": [str(a)], "split_by": "blank_line"},
            },
            {
                "name": "beta",
                "weight": weights[1],
                "source": {"kind": "text", "paths": [str(b)], "split_by": "blank_line"},
            },
        ],
    )


def test_prepare_mixture_and_datamodule(tmp_path, capsys):
    cfg = _mixture_config(tmp_path)
    code, out, err = run_cli(capsys, ["data", "prepare", str(cfg)])
    assert code == 0, err
    mix = tmp_path / "mix"
    meta = read_metadata(mix)
    assert [m["name"] for m in meta["mixture"]] == ["alpha", "beta"] and meta["mixture"][0]["share"] == 0.75
    sub = [read_metadata(mix / n) for n in ("alpha", "beta")]
    assert sub[0]["tokenizer_sha256"] == sub[1]["tokenizer_sha256"] == meta["tokenizer_sha256"]
    assert sub[1]["tokenizer"]["trained"] is False  # beta encoded with alpha's tokenizer
    # the combined directory is one corpus: the sources' streams one after the other
    for split in ("train", "validation"):
        whole = TokenShards(mix, split)
        parts = [TokenShards(mix / n, split) for n in ("alpha", "beta")]
        joined = np.concatenate([p.window(0, len(p)) for p in parts])
        assert np.array_equal(whole.window(0, len(whole)), joined)
        assert whole.num_documents == sum(p.num_documents for p in parts)
    code, out, err = run_cli(capsys, ["data", "prepare", str(cfg)])
    assert code == 0 and "mixture up to date" in out
    code, out, err = run_cli(capsys, ["data", "inspect", str(mix), "--tokens", "0"])
    assert code == 0 and "mixture:    alpha: weight 3 (75.0% of training windows)" in out

    from data.datamodule import TokenDataModule

    dm = TokenDataModule(mix, seq_len=16, micro_batch_size=4, seed=1, val_batches=4, doc_start_mask=True)
    loader = dm.train_dataloader()
    batches = [b for _, b in zip(range(40), loader)]
    assert all(set(b) == {"tokens", "index", "source", "doc_start_mask"} for b in batches)
    sources = np.concatenate([b["source"].numpy() for b in batches])
    assert 0.6 < (sources == 0).mean() < 0.9  # 75% expected over 160 windows
    ds = dm.train_dataset
    for b in batches[:5]:
        for row, i, s in zip(b["tokens"], b["index"], b["source"]):
            src, j = ds.locate(int(i))
            assert src == int(s) and np.array_equal(row.numpy(), ds.parts[src].window(j).astype(np.int64))
    val = list(dm.val_dataloader())
    assert [int(b["source"][0]) for b in val] == [0, 1, 0, 1]  # val_batches=4 over 2 sources, in turns
    assert all(len(set(b["source"].tolist())) == 1 for b in val)

    # errors: one line each, nothing written
    good = json.loads(cfg.read_text())["sources"]
    for change, message in (
        ({1: {"name": "alpha"}}, "used twice"),
        ({0: {"weight": 0}}, "weight"),
        ({0: {"name": "index"}}, "plain directory name"),
    ):
        sources = [{**s, **change.get(i, {})} for i, s in enumerate(good)]
        bad = write_data_config(tmp_path / "bad.yaml", sources=sources, out_dir=str(tmp_path / "e"))
        code, out, err = run_cli(capsys, ["data", "prepare", str(bad)])
        assert code != 0 and message in err.strip().splitlines()[-1], (change, err)
        assert not (tmp_path / "e").exists()
    code, out, err = run_cli(capsys, ["data", "prepare", str(cfg), "sources.0.weight=2", f"out_dir={tmp_path}/e"])
    assert code == 2 and "set a list whole" in err.strip().splitlines()[-1]


@pytest.mark.slow
def test_sigkill_resume_with_a_mixture_is_bit_exact(tmp_path, tiny_data):
    from tests.helpers import read_samples
    from tests.training.test_train import _final_weights, assert_same_weights, kill_and_resume

    corpus = tmp_path / "b.txt"
    corpus.write_text("\n\n".join(paragraph(i, 30) for i in range(300)) + "\n")
    data = {
        "name": "mix",
        "out_dir": str(tmp_path / "mixdata"),
        "validation_fraction": 0.1,
        "num_proc": 1,
        "tokenizer": {"vocab_size": 512, "train_max_bytes": 400_000},
        "sources": [
            {"name": "code", "weight": 2.0, "source": {"kind": "stdlib", "max_bytes": 300_000}},
            {
                "name": "prose",
                "weight": 1.0,
                "source": {"kind": "text", "paths": [str(corpus)], "split_by": "blank_line"},
            },
        ],
    }
    straight, run, kill_at = kill_and_resume(tmp_path, tiny_data, name="mix", data=data)
    assert_same_weights(_final_weights(straight), _final_weights(run))
    assert read_samples(straight) == read_samples(run), f"samples differ (killed at {kill_at})"

    # per-source metrics: validation per source and tokens drawn per source, continued across the resume
    rows = list(csv.DictReader(open(run / "logs" / "metrics.csv")))
    keys = set().union(*(r.keys() for r in rows))
    assert {"val/loss", "val/code/loss", "val/prose/loss", "data/code/tokens", "data/prose/tokens"} <= keys
    last = {}
    for r in rows:
        for k in ("data/code/tokens", "data/prose/tokens"):
            if r.get(k):
                last[k] = (int(float(r["step"])), float(r[k]))
    total = last["data/code/tokens"][1] + last["data/prose/tokens"][1]
    assert total == 24 * 4 * 32  # every token of every step, counted once over the kill
    assert 0.45 < last["data/code/tokens"][1] / total < 0.9
