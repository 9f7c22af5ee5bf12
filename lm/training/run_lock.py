"""The run-directory lock: one training job per ``run_dir`` at a time.

``<run_dir>/.lock`` is held with an advisory ``fcntl.flock`` for the life of the run by the
launching process (global rank 0; the ranks Lightning or ``srun`` start never take it). It records
the holder's host, PID and start time. The kernel drops a flock when its holder dies (kill -9, a
SLURM requeue), so a lock file left behind by a dead process is taken over with a message; a lock
held by a live process stops the second job with a one-line :class:`~lm.errors.LMError` before it
writes anything. Where the file system does not support flock, the recorded PID is checked
instead (same host only). Readers (``lm eval``, ``lm probe``) use :func:`holder` to see whether a
run is live.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable, Dict, Optional

from data.atomic import pid_alive as _pid_alive
from lm.errors import LMError

LOCK_FILE = ".lock"


def _describe(info: Dict) -> str:
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {info.get('started', '?')}"


def _read_info(path: Path) -> Dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def holder(run_dir: Path) -> Optional[Dict]:
    """The live holder of ``run_dir``'s lock (host, pid, started), or None when the run is not live."""
    path = Path(run_dir) / LOCK_FILE
    if not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return _read_info(path) or {"pid": "?", "host": "?"}
        info = _read_info(path)  # no flock here: trust a live PID on this host
        return info if info.get("host") == socket.gethostname() and _pid_alive(int(info.get("pid", 0))) else None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunLock:
    """``with RunLock(run_dir):`` holds ``<run_dir>/.lock`` (see the module docstring)."""

    def __init__(self, run_dir: Path, echo: Callable[[str], None] = print):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.echo = echo
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise LMError(
                f"run_dir {self.run_dir}: cannot create {LOCK_FILE} ({e.strerror or e}); "
                f"make it writable or choose another run_dir=..."
            ) from None
        previous = _read_info(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                raise LMError(
                    f"run_dir {self.run_dir} is in use by another training job ({_describe(previous)}); "
                    f"wait for it to finish, stop it, or choose another run_dir=..."
                ) from None
            # no flock on this file system: fall back to the recorded PID (same host)
            if (
                previous.get("host") == socket.gethostname()
                and previous.get("pid") != os.getpid()
                and _pid_alive(int(previous.get("pid", 0)))
            ):
                os.close(fd)
                raise LMError(
                    f"run_dir {self.run_dir} is in use by another training job ({_describe(previous)}); "
                    f"wait for it to finish, stop it, or choose another run_dir=..."
                ) from None
        if previous.get("pid") not in (None, os.getpid()):
            self.echo(f"note: took over the stale lock of {self.run_dir} ({_describe(previous)}, no longer running)")
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock; the file is emptied (not removed, so no other job can lock a different inode)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_output_dir(target: Path, option: str = "--out") -> None:
    """Refuse to write a reader's results (``lm eval``, ``lm probe``) at ``target`` when it lies in a
    live run (its trainer holds the lock) or in a directory that is not writable: one line naming
    ``option``, the way to write the results elsewhere."""
    import tempfile

    target = Path(target).absolute()
    for parent in [target, *target.parents][:5]:
        if (parent / LOCK_FILE).is_file():
            live = holder(parent)
            if live is not None:
                raise LMError(
                    f"{parent} is being trained ({_describe(live)}); it is read, never written, while the "
                    f"run is live: pass {option} <dir> to write the results elsewhere"
                )
            break
    existing = next(p for p in [target, *target.parents] if p.exists())
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".write-test"):
            pass
    except OSError as e:
        raise LMError(
            f"cannot write the results to {target}: {existing} is not writable ({e.strerror or e}); "
            f"pass {option} <dir> to write them elsewhere"
        ) from None
