"""Fused-recurrent Triton kernels for ``dplr`` (short sequences, generation): its update and the adjoint;
the state block, the loads, the launch and the autograd wiring are :mod:`kernels.ops.common.recurrent`.

    z_t = S_{t-1}^T a_t;  S_t = exp(g_t) * S_{t-1} + b_t z_t^T + k_t v_t^T;  o_t = scale S_t^T q_t

(z is per column, so the V blocks stay independent.)
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
    a_ptr,
    b_ptr,
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
    HAS_H0: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    SAVE_STATES: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    bb, h, rk, rv, mk, mv, kv_offs, kv_mask = state_block(i_v, i_bh, H, K, V, BK, BV)
    S = start_state(h0_ptr, i_bh.to(tl.int64), K, V, kv_offs, kv_mask, HAS_H0, BK, BV)
    bb, t, t_end, i_row = step_range(cu_ptr, i_bh, bb, H, T, IS_VARLEN)
    while t < t_end:  # not range(): breaks the Triton 3.6 interpreter
        step = (bb.to(tl.int64) * T + t) * H + h
        if SAVE_STATES:
            store_state(states_ptr, S, i_row.to(tl.int64) * T + t, K, V, kv_offs, kv_mask)
        q = load_step(q_ptr, step, K, rk, mk)
        k = load_step(k_ptr, step, K, rk, mk)
        a = load_step(a_ptr, step, K, rk, mk)
        b = load_step(b_ptr, step, K, rk, mk)
        g = load_step(g_ptr, step, K, rk, mk)
        v = load_step(v_ptr, step, V, rv, mv)
        z = tl.sum(S * a[:, None], 0)
        S = S * tl.exp(g)[:, None] + b[:, None] * z[None, :] + k[:, None] * v[None, :]
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
    a_ptr,
    b_ptr,
    g_ptr,
    states_ptr,
    do_ptr,
    dht_ptr,
    dq_ptr,
    dk_ptr,
    dv_ptr,
    da_ptr,
    db_ptr,
    dg_ptr,
    dh0_ptr,
    cu_ptr,
    scale,
    B,
    T,
    H,
    K,
    V,
    HAS_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    """dq, dk, da, db, dg are partial sums over this V block: [NV, B, T, H, K] buffers."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    bb, h, rk, rv, mk, mv, kv_offs, kv_mask = state_block(i_v, i_bh, H, K, V, BK, BV)
    part = i_v.to(tl.int64) * B * T * H
    dS = start_state(dht_ptr, i_bh.to(tl.int64), K, V, kv_offs, kv_mask, HAS_DHT, BK, BV)
    bb, t0, t_end, i_row = step_range(cu_ptr, i_bh, bb, H, T, IS_VARLEN)
    n_steps = t_end - t0
    t_last = t_end - 1
    i = 0
    while i < n_steps:  # not range(): breaks the Triton 3.6 interpreter
        t = t_last - i
        step = (bb.to(tl.int64) * T + t) * H + h
        S_prev = load_state(states_ptr, i_row.to(tl.int64) * T + t, K, V, kv_offs, kv_mask)
        q = load_step(q_ptr, step, K, rk, mk)
        k = load_step(k_ptr, step, K, rk, mk)
        a = load_step(a_ptr, step, K, rk, mk)
        b = load_step(b_ptr, step, K, rk, mk)
        decay = tl.exp(load_step(g_ptr, step, K, rk, mk))
        v = load_step(v_ptr, step, V, rv, mv)
        do = load_step(do_ptr, step, V, rv, mv)
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
        store_state(dh0_ptr, dS, i_bh.to(tl.int64), K, V, kv_offs, kv_mask)


KERNELS = RecurrentKernels("dplr", _recurrent_fwd, _recurrent_bwd, value_input=2)


def dplr_fused_recurrent(q, k, v, a, b, g, scale, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Fused-recurrent Triton path; same signature and result as the reference. ``cu_seqlens`` [N+1]:
    packed sequences natively (B = 1, states [N, H, K, V]; one program per sequence and head)."""
    return fused_recurrent(KERNELS, (q, k, v, a, b, g), scale, initial_state, output_final_state, cu_seqlens)


mark_varlen(dplr_fused_recurrent)
