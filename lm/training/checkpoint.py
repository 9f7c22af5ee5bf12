"""Checkpoints that are written atomically, verified before use, and resume training exactly.

Layout of ``<run_dir>/checkpoints/``::

    step-00000500/            one complete checkpoint
        model.ckpt            Lightning checkpoint (a directory under DeepSpeed)
        rng/rank00000.pt      per-rank RNG states (torch, CUDA, numpy, python)
        manifest.json         written last: step, files and sizes, config, tokenizer
    last                      text file naming the newest complete checkpoint
    .tmp-step-00000600/       a checkpoint being written (never loaded; removed on the next save)

A checkpoint is complete when its manifest exists and every file it lists has the recorded size.
This module reads and checks that layout (no Lightning import: evaluation loads fast);
:class:`lm.training.checkpoint_manager.CheckpointManager` writes it during training.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from lm.errors import LMError

MANIFEST = "manifest.json"
STATE = "model.ckpt"
PREFIX = "step-"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def files_with_sizes(root: Path) -> Dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def is_complete(ckpt_dir: Path) -> bool:
    """True when the manifest exists and every listed file is present with its recorded size."""
    manifest = ckpt_dir / MANIFEST
    if not manifest.is_file():
        return False
    try:
        info = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    for rel, size in info.get("files", {}).items():
        f = ckpt_dir / rel
        if not f.is_file() or f.stat().st_size != size:
            return False
    return bool(info.get("files"))


def read_manifest(ckpt_dir: Path) -> Dict[str, Any]:
    return json.loads((Path(ckpt_dir) / MANIFEST).read_text())


def list_complete(directory: Path) -> List[Path]:
    """Complete checkpoints in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and is_complete(p)]
    return sorted(found, key=lambda p: read_manifest(p)["step"])


def latest_complete(directory: Path) -> Optional[Path]:
    """The checkpoint named by ``last`` if complete, else the newest complete one, else None."""
    pointer = directory / "last"
    if pointer.is_file():
        candidate = directory / pointer.read_text().strip()
        if candidate.is_dir() and is_complete(candidate):
            newer = [p for p in list_complete(directory) if read_manifest(p)["step"] > read_manifest(candidate)["step"]]
            return newer[-1] if newer else candidate
    complete = list_complete(directory)
    return complete[-1] if complete else None


def resolve_checkpoint(path: str) -> Path:
    """A checkpoint directory from a user path (the directory, its model.ckpt, or a run dir)."""
    p = Path(path)
    if p.name == STATE:
        p = p.parent
    if (p / "checkpoints").is_dir() and not (p / MANIFEST).exists():
        latest = latest_complete(p / "checkpoints")
        if latest is None:
            raise LMError(f"no complete checkpoint in {p / 'checkpoints'}")
        return latest
    if not p.exists():
        raise LMError(f"checkpoint not found: {path}")
    if not is_complete(p):
        raise LMError(f"checkpoint {path} is incomplete (no manifest or missing/truncated files); refusing to load it")
    return p


# ------------------------------------------------------------------------------------ RNG state


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
