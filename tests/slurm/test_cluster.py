"""``lm submit`` against a real one-node SLURM cluster (tests/slurm/cluster.sh):

1. a tiny training job completes and leaves its checkpoint;
2. the same job, given USR1 mid-training (``scancel --signal=USR1 --batch``, what SLURM sends
   before a time limit or on pre-emption), checkpoints, requeues itself, resumes and completes with
   exactly ``max_steps`` optimizer steps over both runs and final weights equal to (1)'s;
3. a two-rank ``srun`` job (DeepSpeed ZeRO-2 on gloo, 2 CPU ranks) completes.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
import torch

from lm.slurm.status import JobState
from lm.training.checkpoint import latest_complete, read_manifest
from lm.training.export import checkpoint_state_dict
from tests.slurm.conftest import job_log, run_once, submit, wait_for_job, wait_for_samples
from tests.helpers import experiment, read_samples, run_lm

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.xdist_group("slurm")]

MAX_STEPS = 60
SECTIONS = dict(
    train={"max_steps": MAX_STEPS, "record_samples": True, "val_every_n_steps": 30},
    checkpoint={"every_n_steps": 25, "keep_last": 2},
    model={"dropout": 0.1, "d_model": 32, "n_heads": 2, "n_layers": 2},
)


def _train_steps(run_dir: Path):
    """Optimizer steps (1-based) with a logged training loss, in file order."""
    rows = csv.DictReader(open(run_dir / "logs" / "metrics.csv", newline=""))
    return [int(float(r["step"])) + 1 for r in rows if r.get("train/loss")]


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, slurm_data, tmp_path_factory):
    """The tiny job, submitted once per session and run to the end: (job id, run dir, final JobState)."""

    def make(directory: Path) -> dict:
        job_id, run_dir = submit(experiment(directory, slurm_data, name="straight", **SECTIONS))
        return {"job_id": job_id, "run_dir": str(run_dir), "state": dataclasses.asdict(wait_for_job(job_id, run_dir))}

    done = run_once(tmp_path_factory, "slurm-straight", make)
    return done["job_id"], Path(done["run_dir"]), JobState(**done["state"])


def test_submitted_job_completes_with_checkpoint(uninterrupted):
    job_id, run_dir, state = uninterrupted
    log = job_log(run_dir, job_id)
    assert state.state == "COMPLETED", f"{state}\n{log[-4000:]}"
    assert state.restarts in (0, None)
    ckpt = latest_complete(run_dir / "checkpoints")
    assert ckpt is not None and read_manifest(ckpt)["step"] == MAX_STEPS
    assert f"finished at step {MAX_STEPS}" in log
    assert "restart_count=0" in log and "restart_count=1" not in log
    # what lm submit left behind, and lm status
    assert (run_dir / "slurm" / "job.sbatch").is_file() and (run_dir / "slurm" / "experiment.yaml").is_file()
    record = json.loads((run_dir / "slurm" / "jobs.jsonl").read_text().splitlines()[-1])
    assert record["job_id"] == job_id and record["script"] == str(run_dir / "slurm" / "job.sbatch")
    out = run_lm("status", str(run_dir)).stdout
    assert "COMPLETED" in out and f"last step:       {MAX_STEPS}" in out and "step-00000060" in out


def test_usr1_checkpoints_requeues_and_resumes_exactly(uninterrupted, slurm_data, tmp_path):
    job_id, run_dir = submit(experiment(tmp_path, slurm_data, name="preempted", **SECTIONS))
    seen = wait_for_samples(run_dir, job_id, 5)
    signal = subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], capture_output=True, text=True)
    assert signal.returncode == 0, signal.stderr
    state = wait_for_job(job_id, run_dir)
    log = job_log(run_dir, job_id)
    assert state.state == "COMPLETED", f"{state}\n{log[-4000:]}"

    # it stopped mid-training on the signal, saved, requeued itself (SLURM_RESTART_COUNT 0 then 1)
    assert "lm-slurm: USR1" in log
    stops = [line for line in log.splitlines() if line.startswith("stopped by SIGUSR1 at step ")]
    assert len(stops) == 1, log[-4000:]
    stop_step = int(stops[0].split("at step ")[1].split(";")[0])
    assert seen <= stop_step < MAX_STEPS, stops[0]
    assert "requeueing SLURM job" in stops[0]
    assert "restart_count=0" in log and "restart_count=1" in log, log[-4000:]
    assert f"resuming from {run_dir / 'checkpoints' / f'step-{stop_step:08d}'}" in log
    assert state.restarts == 1, state

    # the optimizer steps of both runs add up to max_steps exactly: no step lost, none done twice
    records = [json.loads(line) for line in (run_dir / "samples" / "rank00000.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, MAX_STEPS + 1))
    straight = uninterrupted[1]
    assert read_samples(run_dir) == read_samples(straight)
    assert read_manifest(latest_complete(run_dir / "checkpoints"))["step"] == MAX_STEPS

    # the logs continued: one CSV with the steps of both runs, as many as the uninterrupted run's
    steps = _train_steps(run_dir)
    assert steps == _train_steps(straight) == list(range(1, MAX_STEPS + 1))

    # final weights equal to the uninterrupted run's
    a = checkpoint_state_dict(latest_complete(straight / "checkpoints"))
    b = checkpoint_state_dict(latest_complete(run_dir / "checkpoints"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after the requeue (stopped at step {stop_step})"

    out = run_lm("status", str(run_dir)).stdout
    assert "COMPLETED" in out and "restarts 1" in out and "runs:            2 (restart counts [0, 1])" in out


def test_two_rank_srun_job_with_deepspeed_on_gloo(slurm_cluster, slurm_data, tmp_path):
    path = experiment(
        tmp_path, slurm_data, name="two-ranks", train={"max_steps": 4, "val_every_n_steps": 0, "record_samples": True}
    )
    job_id, run_dir = submit(
        path, "train.devices=2", "train.accelerator=cpu", "train.strategy=deepspeed", "train.zero_stage=2"
    )
    script = (run_dir / "slurm" / "job.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "srun " in script
    state = wait_for_job(job_id, run_dir, timeout=400)
    assert state.state == "COMPLETED", f"{state}\n{job_log(run_dir, job_id)[-4000:]}"
    manifest = read_manifest(latest_complete(run_dir / "checkpoints"))
    assert manifest["world_size"] == 2 and manifest["step"] == 4
    assert (run_dir / "checkpoints" / "step-00000004" / "model.ckpt").is_dir()  # a DeepSpeed checkpoint
    r0, r1 = read_samples(run_dir, 0), read_samples(run_dir, 1)
    assert sorted(r0) == sorted(r1) == [1, 2, 3, 4]
    for step in r0:
        assert not set(sum(r0[step], [])) & set(sum(r1[step], [])), f"ranks saw the same samples at step {step}"
