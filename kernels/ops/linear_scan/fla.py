"""``linear_scan`` on flash-linear-attention's HGRN kernels (``pip install rnn-lm[fla]``).

fla's fused-recurrent HGRN computes ``h_t = exp(g_t) * h_{t-1} + x_t`` (x, g: [B, T, D]; the state is
carried in fp32; initial and final state [B, D]): this package's recurrence with ``x = b`` and
``g = log a``. So this backend needs ``a >= 0``, which is what the models give (``gated_rnn``'s
``a = lambda_t`` in (0, 1]); a packing reset ``a_t = 0`` becomes ``g = -inf``, exactly 0 after exp. A
negative ``a`` is not expressible (its log is NaN); with ``LM_KERNEL_CHECKS=1`` it is an error.

Gradients: fla's own backward returns ``dg_t = dh~_t * a_t * h_{t-1}``, and the chain rule through
``log a`` would divide it by ``a`` (0/0 at a reset). This backend calls fla's forward and backward
kernels itself: the backward's ``dx`` is the adjoint ``dh~_t = dh_t + a_{t+1} dh~_{t+1}``, which is
``db``, and ``da_t = dh~_t * h_{t-1}`` with the saved forward states (``h_0``: the initial state).
fla's chunked HGRN is not used: its in-chunk cumulative sums of ``g`` turn a reset's ``-inf`` into NaN.

Outputs come back in the input dtype and the final state in fp32; fla stores the final state in the
input dtype, so at half precision it is rounded there.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from kernels._checks import value_checks_enabled


class _HGRNScan(torch.autograd.Function):
    """(a, b, h0 | None, output_final_state) -> (h [B, T, D] in a's dtype, h_T [B, D] | None)."""

    @staticmethod
    def forward(ctx, a, b, h0, output_final_state):
        from fla.ops.hgrn.fused_recurrent import fused_recurrent_hgrn_fwd

        ctx.set_materialize_grads(False)
        a, b = a.contiguous(), b.contiguous()
        h0_fp32 = None if h0 is None else h0.float().contiguous()
        h, h_last = fused_recurrent_hgrn_fwd(b, torch.log(a), h0_fp32, output_final_state)
        ctx.save_for_backward(a, h, h0_fp32)
        ctx.h0_dtype = None if h0 is None else h0.dtype
        ctx.b_dtype = b.dtype
        return h, (h_last.float() if output_final_state else None)

    @staticmethod
    def backward(ctx, dh, dh_last):
        from fla.ops.hgrn.fused_recurrent import fused_recurrent_hgrn_bwd

        a, h, h0 = ctx.saved_tensors
        if dh is None:
            dh = torch.zeros_like(h)
        dht = None if dh_last is None else dh_last.float().contiguous()
        adjoint, _, dh0 = fused_recurrent_hgrn_bwd(torch.log(a), h, dh.contiguous(), dht, h0)
        first = h0[:, None] if h0 is not None else h.new_zeros(h.shape[0], 1, h.shape[2], dtype=torch.float32)
        h_prev = torch.cat([first.float(), h[:, :-1].float()], 1)
        da = (adjoint * h_prev).to(a.dtype)
        dh0_out = None if dh0 is None else dh0.to(ctx.h0_dtype)
        return da, adjoint.to(ctx.b_dtype), dh0_out, None


def linear_scan_fla(
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """a, b: [B, T, D] with a >= 0; initial_state: [B, D]. Returns all h_t [B, T, D] (input dtype) and
    h_T [B, D] (fp32) if requested."""
    if value_checks_enabled(reference=False) and bool((a < 0).any()):
        raise ValueError(
            "a: backend 'fla' (fla's HGRN takes log-space gates) needs a >= 0; "
            f"got a minimum of {float(a.detach().min()):.4g}"
        )
    B, T, D = a.shape
    if T == 0:
        state = a.new_zeros(B, D, dtype=torch.float32) if initial_state is None else initial_state.float()
        return a.new_zeros(B, 0, D), (state if output_final_state else None)
    return _HGRNScan.apply(a, b, initial_state, output_final_state)
