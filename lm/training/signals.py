"""Graceful stops on SIGTERM, SIGINT and SIGUSR1 (SLURM's pre-emption / time-limit warning).

The handler only records the signal: nothing heavy may run inside a signal handler (it can fire
in the middle of a backward pass or a collective). At the next optimizer-step boundary every rank
calls :meth:`StopRequest.agreed`, an all-reduce of the flag, so all ranks decide together, save
one checkpoint and stop. With ``requeue`` (SIGUSR1 under SLURM) rank 0 then runs
``scontrol requeue $SLURM_JOB_ID`` so the job continues from that checkpoint.
A second SIGINT while a stop is pending raises KeyboardInterrupt (for the impatient).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from types import FrameType
from typing import Any, Callable, Dict, Optional, Union

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

HANDLED = ("SIGTERM", "SIGINT", "SIGUSR1")
#: the signals that ask for a requeue after the checkpoint (under SLURM)
REQUEUE_ON = ("SIGUSR1",)

#: what ``signal.signal`` returns and accepts: a handler, SIG_DFL / SIG_IGN, or None (not set from Python)
_Handler = Union[Callable[[int, Optional[FrameType]], Any], int, signal.Handlers, None]


class StopRequest:
    """The stop flag and its signal handlers.

    Under SLURM (``SLURM_JOB_ID`` set) the requeue signal's handler is installed at once, when the
    object is created before ``Trainer.fit``: a USR1 that comes while the job is still starting
    is remembered (instead of killing the rank) and acted on at the first step boundary, and
    Lightning, which finds a handler already there, does not add its own SLURM handler (that one
    saves a checkpoint inside the handler and requeues at once). The other signals keep their
    default behaviour until :meth:`install` (Ctrl-C still interrupts data preparation).
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: Optional[str] = None
        self.requeue_on = REQUEUE_ON
        self._previous: Dict[int, _Handler] = {}
        if "SLURM_JOB_ID" in os.environ:
            for name in self.requeue_on:
                sig = getattr(signal, name, None)
                if sig is not None:
                    try:
                        signal.signal(sig, self._handler)
                    except ValueError:  # not in the main thread
                        pass

    def _handler(self, signum: int, frame: Optional[FrameType]) -> None:
        name = signal.Signals(signum).name
        if self.requested and name == "SIGINT":
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = self.signal_name or name

    def install(self) -> None:
        """Install the handlers (after Lightning's own, which they replace for these signals)."""
        for name in HANDLED:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not in the main thread
                pass

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            try:
                signal.signal(sig, previous)
            except (ValueError, TypeError):
                pass
        self._previous.clear()

    def _code(self) -> float:
        """0: no signal; 1: stop; 2: stop and requeue."""
        if not self.requested:
            return 0.0
        return 2.0 if self.signal_name in self.requeue_on else 1.0

    def agreed(self) -> bool:
        """True on every rank if any rank received a signal (a collective: call on all ranks).

        A requeue request anywhere wins, so every rank ends up with the same ``signal_name``.
        """
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            backend = dist.get_backend()
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
            flag = torch.tensor([self._code()], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            code = flag.item()
            if code > self._code():
                self.requested = True
                self.signal_name = self.requeue_on[0] if code == 2.0 else "SIGTERM"
            return code > 0
        return self.requested

    @property
    def wants_requeue(self) -> bool:
        return self.signal_name in self.requeue_on and "SLURM_JOB_ID" in os.environ


def requeue_slurm_job() -> bool:
    """``scontrol requeue $SLURM_JOB_ID``; True when the command succeeded."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{job}_{task}" if job and task else os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return False
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job_id, result.stderr.strip())
        return False
    log.warning("requeued SLURM job %s", job_id)
    return True
