"""Packed sequences (``cu_seqlens``) for ``linear_scan`` on any backend, as an exact input transformation.

A reset at sequence n's first step t0 = cu[n] is ``a_t0 = 0`` (linear-space coefficients may be 0), and its
initial state enters there as ``b_t0 <- a_t0 * h0[n] + b_t0``; then one scan of the whole packed row from
h = 0 gives every state, and sequence n's final state is the state at its last step cu[n+1] - 1 (h0[n]
for an empty sequence). Differentiable by autograd through the wrapped backend.

Low-precision inputs are scanned in fp32 when an initial state is given or the final states are
requested (the final states are read from the scanned states, which the backends return in the input
dtype; b_t0 stays unrounded), else in their own dtype.
"""

from __future__ import annotations

from typing import Callable

import torch

from kernels._varlen import last_steps, mark_varlen, sequence_ids, start_mask


def packed(fn: Callable) -> Callable:
    """``fn`` (a linear_scan backend) extended with ``cu_seqlens=``, marked ``varlen``."""

    def linear_scan_packed(a, b, initial_state=None, output_final_state=False, cu_seqlens=None):
        if cu_seqlens is None:
            return fn(a, b, initial_state, output_final_state)
        _, T, D = a.shape
        wide = a.dtype != torch.float32 and (initial_state is not None or output_final_state)
        a_in, b_in = (a.float(), b.float()) if wide else (a, b)
        starts = start_mask(cu_seqlens, T)[None, :, None]
        if initial_state is not None:
            h0 = initial_state.to(a_in.dtype)[sequence_ids(cu_seqlens, T)][None]  # [1, T, D]
            b_in = torch.where(starts, a_in * h0 + b_in, b_in)
        a_in = a_in.masked_fill(starts, 0.0)
        h, _ = fn(a_in, b_in, None, False)
        final = None
        if output_final_state:
            N = cu_seqlens.shape[0] - 1
            empty = a.new_zeros(N, D, dtype=torch.float32) if initial_state is None else initial_state.float()
            if T == 0:
                final = empty
            else:
                last, nonempty = last_steps(cu_seqlens)
                final = torch.where(nonempty[:, None], h[0, last].float(), empty)
        return h.to(a.dtype), final

    linear_scan_packed.__doc__ = f"{fn.__name__} with ``cu_seqlens`` (see kernels/ops/linear_scan/packed.py)."
    return mark_varlen(linear_scan_packed)
