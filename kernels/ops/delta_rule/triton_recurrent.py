"""Fused-recurrent Triton kernels for ``delta_rule``: one program per (batch x head, V block) holds
its [K, BV] block of the state on chip and walks the time steps (short sequences, generation).

    S' = exp(g_t) S_{t-1};  u_t = beta_t (v_t - S'^T k_t);  S_t = S' + k_t u_t^T;  o_t = scale S_t^T q_t

The V columns of S evolve independently, so V blocks need no communication. Backward walks time
in reverse with the state gradient dS on chip; it reads the entering state of every step, which
the forward stores when gradients are needed (B * H * T * K * V fp32: meant for short T).
Per-V-block partial gradients of q, k, beta and g are summed on the host.
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
#: to K * BV <= 8,192 elements (K = 256, BV = 64 spilled up to 8.8 KB per thread; sm_80 / sm_90)
_BWD_STATE_ELEMS = 128 * 64


@triton.jit
def _recurrent_fwd(q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, h0_ptr, o_ptr, ht_ptr, states_ptr, scale,
                   T, H, K, V,
                   GATED: tl.constexpr, HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr,
                   SAVE_STATES: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    b, h = i_bh // H, i_bh % H
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
        step = (b.to(tl.int64) * T + t) * H + h
        if SAVE_STATES:
            tl.store(states_ptr + (i_bh.to(tl.int64) * T + t) * K * V + kv_offs, S, mask=kv_mask)
        q = tl.load(q_ptr + step * K + rk, mask=mk, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + step * K + rk, mask=mk, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + step * V + rv, mask=mv, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + step).to(tl.float32)
        if GATED:
            S = S * tl.exp(tl.load(g_ptr + step).to(tl.float32))
        u = beta * (v - tl.sum(S * k[:, None], 0))
        S += k[:, None] * u[None, :]
        o = tl.sum(S * q[:, None], 0) * scale
        tl.store(o_ptr + step * V + rv, o.to(o_ptr.dtype.element_ty), mask=mv)
        t += 1
    if STORE_FINAL:
        tl.store(ht_ptr + i_bh.to(tl.int64) * K * V + kv_offs, S, mask=kv_mask)


@triton.jit
def _recurrent_bwd(q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, states_ptr, do_ptr, dht_ptr,
                   dq_ptr, dk_ptr, dv_ptr, dbeta_ptr, dg_ptr, dh0_ptr, scale,
                   B, T, H, K, V,
                   GATED: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr):
    """dq, dk, dbeta, dg are partial sums over this V block: [NV, B, T, H, (K)] buffers."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    b, h = i_bh // H, i_bh % H
    rk = tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    mk, mv = rk < K, rv < V
    kv_offs = rk[:, None] * V + rv[None, :]
    kv_mask = mk[:, None] & mv[None, :]
    part = i_v.to(tl.int64) * B * T * H  # offset of this V block's partial buffers (in steps)
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        dS += tl.load(dht_ptr + i_bh.to(tl.int64) * K * V + kv_offs, mask=kv_mask, other=0.0)
    i = 0
    while i < T:  # not range(): breaks the Triton 3.6 interpreter
        t = T - 1 - i
        step = (b.to(tl.int64) * T + t) * H + h
        S_prev = tl.load(states_ptr + (i_bh.to(tl.int64) * T + t) * K * V + kv_offs, mask=kv_mask, other=0.0)
        q = tl.load(q_ptr + step * K + rk, mask=mk, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + step * K + rk, mask=mk, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + step * V + rv, mask=mv, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + step * V + rv, mask=mv, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + step).to(tl.float32)
        if GATED:
            decay = tl.exp(tl.load(g_ptr + step).to(tl.float32))
        else:
            decay = 1.0
        Sd = S_prev * decay
        pred = tl.sum(Sd * k[:, None], 0)
        u = beta * (v - pred)
        S = Sd + k[:, None] * u[None, :]
        dq = tl.sum(S * do[None, :], 1) * scale
        dS += (scale * q)[:, None] * do[None, :]
        du = tl.sum(dS * k[:, None], 0)
        dk = tl.sum(dS * u[None, :], 1)
        dbeta = tl.sum(du * (v - pred), 0)
        dpred = -beta * du
        dSd = dS + k[:, None] * dpred[None, :]
        dk += tl.sum(Sd * dpred[None, :], 1)
        dg = tl.sum(tl.sum(dSd * Sd, 1), 0)
        dS = dSd * decay
        tl.store(dq_ptr + (part + step) * K + rk, dq, mask=mk)
        tl.store(dk_ptr + (part + step) * K + rk, dk, mask=mk)
        tl.store(dv_ptr + step * V + rv, du * beta, mask=mv)
        tl.store(dbeta_ptr + part + step, dbeta)
        if GATED:
            tl.store(dg_ptr + part + step, dg)
        i += 1
    if STORE_DH0:
        tl.store(dh0_ptr + i_bh.to(tl.int64) * K * V + kv_offs, dS, mask=kv_mask)


class DeltaRuleRecurrentFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, g, scale, h0, output_final_state, save_states):
        B, T, H, K = q.shape
        V = v.shape[-1]
        BK, BV = block_size(K), min(block_size(V), _BV)
        NV = triton.cdiv(V, BV)
        f32 = dict(device=q.device, dtype=torch.float32)
        o = torch.empty(B, T, H, V, device=q.device, dtype=q.dtype)
        ht = torch.empty(B, H, K, V, **f32) if output_final_state else None
        states = torch.empty(B, H, T, K, V, **f32) if save_states else None
        dummy = o
        _recurrent_fwd[(NV, B * H)](
            q, k, v, beta, g if g is not None else dummy, h0 if h0 is not None else dummy, o,
            ht if ht is not None else dummy, states if states is not None else dummy, scale, T, H, K, V,
            GATED=g is not None, HAS_H0=h0 is not None, STORE_FINAL=ht is not None,
            SAVE_STATES=states is not None, BK=BK, BV=BV, **LAUNCH)
        ctx.save_for_backward(q, k, v, beta, g, states)
        ctx.scale, ctx.has_h0 = scale, h0 is not None
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, g, states = ctx.saved_tensors
        if states is None:
            raise RuntimeError("delta_rule fused-recurrent backward: the forward did not keep the states")
        B, T, H, K = q.shape
        V = v.shape[-1]
        BK = block_size(K)
        BV = min(block_size(V), _BV, max(16, _BWD_STATE_ELEMS // BK))
        NV = triton.cdiv(V, BV)
        f32 = dict(device=q.device, dtype=torch.float32)
        dq = torch.empty(NV, B, T, H, K, **f32)
        dk = torch.empty(NV, B, T, H, K, **f32)
        dv = torch.empty(B, T, H, V, **f32)
        dbeta = torch.empty(NV, B, T, H, **f32)
        dg = torch.empty(NV, B, T, H, **f32) if g is not None else None
        dh0 = torch.empty(B, H, K, V, **f32) if ctx.has_h0 else None
        _recurrent_bwd[(NV, B * H)](
            q, k, v, beta, g if g is not None else dv, states, do.contiguous(),
            dht.contiguous() if dht is not None else dv, dq, dk, dv, dbeta,
            dg if dg is not None else dbeta, dh0 if dh0 is not None else dv, ctx.scale, B, T, H, K, V,
            GATED=g is not None, HAS_DHT=dht is not None, STORE_DH0=dh0 is not None, BK=BK, BV=BV, **LAUNCH)
        dg = dg.sum(0).to(g.dtype) if g is not None else None
        return (dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype), dv.to(v.dtype), dbeta.sum(0).to(beta.dtype),
                dg, None, dh0, None, None)


def delta_rule_fused_recurrent(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, g: Optional[torch.Tensor],
    scale: float, initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Fused-recurrent Triton path; same signature and result as the reference."""
    if q.shape[1] == 0:
        return empty_result(q, v, initial_state, output_final_state)
    q, k, v, beta = (x.contiguous() for x in (q, k, v, beta))
    g = g.contiguous() if g is not None else None
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    save = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, beta, g, h0))
    return DeltaRuleRecurrentFunction.apply(q, k, v, beta, g, float(scale), h0, bool(output_final_state), save)
