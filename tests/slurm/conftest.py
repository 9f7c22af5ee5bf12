"""A real one-node SLURM cluster for the tests marked ``slurm`` (brought up by ``cluster.sh``:
munge, slurmctld, slurmd from Debian packages) and helpers that submit with ``lm submit`` and wait
for jobs. The cluster is skipped, with the reason, only where SLURM cannot be installed (not root,
no apt-get, the install fails); any other failure to bring it up fails the tests.

The SLURM tests are meant to run in one pytest-xdist worker (``xdist_group("slurm")`` with
``--dist loadgroup``), but do not rely on it: the corpus and the uninterrupted reference run are
made once per test session under a lock in the directory all workers share, and cluster.sh takes a
lock of its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator, Tuple

import pytest

from tests.helpers import prepare_tiny_data, run_lm

CLUSTER_SH = Path(__file__).with_name("cluster.sh")
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """Install and start the cluster (idempotent); the node's name."""
    if os.geteuid() != 0:
        pytest.skip("cannot install SLURM here: not root")
    if shutil.which("apt-get") is None:
        pytest.skip("cannot install SLURM here: no apt-get")
    proc = subprocess.run(["bash", str(CLUSTER_SH)], capture_output=True, text=True, timeout=900)
    lines = proc.stdout.strip().splitlines()
    last = lines[-1] if lines else proc.stderr.strip()
    if proc.returncode == 3:
        pytest.skip(last.removeprefix("cluster.sh: "))
    if proc.returncode != 0:
        pytest.fail(f"cluster.sh failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return last


@contextlib.contextmanager
def shared_dir(tmp_path_factory, name: str) -> Iterator[Path]:
    """``<session temp>/<name>``, the same directory for every xdist worker, held under a lock."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield root / name


@pytest.fixture(scope="session")
def slurm_data(tmp_path_factory) -> Path:
    """The tiny corpus, prepared once for all workers (runs compared with each other share it)."""
    with shared_dir(tmp_path_factory, "slurm-data") as out:
        if not (out / "metadata.json").is_file():
            prepare_tiny_data(out)
    return out


def run_once(tmp_path_factory, name: str, make) -> dict:
    """``make(directory)`` -> a JSON-able dict, computed by the first worker to ask, read by the rest."""
    with shared_dir(tmp_path_factory, name) as directory:
        result = directory / "result.json"
        if not result.is_file():
            directory.mkdir(exist_ok=True)
            value = make(directory)
            result.write_text(json.dumps(value))
        return json.loads(result.read_text())


def job_log(run_dir: Path, job_id: str) -> str:
    path = run_dir / "slurm" / f"job-{job_id}.out"
    return path.read_text(errors="replace") if path.is_file() else f"(no job log at {path})"


def submit(experiment_path: Path, *args: str) -> Tuple[str, Path]:
    """``lm submit`` an experiment file; (job id, run directory) from its jobs.jsonl record."""
    proc = run_lm("submit", str(experiment_path), "--time", "10:00", "--cpus-per-task", "1", *args)
    assert "submitted job" in proc.stdout, proc.stdout
    import yaml

    run_dir = Path(yaml.safe_load(experiment_path.read_text())["run_dir"])
    record = json.loads((run_dir / "slurm" / "jobs.jsonl").read_text().splitlines()[-1])
    return str(record["job_id"]), run_dir


def wait_for_job(job_id: str, run_dir: Path, timeout: float = 600.0):
    """Poll until the job reaches a final state; its :class:`lm.slurm.status.JobState`."""
    from lm.slurm.status import query_job

    deadline = time.time() + timeout
    while time.time() < deadline:
        state = query_job(job_id)
        if state.state in FINAL_STATES:
            return state
        time.sleep(1.0)
    subprocess.run(["scancel", job_id], capture_output=True)
    raise AssertionError(
        f"job {job_id} did not finish in {timeout:.0f} s (last state {state.state}); "
        f"log:\n{job_log(run_dir, job_id)[-4000:]}"
    )


def wait_for_samples(run_dir: Path, job_id: str, step: int, timeout: float = 600.0) -> int:
    """Wait until rank 0 has recorded a sample of optimizer step ``step``; the step seen."""
    from lm.slurm.status import query_job

    path = run_dir / "samples" / "rank00000.jsonl"
    deadline = time.time() + timeout
    checked = time.time()
    while time.time() < deadline:
        if path.is_file():
            lines = path.read_text().splitlines()
            if lines and json.loads(lines[-1])["step"] >= step:
                return json.loads(lines[-1])["step"]
        if time.time() - checked > 2.0:
            checked = time.time()
            if query_job(job_id).state in FINAL_STATES:
                raise AssertionError(f"job {job_id} ended before step {step}:\n{job_log(run_dir, job_id)[-4000:]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout:.0f} s:\n{job_log(run_dir, job_id)[-4000:]}")
