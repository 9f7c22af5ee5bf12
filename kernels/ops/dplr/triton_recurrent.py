"""Fused-recurrent Triton kernels for ``dplr``: one program per (batch x head, V block) holds its
[K, BV] block of the state on chip and walks the time steps (short sequences, generation).

    z_t = S_{t-1}^T a_t;  S_t = exp(g_t) * S_{t-1} + b_t z_t^T + k_t v_t^T;  o_t = scale S_t^T q_t

The V columns of S evolve independently (z is per column), so V blocks need no communication.
Backward walks time in reverse with dS on chip, reading the entering state of every step that the
forward stores when gradients are needed (B * H * T * K * V fp32: meant for short T). Per-V-block
partial gradients of q, k, a, b and g are summed on the host.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from kernels.ops.delta_rule._chunks import empty_result
from kernels.ops.delta_rule._triton_utils import LAUNCH, block_size

_BV = 64
#: the backward holds the state and its gradient ([K, BV] each): for wide keys its value block shrinks
#: to K * BV <= 8,192 elements (K = 256, BV = 64 spilled 14 KB per thread; sm_80 / sm_90)
_BWD_STATE_ELEMS = 128 * 64


@triton.jit
def _recurrent_fwd(q_ptr, k_ptr, v_ptr, a_ptr, b_ptr, g_ptr, h0_ptr, o_ptr, ht_ptr, states_ptr, scale,
                   T, H, K, V,
                   HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr, SAVE_STATES: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    bb, h = i_bh // H, i_bh % H
    rk = tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    mk, mv = rk < K, rv < V
    kv_offs = rk[:, None] * V + rv[None, :]
    kv_mask = mk[:, None] & mv[None, :]
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        S += tl.load(h0_ptr + i_bh.to(tl.int64) * K * V + kv_offs, mask=kv_mask, other=0.0)
    t = 0
    while t < T:  # not range(): breaks the Triton 3.6 interpreter
        step = (bb.to(tl.int64) * T + t) * H + h
        if SAVE_STATES:
            tl.store(states_ptr + (i_bh.to(tl.int64) * T + t) * K * V + kv_offs, S, mask=kv_mask)
        q = tl.load(q_ptr + step * K + rk, mask=mk, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + step * K + rk, mask=mk, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + step * K + rk, mask=mk, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + step * K + rk, mask=mk, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + step * K + rk, mask=mk, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + step * V + rv, mask=mv, other=0.0).to(tl.float32)
        z = tl.sum(S * a[:, None], 0)
        S = S * tl.exp(g)[:, None] + b[:, None] * z[None, :] + k[:, None] * v[None, :]
        o = tl.sum(S * q[:, None], 0) * scale
        tl.store(o_ptr + step * V + rv, o.to(o_ptr.dtype.element_ty), mask=mv)
        t += 1
    if STORE_FINAL:
        tl.store(ht_ptr + i_bh.to(tl.int64) * K * V + kv_offs, S, mask=kv_mask)


@triton.jit
def _recurrent_bwd(q_ptr, k_ptr, v_ptr, a_ptr, b_ptr, g_ptr, states_ptr, do_ptr, dht_ptr,
                   dq_ptr, dk_ptr, dv_ptr, da_ptr, db_ptr, dg_ptr, dh0_ptr, scale,
                   B, T, H, K, V,
                   HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """dq, dk, da, db, dg are partial sums over this V block: [NV, B, T, H, K] buffers."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    bb, h = i_bh // H, i_bh % H
    rk = tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    mk, mv = rk < K, rv < V
    kv_offs = rk[:, None] * V + rv[None, :]
    kv_mask = mk[:, None] & mv[None, :]
    part = i_v.to(tl.int64) * B * T * H
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        dS += tl.load(dht_ptr + i_bh.to(tl.int64) * K * V + kv_offs, mask=kv_mask, other=0.0)
    i = 0
    while i < T:  # not range(): breaks the Triton 3.6 interpreter
        t = T - 1 - i
        step = (bb.to(tl.int64) * T + t) * H + h
        S_prev = tl.load(states_ptr + (i_bh.to(tl.int64) * T + t) * K * V + kv_offs, mask=kv_mask, other=0.0)
        q = tl.load(q_ptr + step * K + rk, mask=mk, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + step * K + rk, mask=mk, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + step * K + rk, mask=mk, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + step * K + rk, mask=mk, other=0.0).to(tl.float32)
        decay = tl.exp(tl.load(g_ptr + step * K + rk, mask=mk, other=0.0).to(tl.float32))
        v = tl.load(v_ptr + step * V + rv, mask=mv, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + step * V + rv, mask=mv, other=0.0).to(tl.float32)
        z = tl.sum(S_prev * a[:, None], 0)
        S = S_prev * decay[:, None] + b[:, None] * z[None, :] + k[:, None] * v[None, :]
        dq = tl.sum(S * do[None, :], 1) * scale
        dS += (scale * q)[:, None] * do[None, :]
        dk = tl.sum(dS * v[None, :], 1)
        dv = tl.sum(dS * k[:, None], 0)
        dz = tl.sum(dS * b[:, None], 0)
        db = tl.sum(dS * z[None, :], 1)
        dg = tl.sum(dS * S_prev, 1) * decay
        da = tl.sum(S_prev * dz[None, :], 1)
        dS = dS * decay[:, None] + a[:, None] * dz[None, :]
        tl.store(dq_ptr + (part + step) * K + rk, dq, mask=mk)
        tl.store(dk_ptr + (part + step) * K + rk, dk, mask=mk)
        tl.store(da_ptr + (part + step) * K + rk, da, mask=mk)
        tl.store(db_ptr + (part + step) * K + rk, db, mask=mk)
        tl.store(dg_ptr + (part + step) * K + rk, dg, mask=mk)
        tl.store(dv_ptr + step * V + rv, dv, mask=mv)
        i += 1
    if STORE_DH0:
        tl.store(dh0_ptr + i_bh.to(tl.int64) * K * V + kv_offs, dS, mask=kv_mask)


class DplrRecurrentFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, a, b, g, scale, h0, output_final_state, save_states):
        B, T, H, K = q.shape
        V = v.shape[-1]
        BK, BV = block_size(K), min(block_size(V), _BV)
        NV = triton.cdiv(V, BV)
        f32 = dict(device=q.device, dtype=torch.float32)
        o = torch.empty(B, T, H, V, device=q.device, dtype=q.dtype)
        ht = torch.empty(B, H, K, V, **f32) if output_final_state else None
        states = torch.empty(B, H, T, K, V, **f32) if save_states else None
        _recurrent_fwd[(NV, B * H)](
            q, k, v, a, b, g, h0 if h0 is not None else o, o, ht if ht is not None else o,
            states if states is not None else o, scale, T, H, K, V,
            HAS_H0=h0 is not None, STORE_FINAL=ht is not None, SAVE_STATES=states is not None, BK=BK, BV=BV, **LAUNCH)
        ctx.save_for_backward(q, k, v, a, b, g, states)
        ctx.scale, ctx.has_h0 = scale, h0 is not None
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, a, b, g, states = ctx.saved_tensors
        if states is None:
            raise RuntimeError("dplr fused-recurrent backward: the forward did not keep the states")
        B, T, H, K = q.shape
        V = v.shape[-1]
        BK = block_size(K)
        BV = min(block_size(V), _BV, max(16, _BWD_STATE_ELEMS // BK))
        NV = triton.cdiv(V, BV)
        f32 = dict(device=q.device, dtype=torch.float32)
        dq, dk, da, db, dg = (torch.empty(NV, B, T, H, K, **f32) for _ in range(5))
        dv = torch.empty(B, T, H, V, **f32)
        dh0 = torch.empty(B, H, K, V, **f32) if ctx.has_h0 else None
        _recurrent_bwd[(NV, B * H)](
            q, k, v, a, b, g, states, do.contiguous(), dht.contiguous() if dht is not None else dv,
            dq, dk, dv, da, db, dg, dh0 if dh0 is not None else dv, ctx.scale, B, T, H, K, V,
            HAS_DHT=dht is not None, STORE_DH0=dh0 is not None, BK=BK, BV=BV, **LAUNCH)
        return (dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype), dv.to(v.dtype), da.sum(0).to(a.dtype),
                db.sum(0).to(b.dtype), dg.sum(0).to(g.dtype), None, dh0, None, None)


def dplr_fused_recurrent(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor, g: torch.Tensor,
    scale: float, initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Fused-recurrent Triton path; same signature and result as the reference."""
    if q.shape[1] == 0:
        return empty_result(q, v, initial_state, output_final_state)
    q, k, v, a, b, g = (x.contiguous() for x in (q, k, v, a, b, g))
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    save = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, a, b, g, h0))
    return DplrRecurrentFunction.apply(q, k, v, a, b, g, float(scale), h0, bool(output_final_state), save)
