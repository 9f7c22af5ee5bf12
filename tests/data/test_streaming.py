"""Streaming (data.streaming): local jsonl/parquet files tokenized on the fly into the same windows
prepared shards would give, the stateful iterator resumed exactly (in-process, through a
StatefulDataLoader with worker processes, and a training run killed with SIGKILL)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch

from data.encode import _load_tokenizer
from data.split import SPLIT_SALT, VALIDATION, label_of, unit_hash
from data.streaming import StreamWindows, content_key

from tests.data.conftest import paragraph, run_cli, write_data_config


def write_jsonl(root: Path, n_files: int, per_file: int, words: int = 30) -> List[List[str]]:
    root.mkdir(parents=True, exist_ok=True)
    docs = []
    for f in range(n_files):
        texts = [paragraph(f * 1000 + i, words + i % 7) for i in range(per_file)]
        (root / f"part-{f:02d}.jsonl").write_text(
            "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts))
        )
        docs.append(texts)
    return docs


def stream_config(tmp_path: Path, tokenizer: Path, corpus: Path, **extra) -> Path:
    return write_data_config(
        tmp_path / "stream.yaml",
        source={"kind": "jsonl", "paths": [str(corpus)], "split_by": "file"},
        tokenizer={"path": str(tokenizer)},
        out_dir=str(tmp_path / "stream"),
        validation_fraction=0.1,
        streaming=True,
        **extra,
    )


def windows(ds: StreamWindows, n: int):
    return [item["tokens"].numpy() for item in itertools.islice(iter(ds), n)]


def make(tmp_path, prepared_dir, n_files=2, per_file=12, seq_len=16, **kw) -> StreamWindows:
    docs = write_jsonl(tmp_path / "c", n_files, per_file)
    files = sorted(str(p) for p in (tmp_path / "c").iterdir())
    tok = (prepared_dir / "tokenizer.json").read_text()
    ds = StreamWindows({"kind": "jsonl", "text_field": "text"}, files, tok, 0, seq_len, "train", 1234, 0.1, 0.0, **kw)
    return ds, docs, tok


def test_stream_windows_are_the_packed_documents(tmp_path, prepared_dir):
    ds, docs, tok_json = make(tmp_path, prepared_dir, seq_len=16, doc_start_mask=True)
    tok = _load_tokenizer(tok_json)
    train = [
        t for f in docs for t in f if label_of(unit_hash(1234, SPLIT_SALT, content_key(t)), 0.1, 0.0) != VALIDATION
    ]
    assert 0 < len(train) < sum(map(len, docs))  # some documents went to validation
    stream = np.concatenate([np.asarray(tok.encode(t, add_special_tokens=False).ids + [0]) for t in train])
    n = (len(stream) - 1) // 16
    got = list(itertools.islice(iter(ds), n))
    for i, item in enumerate(got):
        assert np.array_equal(item["tokens"].numpy(), stream[i * 16 : i * 16 + 17])
        starts = np.zeros(len(stream), dtype=bool)
        starts[0] = True
        starts[1:] = stream[:-1] == 0
        assert np.array_equal(item["doc_start_mask"].numpy(), starts[i * 16 : i * 16 + 17])
    # the stream goes on past the end of the files (a new epoch of the same documents)
    more = windows(ds, n + 30)
    assert len(more) == n + 30


def test_iterator_state_resumes_exactly_across_epochs(tmp_path, prepared_dir):
    ds, _, _ = make(tmp_path, prepared_dir, seq_len=8)
    straight = windows(ds, 400)  # several passes over the files
    for stop in (1, 37, 150, 333):
        first = iter(ds)
        head = [next(first)["tokens"].numpy() for _ in range(stop)]
        state = json.loads(json.dumps(ds.state_dict()))  # what a checkpoint keeps
        again, _, _ = make(tmp_path / f"r{stop}", prepared_dir, seq_len=8)
        again.load_state_dict(state)
        tail = windows(again, 400 - stop)
        assert all(np.array_equal(a, b) for a, b in zip(head + tail, straight)), stop


def test_stateful_loader_with_workers_resumes_exactly(tmp_path, prepared_dir):
    from torchdata.stateful_dataloader import StatefulDataLoader

    ds, _, _ = make(tmp_path, prepared_dir, n_files=4, per_file=10, seq_len=8)
    kw = dict(batch_size=3, num_workers=2)
    straight = [b["tokens"] for b in itertools.islice(iter(StatefulDataLoader(ds, **kw)), 60)]
    loader = StatefulDataLoader(ds, **kw)
    it = iter(loader)
    head = [next(it)["tokens"] for _ in range(23)]
    state = loader.state_dict()
    del it
    resumed = StatefulDataLoader(ds, **kw)
    resumed.load_state_dict(state)
    tail = [b["tokens"] for b in itertools.islice(iter(resumed), 60 - 23)]
    assert all(torch.equal(a, b) for a, b in zip(head + tail, straight))
    # two workers read different files
    assert not torch.equal(straight[0], straight[1])


def test_prepare_streaming_config_and_errors(tmp_path, prepared_dir, capsys):
    write_jsonl(tmp_path / "c", 3, 10)
    cfg = stream_config(tmp_path, prepared_dir / "tokenizer.json", tmp_path / "c")
    code, out, err = run_cli(capsys, ["data", "prepare", str(cfg)])
    assert code == 0, err
    meta = json.loads((tmp_path / "stream" / "metadata.json").read_text())
    assert meta["stream"]["builder"] == "json" and len(meta["stream"]["files"]) == 3
    assert meta["stream"]["bytes_per_token"] > 1 and meta["splits"] == {}
    code, out, err = run_cli(capsys, ["data", "prepare", str(cfg)])
    assert code == 0 and "up to date" in out
    code, out, err = run_cli(capsys, ["data", "inspect", str(tmp_path / "stream")])
    assert code == 0 and "streaming:  3 files read by the 'json' builder" in out
    for args, message in (
        (["tokenizer.path=null"], "tokenizer.path"),
        (["source.kind=text"], "cannot be streamed"),
        (["source.text_field=body"], "no text field 'body'"),
        (["parts=2"], "data.streaming"),
    ):
        code, out, err = run_cli(capsys, ["data", "prepare", str(cfg), *args, f"out_dir={tmp_path}/e"])
        assert code != 0 and message in err.strip().splitlines()[-1], (args, err)
        assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_sigkill_resume_with_streaming_is_bit_exact(tmp_path, tiny_data):
    from tests.helpers import read_samples
    from tests.training.test_train import _final_weights, assert_same_weights, kill_and_resume

    write_jsonl(tmp_path / "c", 4, 60, words=40)
    data = {
        "name": "stream",
        "out_dir": str(tmp_path / "streamdata"),
        "source": {"kind": "jsonl", "paths": [str(tmp_path / "c")]},
        "tokenizer": {"path": str(tiny_data / "tokenizer.json")},
        "validation_fraction": 0.1,
        "streaming": True,
    }
    straight, run, kill_at = kill_and_resume(tmp_path, tiny_data, name="st", data=data, train={"num_workers": 2})
    assert_same_weights(_final_weights(straight), _final_weights(run))
    assert read_samples(straight) == read_samples(run), f"samples differ (killed at {kill_at})"
