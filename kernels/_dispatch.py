"""Backend selection: explicit ``backend=`` > ``$LM_KERNEL_BACKEND`` > device default."""

from __future__ import annotations

import importlib
import os
from typing import Callable, Dict, Optional

import torch

BACKENDS = ("reference", "torch", "triton")
ENV_VAR = "LM_KERNEL_BACKEND"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def choose_backend(backend: Optional[str], device: torch.device) -> str:
    name = backend or os.environ.get(ENV_VAR) or None
    if name is None:
        return "triton" if device.type == "cuda" and triton_available() else "torch"
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
    return name


def resolve(op: str, backend: str) -> Callable:
    """The implementation of ``op`` for ``backend`` (imported on first use)."""
    module = importlib.import_module(f"kernels.ops.{op}")
    table: Dict[str, Callable[[], Callable]] = module.BACKENDS
    if backend not in table:
        raise ValueError(f"op '{op}' has no '{backend}' backend; available: {', '.join(table)}")
    return table[backend]()
