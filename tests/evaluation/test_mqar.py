"""MQAR as Zoology runs it (data/tasks/mqar.py) and recall against state size
(lm/evaluation/recall_state.py): examples are deterministic and well-formed, the difficulty knobs
do what they say (pairs, length, power-law gaps), a lookup model scores 1 and a constant one
chance, state bytes are measured right per family, and the CLI trains, evaluates and plots."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from data.tasks import build_task, rng_for
from data.tasks.mqar import gap_distribution
from lm.errors import ConfigError, LMError
from tests.evaluation.conftest import (
    error_line,
    in_memory_checkpoint,
    random_model,
    run_lm,
    train_run,
    write_experiment,
)


def mqar(**params):
    return build_task("mqar", {"vocab_size": 64, "seq_len": 32, "n_pairs": 4, **params})


class LookupOracle(nn.Module):
    """At each position, the token that followed the first earlier occurrence of the current token
    (the key's value, for a query key); else token 0."""

    def __init__(self, vocab: int):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.vocab = vocab

    def forward(self, tokens, state=None, return_state=None):
        B, T = tokens.shape
        same = tokens[:, :, None] == tokens[:, None, :]  # [B, t, j]
        earlier = torch.ones(T, T, dtype=torch.bool).tril(-1)
        hit = same & earlier
        first = torch.where(hit.any(-1), hit.float().argmax(-1), torch.full((B, T), -1))
        nxt = torch.where(first >= 0, tokens.gather(1, (first + 1).clamp(max=T - 1)), torch.zeros_like(tokens))
        return nn.functional.one_hot(nxt, self.vocab).float() * 10, None

    def num_parameters(self):
        return 0


class Constant(LookupOracle):
    def __init__(self, vocab: int, token: int):
        super().__init__(vocab)
        self.token = token

    def forward(self, tokens, state=None, return_state=None):
        return nn.functional.one_hot(torch.full_like(tokens, self.token), self.vocab).float() * 10, None


def test_examples_are_deterministic_and_follow_the_layout():
    task = mqar()
    a, b = task.example(rng_for(3, 7, 2)), task.example(rng_for(3, 7, 2))
    for k in ("inputs", "targets", "mask"):
        assert np.array_equal(a[k], b[k])
    assert not np.array_equal(a["inputs"], task.example(rng_for(3, 8, 2))["inputs"])
    assert not np.array_equal(a["inputs"], task.example(rng_for(4, 7, 2))["inputs"])
    for i in range(50):
        ex = task.example(rng_for(0, i, 0))
        x, y, m = ex["inputs"], ex["targets"], ex["mask"]
        assert len(x) == len(y) == len(m) == 32 and x.dtype == np.int64
        keys, values = x[0:8:2], x[1:8:2]
        assert len(set(keys)) == 4 and all(1 <= k < 32 for k in keys)  # keys in [1, V/2)
        assert len(set(values)) == 4 and all(32 <= v < 64 for v in values)  # values in [V/2, V)
        where = np.flatnonzero(m)
        assert len(where) == 4 and all(p >= 8 and (p - 8) % 2 == 0 for p in where)  # even slots after the pairs
        table = dict(zip(keys, values))
        assert sorted(x[where]) == sorted(keys)  # every key asked once
        assert all(y[p] == table[x[p]] for p in where)  # scored: that key's value
        assert x.min() >= 1  # random non-queries from [1, V): 0 stays the padding id


def test_difficulty_knobs():
    task = mqar(vocab_size=512, seq_len=128, n_pairs=8, n_queries=3)
    ex = task.example(rng_for(0, 0, 0))
    assert len(ex["inputs"]) == 128 and ex["mask"].sum() == 3
    # more pairs: a longer context region and more queries (every key asked, n_queries capped at n)
    few, many = task.example(rng_for(0, 1, 0), n_pairs=2), task.example(rng_for(0, 1, 0), n_pairs=16, n_queries=16)
    assert few["mask"].sum() == 2 and many["mask"].sum() == 16
    assert np.flatnonzero(few["mask"]).min() >= 4 and np.flatnonzero(many["mask"]).min() >= 32
    assert len(task.example(rng_for(0, 2, 0), seq_len=256)["inputs"]) == 256
    with pytest.raises(ValueError, match="need an even seq_len >= 136"):
        task.example(rng_for(0, 0, 0), n_pairs=34, n_queries=34)
    # without random non-queries the query region is blank but for the queries
    blank = mqar(random_non_queries=False).example(rng_for(0, 0, 0))
    region = blank["inputs"][8:]
    assert (region[~blank["mask"][8:]] == 0).all() and (region[blank["mask"][8:]] > 0).all()
    # bad configs are one-line config errors
    for params, msg in (
        ({"seq_len": 33}, "positive even"),
        ({"n_pairs": 9}, "need an even seq_len >= 36"),
        ({"n_queries": 5}, "cannot exceed n_pairs"),
        ({"vocab_size": 8, "n_pairs": 4}, "exceeds"),
        ({"power_a": 0.0}, "power_a"),
    ):
        with pytest.raises(ConfigError, match=msg):
            mqar(**params)
    # the sweep keeps the pair counts that fit
    assert mqar(seq_len=64, eval_pairs=[4, 8, 16, 32]).eval_settings() == {"n_pairs": [4, 8, 16]}


@pytest.mark.parametrize("power_a", [0.01, 0.5, 1.0])
def test_query_gaps_follow_the_power_law(power_a):
    task = mqar(seq_len=48, n_pairs=4, n_queries=1, power_a=power_a)  # one query: the law exactly, 20 slots
    slots = (48 - 8) // 2
    counts = np.zeros(slots)
    n = 6000
    for i in range(n):
        ex = task.example(rng_for(1, i, 0))
        counts[(np.flatnonzero(ex["mask"])[0] - 8) // 2] += 1
    expected = gap_distribution(slots, power_a)
    assert 0.5 * np.abs(counts / n - expected).sum() < 0.03  # total variation distance
    if power_a == 1.0:
        assert np.allclose(expected, 1 / slots)
    else:  # log-log slope of the first slots ~ power_a - 1
        s = np.arange(1, 9)
        slope = np.polyfit(np.log(s), np.log(counts[:8] / n), 1)[0]
        assert abs(slope - (power_a - 1)) < 0.2
    # with every key queried, short gaps still dominate under a steep law
    if power_a == 0.01:
        many = mqar(seq_len=128, n_pairs=8, power_a=0.01)
        gaps = np.concatenate([(np.flatnonzero(many.example(rng_for(2, i, 0))["mask"]) - 16) // 2 for i in range(300)])
        assert np.mean(gaps < 10) > 0.3 and gaps.max() < (128 - 16) // 2


def test_lookup_oracle_scores_one_and_constant_scores_chance():
    from lm.evaluation.icl import score_examples
    from lm.evaluation.recall_state import mqar_examples

    task = mqar(vocab_size=64, seq_len=64, n_pairs=8)
    examples = mqar_examples(task, 8, 64, 400, seed=0)
    perfect = score_examples(LookupOracle(64), examples, "classes", batch_size=64)
    assert perfect["acc"] == 1.0 and perfect["seq_acc"] == 1.0 and perfect["scored"] == 400 * 8
    constant = score_examples(Constant(64, 40), examples, "classes", batch_size=64)
    chance = 2 / 64  # one value among V/2
    sd = (chance * (1 - chance) / constant["scored"]) ** 0.5
    assert abs(constant["acc"] - chance) < 4 * sd and constant["seq_acc"] == 0.0


def test_state_bytes_per_layer_by_family():
    from lm.evaluation.recall_state import mixer_state_bytes

    gla, _ = random_model("gla", vocab=64)  # d_model 32, 2 heads of 16: S [1, 2, 16, 16] float32
    per_layer = mixer_state_bytes(gla, 64)
    expected = sum(t.numel() * t.element_size() for t in gla.blocks[0].mixer.init_state(1).values())
    assert per_layer == [expected, expected] and expected >= 2 * 16 * 16 * 4
    tr, _ = random_model("transformer", vocab=64, max_seq_len=256)
    assert mixer_state_bytes(tr, 100) == [2 * 2 * 100 * 16 * 4] * 2  # K and V, [1, H, L, K] float32
    assert mixer_state_bytes(tr, 200)[0] == 2 * mixer_state_bytes(tr, 100)[0]  # grows with the length
    for name in ("deltanet", "rwkv7", "srwm", "aaren"):
        model, _ = random_model(name, vocab=64)
        b = mixer_state_bytes(model, 64)
        assert len(b) == 2 and b[0] > 0 and mixer_state_bytes(model, 128) == b  # constant in the length


def test_recall_vs_state_on_in_memory_checkpoints(tmp_path):
    from lm.evaluation.recall_state import evaluate_checkpoint, write_recall_outputs

    params = {"vocab_size": 64, "seq_len": 32, "n_pairs": 4, "eval_pairs": [2, 4, 8]}
    task_cfg = {"source": {"kind": "task"}, "task": {"name": "mqar", "params": params}}
    gla, gcfg = random_model("gla", vocab=64)
    tr, tcfg = random_model("transformer", vocab=64, max_seq_len=64)
    models = []
    for model, cfg in ((gla, gcfg), (tr, tcfg)):
        ckpt = in_memory_checkpoint(model, {"model": cfg, "data": task_cfg})
        models.append(evaluate_checkpoint(ckpt, n_examples=16, batch_size=8))
    assert [r["n_pairs"] for r in models[0]["rows"]] == [2, 4, 8]
    assert models[1]["state_bytes_per_layer"] == 2 * 2 * 32 * 16 * 4 and not models[1]["recurrent"]
    result = {"task": "mqar", "examples": 16, "seed": 0, "models": models}
    paths = write_recall_outputs(result, tmp_path)
    assert paths["png"].stat().st_size > 5000
    md = paths["md"].read_text()
    assert "| gla |" in md and "(KV cache)" in md and "| 8 pairs |" in md
    assert len(paths["csv"].read_text().splitlines()) == 1 + 2 * 3
    # an LM checkpoint, and a pair count that does not fit, are one-line errors
    lm_ckpt = in_memory_checkpoint(gla, {"model": gcfg, "data": {"source": {"kind": "stdlib"}}})
    with pytest.raises(LMError, match="trained on language modelling, not on 'mqar'"):
        evaluate_checkpoint(lm_ckpt)
    with pytest.raises(LMError, match="--pairs 20 / --seq-len 32"):
        evaluate_checkpoint(in_memory_checkpoint(gla, {"model": gcfg, "data": task_cfg}), pairs=[20], n_examples=2)


@pytest.fixture(scope="module")
def mqar_runs(tmp_path_factory):
    """A tiny GLA and a tiny Transformer trained 4 steps on MQAR (vocab 64), in one directory."""
    root = tmp_path_factory.mktemp("mqar-runs")
    runs = {}
    for name, model in (("gla", "gla/tiny"), ("transformer", "transformer/tiny")):
        runs[name] = train_run(
            write_experiment(
                root,
                name,
                {
                    "defaults": {"model": model, "train": "cpu-test"},
                    "data": {
                        "source": {"kind": "task"},
                        "task": {
                            "name": "mqar",
                            "params": {"vocab_size": 64, "seq_len": 32, "n_pairs": 4, "eval_pairs": [2, 4]},
                            "val_examples": 8,
                        },
                    },
                    "model": {"d_model": 32, "n_heads": 2, "n_layers": 1, "max_seq_len": 64},
                    "train": {"max_steps": 4, "val_every_n_steps": 0, "micro_batch_size": 8, "seq_len": 32},
                    "checkpoint": {"every_n_steps": 4},
                    "logging": {"tensorboard": False},
                },
            )
        )
    return root, runs


def test_experiment_configs_load():
    from lm.config import load_experiment

    cfg = load_experiment("mqar-tiny")
    assert cfg.data.task.name == "mqar" and cfg.data.source.kind == "task"
    task = build_task(cfg.data.task.name, dict(cfg.data.task.params))
    assert task.options.vocab_size <= 8192 and task.eval_settings()["n_pairs"]
    zoo = load_experiment("mqar-zoology")
    assert zoo.data.task.params.vocab_size == 8192


def test_recall_vs_state_cli(mqar_runs, lm_runs, tmp_path):
    root, runs = mqar_runs
    out = tmp_path / "rvs"
    proc = run_lm("eval", "recall-vs-state", str(root), "--examples", "8", "--out", str(out))
    res = json.loads((out / "recall_state.json").read_text())
    assert sorted(m["family"] for m in res["models"]) == ["linear_attention", "transformer"]
    assert all([r["n_pairs"] for r in m["rows"]] == [2, 4] for m in res["models"])
    tr = next(m for m in res["models"] if m["family"] == "transformer")
    assert tr["state_bytes_per_layer"] == 2 * 2 * 32 * 16 * 4  # KV cache at seq_len 32
    assert "(KV cache)" in proc.stdout and (out / "recall_vs_state.png").stat().st_size > 5000
    # the ICL suite evaluates the trained MQAR task too
    proc = run_lm("eval", "icl", str(runs["gla"]), "--tasks", "mqar", "--examples", "8", "--out", str(tmp_path / "icl"))
    assert "| mqar | n_pairs | 4 | 8 |" in proc.stdout
    # bad input: one-line errors
    line = error_line(run_lm("eval", "recall-vs-state", str(lm_runs["gla"]), "--out", str(out), check=False))
    assert "not on 'mqar'" in line
    line = error_line(run_lm("eval", "recall-vs-state", str(runs["gla"]), "--pairs", "4,x", check=False))
    assert "--pairs" in line
    line = error_line(run_lm("eval", "recall-vs-state", str(tmp_path / "nothing"), check=False))
    assert "not found" in line
    (tmp_path / "empty").mkdir()
    line = error_line(run_lm("eval", "recall-vs-state", str(tmp_path / "empty"), check=False))
    assert "directory of runs" in line
