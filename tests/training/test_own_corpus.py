"""A user's own corpus, start to finish (issue 15): metrics of one step per metrics.csv row, the
thread setting, the vocabulary from the data, the small-validation warning, the sample prompt
from the corpus, the resume notice for a new max_steps with the earlier config kept, probe
reports under the run, export file modes."""

from __future__ import annotations

import csv
import math
import os
import stat
from pathlib import Path

import pytest
import torch
import yaml

from lm.config import load_experiment
from lm.training.trainer import train
from tests.helpers import experiment, run_lm


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_data):
    """A tiny run of 4 steps (metrics every 3 steps), resumed to 6 with a new train.max_steps."""
    tmp = tmp_path_factory.mktemp("own")
    path = experiment(
        tmp,
        tiny_data,
        train={"max_steps": 4, "log_every_n_steps": 3, "val_every_n_steps": 0, "sample_tokens": 8, "threads": 2},
        checkpoint={"every_n_steps": 2},
        logging={"tensorboard": False},
    )
    threads = torch.get_num_threads()
    lines, resumed = [], []
    try:
        first = train(load_experiment(str(path)), echo=lines.append)
        second = train(load_experiment(str(path), ["resume=auto", "train.max_steps=6"]), echo=resumed.append)
    finally:
        torch.set_num_threads(threads)
    return {
        "path": path,
        "dir": Path(first.run_dir),
        "first": first,
        "second": second,
        "lines": lines,
        "resumed": resumed,
    }


def test_loss_ppl_bpb_of_one_step_in_each_row(run):
    rows = [r for r in csv.DictReader(open(run["dir"] / "logs" / "metrics.csv")) if r.get("train/loss")]
    assert rows, "no training rows"
    meta = yaml.safe_load((run["dir"] / "config.yaml").read_text())
    assert meta["train"]["log_every_n_steps"] == 3
    from data.datamodule import TokenDataModule

    bpt = TokenDataModule(meta["data"]["out_dir"], 32, 4, 0).bytes_per_token
    for r in rows:
        loss = float(r["train/loss"])
        assert float(r["train/ppl"]) == pytest.approx(math.exp(loss), rel=1e-5), r
        assert float(r["train/bpb"]) == pytest.approx(loss / math.log(2) / bpt, rel=1e-5), r
    # the first row is the logged step's own value, not step 0's
    assert int(float(rows[0]["step"])) > 0


def test_threads_setting_applied_and_printed(run):
    assert any(line == "threads: 2 per process (train.threads; set train.threads=N)" for line in run["lines"]), run[
        "lines"
    ]
    from lm.training.threads import resolve_threads

    env = os.environ.pop("OMP_NUM_THREADS", None)
    try:
        assert resolve_threads(0, 4)[0] == 1
        n, why = resolve_threads(0, 1)
        assert n >= 1 and "physical cores" in why
        assert resolve_threads(3, 4) == (3, "train.threads")
    finally:
        if env is not None:
            os.environ["OMP_NUM_THREADS"] = env


def test_vocabulary_from_the_data_and_parameter_count(run, tmp_path, tiny_data):
    for name in ("gla", "transformer", "rwkv7"):
        for size in ("tiny", "small", "125m"):
            assert load_experiment(None, [f"model={name}/{size}"]).model.vocab_size == 0
    meta = yaml.safe_load((run["dir"] / "config.yaml").read_text())
    assert meta["model"]["vocab_size"] == 512  # the tokenizer's 512 tokens
    model_line = next(line for line in run["lines"] if line.startswith("model: "))
    assert "vocabulary 512" in model_line and "linear_attention/gla" in model_line
    from lm.training.export import load_model

    n = load_model(str(run["dir"])).model.num_parameters()
    assert f"with {n:,} parameters" in model_line
    # a fixed size larger than the tokenizer's: a warning naming the unused rows
    path = experiment(
        tmp_path,
        tiny_data,
        model={"d_model": 32, "n_heads": 2, "n_layers": 2, "vocab_size": 1024},
        train={"max_steps": 1, "val_every_n_steps": 0, "sample_tokens": 0},
    )
    lines = []
    train(load_experiment(str(path)), echo=lines.append)
    warning = [line for line in lines if line.startswith("warning: model.vocab_size=1024")]
    assert warning and "512 embedding rows" in warning[0] and "model.vocab_size=0" in warning[0]


def test_small_validation_set_warning(run):
    from data.split import MIN_VALIDATION_DOCUMENTS, small_split_warning

    warning = [line for line in run["lines"] if line.startswith("warning: the validation split has only")]
    assert warning and f"(< {MIN_VALIDATION_DOCUMENTS})" in warning[0]
    big = {"splits": {"validation": {"documents": 500, "tokens": 10**6}}}
    assert small_split_warning(big) is None
    few_tokens = {"splits": {"validation": {"documents": 500, "tokens": 9400}}}
    assert "9,400 tokens" in small_split_warning(few_tokens)


def test_sample_prompt_from_a_validation_document(run):
    import json

    summary = json.loads((run["dir"] / "summary.json").read_text())
    assert summary["sample_stop"].startswith(("length limit", "end-of-document token"))
    header = next(line for line in run["lines"] if line.startswith("sample (prompt:"))
    assert "a validation document's start" in header and summary["sample_stop"] in header
    from data.shards import TokenShards
    from data.tokenizer import load_tokenizer

    meta = yaml.safe_load((run["dir"] / "config.yaml").read_text())
    shards = TokenShards(meta["data"]["out_dir"], "validation")
    tok = load_tokenizer(Path(meta["data"]["out_dir"]) / "tokenizer.json")
    start = tok.decode([int(t) for t in shards.window(int(shards.doc_starts[0]), 12)])
    assert summary["sample"].startswith(start)


def test_resume_with_new_max_steps_prints_a_notice_and_keeps_the_old_config(run):
    notice = [line for line in run["resumed"] if line.startswith("note: resuming step 4 with changed settings")]
    assert notice and "train.max_steps: 4 -> 6 (the learning-rate schedule now decays" in notice[0]
    assert run["second"].global_step == 6
    old = yaml.safe_load((run["dir"] / "config.4.yaml").read_text())
    new = yaml.safe_load((run["dir"] / "config.yaml").read_text())
    assert old["train"]["max_steps"] == 4 and new["train"]["max_steps"] == 6


def test_probe_report_under_the_run_not_the_checkpoint(run):
    proc = run_lm("probe", str(run["dir"]))
    report = run["dir"] / "probes" / "step-00000006" / "report.md"
    assert report.is_file(), proc.stdout[-2000:]
    assert not (run["dir"] / "checkpoints" / "step-00000006" / "probe-report").exists()
    text = report.read_text()
    assert "negative value means" in text and "linear_attention/gla at step 6" in text


def test_export_has_ordinary_file_modes(run, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "export"
        run_lm("export", str(run["dir"]), str(out))
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_sigint_saves_and_exits_130(tmp_path, tiny_data):
    """Ctrl-C (SIGINT to the process group) saves a checkpoint and exits 128 + 2, not 0."""
    import signal

    from lm.training.checkpoint import latest_complete
    from tests.training.test_train import _start, _wait_for_step

    path = experiment(
        tmp_path,
        tiny_data,
        train={"max_steps": 100_000, "record_samples": True, "val_every_n_steps": 0},
        checkpoint={"every_n_steps": 100_000},
    )
    run = tmp_path / "exp"
    proc, log = _start(["train", str(path)], tmp_path)
    try:
        _wait_for_step(run, 2, proc)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(120) == 130
    finally:
        log.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "stopped by SIGINT" in Path(log.name).read_text()
    assert latest_complete(run / "checkpoints") is not None
