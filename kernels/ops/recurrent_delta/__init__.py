"""``recurrent_delta``: the reference recurrence and its fast paths (see kernels/README.md)."""

from kernels.ops.recurrent_delta.reference import recurrent_delta_reference


def _reference():
    return recurrent_delta_reference


def _torch():
    from kernels.ops.recurrent_delta.torch_recurrent import recurrent_delta_torch

    return recurrent_delta_torch


def _triton():
    from kernels.ops.recurrent_delta.triton_recurrent import recurrent_delta_triton

    return recurrent_delta_triton


#: backend name -> loader returning the implementation (same signature as the reference)
BACKENDS = {"reference": _reference, "torch": _torch, "triton": _triton}
