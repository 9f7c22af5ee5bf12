"""Child processes run in their own process group (session), so that a timeout or an interruption
kills all of them: ``lm train`` under DeepSpeed or Lightning may leave ranks and data workers behind
its own pid."""

from __future__ import annotations

import os
import signal
import subprocess
from typing import List, Optional


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s whole process group (it was started with ``start_new_session=True``)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_group(cmd: List[str], timeout: Optional[float], **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` in a new session. On timeout
    (``subprocess.TimeoutExpired``) or any interruption the whole group is killed before the exception
    propagates; after a normal exit too (leftovers such as an orphaned rank go with it)."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        kill_group(proc)
        proc.communicate()
        raise
    kill_group(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
