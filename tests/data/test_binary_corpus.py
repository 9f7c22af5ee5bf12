"""A binary file given as a text corpus fails with one line naming the file and its share of invalid
UTF-8 bytes (above ``source.max_invalid_utf8``, default 1%); a few invalid bytes are replaced."""

from __future__ import annotations

import random

import pytest

from data.sources import ReadStats, open_source
from lm.config.loader import load_data_config
from lm.errors import ConfigError, DataError


def _binary(path):
    path.write_bytes(random.Random(0).randbytes(20_000))
    return path


def test_binary_file_fails_above_the_default_threshold(tmp_path):
    binary = _binary(tmp_path / "blob.bin")
    cfg = load_data_config("text", [f"source.paths=[{binary}]"])
    assert cfg.source.max_invalid_utf8 == 0.01
    with pytest.raises(DataError) as e:
        list(open_source(cfg.source).documents(ReadStats()))
    message = str(e.value)
    assert message.startswith(f"{binary}: ") and "of its bytes are invalid UTF-8" in message
    assert "source.max_invalid_utf8=0.01" in message and "\n" not in message
    share = float(message.split(": ")[1].split("%")[0])
    assert 30 < share <= 100


def test_few_invalid_bytes_are_replaced_and_the_limit_can_be_raised(tmp_path):
    text = tmp_path / "mostly.txt"
    text.write_bytes(b"plain text " * 500 + b"\xff\xfe" + b" more text")
    stats = ReadStats()
    docs = list(open_source({"kind": "text", "paths": [str(text)], "max_invalid_utf8": 0.01}).documents(stats))
    assert stats.replaced == 2 and "\ufffd" in docs[0].text  # \xff and \xfe: two invalid sequences
    binary = _binary(tmp_path / "blob.bin")
    docs = list(open_source({"kind": "text", "paths": [str(binary)], "max_invalid_utf8": 1.0}).documents(ReadStats()))
    assert docs and "\ufffd" in docs[0].text
    with pytest.raises(ConfigError, match="max_invalid_utf8: must be in"):
        load_data_config("text", ["source.max_invalid_utf8=2"])


def test_default_stdlib_corpus_reads_past_its_legacy_encoded_modules():
    """``make demo``'s corpus: the standard library's KOI8-R / Latin-1 test modules are replaced, not fatal."""
    cfg = load_data_config("stdlib", [])
    stats = ReadStats()
    n = sum(1 for _ in open_source(cfg.source).documents(stats))
    assert n > 500 and stats.replaced > 0
