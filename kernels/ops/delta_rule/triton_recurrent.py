"""Fused-recurrent Triton kernels for ``delta_rule`` (short sequences, generation): its update and the
adjoint; the state block, the loads, the launch and the autograd wiring are :mod:`kernels.ops.common.recurrent`.

    S' = exp(g_t) S_{t-1};  u_t = beta_t (v_t - S'^T k_t);  S_t = S' + k_t u_t^T;  o_t = scale S_t^T q_t
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels._varlen import mark_varlen
from kernels.ops.common.recurrent import RecurrentKernels, fused_recurrent, load_step, step_range
from kernels.ops.common.state import load_state, start_state, state_block, store_state


@triton.jit
def _recurrent_fwd(
    q_ptr,
    k_ptr,
    v_ptr,
    beta_ptr,
    g_ptr,
    h0_ptr,
    o_ptr,
    ht_ptr,
    states_ptr,
    cu_ptr,
    scale,
    T,
    H,
    K,
    V,
    GATED: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    SAVE_STATES: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    b, h, rk, rv, mk, mv, kv_offs, kv_mask = state_block(i_v, i_bh, H, K, V, BK, BV)
    S = start_state(h0_ptr, i_bh.to(tl.int64), K, V, kv_offs, kv_mask, HAS_H0, BK, BV)
    b, t, t_end, i_row = step_range(cu_ptr, i_bh, b, H, T, IS_VARLEN)
    while t < t_end:  # not range(): breaks the Triton 3.6 interpreter
        step = (b.to(tl.int64) * T + t) * H + h
        if SAVE_STATES:
            store_state(states_ptr, S, i_row.to(tl.int64) * T + t, K, V, kv_offs, kv_mask)
        q = load_step(q_ptr, step, K, rk, mk)
        k = load_step(k_ptr, step, K, rk, mk)
        v = load_step(v_ptr, step, V, rv, mv)
        beta = tl.load(beta_ptr + step).to(tl.float32)
        if GATED:
            S = S * tl.exp(tl.load(g_ptr + step).to(tl.float32))
        u = beta * (v - tl.sum(S * k[:, None], 0))
        S += k[:, None] * u[None, :]
        o = tl.sum(S * q[:, None], 0) * scale
        tl.store(o_ptr + step * V + rv, o.to(o_ptr.dtype.element_ty), mask=mv)
        t += 1
    if STORE_FINAL:
        store_state(ht_ptr, S, i_bh.to(tl.int64), K, V, kv_offs, kv_mask)


@triton.jit
def _recurrent_bwd(
    q_ptr,
    k_ptr,
    v_ptr,
    beta_ptr,
    g_ptr,
    states_ptr,
    do_ptr,
    dht_ptr,
    dq_ptr,
    dk_ptr,
    dv_ptr,
    dbeta_ptr,
    dg_ptr,
    dh0_ptr,
    cu_ptr,
    scale,
    B,
    T,
    H,
    K,
    V,
    GATED: tl.constexpr,
    HAS_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    """dq, dk, dbeta, dg are partial sums over this V block: [NV, B, T, H, (K)] buffers."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    b, h, rk, rv, mk, mv, kv_offs, kv_mask = state_block(i_v, i_bh, H, K, V, BK, BV)
    part = i_v.to(tl.int64) * B * T * H  # offset of this V block's partial buffers (in steps)
    dS = start_state(dht_ptr, i_bh.to(tl.int64), K, V, kv_offs, kv_mask, HAS_DHT, BK, BV)
    b, t0, t_end, i_row = step_range(cu_ptr, i_bh, b, H, T, IS_VARLEN)
    n_steps = t_end - t0
    t_last = t_end - 1
    i = 0
    while i < n_steps:  # not range(): breaks the Triton 3.6 interpreter
        t = t_last - i
        step = (b.to(tl.int64) * T + t) * H + h
        S_prev = load_state(states_ptr, i_row.to(tl.int64) * T + t, K, V, kv_offs, kv_mask)
        q = load_step(q_ptr, step, K, rk, mk)
        k = load_step(k_ptr, step, K, rk, mk)
        v = load_step(v_ptr, step, V, rv, mv)
        do = load_step(do_ptr, step, V, rv, mv)
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
        store_state(dh0_ptr, dS, i_bh.to(tl.int64), K, V, kv_offs, kv_mask)


KERNELS = RecurrentKernels(
    "delta_rule", _recurrent_fwd, _recurrent_bwd, value_input=2, flags=lambda inputs: dict(GATED=inputs[4] is not None)
)


def delta_rule_fused_recurrent(q, k, v, beta, g, scale, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Fused-recurrent Triton path; same signature and result as the reference. ``cu_seqlens`` [N+1]:
    packed sequences natively (B = 1, states [N, H, K, V]; one program per sequence and head)."""
    return fused_recurrent(KERNELS, (q, k, v, beta, g), scale, initial_state, output_final_state, cu_seqlens)


mark_varlen(delta_rule_fused_recurrent)
