"""``gla``: the reference recurrence and its fast paths (see kernels/README.md)."""

from kernels.ops.gla.reference import gla_reference


def _reference():
    return gla_reference


def _torch():
    from kernels.ops.gla.torch_chunk import gla_chunked

    return gla_chunked


def _triton():
    from kernels.ops.gla.triton_chunk import gla_triton

    return gla_triton


def _fla():
    from kernels.ops.gla.fla import gla_fla

    return gla_fla


#: backend name -> loader returning the implementation (same signature as the reference)
BACKENDS = {"reference": _reference, "torch": _torch, "triton": _triton, "fla": _fla}
