"""``linear_scan``: the reference recurrence and its fast paths (see kernels/README.md).

The fast paths take ``cu_seqlens`` natively (:func:`kernels.ops.linear_scan.packed.packed`); the ``fla``
backend needs ``a >= 0`` (see :mod:`kernels.ops.linear_scan.fla`).
"""

import functools

from kernels._dispatch import lazy
from kernels.ops.linear_scan.packed import packed


def _packed(module: str, name: str):
    """The loader of a fast path extended with ``cu_seqlens`` (built once)."""
    return functools.lru_cache(maxsize=None)(lambda: packed(lazy(module, name)()))


#: backend name -> loader returning the implementation (same signature as the reference)
BACKENDS = {
    "reference": lazy(__name__ + ".reference", "linear_scan_reference"),
    "torch": _packed(__name__ + ".torch_chunk", "linear_scan_chunked"),
    "triton": _packed(__name__ + ".triton_scan", "linear_scan_triton"),
    "fla": _packed(__name__ + ".fla", "linear_scan_fla"),
}
