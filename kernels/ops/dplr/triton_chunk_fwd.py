"""Forward kernels of the chunked ``dplr`` Triton path (equations in :mod:`kernels.ops.dplr.triton_chunk`).

``_scores_fwd`` (per chunk and row sub-block r, keys in blocks): the sub-blocks (r, c <= r) of the
inclusive score matrices Aqk, Aqb, Pn, Rn. An off-diagonal pair (r > c) factors through the
reference step e = last step of block c: rows of block r get exp(G - G_e), columns of block c get
exp(G_e - G), both <= 1. The diagonal sub-block forms [BS, BS, KEY_SLICE] masked exponent differences.
``_decay_inputs`` (per chunk and key block): q e^G, k e^{G_C - G}, b e^{G_C - G}, A' = a e^{G'}.
``_solve_fwd`` (per chunk): Ti = (I - R)^-1 with R = Rn moved down one row, Wz = Ti A', Zv = Ti P V.
``_state_fwd`` (per head and value block, loop over chunks): Z = Zv + Wz S and the next state; its
[BT, K] operands come ready from the two kernels before it, which keeps its live tiles few.
``_output_fwd`` (per chunk and value block, keys in blocks): O.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.ops.common.state import add_stored_state_product, add_w_state, start_state, state_block, store_state
from kernels.ops.common.tiles import (
    chunk_span,
    chunk_start,
    load_rows,
    load_tile,
    sequence_chunks,
    store_rows,
    store_tile,
    unit_lower_inverse,
)
from kernels.ops.dplr.triton_chunk_tiles import carry_over_chunk, load_next_rows, load_prev, load_row


@triton.jit
def _scores_fwd(
    q_ptr,
    k_ptr,
    a_ptr,
    b_ptr,
    G_ptr,
    aqk_ptr,
    aqb_ptr,
    pn_ptr,
    rn_ptr,
    T,
    H,
    K,
    Tp,
    spans_ptr,
    IS_VARLEN: tl.constexpr,
    BT: tl.constexpr,
    BS: tl.constexpr,
    BK: tl.constexpr,
    BKC: tl.constexpr,
    PREC: tl.constexpr,
):
    """Row sub-block r of Aqk, Aqb (rows of q) and Pn, Rn (rows of a_next[t] = a[t + 1]) against the
    columns of k and b; zero right of the diagonal."""
    i_nr, i_bh = tl.program_id(0), tl.program_id(1)
    i_n, r = i_nr // (BT // BS), i_nr % (BT // BS)
    bb, h = i_bh // H, i_bh % H
    t0 = i_n * BT
    row0 = i_bh * Tp + t0  # buffer row of the chunk's first step
    rr = row0 + r * BS
    t0, T = chunk_span(spans_ptr, i_n, t0, T, IS_VARLEN)
    tr = t0 + r * BS
    c = 0
    while c < r:  # off-diagonal sub-blocks (not range(): breaks the Triton 3.6 interpreter)
        tc = t0 + c * BS
        s_qk = tl.zeros([BS, BS], dtype=tl.float32)
        s_qb = tl.zeros([BS, BS], dtype=tl.float32)
        s_ak = tl.zeros([BS, BS], dtype=tl.float32)
        s_ab = tl.zeros([BS, BS], dtype=tl.float32)
        k0 = 0
        while k0 < K:
            Ge = load_row(G_ptr, row0 + c * BS + BS - 1, K, k0, BK)[None, :]
            el = tl.exp(load_tile(G_ptr, rr, BS, K, k0, BS, BK) - Ge)
            er = tl.exp(Ge - load_tile(G_ptr, row0 + c * BS, BS, K, k0, BS, BK))
            lq = load_rows(q_ptr, bb, h, tr, T, H, K, k0, BS, BK) * el
            la = load_next_rows(a_ptr, bb, h, tr, t0 + BT, T, H, K, k0, BS, BK) * el
            kc = tl.trans(load_rows(k_ptr, bb, h, tc, T, H, K, k0, BS, BK) * er)
            bc = tl.trans(load_rows(b_ptr, bb, h, tc, T, H, K, k0, BS, BK) * er)
            s_qk += tl.dot(lq, kc, input_precision=PREC)
            s_qb += tl.dot(lq, bc, input_precision=PREC)
            s_ak += tl.dot(la, kc, input_precision=PREC)
            s_ab += tl.dot(la, bc, input_precision=PREC)
            k0 += BK
        store_tile(aqk_ptr, s_qk, rr, BS, BT, c * BS, BS, BS)
        store_tile(aqb_ptr, s_qb, rr, BS, BT, c * BS, BS, BS)
        store_tile(pn_ptr, s_ak, rr, BS, BT, c * BS, BS, BS)
        store_tile(rn_ptr, s_ab, rr, BS, BT, c * BS, BS, BS)
        c += 1
    # diagonal sub-block: [BS, BS, BKC] masked exponent differences, keys in slices
    rs = tl.arange(0, BS)
    incl = (rs[:, None] >= rs[None, :])[:, :, None]
    s_qk = tl.zeros([BS, BS], dtype=tl.float32)
    s_qb = tl.zeros([BS, BS], dtype=tl.float32)
    s_ak = tl.zeros([BS, BS], dtype=tl.float32)
    s_ab = tl.zeros([BS, BS], dtype=tl.float32)
    k0 = 0
    while k0 < K:
        xq = load_rows(q_ptr, bb, h, tr, T, H, K, k0, BS, BKC)[:, None, :]
        xa = load_next_rows(a_ptr, bb, h, tr, t0 + BT, T, H, K, k0, BS, BKC)[:, None, :]
        yk = load_rows(k_ptr, bb, h, tr, T, H, K, k0, BS, BKC)[None, :, :]
        yb = load_rows(b_ptr, bb, h, tr, T, H, K, k0, BS, BKC)[None, :, :]
        Gr = load_tile(G_ptr, rr, BS, K, k0, BS, BKC)
        e = tl.exp(tl.where(incl, Gr[:, None, :] - Gr[None, :, :], float("-inf")))
        xqe = xq * e
        xae = xa * e
        s_qk += tl.sum(xqe * yk, 2)
        s_qb += tl.sum(xqe * yb, 2)
        s_ak += tl.sum(xae * yk, 2)
        s_ab += tl.sum(xae * yb, 2)
        k0 += BKC
    store_tile(aqk_ptr, s_qk, rr, BS, BT, r * BS, BS, BS)
    store_tile(aqb_ptr, s_qb, rr, BS, BT, r * BS, BS, BS)
    store_tile(pn_ptr, s_ak, rr, BS, BT, r * BS, BS, BS)
    store_tile(rn_ptr, s_ab, rr, BS, BT, r * BS, BS, BS)
    zero = tl.zeros([BS, BS], dtype=tl.float32)
    c = r + 1
    while c < BT // BS:  # above the diagonal
        store_tile(aqk_ptr, zero, rr, BS, BT, c * BS, BS, BS)
        store_tile(aqb_ptr, zero, rr, BS, BT, c * BS, BS, BS)
        store_tile(pn_ptr, zero, rr, BS, BT, c * BS, BS, BS)
        store_tile(rn_ptr, zero, rr, BS, BT, c * BS, BS, BS)
        c += 1


@triton.jit
def _solve_fwd(
    rn_ptr,
    pn_ptr,
    v_ptr,
    ap_ptr,
    tinv_ptr,
    wz_ptr,
    zv_ptr,
    T,
    H,
    K,
    V,
    Tp,
    spans_ptr,
    IS_VARLEN: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
):
    """Per chunk: Ti = (I - R)^-1 (R[t] = Rn[t - 1], strictly lower), Wz = Ti A' (keys in blocks) and
    Zv = Ti P V (values in blocks; P[t] = Pn[t - 1]), so that Z = Zv + Wz S."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    bb, h, t0, row0 = chunk_start(i_n, i_bh, H, Tp, BT)
    t0, T = chunk_span(spans_ptr, i_n, t0, T, IS_VARLEN)
    tinv = unit_lower_inverse(-load_prev(rn_ptr, row0, 0, BT, 0, BT, BT), BT, PREC)
    store_tile(tinv_ptr, tinv, row0, BT, BT, 0, BT, BT)
    k0 = 0
    while k0 < K:
        wz = tl.dot(tinv, load_tile(ap_ptr, row0, BT, K, k0, BT, BK), input_precision=PREC)
        store_tile(wz_ptr, wz, row0, BT, K, k0, BT, BK)
        k0 += BK
    tp = tl.dot(tinv, load_prev(pn_ptr, row0, 0, BT, 0, BT, BT), input_precision=PREC)
    v0 = 0
    while v0 < V:
        zv = tl.dot(tp, load_rows(v_ptr, bb, h, t0, T, H, V, v0, BT, BV), input_precision=PREC)
        store_tile(zv_ptr, zv, row0, BT, V, v0, BT, BV)
        v0 += BV


@triton.jit
def _decay_inputs(
    q_ptr,
    k_ptr,
    a_ptr,
    b_ptr,
    G_ptr,
    qg_ptr,
    kd_ptr,
    bd_ptr,
    ap_ptr,
    T,
    H,
    K,
    Tp,
    spans_ptr,
    IS_VARLEN: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
):
    """One chunk and key block of q e^G, k e^{G_C - G}, b e^{G_C - G} and A' = a e^{G'} (exponents <= 0)
    into row-major [*, K] fp32 buffers."""
    i_n, i_bh, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bb, h, t0, row0 = chunk_start(i_n, i_bh, H, Tp, BT)
    t0, T = chunk_span(spans_ptr, i_n, t0, T, IS_VARLEN)
    k0 = i_k * BK
    G = load_tile(G_ptr, row0, BT, K, k0, BT, BK)
    to_end = tl.exp(load_row(G_ptr, row0 + BT - 1, K, k0, BK)[None, :] - G)
    store_tile(qg_ptr, load_rows(q_ptr, bb, h, t0, T, H, K, k0, BT, BK) * tl.exp(G), row0, BT, K, k0, BT, BK)
    store_tile(kd_ptr, load_rows(k_ptr, bb, h, t0, T, H, K, k0, BT, BK) * to_end, row0, BT, K, k0, BT, BK)
    store_tile(bd_ptr, load_rows(b_ptr, bb, h, t0, T, H, K, k0, BT, BK) * to_end, row0, BT, K, k0, BT, BK)
    ap = load_rows(a_ptr, bb, h, t0, T, H, K, k0, BT, BK) * tl.exp(load_prev(G_ptr, row0, 0, K, k0, BT, BK))
    store_tile(ap_ptr, ap, row0, BT, K, k0, BT, BK)


@triton.jit
def _state_fwd(
    v_ptr,
    G_ptr,
    kd_ptr,
    bd_ptr,
    wz_ptr,
    zv_ptr,
    h0_ptr,
    states_ptr,
    z_ptr,
    ht_ptr,
    T,
    H,
    K,
    V,
    Tp,
    NT,
    spans_ptr,
    first_ptr,
    IS_VARLEN: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BKR: tl.constexpr,
    PREC: tl.constexpr,
):
    """Loop over chunks for one head and value block: stores each entering state and Z = Zv + Wz S
    (``_solve_fwd``); kd, bd = k, b e^{G_C - G} (``_decay_inputs``). BKR < BK: Wz S is summed over
    key blocks of BKR read back from the stored state (smaller dot operands for exact fp32 dots)."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    bb, h, rk, rv, mk, mv, kv_offs, kv_mask = state_block(i_v, i_bh, H, K, V, BK, BV)
    v0 = i_v * BV
    S = start_state(h0_ptr, i_bh.to(tl.int64), K, V, kv_offs, kv_mask, HAS_H0, BK, BV)
    c_lo, c_hi, bb, i_buf = sequence_chunks(first_ptr, i_bh, bb, H, NT, IS_VARLEN)
    n = c_lo
    while n < c_hi:  # not range(): breaks the Triton 3.6 interpreter
        t0, T_n = chunk_span(spans_ptr, n, n * BT, T, IS_VARLEN)
        row0 = i_buf * Tp + n * BT
        store_state(states_ptr, S, i_buf.to(tl.int64) * NT + n, K, V, kv_offs, kv_mask)
        z = add_w_state(
            load_tile(zv_ptr, row0, BT, V, v0, BT, BV),
            wz_ptr,
            S,
            states_ptr,
            row0,
            (i_buf * NT + n) * K,
            K,
            V,
            v0,
            BT,
            BK,
            BV,
            BKR,
            PREC,
        )
        store_tile(z_ptr, z, row0, BT, V, v0, BT, BV)
        S = carry_over_chunk(
            S, G_ptr, row0, K, kd_ptr, load_rows(v_ptr, bb, h, t0, T_n, H, V, v0, BT, BV), bd_ptr, z, BT, BK, PREC
        )
        n += 1
    if STORE_FINAL:
        store_state(ht_ptr, S, i_bh.to(tl.int64), K, V, kv_offs, kv_mask)


@triton.jit
def _output_fwd(
    qg_ptr,
    v_ptr,
    aqk_ptr,
    aqb_ptr,
    states_ptr,
    z_ptr,
    o_ptr,
    scale,
    T,
    H,
    K,
    V,
    Tp,
    NT,
    spans_ptr,
    IS_VARLEN: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
):
    """O = scale ((q e^G) S + Aqk V + Aqb Z) for one chunk and value block; keys in blocks."""
    i_n, i_bh, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bb, h, t0, row0 = chunk_start(i_n, i_bh, H, Tp, BT)
    t0, T = chunk_span(spans_ptr, i_n, t0, T, IS_VARLEN)
    v0 = i_v * BV
    o = tl.dot(
        load_tile(aqk_ptr, row0, BT, BT, 0, BT, BT),
        load_rows(v_ptr, bb, h, t0, T, H, V, v0, BT, BV),
        input_precision=PREC,
    )
    o += tl.dot(
        load_tile(aqb_ptr, row0, BT, BT, 0, BT, BT), load_tile(z_ptr, row0, BT, V, v0, BT, BV), input_precision=PREC
    )
    srow = (i_bh.to(tl.int64) * NT + i_n) * K  # row of the entering state's first key
    o = add_stored_state_product(o, qg_ptr, row0, states_ptr, srow, K, V, v0, BT, BK, BV, PREC)
    store_rows(o_ptr, o * scale, bb, h, t0, T, H, V, v0, BT, BV)
