"""The callback that writes checkpoints during training (layout: :mod:`lm.training.checkpoint`).

:class:`CheckpointManager` saves every ``every_n_steps`` optimizer steps, at the last step, and when
a stop was requested (signal), keeping the newest ``keep_last``; it also keeps the training RNG
stream independent of validation and probes, so that resumed runs are bit-exact.

Never destroying the last good state: no checkpoint is written while the loss is non-finite (a
streak of skipped steps) or when the weights themselves are non-finite, and the newest checkpoint
from before a streak is never pruned for the rest of the run (so ``keep_last + 1`` may remain).
A save that fails (full disk, permissions) removes its partial directory and stops training with
a one-line :class:`~lm.errors.LMError`; the earlier checkpoints stay intact.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import Callback

from data.atomic import write_atomic
from lm.errors import LMError
from lm.training.checkpoint import (
    MANIFEST,
    STATE,
    files_with_digests,
    files_with_sizes,
    checkpoint_name,
    list_complete,
)
from lm.training.steps import ends_optimizer_step

log = logging.getLogger(__name__)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> Dict[str, Any]:
    """This process's RNG states: torch, numpy, python (and CUDA when available)."""
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


class CheckpointManager(Callback):
    """Save every ``every_n_steps`` optimizer steps, at ``max_steps`` and on a stop request.

    ``stop`` is a :class:`lm.training.signals.StopRequest`; when any rank saw a signal, all ranks
    agree at the next step boundary, save one checkpoint together and stop (and, under SLURM with
    requeue, the job is requeued).
    """

    def __init__(
        self,
        directory: Path,
        every_n_steps: int,
        keep_last: int,
        manifest_extra: Dict[str, Any],
        stop=None,
        resume_from: Optional[Path] = None,
    ):
        super().__init__()
        self.directory = Path(directory)
        self.every_n_steps = int(every_n_steps)
        self.keep_last = int(keep_last)
        self.manifest_extra = manifest_extra
        self.stop = stop
        self.resume_from = resume_from
        self.last_saved_step: Optional[int] = None
        self._train_rng: Optional[Dict[str, Any]] = None
        self.saved: List[Path] = []
        self.stopped_by_signal: Optional[str] = None
        self.skipped_nonfinite: Optional[int] = None  # the last step not saved because of non-finite values
        self._protected: Optional[Path] = None  # newest checkpoint from before a non-finite streak
        self._in_streak = False

    # ------------------------------------------------------------------------------- resume
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.last_saved_step = trainer.global_step if self.resume_from is not None else None
        if self.stop is not None:
            self.stop.install()
        if self.resume_from is not None:
            rng_file = self.resume_from / "rng" / f"rank{trainer.global_rank:05d}.pt"
            if rng_file.is_file():
                self._train_rng = torch.load(rng_file, weights_only=False)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # The training RNG stream continues from the end of the previous training batch, whatever
        # ran in between (validation draws loader seeds, probes sample): an uninterrupted run and a
        # resumed one (state restored from the checkpoint's rng/ files) draw the same numbers.
        if self._train_rng is not None:
            set_rng_state(self._train_rng)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.stop is not None:
            self.stop.uninstall()

    # ------------------------------------------------------------------------------- saving
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._train_rng = rng_state()
        if not ends_optimizer_step(trainer, batch_idx):
            return
        step = trainer.global_step
        stop_now = self.stop.agreed() if self.stop is not None else False
        due = (self.every_n_steps > 0 and step % self.every_n_steps == 0) or (
            trainer.max_steps > 0 and step >= trainer.max_steps
        )
        if (due or stop_now) and step != self.last_saved_step and step > 0:
            if self._healthy(trainer, pl_module):
                self.save(trainer)
            else:
                self.skipped_nonfinite = step
                if trainer.is_global_zero:
                    log.warning(
                        "step %d: no checkpoint written (non-finite loss or weights); the last good one is kept", step
                    )
        if stop_now:
            self.stopped_by_signal = self.stop.signal_name
            trainer.should_stop = True

    def _healthy(self, trainer: pl.Trainer, pl_module) -> bool:
        """False during a non-finite streak or when any weight is non-finite (agreed across ranks).

        Under ZeRO-3 each rank sees only its own (possibly empty) partitions of the weights.
        """
        streak = int(getattr(pl_module, "nonfinite_streak", 0)) > 0
        finite = not streak and all(bool(torch.isfinite(p).all()) for p in pl_module.parameters() if p.numel())
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = pl_module.device if dist.get_backend() == "nccl" else torch.device("cpu")
            flag = torch.tensor([1.0 if finite else 0.0], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = flag.item() > 0
        if not finite and not self._in_streak:
            self._in_streak = True
            if self.saved or self.resume_from is not None:
                self._protected = self.saved[-1] if self.saved else self.resume_from
        elif finite:
            self._in_streak = False
        return finite

    def save(self, trainer: pl.Trainer) -> Path:
        step = trainer.global_step
        name = checkpoint_name(step)
        final = self.directory / name
        tmp = self.directory / f".tmp-{name}"
        rank = trainer.global_rank
        try:
            if rank == 0:
                self.directory.mkdir(parents=True, exist_ok=True)
                for stale in self.directory.glob(".tmp-*"):
                    shutil.rmtree(stale, ignore_errors=True)
                if final.exists():  # e.g. an earlier attempt reached this step: replace it
                    shutil.rmtree(final)
                tmp.mkdir(parents=True)
            _barrier()
            trainer.save_checkpoint(str(tmp / STATE))
            (tmp / "rng").mkdir(exist_ok=True)
            torch.save(
                self._train_rng if self._train_rng is not None else rng_state(), tmp / "rng" / f"rank{rank:05d}.pt"
            )
            _barrier()
            if rank == 0:
                manifest = {
                    "step": step,
                    "epoch": trainer.current_epoch,
                    "world_size": trainer.world_size,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "files": files_with_sizes(tmp),
                    "sha256": files_with_digests(tmp),
                    **self.manifest_extra,
                }
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
                os.replace(tmp, final)
                write_atomic(self.directory / "last", name + "\n")
                self._prune(keep=final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise LMError(self._save_failed(name, e)) from None
        _barrier()
        self.last_saved_step = step
        self.saved.append(final)
        return final

    def _save_failed(self, name: str, e: OSError) -> str:
        """The one-line message of a failed save: what happened, what survived, what to do."""
        newest = self.saved[-1] if self.saved else self.resume_from
        kept = f"the earlier checkpoints are intact (newest: {newest})" if newest else "no earlier checkpoint exists"
        if e.errno == errno.ENOSPC:
            what, fix = "no space left on the device", "free space"
        elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            what, fix = f"not writable ({e.strerror})", "make it writable"
        else:
            what, fix = e.strerror or str(e), "fix the cause"
        return (
            f"cannot write checkpoint {name} in {self.directory}: {what}; {kept}; {fix} and continue with resume=auto"
        )

    def _prune(self, keep: Path) -> None:
        complete = list_complete(self.directory)
        excess = len(complete) - self.keep_last
        for old in complete:
            if excess <= 0:
                break
            if old != keep and old != self._protected:
                shutil.rmtree(old, ignore_errors=True)
                excess -= 1
