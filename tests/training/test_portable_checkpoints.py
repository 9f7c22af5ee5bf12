"""A checkpoint is read from any working directory: a run trained with relative ``run_dir`` and
``data.out_dir`` is evaluated and sampled from elsewhere (the manifest records absolute paths), and
still has its tokenizer after the prepared data directory is gone (the run's ``tokenizer.json``)."""

from __future__ import annotations

import hashlib
import json
import shutil

import yaml

from lm.training.checkpoint import latest_complete, read_manifest
from tests.helpers import experiment
from tests.training.test_run_safety import cli


def test_relative_paths_and_a_moved_corpus(capsys, tmp_path, tiny_data, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(tiny_data, work / "data-tiny")
    elsewhere.mkdir()
    path = experiment(work, tiny_data, train={"max_steps": 2, "val_every_n_steps": 0, "sample_tokens": 0})
    body = yaml.safe_load(path.read_text())
    body["run_dir"], body["data"]["out_dir"] = "runs/exp", "data-tiny"  # relative to the training cwd
    path.write_text(yaml.safe_dump(body))
    monkeypatch.chdir(work)
    code, _, err = cli(capsys, "train", str(path))
    assert code == 0, err[-3000:]
    run = work / "runs" / "exp"
    manifest = read_manifest(latest_complete(run / "checkpoints"))
    assert manifest["tokenizer"]["path"].startswith("/") and manifest["data_dir"] == str(work / "data-tiny")
    copy = run / "tokenizer.json"
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == manifest["tokenizer"]["sha256"]

    monkeypatch.chdir(elsewhere)  # the config's relative out_dir means nothing here
    out = elsewhere / "ppl"
    code, _, err = cli(capsys, "eval", "ppl", str(run), "--max-tokens", "2000", "--out", str(out))
    assert code == 0, err[-3000:]
    assert json.loads((out / "ppl.json").read_text())["tokens"] > 0

    shutil.move(str(work / "data-tiny"), str(tmp_path / "moved"))  # the corpus (and its tokenizer) is gone
    code, _, err = cli(capsys, "generate", str(run), "-p", "def ", "--max-new-tokens", "4", "--temperature", "0")
    assert code == 0, err[-3000:]
