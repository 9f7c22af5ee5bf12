"""Fused-recurrent scaffolding of ``delta_rule`` and ``dplr``: everything but the update.

One program per (batch x head, V block) holds its [K, BV] block of the state on chip and walks the time
steps (short sequences, generation); the V columns of S evolve independently in both ops, so V blocks need
no communication. Backward walks time in reverse with dS on chip, reading the entering state of every step,
which the forward stores when gradients are needed (B * H * T * K * V fp32: meant for short T).

Each op writes its two kernels (the update and its adjoint) from the ``triton.jit`` pieces here and
describes them by a :class:`RecurrentKernels`; :func:`fused_recurrent` launches them with one autograd
function. The kernels take their arguments in this order (``inputs`` as the op's reference takes them,
``q`` first; ``None`` inputs get an unused pointer):

* forward: ``*inputs, h0, o, ht, states, cu, scale, T, H, K, V`` and the constexprs ``HAS_H0,
  STORE_FINAL, SAVE_STATES, IS_VARLEN, BK, BV`` (plus the op's own flags);
* backward: ``*inputs, states, do, dht, *grads, dh0, cu, scale, B, T, H, K, V`` and ``HAS_DHT, STORE_DH0,
  IS_VARLEN, BK, BV``. The value input's gradient is written whole ([B, T, H, V]); every other input's
  gradient is a partial sum over this program's V block ([NV, *input.shape] fp32), summed on the host.

Packed sequences (``cu_seqlens`` [N+1], B = 1, ``IS_VARLEN``): one program per (sequence, head) walks
the steps ``cu[n] <= t < cu[n+1]`` of the packed row (:func:`step_range`), starting from ``h0[n]`` and
storing ``ht[n]``; one launch, no host read of ``cu_seqlens``. An empty sequence takes no step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from kernels.ops.common.tiles import LAUNCH, block_size
from kernels.ops.utils.chunks import empty_result

#: value block of the forward
BV_MAX = 64
#: the forward holds the [K, BV] state block: at K = 256 its value block shrinks to 32 (BV = 64 spilled 272
#: bytes per thread in dplr's forward with Triton 3.6, sm_90 bf16; 3.9 kept it in registers)
FWD_STATE_ELEMS = 128 * 64
#: the backward holds the state and its gradient ([K, BV] each): for wide keys its value block shrinks to
#: K * BV <= 8,192 elements (K = 256, BV = 64 spilled 8.8 KB (delta_rule) and 14 KB (dplr) per thread;
#: sm_80 / sm_90)
BWD_STATE_ELEMS = 128 * 64
#: the same with packed sequences, whose loop bounds and rows take registers too: K = 128, BV = 64 spilled
#: 328 bytes per thread in dplr's backward (132 unpacked; sm_90, bf16), BV = 32 spills less
BWD_STATE_ELEMS_VARLEN = 128 * 32


@triton.jit
def load_step(ptr, step, D, r, m):
    """fp32 features ``r`` (mask ``m``) of step ``step`` (int64 index of (batch, time, head)) of a
    [B, T, H, D] input."""
    return tl.load(ptr + step * D + r, mask=m, other=0.0).to(tl.float32)


@triton.jit
def step_range(cu_ptr, i_bh, b, H, T, IS_VARLEN: tl.constexpr):
    """(batch, first step, end step, row of (batch, head) in the [B, H, T, ...] buffers) of the time loop of
    program ``i_bh`` (batch ``b``): steps 0..T of batch b, or with packed sequences (``IS_VARLEN``, B = 1,
    one program per (sequence n = i_bh // H, head)) the steps cu[n]..cu[n+1] of batch 0."""
    if IS_VARLEN:
        t0 = tl.load(cu_ptr + i_bh // H)
        t_end = tl.load(cu_ptr + i_bh // H + 1)
        row = i_bh % H
        b = row * 0
    else:
        t0 = 0
        t_end = T
        row = i_bh
    return b, t0, t_end, row


@dataclass(frozen=True)
class RecurrentKernels:
    """An op's two fused-recurrent kernels and what the launcher needs to know about them."""

    name: str  #: the op, for messages
    fwd: object  #: forward ``triton.jit`` kernel (arguments: module docstring)
    bwd: object  #: backward kernel
    value_input: int  #: index of v among the inputs
    flags: Callable[[Sequence[Optional[torch.Tensor]]], dict] = field(default=lambda inputs: {})


class FusedRecurrentFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels: RecurrentKernels, scale, h0, output_final_state, save_states, cu, *inputs):
        q, v = inputs[0], inputs[kernels.value_input]
        B, T, H, K = q.shape
        V = v.shape[-1]
        NS = B if cu is None else cu.shape[0] - 1  # states: one per batch row, or per packed sequence
        BK = block_size(K)
        BV = min(block_size(V), BV_MAX, max(16, FWD_STATE_ELEMS // BK))
        NV = triton.cdiv(V, BV)
        f32 = dict(device=q.device, dtype=torch.float32)
        o = torch.empty(B, T, H, V, device=q.device, dtype=q.dtype)
        ht = torch.empty(NS, H, K, V, **f32) if output_final_state else None
        states = torch.empty(B, H, T, K, V, **f32) if save_states else None
        kernels.fwd[(NV, NS * H)](
            *_or(inputs, o),
            _or(h0, o),
            o,
            _or(ht, o),
            _or(states, o),
            _or(cu, o),
            scale,
            T,
            H,
            K,
            V,
            HAS_H0=h0 is not None,
            STORE_FINAL=ht is not None,
            SAVE_STATES=states is not None,
            IS_VARLEN=cu is not None,
            BK=BK,
            BV=BV,
            **kernels.flags(inputs),
            **LAUNCH,
        )
        ctx.save_for_backward(*inputs, states)
        ctx.kernels, ctx.scale, ctx.has_h0, ctx.cu = kernels, scale, h0 is not None, cu
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        *inputs, states = ctx.saved_tensors
        kernels = ctx.kernels
        if states is None:
            raise RuntimeError(f"{kernels.name} fused-recurrent backward: the forward did not keep the states")
        q, v = inputs[0], inputs[kernels.value_input]
        B, T, H, K = q.shape
        V = v.shape[-1]
        BK = block_size(K)
        cu = ctx.cu
        elems = BWD_STATE_ELEMS if cu is None else BWD_STATE_ELEMS_VARLEN
        BV = min(block_size(V), BV_MAX, max(16, elems // BK))
        NV = triton.cdiv(V, BV)
        f32 = dict(device=q.device, dtype=torch.float32)
        dv = torch.empty(B, T, H, V, **f32)
        grads = [
            None if x is None else dv if i == kernels.value_input else torch.empty(NV, *x.shape, **f32)
            for i, x in enumerate(inputs)
        ]
        NS = B if cu is None else cu.shape[0] - 1
        dh0 = torch.empty(NS, H, K, V, **f32) if ctx.has_h0 else None
        kernels.bwd[(NV, NS * H)](
            *_or(inputs, dv),
            states,
            do.contiguous(),
            _or(dht.contiguous() if dht is not None else None, dv),
            *_or(grads, dv),
            _or(dh0, dv),
            _or(cu, dv),
            ctx.scale,
            B,
            T,
            H,
            K,
            V,
            HAS_DHT=dht is not None,
            STORE_DH0=dh0 is not None,
            IS_VARLEN=cu is not None,
            BK=BK,
            BV=BV,
            **kernels.flags(inputs),
            **LAUNCH,
        )
        grads = [
            None if d is None else d.to(x.dtype) if i == kernels.value_input else d.sum(0).to(x.dtype)
            for i, (x, d) in enumerate(zip(inputs, grads))
        ]
        return (None, None, dh0, None, None, None, *grads)


def _or(x, dummy):
    """``x``, or ``dummy`` (an unused pointer) where it is None; elementwise for a list or tuple."""
    if isinstance(x, (list, tuple)):
        return tuple(_or(y, dummy) for y in x)
    return dummy if x is None else x


def fused_recurrent(
    kernels: RecurrentKernels,
    inputs: Sequence[Optional[torch.Tensor]],
    scale: float,
    initial_state: Optional[torch.Tensor],
    output_final_state: bool,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run the op's fused-recurrent kernels on ``inputs`` (as its reference takes them, before ``scale``);
    same result as the reference. ``cu_seqlens`` [N+1]: packed sequences (B = 1, states [N, H, K, V])."""
    q, v = inputs[0], inputs[kernels.value_input]
    cu = cu_seqlens.to(torch.int32).contiguous() if cu_seqlens is not None else None
    if q.shape[1] == 0:
        n_states = cu.shape[0] - 1 if cu is not None else None
        return empty_result(q, v, initial_state, output_final_state, n_states=n_states)
    inputs = tuple(x.contiguous() if x is not None else None for x in inputs)
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    save = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (*inputs, h0))
    return FusedRecurrentFunction.apply(kernels, float(scale), h0, bool(output_final_state), save, cu, *inputs)
