"""Atomic outputs: a file or a directory appears complete or not at all.

:func:`write_atomic` writes a file (text or bytes) through a temporary sibling and a rename: the one
file writer of the project (checkpoint pointers, config.yaml, summaries, evaluation reports).

:func:`atomic_directory` yields an empty ``.<name>.tmp-<pid>-<random>`` directory next to the
target. On normal exit the target (if any) is replaced by it; on any exception, Ctrl-C or SIGTERM
the temporary directory is deleted, so no partial output is ever left. Leftovers of a process
that was killed outright (SIGKILL) are removed by the next run once their pid is gone.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union


def write_atomic(path: Union[str, Path], content: Union[str, bytes], mode: Optional[int] = None) -> Path:
    """Write ``content`` (text as UTF-8, or bytes) to ``path`` through a temporary sibling and a rename;
    ``mode``: chmod the file first. Creates the parent directory; a failed write leaves no temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content, encoding="utf-8")
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(target: Path) -> None:
    """Delete ``.<name>.tmp-<pid>-*`` / ``.<name>.old-<pid>-*`` siblings whose process is gone."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(?:tmp|old)-(\d+)-[0-9a-f]+$")
    if not target.parent.is_dir():
        return
    for entry in target.parent.iterdir():
        m = pattern.match(entry.name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises KeyboardInterrupt (so cleanup runs); main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``target``; replace ``target`` with it on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = target.parent / f".{target.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        with sigterm_as_interrupt():
            yield tmp
            old = None
            if target.exists():
                old = target.parent / f".{target.name}.old-{tag}"
                os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                if old is not None:
                    os.replace(old, target)
                raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
