"""``linear_scan``: the reference recurrence and its fast paths (see kernels/README.md)."""

from kernels.ops.linear_scan.reference import linear_scan_reference


def _reference():
    return linear_scan_reference


def _torch():
    from kernels.ops.linear_scan.chunk import linear_scan_chunked

    return linear_scan_chunked


def _triton():
    from kernels.ops.linear_scan.triton_scan import linear_scan_triton

    return linear_scan_triton


#: backend name -> loader returning the implementation (same signature as the reference)
BACKENDS = {"reference": _reference, "torch": _torch, "triton": _triton}
