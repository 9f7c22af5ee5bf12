"""The ``triton`` backend of the ops with fused-recurrent and chunked Triton kernels (``delta_rule``, ``dplr``):
which path a call takes, and how it is called with packed sequences (:func:`triton_backend` builds it)."""

from __future__ import annotations

import warnings
from typing import Callable


def pick_triton_path(
    op: str,
    q,
    v,
    recurrent_max_t: int,
    max_head: int,
    recurrent: Callable[[], Callable],
    chunked: Callable[[], Callable],
    fallback: Callable[[], Callable],
) -> Callable:
    """The fused-recurrent kernels for ``T <= recurrent_max_t`` (short sequences, generation), else the chunked
    kernels; heads wider than ``max_head`` keys or values do not fit the chunked kernels' tiles on chip and
    take ``fallback`` (the chunked PyTorch path), with a warning. The three are loaders (imported on use)."""
    if q.shape[1] <= recurrent_max_t:
        return recurrent()
    K, V = q.shape[-1], v.shape[-1]
    if max(K, V) > max_head:
        warnings.warn(
            f"{op}: K={K}, V={V} exceed {max_head} for the chunked Triton kernels; using the chunked PyTorch path",
            stacklevel=3,
        )
        return fallback()
    return chunked()


def triton_backend(
    op: str,
    recurrent_max_t: int,
    max_head: Callable[[], int],
    recurrent: Callable[[], Callable],
    chunked: Callable[[], Callable],
    fallback: Callable[[], Callable],
) -> Callable:
    """The ``"triton"`` backend of ``op``: called with the reference's positional arguments (q first, v
    third), it takes the path :func:`pick_triton_path` picks (``max_head``: a loader of the chunked tiles'
    widest head) and calls it through :func:`kernels._varlen.call_native`. All three paths take packed sequences
    (``cu_seqlens``, B = 1, states [N, H, K, V]) natively; ``offsets``: their validated host copy."""
    from kernels._varlen import call_native, mark_varlen

    def triton(*args, cu_seqlens=None, offsets=None):
        fn = pick_triton_path(op, args[0], args[2], recurrent_max_t, max_head(), recurrent, chunked, fallback)
        return call_native(fn, args, cu_seqlens, offsets)

    triton.__name__ = triton.__qualname__ = f"{op}_triton"
    return mark_varlen(triton, host_offsets=True)
