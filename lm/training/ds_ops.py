"""DeepSpeed's JIT-built CPU op (``deepspeed_shm_comm``), built by the launching process before any
rank starts, so that a killed build can never hang later runs.

PyTorch builds extensions under ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``)
and guards each build with a ``lock`` file it deletes when done; a process killed mid-build leaves
that file behind and every later build of the op waits for it forever, silently. Here the
launching process takes an ``fcntl.flock`` on ``<extensions dir>/.rnn-lm-build.lock`` (released by
the kernel when its holder dies), removes a ``lock`` file left in the op's build directory (under
the flock no build of ours can own it), and builds/loads the op; the ranks then find it built.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Callable

BUILD_LOCK = ".rnn-lm-build.lock"
OPS = ("ShareMemCommBuilder",)


def extensions_dir() -> Path:
    """Where PyTorch builds JIT extensions (``TORCH_EXTENSIONS_DIR`` or its default)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory("deepspeed_shm_comm", verbose=False)).parent


def prebuild_cpu_ops(echo: Callable[[str], None] = print) -> None:
    """Build (or just load, when up to date) DeepSpeed's CPU ops under our own lock."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    root = extensions_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / BUILD_LOCK, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            echo(f"waiting for another process to finish building DeepSpeed's ops in {root}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        for name in OPS:
            builder = get_accelerator().create_op_builder(name)
            if builder is None:
                continue
            stale = root / builder.name / "lock"
            if stale.exists():
                stale.unlink()
                echo(f"note: removed a stale build lock {stale} (a build of {builder.name} was killed)")
            builder.load()
