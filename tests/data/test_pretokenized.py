"""Pretokenized corpora: Megatron .bin/.idx written by an independent writer (the layout documented in
data/pretokenized.py) and HF datasets of token ids, read back token for token, prepared into shards
without re-tokenizing, inspected, and trained on."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import List

import numpy as np
import pytest

from data.pretokenized import IndexedTokens, TokenSource
from data.shards import TokenShards, read_metadata
from lm.errors import DataError

from tests.data.conftest import paragraph, run_cli, write_data_config


def write_mmidx(prefix: Path, docs: List[List[List[int]]], dtype=np.uint16, code: int = 8, modes: bool = False):
    """A Megatron MMIDIDX v1 dataset: ``docs`` is a list of documents, each a list of sequences."""
    sizes, pointers, doc_idx = [], [], [0]
    with open(str(prefix) + ".bin", "wb") as f:
        for doc in docs:
            for seq in doc:
                pointers.append(f.tell())
                sizes.append(len(seq))
                f.write(np.asarray(seq, dtype=dtype).tobytes())
            doc_idx.append(len(sizes))
    with open(str(prefix) + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(np.asarray(sizes, dtype="<i4").tobytes())
        f.write(np.asarray(pointers, dtype="<i8").tobytes())
        f.write(np.asarray(doc_idx, dtype="<i8").tobytes())
        if modes:
            f.write(np.zeros(len(sizes), dtype=np.int8).tobytes())


def _docs(tok_path: Path, n: int = 40) -> List[List[int]]:
    from data.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_path)
    return [tok.encode(paragraph(i), add_special_tokens=False).ids for i in range(n)]


def test_megatron_index_read_back_token_for_token(tmp_path):
    rng = np.random.default_rng(0)
    docs = []
    for d in range(30):
        n_seq = int(rng.integers(1, 4))
        docs.append([rng.integers(0, 60000, int(rng.integers(1, 50))).tolist() for _ in range(n_seq)])
    docs.append([[5, 6], []])  # an empty sentence inside a document
    write_mmidx(tmp_path / "c", docs, modes=True)
    for name in ("c", "c.bin", "c.idx"):
        x = IndexedTokens(tmp_path / name)
        assert x.dtype == np.uint16 and x.num_documents == len(docs)
        for d, doc in enumerate(docs):
            assert x.document(d).tolist() == [t for seq in doc for t in seq]
    # int32 ids
    write_mmidx(tmp_path / "w", [[[70000, 1]], [[2]]], dtype=np.int32, code=4)
    assert [IndexedTokens(tmp_path / "w").document(d).tolist() for d in range(2)] == [[70000, 1], [2]]


def test_megatron_index_errors_are_one_line(tmp_path):
    write_mmidx(tmp_path / "c", [[[1, 2, 3]], [[4]]])
    idx = tmp_path / "c.idx"
    raw = idx.read_bytes()
    cases = {
        b"XXIDIDX\x00\x00" + raw[9:]: "not a Megatron MMIDIDX index",
        raw[:9] + struct.pack("<Q", 2) + raw[17:]: "version 2",
        raw[:17] + struct.pack("<B", 6) + raw[18:]: "dtype code 6",
        raw[:-3]: "truncated or damaged",
    }
    for content, message in cases.items():
        idx.write_bytes(content)
        with pytest.raises(DataError, match=message) as e:
            IndexedTokens(tmp_path / "c")
        assert "\n" not in str(e.value)
    idx.write_bytes(raw)
    (tmp_path / "c.bin").write_bytes(b"\0\0")
    with pytest.raises(DataError, match="points past its end"):
        IndexedTokens(tmp_path / "c")
    with pytest.raises(DataError, match="not found"):
        IndexedTokens(tmp_path / "missing")


def _check_prepared(out: Path, docs: List[List[int]], eod: int):
    meta = read_metadata(out)
    got = {}
    for split in meta["splits"]:
        shards = TokenShards(out, split)
        ids = shards.window(0, len(shards)).tolist()
        starts = np.asarray(shards.doc_starts).tolist() + [len(ids)]
        got[split] = [ids[a:b] for a, b in zip(starts, starts[1:])]
    # every document comes back once, with one end-of-document id, in source order within its split
    flat = sorted(map(tuple, got["train"] + got["validation"]))
    expected = sorted(tuple(d if d and d[-1] == eod else d + [eod]) for d in docs)
    assert flat == expected
    with_eod = [d if d[-1] == eod else d + [eod] for d in docs]
    for split in ("train", "validation"):
        mine = set(map(tuple, got[split]))
        assert got[split] == [d for d in with_eod if tuple(d) in mine]
    assert got["validation"]
    return meta


def test_prepare_megatron_and_inspect(tmp_path, prepared_dir, capsys):
    tok = prepared_dir / "tokenizer.json"
    docs = _docs(tok)
    eod = read_metadata(prepared_dir)["eod_id"]
    docs[3] = docs[3] + [eod]  # a document that already ends with the end-of-document id keeps one
    # two sentences per document for half of them
    write_mmidx(
        tmp_path / "corpus", [[d[: len(d) // 2], d[len(d) // 2 :]] if i % 2 else [d] for i, d in enumerate(docs)]
    )
    cfg = write_data_config(
        tmp_path / "m.yaml",
        source={"kind": "megatron", "paths": [str(tmp_path / "corpus")]},
        tokenizer={"path": str(tok)},
        out_dir=str(tmp_path / "out"),
        shard_tokens=500,
    )
    code, out, err = run_cli(capsys, ["data", "prepare", str(cfg)])
    assert code == 0, err
    meta = _check_prepared(tmp_path / "out", docs, eod)
    assert meta["source"]["kind"] == "megatron" and meta["bytes"] == 0
    assert meta["tokenizer_sha256"] == read_metadata(prepared_dir)["tokenizer_sha256"]
    # up to date on a second run
    code, out, err = run_cli(capsys, ["data", "prepare", str(cfg)])
    assert code == 0 and "up to date" in out

    code, out, err = run_cli(capsys, ["data", "inspect", str(tmp_path / "corpus.idx"), "--tokenizer", str(tok)])
    assert code == 0, err
    assert "Megatron MMIDIDX v1, dtype uint16" in out and f"documents:  {len(docs)}" in out
    assert paragraph(0)[:30] in out
    code, out, err = run_cli(capsys, ["data", "inspect", str(tmp_path / "out")])
    assert code == 0 and "megatron" in out

    # a tokenizer is required, and ids must fit its vocabulary
    code, out, err = run_cli(capsys, ["data", "prepare", str(cfg), "tokenizer.path=null", f"out_dir={tmp_path}/o2"])
    assert code != 0 and "tokenizer.path" in err.strip().splitlines()[-1]
    write_mmidx(tmp_path / "big", [[[1, 2]], [[9999]], [[3]]])
    code, out, err = run_cli(
        capsys, ["data", "prepare", str(cfg), f"source.paths=[{tmp_path}/big]", f"out_dir={tmp_path}/o3"]
    )
    assert code != 0 and "9999" in err and "vocabulary" in err
    assert not (tmp_path / "o3").exists()


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet", "jsonl"])
def test_prepare_hf_token_ids(tmp_path, prepared_dir, capsys, layout):
    import datasets

    tok = prepared_dir / "tokenizer.json"
    docs = _docs(tok, 30)
    eod = read_metadata(prepared_dir)["eod_id"]
    ds = datasets.Dataset.from_dict({"input_ids": docs, "n": list(range(len(docs)))})
    if layout == "save_to_disk":
        path = tmp_path / "saved"
        ds.save_to_disk(str(path))
    elif layout == "parquet":
        path = tmp_path / "ids.parquet"
        ds.to_parquet(str(path))
    else:
        path = tmp_path / "ids.jsonl"
        path.write_text("".join(json.dumps({"input_ids": d}) + "\n" for d in docs))
    assert [d.tolist() for d in TokenSource({"kind": "hf_tokens", "paths": [str(path)]}).token_documents()] == docs
    cfg = write_data_config(
        tmp_path / "h.yaml",
        source={"kind": "hf_tokens", "paths": [str(path)]},
        tokenizer={"path": str(tok)},
        out_dir=str(tmp_path / "out"),
    )
    code, out, err = run_cli(capsys, ["data", "prepare", str(cfg)])
    assert code == 0, err
    _check_prepared(tmp_path / "out", docs, eod)
    code, out, err = run_cli(capsys, ["data", "inspect", str(path)])
    assert code == 0, err
    assert "column 'input_ids'" in out and f"documents:  {len(docs)}" in out
    code, out, err = run_cli(capsys, ["data", "prepare", str(cfg), "source.ids_field=ids", f"out_dir={tmp_path}/o2"])
    assert code != 0 and "no column 'ids'" in err


def test_train_a_few_steps_on_megatron(tmp_path, prepared_dir):
    from tests.helpers import experiment, run_lm

    tok = prepared_dir / "tokenizer.json"
    docs = _docs(tok, 60)
    write_mmidx(tmp_path / "corpus", [[d] for d in docs])
    data = {
        "name": "mega",
        "out_dir": str(tmp_path / "mega"),
        "source": {"kind": "megatron", "paths": [str(tmp_path / "corpus")]},
        "tokenizer": {"path": str(tok)},
        "validation_fraction": 0.1,
        "num_proc": 1,
    }
    path = experiment(
        tmp_path,
        tmp_path / "mega",
        data=data,
        train={"max_steps": 3, "seq_len": 32, "micro_batch_size": 2, "val_every_n_steps": 3, "val_batches": 2},
    )
    run_lm("train", str(path), timeout=300)
    from lm.training.checkpoint import latest_complete, read_manifest

    assert read_manifest(latest_complete(tmp_path / "exp" / "checkpoints"))["step"] == 3
    assert read_metadata(tmp_path / "mega")["source"]["kind"] == "megatron"
