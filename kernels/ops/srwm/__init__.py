"""``srwm``: the reference recurrence and its fast paths (see kernels/README.md)."""

from kernels.ops.srwm.reference import srwm_reference


def _reference():
    return srwm_reference


def _torch():
    from kernels.ops.srwm.torch_recurrent import srwm_torch

    return srwm_torch


def _triton():
    from kernels.ops.srwm.triton_recurrent import srwm_triton

    return srwm_triton


#: backend name -> loader returning the implementation (same signature as the reference)
BACKENDS = {"reference": _reference, "torch": _torch, "triton": _triton}
