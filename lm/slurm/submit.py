"""``lm submit``: validate, render, write the job files atomically, ``sbatch``, record the job.

Files written under ``<run_dir>/slurm/``::

    experiment.yaml   the composed config the job trains (a requeued job runs exactly this)
    job.sbatch        the rendered script
    jobs.jsonl        one line per submission: job id, time, script, log, experiment, overrides
    job-<id>.out      the job's output (written by SLURM, appended to by every rerun)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from lm.errors import LMError
from lm.slurm.render import render
from lm.slurm.spec import JobSpec, apply_flags, check_resume, job_spec
from lm.training.checkpoint import write_atomic_text

JOBS = "jobs.jsonl"


@dataclass
class Submission:
    spec: JobSpec
    script: str
    config: Any = None  # the composed experiment config (DictConfig)
    job_id: Optional[str] = None

    @property
    def log_file(self) -> Optional[Path]:
        if self.job_id is None:
            return None
        return Path(str(self.spec.log_pattern).replace("%j", self.job_id))


def prepare_submission(experiment: str, overrides: List[str], flags: Dict[str, Any]) -> Submission:
    """Compose and validate the config, apply the flags, build and render the job (writes nothing)."""
    from lm.config import load_experiment

    check_resume(overrides)
    cfg = load_experiment(experiment, overrides)
    apply_flags(cfg, flags)
    spec = job_spec(cfg)
    cfg.run_dir = str(spec.run_dir)  # the job resolves nothing relative to where it happens to start
    return Submission(spec, render(spec), config=cfg)


def sbatch_path() -> str:
    path = shutil.which("sbatch")
    if path is None:
        raise LMError(
            "sbatch not found on PATH (is this a SLURM login node?); "
            "use `lm submit ... --dry-run` to print the job script without submitting"
        )
    return path


def submit(
    experiment: str,
    overrides: List[str],
    flags: Dict[str, Any],
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
) -> Submission:
    """Render and (unless ``dry_run``) submit; returns the submission with its job id."""
    from lm.config import to_yaml

    sub = prepare_submission(experiment, overrides, flags)
    if dry_run:
        echo(sub.script.rstrip("\n"))
        return sub
    sbatch = sbatch_path()
    spec = sub.spec
    spec.slurm_dir.mkdir(parents=True, exist_ok=True)
    write_atomic_text(spec.snapshot_path, to_yaml(sub.config), mode=0o644)
    write_atomic_text(spec.script_path, sub.script, mode=0o755)
    proc = subprocess.run([sbatch, "--parsable", str(spec.script_path)], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise LMError(f"sbatch failed ({proc.returncode}): {lines[-1] if lines else 'no output'}")
    sub.job_id = proc.stdout.strip().split(";")[0]
    record = {
        "job_id": sub.job_id,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "script": str(spec.script_path),
        "log": str(sub.log_file),
        "run_dir": str(spec.run_dir),
        "experiment": experiment,
        "overrides": list(overrides),
        "variant": spec.variant,
        "nodes": spec.nodes,
        "tasks_per_node": spec.tasks_per_node,
        "gpus_per_node": spec.gpus_per_node,
    }
    with open(spec.slurm_dir / JOBS, "a") as f:  # one short line per write: appends do not interleave
        f.write(json.dumps(record) + "\n")
    echo(
        f"submitted job {sub.job_id} ({spec.variant}: {spec.nodes} node(s) x {spec.tasks_per_node} rank(s), "
        f"time {spec.time}); run {spec.run_dir}; log {sub.log_file}"
    )
    echo(f"follow it with: lm status {spec.run_dir}")
    return sub


def read_jobs(run_dir: Path) -> List[Dict[str, Any]]:
    """The submissions recorded for ``run_dir``, oldest first (unreadable lines are skipped)."""
    path = Path(run_dir) / "slurm" / JOBS
    if not path.is_file():
        return []
    jobs = []
    for line in path.read_text().splitlines():
        try:
            jobs.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return jobs
