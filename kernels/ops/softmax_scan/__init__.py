"""``softmax_scan``: the reference recurrence and its fast paths (see kernels/README.md)."""

from kernels._dispatch import lazy

#: backend name -> loader returning the implementation (same signature as the reference); ``torch`` is the
#: chunked scan, with ``cu_seqlens`` its segmented form
BACKENDS = {
    "reference": lazy(__name__ + ".reference", "softmax_scan_reference"),
    "torch": lazy(__name__ + ".torch_chunk_varlen", "softmax_scan_chunked_packed"),
    "triton": lazy(__name__ + ".triton_scan", "softmax_scan_triton"),
}
