"""Backward kernels of the chunked ``dplr`` Triton path (equations in :mod:`kernels.ops.dplr.triton_chunk`).

``_solve_bwd`` (per chunk): Wb = Ti^T Bd and dYo = scale Ti^T Aqb^T dO, the parts of dY = Ti^T dZ,
dZ = scale Aqb^T dO + Bd dS, that do not depend on dS.
``_state_bwd`` (per head and value block, reverse loop over chunks): dS leaving each chunk and
dY = dYo + Wb dS.
``_dscores_bwd`` (per chunk and operand, values in blocks): the score matrices' gradients, masked to
their triangles: dAqk, dAqb from dO, dPn, dRn from dY moved up one row (P, R are Pn, Rn moved down).
``_dv_bwd`` (per chunk and value block, keys in blocks): dV.
``_grads_state`` (per chunk and key block, values in blocks): dq, dk, db, da and the decay gradients
dG, dG' through the output's and state update's state terms and the solve's A' S.
``_grads_scores`` (per chunk, sub-block and key block): adds the off-diagonal sub-blocks' score terms;
``_grads_diag`` (per chunk and sub-block, keys in slices): the diagonal sub-blocks' terms.
Through the scores, off-diagonal pairs use dG_t += x_t * dx_t and dG_i -= y_i * dy_i (the scores depend
on the decays only through G_t - G_i); diagonal sub-blocks differentiate their exponent tensor
directly, leaving out the exponent-0 diagonal.
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
)
from kernels.ops.dplr.triton_chunk_tiles import (
    carry_over_chunk,
    load_next,
    load_next_rows,
    load_prev,
    load_row,
)


@triton.jit
def _solve_bwd(
    tinv_ptr,
    aqb_ptr,
    bd_ptr,
    do_ptr,
    wb_ptr,
    dyo_ptr,
    scale,
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
    """Per chunk: Wb = Ti^T Bd (keys in blocks) and dYo = scale Ti^T Aqb^T dO (values in blocks), so that
    dY = Ti^T dZ = dYo + Wb dS."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    bb, h, t0, row0 = chunk_start(i_n, i_bh, H, Tp, BT)
    t0, T = chunk_span(spans_ptr, i_n, t0, T, IS_VARLEN)
    tinv_t = tl.trans(load_tile(tinv_ptr, row0, BT, BT, 0, BT, BT))
    k0 = 0
    while k0 < K:
        wb = tl.dot(tinv_t, load_tile(bd_ptr, row0, BT, K, k0, BT, BK), input_precision=PREC)
        store_tile(wb_ptr, wb, row0, BT, K, k0, BT, BK)
        k0 += BK
    m = tl.dot(tinv_t, tl.trans(load_tile(aqb_ptr, row0, BT, BT, 0, BT, BT)), input_precision=PREC) * scale
    v0 = 0
    while v0 < V:
        dyo = tl.dot(m, load_rows(do_ptr, bb, h, t0, T, H, V, v0, BT, BV), input_precision=PREC)
        store_tile(dyo_ptr, dyo, row0, BT, V, v0, BT, BV)
        v0 += BV


@triton.jit
def _state_bwd(
    qg_ptr,
    wb_ptr,
    ap_ptr,
    G_ptr,
    do_ptr,
    dyo_ptr,
    dht_ptr,
    dstates_ptr,
    dy_ptr,
    dh0_ptr,
    scale,
    T,
    H,
    K,
    V,
    Tp,
    NT,
    spans_ptr,
    first_ptr,
    IS_VARLEN: tl.constexpr,
    HAS_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BKR: tl.constexpr,
    PREC: tl.constexpr,
):
    """Reverse loop: dS leaving each chunk and dY = dYo + Wb dS (``_solve_bwd``); qg, ap are q e^G and
    a e^{G'} (``_decay_inputs``). BKR < BK: Wb dS in key blocks read back (as in ``_state_fwd``)."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    bb, h, rk, rv, mk, mv, kv_offs, kv_mask = state_block(i_v, i_bh, H, K, V, BK, BV)
    v0 = i_v * BV
    dS = start_state(dht_ptr, i_bh.to(tl.int64), K, V, kv_offs, kv_mask, HAS_DHT, BK, BV)
    c_lo, c_hi, bb, i_buf = sequence_chunks(first_ptr, i_bh, bb, H, NT, IS_VARLEN)
    i = c_lo
    while i < c_hi:  # not range(): breaks the Triton 3.6 interpreter
        n = c_hi - 1 - (i - c_lo)
        t0, T_n = chunk_span(spans_ptr, n, n * BT, T, IS_VARLEN)
        row0 = i_buf * Tp + n * BT
        store_state(dstates_ptr, dS, i_buf.to(tl.int64) * NT + n, K, V, kv_offs, kv_mask)
        dy = add_w_state(
            load_tile(dyo_ptr, row0, BT, V, v0, BT, BV),
            wb_ptr,
            dS,
            dstates_ptr,
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
        store_tile(dy_ptr, dy, row0, BT, V, v0, BT, BV)
        dS = carry_over_chunk(
            dS,
            G_ptr,
            row0,
            K,
            qg_ptr,
            load_rows(do_ptr, bb, h, t0, T_n, H, V, v0, BT, BV) * scale,
            ap_ptr,
            dy,
            BT,
            BK,
            PREC,
        )
        i += 1
    if STORE_DH0:
        store_state(dh0_ptr, dS, i_bh.to(tl.int64), K, V, kv_offs, kv_mask)


@triton.jit
def _dscores_bwd(
    do_ptr,
    dy_ptr,
    v_ptr,
    z_ptr,
    daqk_ptr,
    daqb_ptr,
    dpn_ptr,
    drn_ptr,
    scale,
    T,
    H,
    V,
    Tp,
    spans_ptr,
    IS_VARLEN: tl.constexpr,
    BT: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
):
    """Operand 0: dAqk = incl(scale dO V^T), dAqb = incl(scale dO Z^T); operand 1: dPn = incl(dY_next V^T),
    dRn = incl(dY_next Z^T) with dY_next[t] = dY[t + 1] (0 at the chunk's last step)."""
    i_n, i_bh, which = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bb, h, t0, row0 = chunk_start(i_n, i_bh, H, Tp, BT)
    t0, T = chunk_span(spans_ptr, i_n, t0, T, IS_VARLEN)
    acc_v = tl.zeros([BT, BT], dtype=tl.float32)
    acc_z = tl.zeros([BT, BT], dtype=tl.float32)
    v0 = 0
    while v0 < V:
        if which == 0:
            x = load_rows(do_ptr, bb, h, t0, T, H, V, v0, BT, BV) * scale
        else:
            x = load_next(dy_ptr, row0, 0, BT, V, v0, BT, BV)
        acc_v += tl.dot(x, tl.trans(load_rows(v_ptr, bb, h, t0, T, H, V, v0, BT, BV)), input_precision=PREC)
        acc_z += tl.dot(x, tl.trans(load_tile(z_ptr, row0, BT, V, v0, BT, BV)), input_precision=PREC)
        v0 += BV
    rows = tl.arange(0, BT)
    incl = rows[:, None] >= rows[None, :]
    acc_v = tl.where(incl, acc_v, 0.0)
    acc_z = tl.where(incl, acc_z, 0.0)
    if which == 0:
        store_tile(daqk_ptr, acc_v, row0, BT, BT, 0, BT, BT)
        store_tile(daqb_ptr, acc_z, row0, BT, BT, 0, BT, BT)
    else:
        store_tile(dpn_ptr, acc_v, row0, BT, BT, 0, BT, BT)
        store_tile(drn_ptr, acc_z, row0, BT, BT, 0, BT, BT)


@triton.jit
def _dv_bwd(
    kd_ptr,
    do_ptr,
    aqk_ptr,
    pn_ptr,
    dstates_ptr,
    dy_ptr,
    dv_ptr,
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
    """dV = scale Aqk^T dO + P^T dY + (k e^{G_C - G}) dS for one chunk and value block; keys in blocks."""
    i_n, i_bh, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bb, h, t0, row0 = chunk_start(i_n, i_bh, H, Tp, BT)
    t0, T = chunk_span(spans_ptr, i_n, t0, T, IS_VARLEN)
    v0 = i_v * BV
    dv = scale * tl.dot(
        tl.trans(load_tile(aqk_ptr, row0, BT, BT, 0, BT, BT)),
        load_rows(do_ptr, bb, h, t0, T, H, V, v0, BT, BV),
        input_precision=PREC,
    )
    dv += tl.dot(
        tl.trans(load_prev(pn_ptr, row0, 0, BT, 0, BT, BT)),
        load_tile(dy_ptr, row0, BT, V, v0, BT, BV),
        input_precision=PREC,
    )
    srow = (i_bh.to(tl.int64) * NT + i_n) * K
    dv = add_stored_state_product(dv, kd_ptr, row0, dstates_ptr, srow, K, V, v0, BT, BK, BV, PREC)
    store_rows(dv_ptr, dv, bb, h, t0, T, H, V, v0, BT, BV)


@triton.jit
def _grads_state(
    q_ptr,
    k_ptr,
    v_ptr,
    a_ptr,
    b_ptr,
    G_ptr,
    do_ptr,
    states_ptr,
    dstates_ptr,
    z_ptr,
    dy_ptr,
    dq_ptr,
    dk_ptr,
    da_ptr,
    db_ptr,
    dG_ptr,
    dGx_ptr,
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
    """One chunk and key block: dq through (q e^G) S, dk and db through the state update, da through
    A' S, and dG, dG' (gradients of the cumulative decays G, G'; the host maps them to dg)."""
    i_n, i_bh, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bb, h, t0, row0 = chunk_start(i_n, i_bh, H, Tp, BT)
    t0, T = chunk_span(spans_ptr, i_n, t0, T, IS_VARLEN)
    k0 = i_k * BK
    srow = (i_bh.to(tl.int64) * NT + i_n) * K + k0
    acc_q = tl.zeros([BT, BK], dtype=tl.float32)  # dO S^T
    acc_k = tl.zeros([BT, BK], dtype=tl.float32)  # V dS^T
    acc_b = tl.zeros([BT, BK], dtype=tl.float32)  # Z dS^T
    acc_a = tl.zeros([BT, BK], dtype=tl.float32)  # dY S^T
    ss = tl.zeros([BK], dtype=tl.float32)  # sum over values of dS * S
    v0 = 0
    while v0 < V:
        S = load_tile(states_ptr, srow, K - k0, V, v0, BK, BV)
        dS = load_tile(dstates_ptr, srow, K - k0, V, v0, BK, BV)
        acc_q += tl.dot(load_rows(do_ptr, bb, h, t0, T, H, V, v0, BT, BV), tl.trans(S), input_precision=PREC)
        acc_k += tl.dot(load_rows(v_ptr, bb, h, t0, T, H, V, v0, BT, BV), tl.trans(dS), input_precision=PREC)
        acc_b += tl.dot(load_tile(z_ptr, row0, BT, V, v0, BT, BV), tl.trans(dS), input_precision=PREC)
        acc_a += tl.dot(load_tile(dy_ptr, row0, BT, V, v0, BT, BV), tl.trans(S), input_precision=PREC)
        ss += tl.sum(dS * S, 1)
        v0 += BV
    rows = tl.arange(0, BT)
    G = load_tile(G_ptr, row0, BT, K, k0, BT, BK)
    g_last = load_row(G_ptr, row0 + BT - 1, K, k0, BK)
    to_end = tl.exp(g_last[None, :] - G)
    dq = scale * acc_q * tl.exp(G)
    dG = dq * load_rows(q_ptr, bb, h, t0, T, H, K, k0, BT, BK)
    dk = acc_k * to_end
    db = acc_b * to_end
    # the state's decay e^{G_C - G_t}; the chunk's last step has exponent exactly 0 and is left out,
    # so it leaves no rounding noise in dG
    kd = load_rows(k_ptr, bb, h, t0, T, H, K, k0, BT, BK) * to_end
    bd = load_rows(b_ptr, bb, h, t0, T, H, K, k0, BT, BK) * to_end
    s_end = tl.where(rows[:, None] < BT - 1, kd * acc_k + bd * acc_b, 0.0)
    dG -= s_end
    d_last = tl.sum(s_end, 0) + tl.exp(g_last) * ss
    dG = tl.where(rows[:, None] == BT - 1, dG + d_last[None, :], dG)
    da = acc_a * tl.exp(load_prev(G_ptr, row0, 0, K, k0, BT, BK))
    store_rows(dq_ptr, dq, bb, h, t0, T, H, K, k0, BT, BK)
    store_rows(dk_ptr, dk, bb, h, t0, T, H, K, k0, BT, BK)
    store_rows(db_ptr, db, bb, h, t0, T, H, K, k0, BT, BK)
    store_rows(da_ptr, da, bb, h, t0, T, H, K, k0, BT, BK)
    store_tile(dG_ptr, dG, row0, BT, K, k0, BT, BK)
    store_tile(dGx_ptr, da * load_rows(a_ptr, bb, h, t0, T, H, K, k0, BT, BK), row0, BT, K, k0, BT, BK)


@triton.jit
def _grads_scores(
    q_ptr,
    k_ptr,
    a_ptr,
    b_ptr,
    G_ptr,
    daqk_ptr,
    daqb_ptr,
    dpn_ptr,
    drn_ptr,
    dq_ptr,
    dk_ptr,
    db_ptr,
    dG_ptr,
    dan_ptr,
    T,
    H,
    K,
    Tp,
    spans_ptr,
    IS_VARLEN: tl.constexpr,
    BT: tl.constexpr,
    BS: tl.constexpr,
    BK: tl.constexpr,
    PREC: tl.constexpr,
):
    """Sub-block j of a chunk, one key block: adds the off-diagonal sub-blocks' terms to dq, dk, db, dG
    of the block's rows and writes those of a_next (da_next) to ``dan``. As rows (q, a_next) the block
    meets the column blocks c < j through their last steps; as columns (k, b) the row blocks r > j
    through its own last step."""
    i_nj, i_bh, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, j = i_nj // (BT // BS), i_nj % (BT // BS)
    bb, h = i_bh // H, i_bh % H
    t0, k0 = i_n * BT, i_k * BK
    row0 = i_bh * Tp + t0
    rj = row0 + j * BS
    t0, T = chunk_span(spans_ptr, i_n, t0, T, IS_VARLEN)
    tj = t0 + j * BS
    Gj = load_tile(G_ptr, rj, BS, K, k0, BS, BK)
    dq = tl.zeros([BS, BK], dtype=tl.float32)
    dan = tl.zeros([BS, BK], dtype=tl.float32)
    c = 0
    while c < j:  # block j as rows
        Ge = load_row(G_ptr, row0 + c * BS + BS - 1, K, k0, BK)[None, :]
        er = tl.exp(Ge - load_tile(G_ptr, row0 + c * BS, BS, K, k0, BS, BK))
        kc = load_rows(k_ptr, bb, h, t0 + c * BS, T, H, K, k0, BS, BK) * er
        bc = load_rows(b_ptr, bb, h, t0 + c * BS, T, H, K, k0, BS, BK) * er
        el = tl.exp(Gj - Ge)
        dq += (
            tl.dot(load_tile(daqk_ptr, rj, BS, BT, c * BS, BS, BS), kc, input_precision=PREC)
            + tl.dot(load_tile(daqb_ptr, rj, BS, BT, c * BS, BS, BS), bc, input_precision=PREC)
        ) * el
        dan += (
            tl.dot(load_tile(dpn_ptr, rj, BS, BT, c * BS, BS, BS), kc, input_precision=PREC)
            + tl.dot(load_tile(drn_ptr, rj, BS, BT, c * BS, BS, BS), bc, input_precision=PREC)
        ) * el
        c += 1
    dk = tl.zeros([BS, BK], dtype=tl.float32)
    db = tl.zeros([BS, BK], dtype=tl.float32)
    Ge = load_row(G_ptr, rj + BS - 1, K, k0, BK)[None, :]
    er = tl.exp(Ge - Gj)
    r = j + 1
    while r < BT // BS:  # block j as columns
        rr = row0 + r * BS
        el = tl.exp(load_tile(G_ptr, rr, BS, K, k0, BS, BK) - Ge)
        lq = load_rows(q_ptr, bb, h, t0 + r * BS, T, H, K, k0, BS, BK) * el
        la = load_next_rows(a_ptr, bb, h, t0 + r * BS, t0 + BT, T, H, K, k0, BS, BK) * el
        dk += tl.dot(tl.trans(load_tile(daqk_ptr, rr, BS, BT, j * BS, BS, BS)), lq, input_precision=PREC) + tl.dot(
            tl.trans(load_tile(dpn_ptr, rr, BS, BT, j * BS, BS, BS)), la, input_precision=PREC
        )
        db += tl.dot(tl.trans(load_tile(daqb_ptr, rr, BS, BT, j * BS, BS, BS)), lq, input_precision=PREC) + tl.dot(
            tl.trans(load_tile(drn_ptr, rr, BS, BT, j * BS, BS, BS)), la, input_precision=PREC
        )
        r += 1
    dk *= er
    db *= er
    xq = load_rows(q_ptr, bb, h, tj, T, H, K, k0, BS, BK)
    xa = load_next_rows(a_ptr, bb, h, tj, t0 + BT, T, H, K, k0, BS, BK)
    yk = load_rows(k_ptr, bb, h, tj, T, H, K, k0, BS, BK)
    yb = load_rows(b_ptr, bb, h, tj, T, H, K, k0, BS, BK)
    dG = xq * dq + xa * dan - yk * dk - yb * db + load_tile(dG_ptr, rj, BS, K, k0, BS, BK)
    store_tile(dG_ptr, dG, rj, BS, K, k0, BS, BK)
    store_rows(dq_ptr, dq + load_rows(dq_ptr, bb, h, tj, T, H, K, k0, BS, BK), bb, h, tj, T, H, K, k0, BS, BK)
    store_rows(dk_ptr, dk + load_rows(dk_ptr, bb, h, tj, T, H, K, k0, BS, BK), bb, h, tj, T, H, K, k0, BS, BK)
    store_rows(db_ptr, db + load_rows(db_ptr, bb, h, tj, T, H, K, k0, BS, BK), bb, h, tj, T, H, K, k0, BS, BK)
    store_tile(dan_ptr, dan, rj, BS, K, k0, BS, BK)


@triton.jit
def _grads_diag(
    q_ptr,
    k_ptr,
    a_ptr,
    b_ptr,
    G_ptr,
    daqk_ptr,
    daqb_ptr,
    dpn_ptr,
    drn_ptr,
    dq_ptr,
    dk_ptr,
    db_ptr,
    dG_ptr,
    dan_ptr,
    T,
    H,
    K,
    Tp,
    spans_ptr,
    IS_VARLEN: tl.constexpr,
    BT: tl.constexpr,
    BS: tl.constexpr,
    BKC: tl.constexpr,
):
    """Diagonal sub-block j of a chunk's score matrices: adds its gradient terms to dq, dk, db, dG and
    dan (da_next) of the block's rows. The [BS, BS, BKC] tensors of masked exponent differences are
    formed slice by slice over the keys; the exponent-0 diagonal is left out of dG."""
    i_n, i_bh, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bb, h = i_bh // H, i_bh % H
    t0 = i_n * BT
    tj = t0 + j * BS
    rj = i_bh * Tp + tj  # buffer row of the block's first step
    t0, T = chunk_span(spans_ptr, i_n, t0, T, IS_VARLEN)
    tj = t0 + j * BS
    rs = tl.arange(0, BS)
    incl3 = (rs[:, None] >= rs[None, :])[:, :, None]
    strict3 = (rs[:, None] > rs[None, :])[:, :, None]
    d_qk = load_tile(daqk_ptr, rj, BS, BT, j * BS, BS, BS)[:, :, None]
    d_qb = load_tile(daqb_ptr, rj, BS, BT, j * BS, BS, BS)[:, :, None]
    d_ak = load_tile(dpn_ptr, rj, BS, BT, j * BS, BS, BS)[:, :, None]
    d_ab = load_tile(drn_ptr, rj, BS, BT, j * BS, BS, BS)[:, :, None]
    c0 = 0
    while c0 < K:
        xq = load_rows(q_ptr, bb, h, tj, T, H, K, c0, BS, BKC)[:, None, :]
        xa = load_next_rows(a_ptr, bb, h, tj, t0 + BT, T, H, K, c0, BS, BKC)[:, None, :]
        yk = load_rows(k_ptr, bb, h, tj, T, H, K, c0, BS, BKC)[None, :, :]
        yb = load_rows(b_ptr, bb, h, tj, T, H, K, c0, BS, BKC)[None, :, :]
        Gj = load_tile(G_ptr, rj, BS, K, c0, BS, BKC)
        e = tl.exp(tl.where(incl3, Gj[:, None, :] - Gj[None, :, :], float("-inf")))
        wq = (d_qk * yk + d_qb * yb) * e  # [t, i, BKC]
        wa = (d_ak * yk + d_ab * yb) * e
        xqe = xq * e
        xae = xa * e
        eg = tl.where(strict3, xq * wq + xa * wa, 0.0)  # d/d(G_t - G_i)
        dq = tl.sum(wq, 1) + load_rows(dq_ptr, bb, h, tj, T, H, K, c0, BS, BKC)
        dk = tl.sum(d_qk * xqe + d_ak * xae, 0) + load_rows(dk_ptr, bb, h, tj, T, H, K, c0, BS, BKC)
        db = tl.sum(d_qb * xqe + d_ab * xae, 0) + load_rows(db_ptr, bb, h, tj, T, H, K, c0, BS, BKC)
        dG = tl.sum(eg, 1) - tl.sum(eg, 0) + load_tile(dG_ptr, rj, BS, K, c0, BS, BKC)
        store_rows(dq_ptr, dq, bb, h, tj, T, H, K, c0, BS, BKC)
        store_rows(dk_ptr, dk, bb, h, tj, T, H, K, c0, BS, BKC)
        store_rows(db_ptr, db, bb, h, tj, T, H, K, c0, BS, BKC)
        store_tile(dG_ptr, dG, rj, BS, K, c0, BS, BKC)
        store_tile(dan_ptr, tl.sum(wa, 1) + load_tile(dan_ptr, rj, BS, K, c0, BS, BKC), rj, BS, K, c0, BS, BKC)
        c0 += BKC
