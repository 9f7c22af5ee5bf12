"""A user's own corpus (issue 15): WikiText-style article splitting (``split_by: regex``), HF
``datasets`` builders on local files (``kind: hf`` with ``paths``, never the current directory),
and ``data=<prepared corpus>`` read back from its ``metadata.json``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from data.sources import ReadStats, open_source
from lm.config import load_experiment
from lm.config.schema import SourceConfig
from lm.errors import ConfigError, DataError

WIKI = (
    " = Alpha = \n\n Alpha is a letter . \n\n = = Use = = \n\n It starts words . \n\n"
    " = Beta = \n\n Beta follows alpha . \n\n = = = History = = = \n\n Old . \n"
)


def texts(cfg):
    return [d.text for d in open_source(cfg).documents(ReadStats())]


def test_regex_split_keeps_section_headings_inside_their_article(tmp_path):
    path = tmp_path / "wiki.txt"
    path.write_text(WIKI, encoding="utf-8")
    docs = texts({"kind": "text", "paths": [str(path)], "split_by": "regex", "split_regex": SourceConfig().split_regex})
    assert len(docs) == 2
    assert docs[0].startswith(" = Alpha = ") and " = = Use = = " in docs[0]
    assert docs[1].startswith(" = Beta = ") and " = = = History = = = " in docs[1]
    # blank_line, by contrast, makes every heading its own document
    assert " = = Use = = " in texts({"kind": "text", "paths": [str(path)], "split_by": "blank_line"})
    # any regex: a document starts at each match
    custom = texts({"kind": "text", "paths": [str(path)], "split_by": "regex", "split_regex": r"(?m)^(?= = = )"})
    assert len(custom) == 3
    with pytest.raises(ConfigError, match="data.source.split_regex: invalid regular expression"):
        load_experiment(None, ["data.source.kind=text", "data.source.split_by=regex", "data.source.split_regex=(oops"])


@pytest.mark.parametrize("builder,suffix", [("parquet", "parquet"), ("json", "jsonl")])
def test_hf_builder_reads_exactly_the_given_local_files(tmp_path, monkeypatch, builder, suffix):
    import datasets

    rows = [{"text": f"document {i} " * 3} for i in range(5)]
    path = tmp_path / "files" / f"x.{suffix}"
    path.parent.mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(path)) if builder == "parquet" else path.write_text(
        "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8"
    )
    # the current directory holds a file the builder would choke on if it scanned it
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "doc_starts.npy").write_bytes(b"\x93NUMPY garbage")
    monkeypatch.chdir(cwd)
    source = open_source({"kind": "hf", "hf_name": builder, "paths": [str(path)], "text_field": "text"})
    assert source.files() == [path]
    stats = ReadStats()
    assert [d.text for d in source.documents(stats)] == [r["text"] for r in rows]
    assert stats.files == 1 and source.describe()["paths"] == [str(path)]
    with pytest.raises(DataError, match="source.paths: file not found"):
        open_source({"kind": "hf", "hf_name": builder, "paths": [str(tmp_path / "missing.parquet")]}).files()


def test_data_names_a_prepared_corpus(tmp_path, monkeypatch, tiny_data):
    # by directory
    cfg = load_experiment(None, [f"data={tiny_data}", "model=gla/tiny"])
    assert cfg.data.out_dir == str(tiny_data) and cfg.data.name == "stdlib-tiny"
    assert cfg.data.tokenizer.vocab_size == 512 and cfg.data.source.max_bytes == 400_000
    # by name under artifacts/data (relative to the working directory)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "artifacts" / "data").mkdir(parents=True)
    os.symlink(tiny_data, tmp_path / "artifacts" / "data" / "mine")
    cfg = load_experiment(None, ["data=mine", "train.max_steps=3"])
    assert cfg.data.out_dir == str(Path("artifacts") / "data" / "mine") and cfg.data.source.kind == "stdlib"
    # a data config file of that name wins; an unknown name says where corpora are looked for
    assert load_experiment(None, ["data=stdlib"]).data.out_dir == "artifacts/data/stdlib"
    with pytest.raises(ConfigError, match=r"unknown data config 'nothere'.*prepared corpus"):
        load_experiment(None, ["data=nothere"])
