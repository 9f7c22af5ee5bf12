"""Single-process training: the loss goes down, checkpoints are atomic and pruned, an incomplete
checkpoint is never loaded, a run killed with SIGKILL resumes to bit-identical weights having
consumed exactly the same samples, SIGTERM saves and exits cleanly, export works, bad configs and
diverging runs fail with one-line errors, and wandb offline writes its run directory."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from lm.config import load_experiment
from lm.training.checkpoint import is_complete, latest_complete, list_complete, read_manifest
from lm.training.export import checkpoint_state_dict, load_model
from lm.training.trainer import train
from tests.helpers import kill_group, run_group
from tests.training.conftest import experiment, lm_command, lm_env, read_samples, run_lm, REPO


def quiet(msg):
    pass


def test_training_lowers_loss_and_writes_artifacts(tmp_path, tiny_data):
    path = experiment(
        tmp_path,
        tiny_data,
        train={"max_steps": 40, "lr": 1e-2, "val_every_n_steps": 20},
        checkpoint={"every_n_steps": 10, "keep_last": 2},
    )
    cfg = load_experiment(str(path))
    result = train(cfg, echo=quiet)
    run = Path(cfg.run_dir)
    import csv

    losses = [float(r["train/loss"]) for r in csv.DictReader(open(run / "logs" / "metrics.csv")) if r.get("train/loss")]
    assert losses[-1] < losses[0] - 0.5, f"loss did not go down: {losses[0]:.3f} -> {losses[-1]:.3f}"
    assert result.val_loss is not None and result.val_bpb is not None and result.val_ppl > 1
    assert result.global_step == 40
    # keep-last-2 and the `last` pointer
    complete = list_complete(run / "checkpoints")
    assert [read_manifest(p)["step"] for p in complete] == [30, 40]
    assert (run / "checkpoints" / "last").read_text().strip() == "step-00000040"
    assert (run / "loss.png").stat().st_size > 1000
    assert (run / "tensorboard").is_dir() and any((run / "tensorboard").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 40 and summary["val_bpb"] > 0
    # export and reload: the same logits as the checkpoint
    out = tmp_path / "export"
    run_lm("export", str(run), str(out))
    exported = load_model(str(out))
    from_ckpt = load_model(str(complete[-1]))
    tokens = torch.randint(0, 500, (1, 16))
    assert torch.equal(exported.model(tokens)[0], from_ckpt.model(tokens)[0])
    assert (out / "tokenizer.json").is_file() and exported.step == 40
    # a finished run resumed with resume=auto does nothing
    again = train(load_experiment(str(path), ["resume=auto"]), echo=quiet)
    assert again.global_step == 40


def test_incomplete_checkpoints_are_never_loaded(tmp_path, tiny_data):
    path = experiment(tmp_path, tiny_data, train={"max_steps": 8}, checkpoint={"every_n_steps": 4})
    cfg = load_experiment(str(path))
    train(cfg, echo=quiet)
    ckpts = Path(cfg.run_dir) / "checkpoints"
    newest = latest_complete(ckpts)
    assert read_manifest(newest)["step"] == 8
    # truncate a file of the newest: it is no longer complete, and auto-resume picks step 4
    victim = next(p for p in (newest / "model.ckpt").parent.rglob("*.ckpt") if p.is_file())
    victim.write_bytes(victim.read_bytes()[:100])
    assert not is_complete(newest)
    assert read_manifest(latest_complete(ckpts))["step"] == 4
    # a half-written temporary directory and a directory without manifest are ignored too
    (ckpts / ".tmp-step-00000012").mkdir()
    (ckpts / "step-00000016").mkdir()
    assert read_manifest(latest_complete(ckpts))["step"] == 4
    proc = run_lm("train", str(path), f"resume={newest}", check=False)
    assert proc.returncode == 2 and "incomplete" in proc.stderr


def _start(args, tmp_path):
    log = open(tmp_path / f"log-{time.time_ns()}.txt", "w")
    return subprocess.Popen(
        lm_command(*args), stdout=log, stderr=subprocess.STDOUT, env=lm_env(), cwd=REPO, start_new_session=True
    ), log


def _wait_for_step(run_dir: Path, step: int, proc, timeout=300.0) -> None:
    path = run_dir / "samples" / "rank00000.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file():
            lines = path.read_text().splitlines()
            if lines and json.loads(lines[-1])["step"] >= step:
                return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with {proc.returncode}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached")


def _final_weights(run_dir: Path):
    return checkpoint_state_dict(latest_complete(run_dir / "checkpoints"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"


def kill_and_resume(tmp_path, tiny_data, extra=(), max_steps=24, every=4, name="exp", data=None, train=None):
    """Train ``<name>-straight`` uninterrupted, and ``<name>-killed`` SIGKILLed at a random step then
    resumed (``resume=auto``); returns (straight run, killed run, the step it was killed at). ``data``
    and ``train`` add to the experiment's sections (``tests.helpers.experiment``)."""
    sections = dict(
        train={"max_steps": max_steps, "record_samples": True, "val_every_n_steps": 6, **(train or {})},
        checkpoint={"every_n_steps": every},
        model={"dropout": 0.1, "d_model": 32, "n_heads": 2, "n_layers": 2},
    )
    if data is not None:
        sections["data"] = data
    straight = experiment(tmp_path, tiny_data, name=f"{name}-straight", **sections)
    killed = experiment(tmp_path, tiny_data, name=f"{name}-killed", **sections)
    run_lm("train", str(straight), *extra)
    kill_at = random.Random().randint(every + 2, max_steps - 3)
    proc, log = _start(["train", str(killed), *extra], tmp_path)
    try:
        _wait_for_step(tmp_path / f"{name}-killed", kill_at, proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        log.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    killed_run = tmp_path / f"{name}-killed"
    assert read_manifest(latest_complete(killed_run / "checkpoints"))["step"] < max_steps, "killed too late"
    run_lm("train", str(killed), "resume=auto", *extra)
    return tmp_path / f"{name}-straight", killed_run, kill_at


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_exact(tmp_path, tiny_data):
    straight, killed, kill_at = kill_and_resume(tmp_path, tiny_data)
    assert_same_weights(_final_weights(straight), _final_weights(killed))
    assert read_samples(straight) == read_samples(killed), f"samples differ (killed at step {kill_at})"
    # the logs continued in the same CSV file: it holds the steps of both attempts
    import csv

    steps = {
        int(float(r["step"])) for r in csv.DictReader(open(killed / "logs" / "metrics.csv")) if r.get("train/loss")
    }
    assert min(steps) <= 2 and max(steps) >= 22


@pytest.mark.slow
def test_sigkill_and_resume_with_state_passing_is_bit_exact(tmp_path, tiny_data):
    """train.state_passing: the carried states are in the checkpoint, so the resumed run continues
    from the same states and ends with the same weights."""
    straight, killed, kill_at = kill_and_resume(tmp_path, tiny_data, extra=("train.state_passing=true",), name="tbptt")
    assert_same_weights(_final_weights(straight), _final_weights(killed))
    samples = read_samples(straight)
    assert samples == read_samples(killed), f"samples differ (killed at step {kill_at})"
    first_row = [micro[0][0] for _, micro in sorted(samples.items())]  # row 0 of each step's first micro-batch
    assert sum(b == a + 1 for a, b in zip(first_row, first_row[1:])) >= len(first_row) // 2  # consecutive windows
    ckpt = torch.load(latest_complete(killed / "checkpoints") / "model.ckpt", weights_only=False)
    record = ckpt["state_passing"]["record"]
    assert record["index"].shape[0] == 1 and record["state"] is not None


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path, tiny_data):
    path = experiment(
        tmp_path, tiny_data, train={"max_steps": 100_000, "record_samples": True}, checkpoint={"every_n_steps": 100_000}
    )
    proc, log = _start(["train", str(path)], tmp_path)
    try:
        _wait_for_step(tmp_path / "exp", 5, proc)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(120) == 128 + signal.SIGTERM  # documented: a signal stop exits 128 + signum
    finally:
        log.close()
        if proc.poll() is None:
            kill_group(proc)
    output = (Path(log.name)).read_text()
    assert "stopped by SIGTERM" in output
    latest = latest_complete(tmp_path / "exp" / "checkpoints")
    assert latest is not None and 5 <= read_manifest(latest)["step"] < 100_000


def test_bad_config_fails_before_heavy_work(tmp_path, tiny_data):
    path = experiment(tmp_path, tiny_data)
    proc = run_lm("train", str(path), "train.micro_batch_sise=3", check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error:") and "micro_batch_size" in err
    assert not (tmp_path / "exp").exists(), "a bad config must not create the run directory"
    proc = run_lm("train", str(path), "model.vocab_size=100", check=False)
    assert proc.returncode == 2 and "model.vocab_size (100)" in proc.stderr


def test_diverging_run_aborts_after_k_nonfinite_steps(tmp_path, tiny_data):
    path = experiment(
        tmp_path,
        tiny_data,
        train={"max_steps": 60, "lr": 1e4, "grad_clip": 0.0, "warmup_steps": 0, "max_nonfinite_steps": 3},
    )
    proc = run_lm("train", str(path), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "non-finite for 3 consecutive steps" in last


def test_nonfinite_step_is_skipped_and_counted(tmp_path, tiny_data, monkeypatch):
    from lm.training import module as module_mod

    original = module_mod.LMModule.loss_sum
    calls = {"n": 0}

    def flaky(self, tokens, doc_start_mask=None):
        total, count = original(self, tokens, doc_start_mask)
        calls["n"] += 1
        if self.training and calls["n"] in (3, 4):
            total = total * float("nan")
        return total, count

    monkeypatch.setattr(module_mod.LMModule, "loss_sum", flaky)
    path = experiment(tmp_path, tiny_data, train={"max_steps": 6, "val_every_n_steps": 0})
    cfg = load_experiment(str(path))
    result = train(cfg, echo=quiet)
    assert result.global_step == 6
    state = checkpoint_state_dict(latest_complete(Path(cfg.run_dir) / "checkpoints"))
    assert all(torch.isfinite(v).all() for v in state.values())
    ckpt = torch.load(latest_complete(Path(cfg.run_dir) / "checkpoints") / "model.ckpt", weights_only=False)
    assert ckpt["nonfinite"]["total"] == 2


def test_wandb_offline_run_directory(tmp_path, tiny_data):
    path = experiment(
        tmp_path,
        tiny_data,
        train={"max_steps": 3, "val_every_n_steps": 0},
        logging={"wandb": {"mode": "offline", "project": "test"}},
    )
    env = lm_env()
    env.pop("WANDB_MODE", None)
    proc = run_group(lm_command("train", str(path)), 300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "exp"
    run_id = (run / "wandb_run_id").read_text().strip()
    offline = list((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert offline, list((run / "wandb").iterdir())
