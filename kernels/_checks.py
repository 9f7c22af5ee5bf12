"""Argument validation shared by every op's public wrapper: one ValueError per problem, naming
the argument and the expected shape."""

from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple, Union

import torch

Dims = Sequence[Union[int, str]]


def _fmt(shape: Dims) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def check_tensor(name: str, x: torch.Tensor, expected: Dims, sizes: dict, ref: Optional[torch.Tensor] = None) -> None:
    """Check ``x`` against a symbolic shape such as ``("B", "T", "H", "K")``.

    ``sizes`` maps symbols to known sizes and is filled in with new symbols as they are met, so
    the first tensor fixes B, T, ... and later ones must agree. ``ref`` fixes device and dtype.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor of shape {_fmt(expected)}, got {type(x).__name__}")
    if x.dim() != len(expected):
        raise ValueError(f"{name}: expected {len(expected)} dims {_fmt(expected)}, got shape {tuple(x.shape)}")
    for sym, actual in zip(expected, x.shape):
        if isinstance(sym, int):
            want = sym
        elif sym in sizes:
            want = sizes[sym]
        else:
            sizes[sym] = int(actual)
            continue
        if actual != want:
            concrete = [sizes.get(s, s) if not isinstance(s, int) else s for s in expected]
            raise ValueError(f"{name}: expected shape {_fmt(expected)} = {_fmt(concrete)}, got {tuple(x.shape)}")
    if ref is not None:
        if x.device != ref.device:
            raise ValueError(f"{name}: on {x.device}, expected the same device as the inputs ({ref.device})")
        if not x.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got {x.dtype}")


def check_floating(name: str, x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {x.dtype}")


def check_same_dtype(names_and_tensors: Sequence[Tuple[str, torch.Tensor]]) -> None:
    first_name, first = names_and_tensors[0]
    for name, x in names_and_tensors[1:]:
        if x.dtype != first.dtype:
            raise ValueError(f"{name}: dtype {x.dtype} differs from {first_name}'s {first.dtype}")


#: set to 1 to run the value checks (which read tensor values) on every backend, not only the reference
CHECKS_ENV = "LM_KERNEL_CHECKS"


def value_checks_enabled(reference: bool) -> bool:
    """Whether to run value checks: always on the reference backend (a step loop, where one more read
    costs nothing), elsewhere only with ``LM_KERNEL_CHECKS=1`` -- reading a CUDA tensor's values on
    the host waits for the GPU, which a per-layer check would do on every forward."""
    return reference or os.environ.get(CHECKS_ENV, "0") not in ("", "0")


def check_log_decay(name: str, g: Optional[torch.Tensor]) -> None:
    """Log-space decays must be <= 0 (a decay factor exp(g) <= 1). Reads the values: see
    :func:`value_checks_enabled` for when the ops call it."""
    if g is None or _compiling():
        return
    if bool((g > 0).any()):
        raise ValueError(
            f"{name}: log-space decays must be <= 0 (decay factor exp({name}) <= 1); "
            f"got a maximum of {float(g.detach().max()):.4g}"
        )


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())
