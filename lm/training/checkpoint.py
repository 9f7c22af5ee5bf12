"""Checkpoints that are written atomically, verified before use, and resume training exactly.

Layout of ``<run_dir>/checkpoints/``::

    step-00000500/            one complete checkpoint
        model.ckpt            Lightning checkpoint (a directory under DeepSpeed)
        rng/rank00000.pt      per-rank RNG states (torch, CUDA, numpy, python)
        manifest.json         written last: step, files with sizes and SHA-256, config, tokenizer
    last                      text file naming the newest complete checkpoint
    .tmp-step-00000600/       a checkpoint being written (never loaded; removed on the next save)

A checkpoint is complete when its manifest exists and every file it lists has the recorded size;
it is *verified* when, in addition, every file's SHA-256 equals the manifest's (streamed; done
before a checkpoint is loaded: resume, export, evaluation). A checkpoint that fails is rejected
with its reason (:func:`latest_complete` reports it) and the next older one is used.
This module reads and checks that layout (no torch or Lightning import: evaluation and ``lm status``
load fast);
:class:`lm.training.checkpoint_manager.CheckpointManager` writes it during training.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from data.atomic import write_atomic
from lm.errors import LMError

#: the project's atomic file writer under its older name (lm.slurm.submit imports it)
write_atomic_text = write_atomic

MANIFEST = "manifest.json"
STATE = "model.ckpt"
#: the run's copy of its tokenizer, ``<run_dir>/tokenizer.json`` (beside ``config.yaml`` and ``checkpoints/``)
RUN_TOKENIZER = "tokenizer.json"
PREFIX = "step-"
_CHUNK = 1 << 20


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def files_with_sizes(root: Path) -> Dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(_CHUNK), b""):
            digest.update(piece)
    return digest.hexdigest()


def files_with_digests(root: Path) -> Dict[str, str]:
    """relative path -> SHA-256 of every file under ``root``."""
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def check_checkpoint(ckpt_dir: Path, verify: bool = False) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """(manifest, None) for a complete checkpoint, else (None, the reason it is rejected).

    ``verify``: also compare every file's SHA-256 with the manifest (manifests written before
    checksums existed are checked by size only).
    """
    manifest = ckpt_dir / MANIFEST
    if not manifest.is_file():
        return None, "no manifest.json (the save did not finish)"
    try:
        info = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return None, f"unreadable manifest.json ({type(e).__name__})"
    if not isinstance(info, dict) or not info.get("files") or "step" not in info:
        return None, "manifest.json lists no files"
    for rel, size in info["files"].items():
        f = ckpt_dir / rel
        if not f.is_file():
            return None, f"{rel} is missing"
        actual = f.stat().st_size
        if actual != size:
            return None, f"{rel} has {actual} bytes, the manifest says {size}"
    if verify:
        for rel, expected in (info.get("sha256") or {}).items():
            if sha256_file(ckpt_dir / rel) != expected:
                return None, f"{rel} fails its SHA-256 check (corrupt)"
    return info, None


def _complete_manifest(ckpt_dir: Path) -> Optional[Dict[str, Any]]:
    """The manifest of a complete checkpoint (see :func:`is_complete`), else None; read once."""
    return check_checkpoint(ckpt_dir)[0]


def is_complete(ckpt_dir: Path) -> bool:
    """True when the manifest exists and every listed file is present with its recorded size."""
    return _complete_manifest(ckpt_dir) is not None


def read_manifest(ckpt_dir: Path) -> Dict[str, Any]:
    return json.loads((Path(ckpt_dir) / MANIFEST).read_text())


def step_dirs(directory: Path) -> List[Path]:
    """Every ``step-*`` directory in ``directory`` (complete or not), by name."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def _complete_with_steps(directory: Path, rejected: Optional[List[Tuple[Path, str]]] = None) -> List[Tuple[int, Path]]:
    """(step, path) of the complete checkpoints in ``directory``, oldest first (one manifest read each);
    the others are added to ``rejected`` with their reason."""
    found = []
    for p in step_dirs(directory):
        info, reason = check_checkpoint(p)
        if info is not None:
            found.append((info["step"], p))
        elif rejected is not None:
            assert reason is not None  # check_checkpoint gives a reason with every rejection
            rejected.append((p, reason))
    return sorted(found, key=lambda item: item[0])


def list_complete(directory: Path) -> List[Path]:
    """Complete checkpoints in ``directory``, oldest first."""
    return [p for _, p in _complete_with_steps(directory)]


def latest_complete(
    directory: Path, verify: bool = False, rejected: Optional[List[Tuple[Path, str]]] = None
) -> Optional[Path]:
    """The checkpoint named by ``last`` if complete, else the newest complete one, else None.

    ``verify``: check content checksums too, newest first, falling back to older checkpoints.
    ``rejected``: a list that receives (path, reason) of every newer checkpoint passed over.
    """
    order: List[Tuple[int, Path]] = _complete_with_steps(directory, rejected)
    pointer = directory / "last"
    if pointer.is_file():
        candidate = directory / pointer.read_text().strip()
        steps = {p: step for step, p in order}
        if candidate not in steps and candidate.is_dir():  # not a step-* directory of this one
            info = _complete_manifest(candidate)
            if info is not None and not any(step > info["step"] for step, _ in order):
                order.append((info["step"], candidate))
    for _, path in reversed(order):
        if not verify:
            return path
        info, reason = check_checkpoint(path, verify=True)
        if info is not None:
            return path
        if rejected is not None:
            assert reason is not None  # check_checkpoint gives a reason with every rejection
            rejected.append((path, reason))
    return None


def resolve_checkpoint(path: str, verify: bool = True) -> Path:
    """A verified checkpoint directory from a user path (the directory, its model.ckpt, or a run dir)."""
    p = Path(path)
    if p.name == STATE:
        p = p.parent
    if (p / "checkpoints").is_dir() and not (p / MANIFEST).exists():
        rejected: List[Tuple[Path, str]] = []
        latest = latest_complete(p / "checkpoints", verify=verify, rejected=rejected)
        if latest is None:
            why = f" ({rejected[0][0].name}: {rejected[0][1]})" if rejected else ""
            raise LMError(f"no complete checkpoint in {p / 'checkpoints'}{why}")
        return latest
    if not p.exists():
        raise LMError(f"checkpoint not found: {path}")
    info, reason = check_checkpoint(p, verify=verify)
    if info is None:
        raise LMError(f"checkpoint {path} is incomplete or corrupt ({reason}); refusing to load it")
    return p
