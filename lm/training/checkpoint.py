"""Checkpoints that are written atomically, verified before use, and resume training exactly.

Layout of ``<run_dir>/checkpoints/``::

    step-00000500/            one complete checkpoint
        model.ckpt            Lightning checkpoint (a directory under DeepSpeed)
        rng/rank00000.pt      per-rank RNG states (torch, CUDA, numpy, python)
        manifest.json         written last: step, files and sizes, config, tokenizer
    last                      text file naming the newest complete checkpoint
    .tmp-step-00000600/       a checkpoint being written (never loaded; removed on the next save)

A checkpoint is complete when its manifest exists and every file it lists has the recorded size.
This module reads and checks that layout (no torch or Lightning import: evaluation and ``lm status``
load fast);
:class:`lm.training.checkpoint_manager.CheckpointManager` writes it during training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from lm.errors import LMError

MANIFEST = "manifest.json"
STATE = "model.ckpt"
PREFIX = "step-"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def files_with_sizes(root: Path) -> Dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def write_atomic_text(path: Path, text: str, mode: Optional[int] = None) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (``mode``: chmod it first)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    if mode is not None:
        os.chmod(tmp, mode)
    os.replace(tmp, path)


def _complete_manifest(ckpt_dir: Path) -> Optional[Dict[str, Any]]:
    """The manifest of a complete checkpoint (see :func:`is_complete`), else None; read once."""
    manifest = ckpt_dir / MANIFEST
    if not manifest.is_file():
        return None
    try:
        info = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    for rel, size in info.get("files", {}).items():
        f = ckpt_dir / rel
        if not f.is_file() or f.stat().st_size != size:
            return None
    return info if info.get("files") else None


def is_complete(ckpt_dir: Path) -> bool:
    """True when the manifest exists and every listed file is present with its recorded size."""
    return _complete_manifest(ckpt_dir) is not None


def read_manifest(ckpt_dir: Path) -> Dict[str, Any]:
    return json.loads((Path(ckpt_dir) / MANIFEST).read_text())


def _complete_with_steps(directory: Path) -> List[Tuple[int, Path]]:
    """(step, path) of the complete checkpoints in ``directory``, oldest first (one manifest read each)."""
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX):
            info = _complete_manifest(p)
            if info is not None:
                found.append((info["step"], p))
    return sorted(found, key=lambda item: item[0])


def list_complete(directory: Path) -> List[Path]:
    """Complete checkpoints in ``directory``, oldest first."""
    return [p for _, p in _complete_with_steps(directory)]


def latest_complete(directory: Path) -> Optional[Path]:
    """The checkpoint named by ``last`` if complete, else the newest complete one, else None."""
    complete = _complete_with_steps(directory)
    pointer = directory / "last"
    if pointer.is_file():
        candidate = directory / pointer.read_text().strip()
        steps = {p: step for step, p in complete}
        if candidate in steps:
            candidate_step = steps[candidate]
        else:  # not a step-* directory of this one: check it on its own
            info = _complete_manifest(candidate) if candidate.is_dir() else None
            candidate_step = info["step"] if info is not None else None
        if candidate_step is not None:
            newer = [p for step, p in complete if step > candidate_step]
            return newer[-1] if newer else candidate
    return complete[-1][1] if complete else None


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
