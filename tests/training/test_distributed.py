"""Two CPU processes (gloo): DeepSpeed ZeRO-2 and ZeRO-3 train, checkpoint and resume through the
real ZeRO code path; a ZeRO-2 run killed with SIGKILL resumes to bit-identical weights with the same
samples on every rank; ranks see disjoint samples; DDP trains too."""

from __future__ import annotations

import shutil

import pytest

from data.atomic import write_atomic
from lm.training.checkpoint import latest_complete, read_manifest
from tests.training.conftest import experiment, read_samples, run_lm
from tests.training.test_train import _final_weights, assert_same_weights, kill_and_resume

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TWO_RANKS = ("train.devices=2", "train.accelerator=cpu")


def test_zero2_kill_and_resume_bit_exact_on_two_ranks(tmp_path, tiny_data):
    extra = (*TWO_RANKS, "train.strategy=deepspeed", "train.zero_stage=2")
    straight, killed, kill_at = kill_and_resume(tmp_path, tiny_data, extra=extra, max_steps=16, every=4)
    assert_same_weights(_final_weights(straight), _final_weights(killed))
    for rank in (0, 1):
        assert read_samples(straight, rank) == read_samples(killed, rank), (
            f"rank {rank} samples differ (kill at {kill_at})"
        )
    r0, r1 = read_samples(straight, 0), read_samples(straight, 1)
    for step in r0:
        assert not set(sum(r0[step], [])) & set(sum(r1[step], [])), f"ranks overlap at step {step}"
    manifest = read_manifest(latest_complete(killed / "checkpoints"))
    assert manifest["world_size"] == 2 and manifest["step"] == 16


def test_zero3_trains_checkpoints_and_resumes(tmp_path, tiny_data):
    sections = dict(train={"max_steps": 8, "val_every_n_steps": 4}, checkpoint={"every_n_steps": 4, "keep_last": 5})
    a = experiment(tmp_path, tiny_data, name="z3a", **sections)
    b = experiment(tmp_path, tiny_data, name="z3b", **sections)
    extra = (*TWO_RANKS, "train.strategy=deepspeed", "train.zero_stage=3")
    run_lm("train", str(a), *extra)
    run_lm("train", str(b), *extra)
    ckpts = tmp_path / "z3b" / "checkpoints"
    shutil.rmtree(ckpts / "step-00000008")
    write_atomic(ckpts / "last", "step-00000004\n")
    proc = run_lm("train", str(b), "resume=auto", *extra)
    assert "resuming from" in proc.stdout
    assert read_manifest(latest_complete(ckpts))["step"] == 8
    assert_same_weights(_final_weights(tmp_path / "z3a"), _final_weights(tmp_path / "z3b"))
    # consolidated export works without DeepSpeed at load time
    run_lm("export", str(tmp_path / "z3a"), str(tmp_path / "z3a-export"))


def test_ddp_two_ranks_train(tmp_path, tiny_data):
    path = experiment(
        tmp_path, tiny_data, name="ddp", train={"max_steps": 6, "val_every_n_steps": 3, "record_samples": True}
    )
    run_lm("train", str(path), *TWO_RANKS, "train.strategy=ddp")
    r0, r1 = read_samples(tmp_path / "ddp", 0), read_samples(tmp_path / "ddp", 1)
    assert sorted(r0) == sorted(r1) == list(range(1, 7))
    for step in r0:
        assert not set(sum(r0[step], [])) & set(sum(r1[step], []))
    assert read_manifest(latest_complete(tmp_path / "ddp" / "checkpoints"))["step"] == 6
