"""`lm data prepare` / `lm data inspect` end to end: output, metadata, idempotence, atomicity, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import lm
from lm.errors import DataError
from data.shards import TokenShards, check_compatible, read_metadata
from data.tokenizer import load_tokenizer, tokenizer_sha256

from tests.data.conftest import SHAKESPEARE, paragraph, run_cli, write_data_config


def leftovers(parent: Path):
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_prepare_end_to_end_and_metadata(tmp_path, text_corpus, capsys):
    cfg = write_data_config(tmp_path / "d.yaml", source={"paths": [str(text_corpus)]})
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, ["data", "prepare", str(cfg), f"out_dir={out}", "tokenizer.vocab_size=320"])
    assert code == 0, err
    assert f"prepared {out}" in stdout and "train" in stdout and "validation" in stdout
    meta = read_metadata(out)
    assert meta["version"] == lm.__version__ and meta["created"]
    assert meta["vocab_size"] == 320 and meta["dtype"] == "uint16"
    assert (meta["eod_id"], meta["pad_id"]) == (0, 1)
    assert meta["tokenizer_sha256"] == tokenizer_sha256(out / "tokenizer.json")
    assert meta["source"] == {
        "kind": "text",
        "paths": [str(text_corpus)],
        "split_by": "blank_line",
        "files": 1,
        "files_read": 1,
    }
    assert meta["invalid_utf8_replaced"] == 0 and meta["config"]["tokenizer"]["vocab_size"] == 320
    assert len(meta["fingerprint"]) == 64
    splits = meta["splits"]
    assert set(splits) == {"train", "validation"}
    assert splits["train"]["documents"] + splits["validation"]["documents"] == 60
    assert splits["validation"]["documents"] >= 1
    expected_bytes = sum(len(paragraph(i).encode()) for i in range(60)) + 1  # last block keeps "\n"
    assert splits["train"]["bytes"] + splits["validation"]["bytes"] == expected_bytes

    # the shards decode back to exactly the documents, each followed by one end-of-document id
    tok = load_tokenizer(out / "tokenizer.json")
    docs = []
    for split in ("train", "validation"):
        shards = TokenShards(out, split)
        s = splits[split]
        assert len(shards) == s["tokens"] and shards.num_documents == s["documents"]
        assert s["bytes_per_token"] == pytest.approx(s["bytes"] / s["tokens"])
        ids = shards.window(0, len(shards))
        starts = np.asarray(shards.doc_starts).tolist()
        ends = starts[1:] + [len(ids)]
        assert (ids == 0).sum() == s["documents"] and ids[-1] == 0
        for a, b in zip(starts, ends):
            assert ids[b - 1] == 0
            docs.append(tok.decode(ids[a : b - 1].tolist()))
    assert sorted(d.rstrip("\n") for d in docs) == sorted(paragraph(i) for i in range(60))


def test_idempotent_and_force(tmp_path, text_corpus, capsys):
    cfg = write_data_config(tmp_path / "d.yaml", source={"paths": [str(text_corpus)]}, out_dir=str(tmp_path / "out"))
    assert run_cli(capsys, ["data", "prepare", str(cfg)])[0] == 0
    created = read_metadata(tmp_path / "out")["created"]
    sha = read_metadata(tmp_path / "out")["tokenizer_sha256"]
    code, stdout, _ = run_cli(capsys, ["data", "prepare", str(cfg)])
    assert code == 0 and "up to date" in stdout
    # performance knobs are not part of the fingerprint
    code, stdout, _ = run_cli(capsys, ["data", "prepare", str(cfg), "num_proc=1", "batch_size=7"])
    assert "up to date" in stdout
    code, stdout, _ = run_cli(capsys, ["data", "prepare", str(cfg), "num_proc=1", "--force"])
    assert code == 0 and "prepared" in stdout
    meta = read_metadata(tmp_path / "out")
    assert meta["encode"]["workers"] == 1 and meta["tokenizer_sha256"] == sha  # same result
    # a changed source file or config key rebuilds
    text_corpus.write_text(text_corpus.read_text() + "\n\nanother paragraph here\n")
    code, stdout, _ = run_cli(capsys, ["data", "prepare", str(cfg)])
    assert "prepared" in stdout
    code, stdout, _ = run_cli(capsys, ["data", "prepare", str(cfg), "split_seed=99"])
    assert "prepared" in stdout and read_metadata(tmp_path / "out")["config"]["split_seed"] == 99
    assert leftovers(tmp_path) == []
    assert created  # (timestamps may be equal within a second; fingerprints decide)


@pytest.mark.parametrize("exc", [RuntimeError("injected failure"), KeyboardInterrupt()])
def test_failure_midway_leaves_nothing(tmp_path, text_corpus, monkeypatch, exc):
    import data.shards

    def boom(self):
        raise exc

    monkeypatch.setattr(data.shards.SplitWriter, "close", boom)
    cfg = write_data_config(tmp_path / "d.yaml", source={"paths": [str(text_corpus)]}, out_dir=str(tmp_path / "out"))
    from lm.config.loader import load_data_config
    from data.prepare import prepare

    with pytest.raises(type(exc)):
        prepare(load_data_config(str(cfg)), echo=lambda s: None)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_failure_during_rebuild_keeps_old_output(tmp_path, text_corpus, monkeypatch):
    import data.prepare
    from lm.config.loader import load_data_config

    cfg = load_data_config(
        str(write_data_config(tmp_path / "d.yaml", source={"paths": [str(text_corpus)]}, out_dir=str(tmp_path / "out")))
    )
    data.prepare.prepare(cfg, echo=lambda s: None)
    before = read_metadata(tmp_path / "out")

    def boom(*a, **k):
        raise RuntimeError("encoder died")

    monkeypatch.setattr(data.prepare, "encode_to_shards", boom)
    with pytest.raises(RuntimeError):
        data.prepare.prepare(cfg, force=True, echo=lambda s: None)
    assert read_metadata(tmp_path / "out") == before and leftovers(tmp_path) == []


def test_inspect_output(prepared_dir, capsys):
    code, stdout, err = run_cli(capsys, ["data", "inspect", str(prepared_dir), "--tokens", "40"])
    assert code == 0, err
    meta = read_metadata(prepared_dir)
    assert meta["tokenizer_sha256"] in stdout and "uint16" in stdout and "bytes/token" in stdout
    for split in ("train", "validation"):
        assert f"{meta['splits'][split]['tokens']:,}" in stdout
    assert "sample: first 40 tokens of validation" in stdout and "doc " in stdout


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} not present")
def test_prepare_tinyshakespeare_via_overrides(tmp_path, capsys):
    out = tmp_path / "shakespeare"
    code, stdout, err = run_cli(
        capsys,
        [
            "data",
            "prepare",
            "text",
            f"source.paths=[{SHAKESPEARE}]",
            "source.max_bytes=300000",
            "tokenizer.vocab_size=512",
            f"out_dir={out}",
            "name=shakespeare",
        ],
    )
    assert code == 0, err
    meta = read_metadata(out)
    assert meta["name"] == "shakespeare" and meta["bytes"] <= 300_000
    assert 1.5 < meta["splits"]["validation"]["bytes_per_token"] < 4.0


def test_existing_tokenizer_path_and_check_compatible(tmp_path, prepared_dir, text_corpus, capsys):
    tok_path = prepared_dir / "tokenizer.json"
    cfg = write_data_config(
        tmp_path / "d.yaml",
        source={"paths": [str(text_corpus)]},
        tokenizer={"path": str(tok_path)},
        out_dir=str(tmp_path / "out"),
    )
    code, _, err = run_cli(capsys, ["data", "prepare", str(cfg)])
    assert code == 0, err
    meta = read_metadata(tmp_path / "out")
    assert meta["tokenizer"]["trained"] is False
    assert meta["tokenizer_sha256"] == tokenizer_sha256(tok_path)
    assert check_compatible(tmp_path / "out", tok_path, vocab_size=300)["vocab_size"] == 300
    check_compatible(tmp_path / "out", meta["tokenizer_sha256"])


def test_check_compatible_mismatches(tmp_path, prepared_dir):
    from data.datamodule import TokenDataModule
    from data.tokenizer import train_tokenizer

    other = tmp_path / "other.json"
    train_tokenizer([paragraph(i) for i in range(30)], 290, 2, ["<|endoftext|>", "<|pad|>"]).save(str(other))
    with pytest.raises(DataError, match="shards were tokenized with tokenizer sha256"):
        check_compatible(prepared_dir, other)
    with pytest.raises(DataError, match="shards have vocab size 300, expected 512"):
        check_compatible(prepared_dir, prepared_dir / "tokenizer.json", vocab_size=512)
    with pytest.raises(DataError, match="shards were tokenized"):
        TokenDataModule(prepared_dir, 16, 2, seed=0, expected_tokenizer_hash="0" * 64)
    dm = TokenDataModule(
        prepared_dir, 16, 2, seed=0, expected_tokenizer_hash=tokenizer_sha256(prepared_dir / "tokenizer.json")
    )
    assert dm.vocab_size == 300


def _bad_inputs(tmp_path: Path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(paragraph(i) for i in range(20)))
    bad_utf8 = tmp_path / "bad.txt"
    bad_utf8.write_bytes(b"fine text\n\nbroken \xff here\n")
    blank = tmp_path / "blank.txt"
    blank.write_text("   \n\n \n")
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(json.dumps({"content": "x"}) + "\n")
    return [
        ([f"source.paths=[{tmp_path}/missing.txt]"], "source.paths: file not found"),
        ([f"source.paths=[{tmp_path}/*.md]"], "matches no files"),
        ([f"source.paths=[{blank}]"], "empty corpus"),
        ([f"source.paths=[{corpus}]", "source.max_bytes=10"], "empty corpus"),
        ([f"source.paths=[{bad_utf8}]", "source.encoding_errors=fail"], "bad.txt: invalid UTF-8 at byte 18"),
        ([f"source.paths=[{jsonl}]", "source.kind=jsonl"], "rows.jsonl: no field 'text'"),
        ([f"source.paths=[{corpus}]", "source.kind=yaml"], "data.source.kind: invalid value 'yaml'"),
        ([f"source.paths=[{corpus}]", "tokenizer.vocab_size=100"], "tokenizer.vocab_size: must be at least 258"),
        ([f"source.paths=[{corpus}]", "source.split_by=file"], "corpus has 1 document"),
        ([f"source.paths=[{corpus}]", f"tokenizer.path={tmp_path}/none.json"], "tokenizer file not found"),
    ]


def test_bad_inputs_exit_2_with_one_line_and_no_output(tmp_path, capsys):
    cfg = write_data_config(tmp_path / "d.yaml", out_dir=str(tmp_path / "out"))
    for overrides, message in _bad_inputs(tmp_path):
        code, stdout, err = run_cli(capsys, ["data", "prepare", str(cfg), *overrides])
        assert code == 2, (overrides, stdout, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (overrides, err)
        assert not (tmp_path / "out").exists() and leftovers(tmp_path) == [], overrides


def test_cli_errors_for_config_and_inspect(tmp_path, capsys):
    code, _, err = run_cli(capsys, ["data", "prepare", "no-such-config"])
    assert code == 2 and "unknown data config 'no-such-config'" in err
    code, _, err = run_cli(capsys, ["data", "prepare", "stdlib", "tokenizer.vocab_sise=3"])
    assert code == 2 and "unknown key 'data.tokenizer.vocab_sise'" in err
    code, _, err = run_cli(capsys, ["data", "inspect", str(tmp_path / "nothing")])
    assert code == 2 and "data directory not found" in err
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("mine")
    cfg = write_data_config(tmp_path / "d.yaml", out_dir=str(tmp_path / "plain"))
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(paragraph(i) for i in range(20)))
    code, _, err = run_cli(capsys, ["data", "prepare", str(cfg), f"source.paths=[{corpus}]"])
    assert code == 2 and "is not a prepared data directory" in err
    assert (tmp_path / "plain" / "notes.txt").read_text() == "mine"


def test_shipped_configs_load():
    from lm.config.loader import load_data_config

    for name in ("stdlib", "stdlib-small", "text", "jsonl"):
        cfg = load_data_config(name)
        assert cfg.out_dir == f"artifacts/data/{cfg.name}"
    assert load_data_config("stdlib").tokenizer.vocab_size == 8192
    assert load_data_config("stdlib-small").source.max_bytes <= 8_000_000


def test_bench_runs_and_prints_table(text_corpus, capsys):
    from data.bench import main as bench

    bench(["--text", str(text_corpus), "--mb", "0.05", "--vocab", "300", "--repeat", "1", "--workers", "2"])
    out = capsys.readouterr().out
    assert "baseline: encode_batch, 1 process, Rust threads on" in out
    assert "prepare path, 2 processes: encode+pack+write" in out
    assert "packing/writing overhead, 2 processes:" in out


def test_prepare_jsonl_and_capped_stdlib_by_config_name(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": paragraph(i), "n": i}) + "\n" for i in range(40)))
    code, stdout, err = run_cli(
        capsys,
        [
            "data",
            "prepare",
            "jsonl",
            f"source.paths=[{rows}]",
            f"out_dir={tmp_path / 'j'}",
            "tokenizer.vocab_size=300",
            "validation_fraction=0.1",
        ],
    )
    assert code == 0, err
    meta = read_metadata(tmp_path / "j")
    assert meta["documents"] == 40 and meta["source"]["kind"] == "jsonl"
    code, stdout, err = run_cli(
        capsys,
        [
            "data",
            "prepare",
            "stdlib-small",
            "source.max_bytes=200000",
            f"out_dir={tmp_path / 's'}",
            "tokenizer.vocab_size=400",
        ],
    )
    assert code == 0, err
    meta = read_metadata(tmp_path / "s")
    assert meta["source"]["kind"] == "stdlib" and 0 < meta["bytes"] <= 200_000
    assert meta["source"]["files_read"] < meta["source"]["files"]
    assert meta["splits"]["validation"]["documents"] >= 1
