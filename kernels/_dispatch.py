"""Backend selection: explicit ``backend=`` > ``$LM_KERNEL_BACKEND`` > automatic.

Automatic: ``triton`` for CUDA tensors (when installed), ``torch`` otherwise; on the CPU a
sequence shorter than :data:`SHORT_T` (decoding one token at a time) runs the reference step,
which is exactly one recurrence step with no chunk padding. If the chosen op lacks that backend,
the automatic choice falls back to ``torch``, then ``reference``; an explicit choice is an error.

Packed sequences (``cu_seqlens``): a backend marked ``varlen`` (:func:`kernels._varlen.mark_varlen`)
gets ``cu_seqlens=`` (and ``offsets=``, the validated host copy, when marked so); any other runs once per
sequence (:func:`kernels._varlen.per_sequence`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Callable, Dict, Optional

import torch

from kernels._varlen import call_native, is_varlen, per_sequence

BACKENDS = ("reference", "torch", "triton", "fla")
ENV_VAR = "LM_KERNEL_BACKEND"
SHORT_T = 8


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def choose_backend(backend: Optional[str], device: torch.device) -> Optional[str]:
    """The requested backend, validated; None means automatic (see :func:`resolve_auto`)."""
    name = backend or os.environ.get(ENV_VAR) or None
    if name is None:
        return None
    if name not in BACKENDS:
        source = "backend" if backend else ENV_VAR
        raise ValueError(f"{source}: unknown kernel backend '{name}'; choose one of {', '.join(BACKENDS)}")
    if name == "triton":
        if not triton_available():
            raise ValueError("backend 'triton' requested but Triton is not installed (pip install triton)")
        if device.type != "cuda" and not triton_interpret():
            raise ValueError(
                f"backend 'triton' needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 to "
                "run Triton kernels on the CPU interpreter"
            )
    if name == "fla":
        _check_fla(device)
    return name


def fla_available() -> bool:
    """flash-linear-attention's ops (``pip install rnn-lm[fla]``) importable."""
    return importlib.util.find_spec("fla") is not None and importlib.util.find_spec("fla.ops") is not None


def _check_fla(device: torch.device) -> None:
    """``backend="fla"``: never chosen automatically; needs fla, and CUDA or the Triton interpreter."""
    if not fla_available():
        raise ValueError(
            "backend 'fla' requested but flash-linear-attention is not installed (pip install 'rnn-lm[fla]')"
        )
    if device.type != "cuda" and not triton_interpret():
        raise ValueError(
            f"backend 'fla' runs Triton kernels and needs CUDA tensors (got {device.type}); set "
            "TRITON_INTERPRET=1 to run them on the CPU interpreter"
        )


def lazy(module: str, name: str) -> Callable[[], Callable]:
    """An entry of an op's ``BACKENDS`` table: a loader returning ``module.name``, imported on first use (so
    that ``import kernels`` imports neither Triton nor fla)."""
    return lambda: getattr(importlib.import_module(module), name)


def _table(op: str) -> Dict[str, Callable[[], Callable]]:
    return importlib.import_module(f"kernels.ops.{op}").BACKENDS


def is_reference(op: str, fn: Callable) -> bool:
    """Whether ``fn`` (from :func:`resolve`) is ``op``'s reference step loop."""
    return fn is _table(op)["reference"]()


def resolve_auto(op: str, device: torch.device, T: int) -> Callable:
    table = _table(op)
    if device.type == "cuda" and triton_available() and "triton" in table:
        return table["triton"]()
    if device.type != "cuda" and T < SHORT_T:
        return table["reference"]()
    return table["torch"]() if "torch" in table else table["reference"]()


def resolve(op: str, backend: Optional[str], device: torch.device, T: int) -> Callable:
    """The implementation of ``op`` for ``backend`` (None: automatic), imported on first use."""
    if backend is None:
        return resolve_auto(op, device, T)
    table = _table(op)
    if backend not in table:
        raise ValueError(f"op '{op}' has no '{backend}' backend; available: {', '.join(table)}")
    return table[backend]()


def call(op: str, fn: Callable, args: tuple, cu_seqlens: Optional[torch.Tensor], offsets, n_steps: int, batched=()):
    """Call the resolved ``fn``: plainly, natively with ``cu_seqlens=`` when it is marked ``varlen``, else
    once per sequence (``offsets``: the validated ``cu_seqlens`` as a list; zero-length sequences run
    through the reference, which returns the state unchanged)."""
    if cu_seqlens is None or is_varlen(fn):
        return call_native(fn, args, cu_seqlens, offsets)
    return per_sequence(fn, offsets, args, n_steps, batched, empty_fn=_table(op)["reference"]())
