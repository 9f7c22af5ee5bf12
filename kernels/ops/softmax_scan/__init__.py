"""``softmax_scan``: the reference recurrence and its fast paths (see kernels/README.md)."""

from kernels.ops.softmax_scan.reference import softmax_scan_reference


def _reference():
    return softmax_scan_reference


def _torch():
    from kernels.ops.softmax_scan.torch_chunk_varlen import softmax_scan_chunked_packed

    return softmax_scan_chunked_packed  # the chunked scan; with cu_seqlens its segmented form


def _triton():
    from kernels.ops.softmax_scan.triton_scan import softmax_scan_triton

    return softmax_scan_triton


#: backend name -> loader returning the implementation (same signature as the reference)
BACKENDS = {"reference": _reference, "torch": _torch, "triton": _triton}
