"""``linear_scan``: the reference recurrence and its fast paths (see kernels/README.md).

The fast paths take ``cu_seqlens`` natively (:func:`kernels.ops.linear_scan.packed.packed`).
"""

import functools

from kernels.ops.linear_scan.reference import linear_scan_reference
from kernels.ops.linear_scan.packed import packed


def _reference():
    return linear_scan_reference


@functools.lru_cache(maxsize=None)
def _torch():
    from kernels.ops.linear_scan.torch_chunk import linear_scan_chunked

    return packed(linear_scan_chunked)


@functools.lru_cache(maxsize=None)
def _triton():
    from kernels.ops.linear_scan.triton_scan import linear_scan_triton

    return packed(linear_scan_triton)


#: backend name -> loader returning the implementation (same signature as the reference)
BACKENDS = {"reference": _reference, "torch": _torch, "triton": _triton}
