"""Fixtures for the data tests: tiny corpora, a prepared directory, and a CLI runner."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Tuple

import pytest

#: tinyshakespeare lives in ../shared/data next to the repository
SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared/data/tinyshakespeare.txt"

WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
    "sigma tau upsilon phi chi psi omega"
).split()


def paragraph(i: int, n_words: int = 40) -> str:
    """A deterministic pseudo-random paragraph (document ``i``)."""
    out = []
    x = i * 7919 + 17
    for _ in range(n_words):
        x = (x * 1103515245 + 12345) % (1 << 31)
        out.append(WORDS[x % len(WORDS)])
    return f"doc {i}: " + " ".join(out) + "."


@pytest.fixture
def text_corpus(tmp_path) -> Path:
    """One text file of 60 blank-line separated paragraphs (about 20 KB)."""
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraph(i) for i in range(60)) + "\n", encoding="utf-8")
    return path


def write_data_config(path: Path, **sections) -> Path:
    """A data-config YAML (JSON is valid YAML) with ``sections`` merged over small defaults."""
    cfg = {
        "name": "tiny",
        "source": {"kind": "text", "paths": [], "split_by": "blank_line"},
        "tokenizer": {"vocab_size": 300, "min_frequency": 2},
        "validation_fraction": 0.1,
        "num_proc": 2,
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return path


def run_cli(capsys, args: List[str]) -> Tuple[int, str, str]:
    """Run ``lm <args>`` in-process; returns (exit code, stdout, stderr)."""
    from lm.cli.main import main

    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory) -> Path:
    """A prepared directory: 60 paragraphs, vocab 300, shards of 1000 tokens (several per split)."""
    from lm.config.loader import load_data_config
    from data.prepare import prepare

    root = tmp_path_factory.mktemp("prepared")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(paragraph(i) for i in range(60)) + "\n", encoding="utf-8")
    cfg_path = write_data_config(
        root / "tiny.yaml", source={"paths": [str(corpus)]}, out_dir=str(root / "out"), shard_tokens=1000
    )
    prepare(load_data_config(str(cfg_path)), echo=lambda s: None, progress=False)
    return root / "out"
