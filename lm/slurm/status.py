"""``lm status <run_dir>``: the last submitted job's state, the last logged step, the last checkpoint.

The job state comes from the first source that knows the job: ``scontrol show job`` (jobs the
controller still holds, with the restart count), ``squeue`` (queued and running jobs), then
``sacct -c`` (the job-completion log, which also works without an accounting database).
"""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from lm.errors import LMError
from lm.slurm.submit import read_jobs

START_LINE = re.compile(r"^lm-slurm: job (\S+) start restart_count=(\d+)", re.MULTILINE)


@dataclass
class JobState:
    job_id: str
    state: str  # RUNNING, PENDING, COMPLETED, FAILED, ... or UNKNOWN
    source: str  # scontrol | squeue | sacct -c | none
    restarts: Optional[int] = None
    exit_code: Optional[str] = None
    reason: Optional[str] = None


def _run(args: List[str]) -> Optional[str]:
    """stdout of a SLURM command, or None when it is missing, fails or prints nothing."""
    if shutil.which(args[0]) is None:
        return None
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = proc.stdout.strip()
    return out if proc.returncode == 0 and out else None


def _fields(line: str) -> Dict[str, str]:
    return dict(item.split("=", 1) for item in line.split() if "=" in item)


def query_job(job_id: str) -> JobState:
    out = _run(["scontrol", "show", "job", "-o", job_id])
    if out:
        f = _fields(out.splitlines()[0])
        if f.get("JobId") == job_id or f.get("JobId", "").startswith(job_id):
            restarts = f.get("Restarts")
            return JobState(
                job_id,
                f.get("JobState", "UNKNOWN"),
                "scontrol",
                int(restarts) if restarts and restarts.isdigit() else None,
                f.get("ExitCode"),
                f.get("Reason"),
            )
    out = _run(["squeue", "-h", "-j", job_id, "-o", "%T|%r"])
    if out:
        state, _, reason = out.splitlines()[0].partition("|")
        return JobState(job_id, state.strip(), "squeue", reason=reason.strip() or None)
    out = _run(["sacct", "-c", "-j", job_id, "-n", "-P", "-o", "JobID,State,ExitCode"])
    if out:
        rows = [line.split("|") for line in out.splitlines() if line.split("|")[0] == job_id]
        if rows:  # one row per run of the job: earlier runs of a requeued job, then the last one
            _, state, code = (rows[-1] + ["", ""])[:3]
            return JobState(job_id, state, "sacct -c", restarts=len(rows) - 1, exit_code=code or None)
    return JobState(job_id, "UNKNOWN", "none")


def last_logged_step(run_dir: Path) -> Optional[int]:
    """The last optimizer step with a logged training loss in ``logs/metrics.csv`` (the CSV's
    ``step`` column counts from 0: the row of step n says n - 1)."""
    path = run_dir / "logs" / "metrics.csv"
    if not path.is_file():
        return None
    best: Optional[int] = None
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("train/loss") in (None, "") or row.get("step") in (None, ""):
                continue
            try:
                step = int(float(row["step"])) + 1
            except ValueError:
                continue
            best = step if best is None else max(best, step)
    return best


def attempts(log_file: Path) -> List[int]:
    """SLURM_RESTART_COUNT of each run of the job, as its script logged them."""
    if not log_file.is_file():
        return []
    return [int(m.group(2)) for m in START_LINE.finditer(log_file.read_text(errors="replace"))]


def status_lines(run_dir: str) -> List[str]:
    from lm.training.checkpoint import latest_complete, read_manifest

    run = Path(run_dir).expanduser().resolve()
    if not run.is_dir():
        raise LMError(f"run directory not found: {run_dir}")
    lines = [f"run:             {run}"]
    jobs = read_jobs(run)
    if jobs:
        job = jobs[-1]
        state = query_job(str(job["job_id"]))
        lines.append(
            f"job:             {job['job_id']} (submitted {job.get('time', '?')}; "
            f"{len(jobs)} submission(s) recorded in slurm/jobs.jsonl)"
        )
        detail = [state.source]
        if state.restarts is not None:
            detail.append(f"restarts {state.restarts}")
        if state.exit_code:
            detail.append(f"exit code {state.exit_code}")
        if state.reason and state.reason not in ("None", "(null)"):
            detail.append(f"reason {state.reason}")
        lines.append(f"state:           {state.state} ({'; '.join(detail)})")
        log = Path(job.get("log") or run / "slurm" / f"job-{job['job_id']}.out")
        runs = attempts(log)
        lines.append(f"runs:            {len(runs)} (restart counts {runs or '-'}); log {log}")
    else:
        lines.append("job:             none recorded (no slurm/jobs.jsonl: not submitted with lm submit)")
    step = last_logged_step(run)
    lines.append(f"last step:       {step if step is not None else '-'} (last training loss in logs/metrics.csv)")
    ckpt = latest_complete(run / "checkpoints")
    if ckpt is None:
        lines.append("last checkpoint: none")
    else:
        manifest = read_manifest(ckpt)
        lines.append(f"last checkpoint: {ckpt} (step {manifest['step']}, written {manifest.get('time', '?')})")
    return lines
