"""Source readers: every kind, blank-line splitting, caps, UTF-8 handling, bad paths and fields."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

from lm.errors import DataError
from data.sources import ReadStats, open_source, stdlib_files

from tests.data.conftest import SHAKESPEARE


def texts(cfg, stats=None):
    return [d.text for d in open_source(cfg).documents(stats)]


def test_text_one_document_per_file(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n")
    (tmp_path / "a.txt").write_text("first file\n\nstill first\n")
    (tmp_path / "empty.txt").write_text("  \n\n")
    docs = texts({"kind": "text", "paths": [str(tmp_path / "*.txt")]})
    assert docs == ["first file\n\nstill first\n", "second file\n"]  # sorted glob, empty dropped


def test_text_blank_line_blocks(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("one\nline two\n\n\n  \nthree\n \t\nfour\n")
    docs = texts({"kind": "text", "paths": [str(p)], "split_by": "blank_line"})
    assert docs == ["one\nline two", "three", "four\n"]


def test_text_directory_and_order_of_patterns(tmp_path):
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "z.txt").write_text("z")
    (d / "sub" / "a.txt").write_text("a")
    (d / ".hidden").write_text("hidden")
    extra = tmp_path / "x.txt"
    extra.write_text("x")
    src = open_source({"kind": "text", "paths": [str(extra), str(d), str(extra)]})
    assert [p.name for p in src.files()] == ["x.txt", "a.txt", "z.txt"]


def test_caps_keep_the_first_documents(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("\n\n".join(f"block {i}" for i in range(10)))  # each block is 7 bytes
    base = {"kind": "text", "paths": [str(p)], "split_by": "blank_line"}
    assert texts({**base, "max_documents": 3}) == ["block 0", "block 1", "block 2"]
    stats = ReadStats()
    assert texts({**base, "max_bytes": 20}, stats) == ["block 0", "block 1"]
    assert (stats.documents, stats.bytes) == (2, 14)


def test_invalid_utf8_replace_counts_and_fail_names_file(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"ok \xff\xfe text \xc3 end \xe2\x82\xac")  # 3 invalid sequences, 1 valid euro
    stats = ReadStats()
    (doc,) = texts({"kind": "text", "paths": [str(p)]}, stats)
    assert doc == "ok \ufffd\ufffd text \ufffd end \u20ac"
    assert stats.replaced == 3
    with pytest.raises(DataError, match=r"bad\.txt: invalid UTF-8 at byte 3"):
        texts({"kind": "text", "paths": [str(p)], "encoding_errors": "fail"})


@pytest.mark.parametrize(
    "paths, message",
    [
        (["/nonexistent/file.txt"], "file not found: /nonexistent/file.txt"),
        (["/nonexistent/*.txt"], "'/nonexistent/\\*.txt' matches no files"),
        ([], "source.paths: no files given"),
    ],
)
def test_missing_paths(paths, message):
    with pytest.raises(DataError, match=message):
        open_source({"kind": "text", "paths": paths}).files()


def test_stdlib_lists_sorted_py_files_without_site_packages():
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [p.relative_to(root).as_posix() for p in files]
    assert len(files) > 500 and all(r.endswith(".py") for r in rel)
    assert rel == sorted(rel)
    assert not any("site-packages" in r or "dist-packages" in r for r in rel)
    assert "os.py" in rel and "json/__init__.py" in rel
    stats = ReadStats()
    docs = texts({"kind": "stdlib", "max_bytes": 200_000}, stats)
    assert 0 < stats.bytes <= 200_000 and len(docs) == stats.documents
    first = next(p for p in files if p.read_bytes().strip())
    assert docs[0] == first.read_text(encoding="utf-8")


def _rows(n):
    return [{"text": f"row {i} text", "id": i} for i in range(n)]


def test_jsonl_json_csv_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows(4)
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "b.json").write_text(json.dumps(rows))
    (tmp_path / "c.csv").write_text("id,text\n" + "".join(f"{r['id']},{r['text']}\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    expected = [r["text"] for r in rows]
    for kind, name in (("jsonl", "a.jsonl"), ("json", "b.json"), ("csv", "c.csv"), ("parquet", "d.parquet")):
        assert texts({"kind": kind, "paths": [str(tmp_path / name)]}) == expected, kind
    both = texts({"kind": "jsonl", "paths": [str(tmp_path / "a.jsonl")] * 2})
    assert both == expected  # the same file is read once


def test_jsonl_missing_field_names_file_field_and_columns(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"body": "hello", "id": 1}) + "\n")
    with pytest.raises(
        DataError,
        match=r"x\.jsonl: no field 'text' \(source\.text_field\); "
        r"columns: body, id",
    ):
        texts({"kind": "jsonl", "paths": [str(p)]})
    assert texts({"kind": "jsonl", "paths": [str(p)], "text_field": "body"}) == ["hello"]


def test_non_text_value_names_its_row_in_the_file(tmp_path):
    """Rows are counted across the reader's batches of 1024: the bad row is named by its index."""
    p = tmp_path / "long.jsonl"
    rows = [{"text": f"doc {i}"} for i in range(1100)]
    rows[1050] = {"text": 7}
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=r"long\.jsonl: row 1050: field 'text' holds int, expected text"):
        texts({"kind": "jsonl", "paths": [str(p)]})


def test_hf_hub_offline_is_one_line_error(monkeypatch):
    import datasets.config

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(DataError) as info:
        texts({"kind": "hf", "hf_name": "surely-not-cached/xyz-corpus", "hf_split": "train"})
    msg = str(info.value)
    assert "cannot load HF dataset 'surely-not-cached/xyz-corpus'" in msg and "offline" in msg
    assert "\n" not in msg


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} not present")
def test_tinyshakespeare_blocks():
    stats = ReadStats()
    docs = texts({"kind": "text", "paths": [str(SHAKESPEARE)], "split_by": "blank_line"}, stats)
    assert len(docs) > 5000 and docs[0].startswith("First Citizen:")
    assert stats.replaced == 0 and stats.files == 1
