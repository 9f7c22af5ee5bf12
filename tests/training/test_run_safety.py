"""Run-directory safety (issue 13): the run lock, checksummed checkpoints and rejected ones named,
``resume=auto`` without a usable checkpoint touching nothing, a fresh run refusing an earlier
run's directory, non-finite streaks keeping the last good checkpoint, settings changed on resume
(applied, or refused before anything is written), a task run's config read back, and one-line
errors with exit status 2 for the faults of items 9 and 10."""

from __future__ import annotations

import csv
import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lm.config import load_experiment
from lm.errors import ConfigError, LMError
from lm.training.checkpoint import latest_complete, list_complete, read_manifest
from lm.training.export import checkpoint_state_dict
from lm.training.run_lock import RunLock, holder
from tests.helpers import experiment, run_lm
from tests.training.test_train import _start, _wait_for_step


def cli(capsys, *args):
    """``lm <args>`` in this process: (exit status, stdout, stderr)."""
    from lm.cli.main import main

    capsys.readouterr()
    code = 0
    try:
        main(list(args))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def snapshot(run: Path) -> dict:
    """Every file under ``run`` (but the lock) with its bytes' hash: what a refused command must not change."""
    import hashlib

    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def train_run(capsys, tmp_path, tiny_data, *overrides, name="exp", **sections):
    path = experiment(tmp_path, tiny_data, name=name, **sections)
    code, out, err = cli(capsys, "train", str(path), *overrides)
    assert code == 0, err[-3000:]
    return path, tmp_path / name


SHORT = dict(
    train={"max_steps": 4, "val_every_n_steps": 0, "sample_tokens": 0}, checkpoint={"every_n_steps": 2, "keep_last": 5}
)


# ------------------------------------------------------------------------------------ 1. lock


def test_lock_refuses_a_second_holder_and_takes_over_a_dead_ones(tmp_path):
    run = tmp_path / "run"
    first = RunLock(run).acquire()
    try:
        assert holder(run)["pid"] == os.getpid()
        with pytest.raises(LMError, match=r"in use by another training job \(pid \d+ on .* since"):
            RunLock(run).acquire()
    finally:
        first.release()
    assert holder(run) is None
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / ".lock").write_text(json.dumps({"host": "h", "pid": dead.pid, "started": "then"}))
    said = []
    RunLock(run, echo=said.append).acquire().release()
    assert len(said) == 1 and "took over the stale lock" in said[0] and f"pid {dead.pid}" in said[0]


def test_two_trainers_on_one_run_dir_one_refuses(tmp_path, tiny_data):
    path = experiment(
        tmp_path,
        tiny_data,
        # far more steps than the test takes: the trainer must still be training when it is signalled
        train={"max_steps": 100_000, "record_samples": True, "val_every_n_steps": 0},
        checkpoint={"every_n_steps": 100_000},
    )
    run = tmp_path / "exp"
    proc, log = _start(["train", str(path)], tmp_path)
    try:
        _wait_for_step(run, 2, proc)
        config_before = (run / "config.yaml").read_bytes()
        second = run_lm("train", str(path), "resume=auto", "seed=2", check=False, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        line = one_line_error(second.stderr)
        assert f"run_dir {run} is in use by another training job (pid {proc.pid}" in line
        assert (run / "config.yaml").read_bytes() == config_before
        assert proc.poll() is None, f"the first trainer ended (exit {proc.returncode}) before it was signalled"
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(120) == 128 + signal.SIGTERM  # a signal stop exits 128 + signum after saving
    finally:
        log.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    steps = [json.loads(x)["step"] for x in (run / "samples" / "rank00000.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)), "a second trainer wrote into the run"
    assert "stopped by SIGTERM" in Path(log.name).read_text()
    assert latest_complete(run / "checkpoints") is not None and holder(run) is None


# --------------------------------------------------------------- 2-4. verified checkpoints


def test_corrupt_checkpoints_are_rejected_by_name_and_none_usable_touches_nothing(capsys, tmp_path, tiny_data):
    path, run = train_run(
        capsys,
        tmp_path,
        tiny_data,
        train={"max_steps": 8, "val_every_n_steps": 0, "sample_tokens": 0},
        checkpoint={"every_n_steps": 4, "keep_last": 5},
    )
    ckpts = run / "checkpoints"
    original = checkpoint_state_dict(ckpts / "step-00000008")
    # 3. same-size corruption in the middle of the newest: caught by the checksum, step 4 resumed
    victim = ckpts / "step-00000008" / "model.ckpt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = os.urandom(4096)
    victim.write_bytes(bytes(data))
    code, out, err = cli(capsys, "train", str(path), "resume=auto")
    assert code == 0, err[-3000:]
    assert f"checkpoint {ckpts / 'step-00000008'} rejected: model.ckpt fails its SHA-256 check (corrupt)" in out
    assert f"resuming from {ckpts / 'step-00000004'}" in out
    redone = checkpoint_state_dict(ckpts / "step-00000008")
    assert all(torch.equal(original[k], redone[k]) for k in original), "the redone steps differ"
    # 4. a truncated newest is named with its reason too
    victim.write_bytes(victim.read_bytes()[:1000])
    code, out, err = cli(capsys, "train", str(path), "resume=auto")
    assert code == 0 and "rejected: model.ckpt has 1000 bytes, the manifest says" in out
    # 2. every checkpoint corrupt: one line, exit 2, nothing deleted, appended or overwritten
    for step in list_complete(ckpts):
        f = step / "model.ckpt"
        f.write_bytes(f.read_bytes()[:500])
    before = snapshot(run)
    code, out, err = cli(capsys, "train", str(path), "resume=auto")
    assert code == 2
    line = one_line_error(err)
    assert f"resume=auto: no usable checkpoint in {ckpts}" in line and "nothing was changed" in line
    assert snapshot(run) == before


def test_export_and_eval_reject_a_corrupt_checkpoint(capsys, tmp_path, tiny_data):
    path, run = train_run(capsys, tmp_path, tiny_data, **SHORT)
    victim = run / "checkpoints" / "step-00000004" / "model.ckpt"
    data = bytearray(victim.read_bytes())
    data[100:200] = bytes(100)
    victim.write_bytes(bytes(data))
    code, _, err = cli(capsys, "export", str(run / "checkpoints" / "step-00000004"), str(tmp_path / "x"))
    assert code == 2 and "fails its SHA-256 check" in one_line_error(err)
    assert not (tmp_path / "x").exists()
    # the run directory: the newest verified checkpoint (step 2) is exported
    code, out, err = cli(capsys, "export", str(run), str(tmp_path / "y"))
    assert code == 0 and "exported step 2" in out, err[-2000:]


# ---------------------------------------------------------------------- 5. non-finite streaks


def test_nonfinite_streak_neither_checkpoints_nor_prunes_the_last_good_one(capsys, tmp_path, tiny_data):
    path = experiment(
        tmp_path,
        tiny_data,
        train={
            "max_steps": 40,
            "lr": 1e6,
            "warmup_steps": 10000,
            "grad_clip": 0.0,
            "max_nonfinite_steps": 3,
            "val_every_n_steps": 0,
            "log_every_n_steps": 1,
        },
        checkpoint={"every_n_steps": 1, "keep_last": 3},
    )
    code, out, err = cli(capsys, "train", str(path))
    assert code == 2
    line = one_line_error(err)
    assert "non-finite for 3 consecutive steps" in line and "the last good checkpoint is" in line
    ckpts = tmp_path / "exp" / "checkpoints"
    kept = list_complete(ckpts)
    assert kept, "the last good checkpoint was pruned"
    last_good = Path(line.split("the last good checkpoint is ")[1].strip())
    assert last_good in kept
    for ckpt in kept:
        state = checkpoint_state_dict(ckpt)
        assert all(torch.isfinite(v).all() for v in state.values()), f"{ckpt} holds non-finite weights"
        assert torch.load(ckpt / "model.ckpt", weights_only=False)["nonfinite"]["streak"] == 0
    rows = list(csv.DictReader(open(tmp_path / "exp" / "logs" / "metrics.csv")))
    skipped = [r for r in rows if r.get("train/nonfinite_steps")]
    assert skipped, "no skipped step was logged"
    for r in skipped:
        assert r["train/loss"] in ("", None) or math.isnan(float(r["train/loss"])), r


# ---------------------------------------------------------------- 6. fresh run, existing dir


def test_fresh_run_into_an_earlier_runs_directory_stops_and_overwrite_starts_over(capsys, tmp_path, tiny_data):
    path, run = train_run(capsys, tmp_path, tiny_data, **SHORT)
    before = snapshot(run)
    code, _, err = cli(capsys, "train", str(path))
    assert code == 2
    line = one_line_error(err)
    assert "already holds checkpoints of an earlier run (newest step-00000004)" in line
    assert "resume=auto" in line and "overwrite=true" in line
    assert snapshot(run) == before
    code, _, err = cli(capsys, "train", str(path), "overwrite=true", "resume=auto")
    assert code == 2 and "cannot be combined with resume=auto" in one_line_error(err)
    code, out, err = cli(capsys, "train", str(path), "overwrite=true", "train.max_steps=2")
    assert code == 0, err[-3000:]
    assert [read_manifest(p)["step"] for p in list_complete(run / "checkpoints")] == [2]


# ------------------------------------------------------------- 7. settings changed on resume


def test_resume_applies_a_changed_lr_and_refuses_a_changed_model(capsys, tmp_path, tiny_data):
    from lm.training.schedule import lr_multiplier

    sections = {**SHORT, "train": {**SHORT["train"], "lr": 1e-3, "warmup_steps": 2}}
    path, run = train_run(capsys, tmp_path, tiny_data, **sections)
    config = (run / "config.yaml").read_bytes()
    before = snapshot(run)
    for override, named in (
        ("model.d_model=64", "model.d_model (32 -> 64)"),
        ("model=transformer/tiny", "model.family ('linear_attention' -> 'transformer')"),
        ("seed=7", "seed (1234 -> 7)"),
    ):
        code, _, err = cli(capsys, "train", str(path), "resume=auto", override)
        assert code == 2
        line = one_line_error(err)
        assert named in line and "cannot change on resume" in line, line
        assert snapshot(run) == before and (run / "config.yaml").read_bytes() == config
    code, out, err = cli(capsys, "train", str(path), "resume=auto", "train.lr=2e-3", "train.max_steps=6")
    assert code == 0, err[-3000:]
    assert "train.lr: 0.001 -> 0.002" in out
    state = torch.load(run / "checkpoints" / "step-00000006" / "model.ckpt", weights_only=False)
    assert state["lr_schedulers"][0]["base_lrs"] == [2e-3, 2e-3]
    group = state["optimizer_states"][0]["param_groups"][0]
    assert group["lr"] == pytest.approx(2e-3 * lr_multiplier(6, 2, 6, 0.1))


def test_resume_policy_classifies_every_schema_key():
    from lm.training.resume_policy import CLASSES, classify, schema_keys

    keys = schema_keys()
    assert len(keys) > 80 and "train.lr" in keys and "model.mixer" in keys
    unclassified = [k for k in keys if not any(k in members for members in CLASSES.values())]
    assert not unclassified, f"classify these keys in lm/training/resume_policy.py: {unclassified}"
    names = list(CLASSES)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not CLASSES[a] & CLASSES[b], f"{a} and {b} share {CLASSES[a] & CLASSES[b]}"
    assert classify("train.lr") == "notice" and classify("model.d_model") == "forbidden"
    assert classify("train.max_steps") == "notice" and classify("train.threads") == "overridable"


# ------------------------------------------------------------------- 8. a task run's config


def test_task_run_config_reads_back(capsys, tmp_path):
    path = tmp_path / "task.yaml"
    path.write_text(
        json.dumps(
            {
                "defaults": {"model": "gla/tiny", "train": "cpu-test"},
                "name": "task",
                "run_dir": str(tmp_path / "task"),
                "data": {"source": {"kind": "task"}, "task": {"name": "associative_recall", "val_examples": 8}},
                "model": {"d_model": 32, "n_heads": 2, "n_layers": 1},
                "train": {"max_steps": 2, "val_every_n_steps": 0},
                "checkpoint": {"every_n_steps": 2},
            }
        )
    )
    code, _, err = cli(capsys, "train", str(path))
    assert code == 0, err[-3000:]
    run = tmp_path / "task"
    assert "task_output: classes" in (run / "config.yaml").read_text()
    code, out, err = cli(capsys, "config", "show", str(run / "config.yaml"))
    assert code == 0 and "task_output: classes" in out, err
    code, _, err = cli(capsys, "export", str(run), str(tmp_path / "export"))
    assert code == 0, err
    code, out, err = cli(capsys, "config", "show", str(tmp_path / "export" / "config.yaml"))
    assert code == 0 and "task_output: classes" in out, err
    code, out, err = cli(capsys, "train", str(run / "config.yaml"), "resume=auto", "train.max_steps=3")
    assert code == 0 and "resuming from" in out, err[-3000:]
    with pytest.raises(ConfigError, match="data.task_output"):
        load_experiment(str(path), ["data.task_output=labels"])


# ------------------------------------------------------------- 9-10. one-line errors


def _immutable(path: Path) -> bool:
    """Make ``path`` read-only even for root (chattr +i; chmod otherwise); False when impossible."""
    if os.geteuid() == 0:
        return subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
    path.chmod(0o555)
    return True


def _mutable(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    else:
        path.chmod(0o755)


def test_read_only_run_dir_and_checkpoints(capsys, tmp_path, tiny_data):
    path, run = train_run(capsys, tmp_path, tiny_data, **SHORT)
    for target in (run / "checkpoints", run):
        if not _immutable(target):
            pytest.skip("cannot make a directory read-only here")
        try:
            before = snapshot(run)
            code, _, err = cli(capsys, "train", str(path), "resume=auto", "train.max_steps=6")
            assert code == 2
            line = one_line_error(err)
            assert f"{target}" in line and ("not writable" in line or "cannot create" in line), line
            assert snapshot(run) == before
            if target == run:  # lm eval on a read-only run: one line naming --out, then --out works
                args = ["eval", "ppl", str(run), "--max-docs", "2", "--max-tokens", "256", "--seq-len", "32"]
                code, _, err = cli(capsys, *args)
                assert code == 2 and "pass --out" in one_line_error(err)
                code, out, err = cli(capsys, *args, "--out", str(tmp_path / "ppl"))
                assert code == 0 and (tmp_path / "ppl" / "ppl.json").is_file(), err[-2000:]
                assert snapshot(run) == before
        finally:
            _mutable(target)


def test_eval_and_probe_on_a_live_run_do_not_write_into_it(capsys, tmp_path, tiny_data):
    path, run = train_run(capsys, tmp_path, tiny_data, **SHORT)
    before = snapshot(run)
    lock = RunLock(run).acquire()  # as a live trainer holds it
    try:
        code, _, err = cli(capsys, "eval", "ppl", str(run), "--max-docs", "2", "--max-tokens", "256")
        line = one_line_error(err)
        assert code == 2 and "is being trained" in line and "pass --out" in line
        code, _, err = cli(capsys, "probe", str(run))
        assert code == 2 and "pass --out" in one_line_error(err)
    finally:
        lock.release()
    assert snapshot(run) == before


def test_full_disk_during_save_keeps_earlier_checkpoints(capsys, tmp_path, tiny_data, monkeypatch):
    import pytorch_lightning as pl

    original = pl.Trainer.save_checkpoint
    calls = {"n": 0}

    def failing(self, filepath, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(filepath).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, filepath, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "save_checkpoint", failing)
    path = experiment(tmp_path, tiny_data, **SHORT)
    code, _, err = cli(capsys, "train", str(path))
    assert code == 2
    ckpts = tmp_path / "exp" / "checkpoints"
    line = one_line_error(err)
    assert f"cannot write checkpoint step-00000004 in {ckpts}: no space left on the device" in line
    assert f"newest: {ckpts / 'step-00000002'}" in line and "resume=auto" in line
    assert [p.name for p in ckpts.iterdir() if p.name.startswith(".tmp")] == []
    monkeypatch.setattr(pl.Trainer, "save_checkpoint", original)
    code, out, err = cli(capsys, "train", str(path), "resume=auto")
    assert code == 0 and f"resuming from {ckpts / 'step-00000002'}" in out, err[-3000:]
    assert read_manifest(latest_complete(ckpts))["step"] == 4


def test_export_to_an_existing_file_and_lr_zero(capsys, tmp_path, tiny_data):
    path, run = train_run(capsys, tmp_path, tiny_data, **SHORT)
    target = tmp_path / "file.bin"
    target.write_bytes(b"keep me")
    code, _, err = cli(capsys, "export", str(run), str(target))
    assert code == 2 and f"export directory {target} is an existing file" in one_line_error(err)
    assert target.read_bytes() == b"keep me"
    code, _, err = cli(capsys, "train", str(path), "train.lr=0", "run_dir=" + str(tmp_path / "lr0"))
    assert code == 2 and "train.lr: 0 would train nothing" in one_line_error(err)
    assert not (tmp_path / "lr0").exists()


def test_truncated_doc_starts_is_one_line(capsys, tmp_path, tiny_data):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    f = data / "train" / "doc_starts.npy"
    f.write_bytes(f.read_bytes()[:40])
    path = experiment(tmp_path, data)
    code, _, err = cli(capsys, "train", str(path))
    line = one_line_error(err)
    assert code == 2 and f"{f}: cannot read the document offsets" in line and "lm data prepare --force" in line
    assert not (tmp_path / "exp" / "checkpoints").exists()
