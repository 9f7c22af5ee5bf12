"""Chunked Triton kernels for ``delta_rule`` (gated when ``g`` is given): forward and backward.

Per chunk of BT = 64 steps (32 for heads wider than 64 or fp32 inputs, see ``_chunk``) with entering state
S, b = chunk-local cumsum(g), gamma = exp(b) (derivation in :mod:`kernels.ops.delta_rule.torch_chunk`):

    A = strict_lower(diag(beta) (exp(b_i - b_j)) * K K^T),  Ai = (I + A)^-1   (16-block substitution)
    W = Ai diag(beta gamma) K,   U~ = Ai diag(beta) V,   U = U~ - W S
    O = scale (diag(gamma) Q S + (M * Q K^T) U),   S' = gamma_C S + (K * exp(b_C - b))^T U

Forward kernels: ``_prep_fwd`` (per chunk: Ai, W, U~), ``_state_fwd`` (per head and V block: loop
over chunks, stores each entering state and U), ``_output_fwd`` (per chunk and V block).
Backward kernels: ``_state_bwd`` (reverse loop: the gradient of every leaving state and dU),
``_grads_output_state`` (per chunk and key block: dq, dk and db in part) and ``_grads_solve`` (per
chunk: the rest of dk and db, dv, dbeta; two kernels to keep the live tiles, and so shared memory,
small); then dg = reverse chunk cumsum of db on the host.

Every contraction over keys or values runs in blocks (:class:`_Blocks`: at most 64 wide in bf16, 32 in
fp32, whose exact dots are FMA loops holding the whole reduction per thread), summing partial products;
the state loops, which hold a [K, BV] state, read it back in key blocks from the copy they store for the
other kernels when the key block is narrower than K. No tile is wider than its block, so the kernels fit
the registers at K = V = 128 (``python -m kernels.compile_check``: at most 256 spilled bytes per thread).

Packed sequences (``cu_seqlens``, B = 1): the chunks are aligned to sequence starts
(:class:`~kernels.ops.utils.chunk_table.ChunkTable`); every per-chunk kernel reads its chunk's first step
and its sequence's end from the table (``IS_VARLEN``), the state loops run one program per (sequence,
head) over that sequence's chunks, from ``h0[n]`` to ``ht[n]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.ops.common.state import add_w_state, start_state, state_block, store_state
from kernels.ops.common.tiles import (
    LAUNCH,
    block_size,
    chunk_cumsum,
    chunk_length,
    chunk_reverse_cumsum,
    chunk_span,
    chunk_start,
    dot_precision,
    load_rows,
    load_steps,
    load_tile,
    sequence_chunks,
    store_rows,
    store_steps,
    store_tile,
    unit_lower_inverse,
)
from kernels._varlen import host_offsets, mark_varlen
from kernels.ops.utils.chunk_table import ChunkTable
from kernels.ops.utils.chunks import empty_result

_STATE_BV = 64  # V block of the state-passing kernels
#: launch options of the backward kernels, which hold more live [BT, BK] / [BK, BV] tiles than 4 warps
#: have registers for (sm_90, ``python -m kernels.compile_check``): at K = V = 64 4 warps spilled up to
#: 504 bytes per thread, 8 warps at most 148 (16 warps cap registers at 128 per thread and spill more)
_BWD_LAUNCH = dict(LAUNCH, num_warps=8)
#: key block of ``_grads_output_state`` (one program per chunk and key block, holding [BK, V] blocks
#: of S and dS): with whole keys K = V = 128 spilled 816 bytes per thread at 8 warps (sm_90, bf16);
#: blocks of 32 spill at most 68, and 16 for the exact fp32 dots (which ptxas lowers to FMA) at most 20
_GRAD_BK = 32
_GRAD_BK_FP32 = 16
#: exact fp32 dots (fp32 inputs) are FMA loops in which each thread holds its operands' whole reduction
#: length: with 64-step chunks and 64-wide state blocks K = V = 64 spilled 16-68 KB per thread (sm_80 /
#: sm_90); 32-step chunks and state value blocks of 16 spill nothing there (K = 128 spilled too, up to
#: 24 KB, until the contractions ran in blocks, below)
_EXACT_CHUNK = 32
_EXACT_STATE_BV = 16
#: widest key / value block of the contractions over keys (values) inside a kernel: the per-chunk
#: kernels and the state loops sum them over blocks (the state loops' W S and Kd dS from the state they
#: just stored), so an exact fp32 FMA dot holds at most a 32-long reduction per operand (K = 128 spilled
#: 0.3-24 KB per thread with whole keys) and a tf32 one at most 64
_BLOCK = 64
_EXACT_BLOCK = 32
#: elements of a [BT, BV] tile of the backward state loop (its value block): at 64-step chunks (bf16,
#: K = V = 64) value blocks of 64 spilled 380-840 bytes per thread on sm_80, blocks of 32 at most 64
_STATE_BWD_ELEMS = 64 * 32
#: key and value block of ``_grads_solve``, which holds three [BT, BT] tiles besides its blocks: bf16
#: whole 64-wide blocks spilled 650-2,900 bytes per thread at K = V = 64 (sm_80), blocks of 64 at
#: K = V = 128 68-116 (sm_80 / sm_90), blocks of 32 at most 212 at K = 64 (sm_80) and 0 elsewhere
_SOLVE_BLOCK = 32


@dataclass(frozen=True)
class _Blocks:
    """Chunk length and tile widths of one call (K keys, V values, input dtype)."""

    BT: int  # chunk length
    BK: int  # whole key width (the state loops' state block, dq / dk tiles)
    BV: int  # whole value width
    BVS: int  # value block of the forward state loop and of the output kernel
    BVSB: int  # value block of the backward state loop
    BKC: int  # key block of the contractions over keys (forward kernels, state loops)
    BVC: int  # value block of the contractions over values in ``_grads_output_state``
    BKG: int  # key block of ``_grads_output_state`` (one program per block)
    BKD: int  # key block of ``_grads_solve``
    BVD: int  # value block of ``_grads_solve``


def _blocks(K: int, V: int, dtype: torch.dtype) -> _Blocks:
    """Block sizes for K keys, V values and inputs of ``dtype`` (fp32: exact dots, smaller tiles)."""
    exact = dot_precision(dtype) == "ieee"
    BT = chunk_length(K, V)
    BK, BV = block_size(K), block_size(V)
    BT = min(BT, _EXACT_CHUNK) if exact else BT
    blk = _EXACT_BLOCK if exact else _BLOCK
    BVS = min(BV, _EXACT_STATE_BV if exact else _STATE_BV)
    return _Blocks(
        BT=BT,
        BK=BK,
        BV=BV,
        BVS=BVS,
        BVSB=min(BVS, max(16, _STATE_BWD_ELEMS // BT)),
        BKC=min(BK, blk),
        BVC=min(BV, blk),
        BKG=min(BK, _GRAD_BK_FP32 if exact else _GRAD_BK),
        BKD=min(BK, _SOLVE_BLOCK),
        BVD=min(BV, _SOLVE_BLOCK),
    )


@triton.jit
def _decay_matrix(bc, GATED: tl.constexpr, STRICT: tl.constexpr, BT: tl.constexpr):
    """exp(b_t - b_i) on i < t (STRICT) or i <= t, 0 above; all ones/zeros without gating."""
    rows = tl.arange(0, BT)
    if STRICT:
        mask = rows[:, None] > rows[None, :]
    else:
        mask = rows[:, None] >= rows[None, :]
    if GATED:
        return tl.exp(tl.where(mask, bc[:, None] - bc[None, :], float("-inf")))
    else:
        return mask.to(tl.float32)


@triton.jit
def _prep_fwd(
    k_ptr,
    v_ptr,
    beta_ptr,
    bcum_ptr,
    ainv_ptr,
    w_ptr,
    ut_ptr,
    spans_ptr,
    T,
    H,
    K,
    V,
    Tp,
    GATED: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    BT: tl.constexpr,
    BKC: tl.constexpr,
    BVC: tl.constexpr,
    PREC: tl.constexpr,
):
    """Per chunk: Ai = (I + A)^-1, W = Ai diag(beta gamma) K and U~ = Ai diag(beta) V; K K^T summed over
    key blocks of BKC, W and U~ formed in key / value blocks of BKC / BVC (each block read again)."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    b, h, t0, row0 = chunk_start(i_n, i_bh, H, Tp, BT)
    t0, T = chunk_span(spans_ptr, i_n, t0, T, IS_VARLEN)
    rows = tl.arange(0, BT)
    beta = load_steps(beta_ptr, b, h, t0, T, H, BT)
    if GATED:
        bc = tl.load(bcum_ptr + row0 + rows)
    else:
        bc = tl.zeros([BT], dtype=tl.float32)
    kk = tl.zeros([BT, BT], dtype=tl.float32)
    k0 = 0
    while k0 < K:
        kb = load_rows(k_ptr, b, h, t0, T, H, K, k0, BT, BKC)
        kk += tl.dot(kb, tl.trans(kb), input_precision=PREC)
        k0 += BKC
    ainv = unit_lower_inverse(beta[:, None] * _decay_matrix(bc, GATED, True, BT) * kk, BT, PREC)
    store_tile(ainv_ptr, ainv, row0, BT, BT, 0, BT, BT)
    k_scale = (beta * tl.exp(bc))[:, None]
    k0 = 0
    while k0 < K:
        w = tl.dot(ainv, load_rows(k_ptr, b, h, t0, T, H, K, k0, BT, BKC) * k_scale, input_precision=PREC)
        store_tile(w_ptr, w, row0, BT, K, k0, BT, BKC)
        k0 += BKC
    v0 = 0
    while v0 < V:
        ut = tl.dot(ainv, load_rows(v_ptr, b, h, t0, T, H, V, v0, BT, BVC) * beta[:, None], input_precision=PREC)
        store_tile(ut_ptr, ut, row0, BT, V, v0, BT, BVC)
        v0 += BVC


@triton.jit
def _state_fwd(
    k_ptr,
    w_ptr,
    ut_ptr,
    bcum_ptr,
    h0_ptr,
    states_ptr,
    u_ptr,
    ht_ptr,
    spans_ptr,
    first_ptr,
    T,
    H,
    K,
    V,
    Tp,
    NT,
    GATED: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BKC: tl.constexpr,
    PREC: tl.constexpr,
):
    """Per head and V block, over the chunks: store the entering state S, U = U~ - W S (W S in key blocks
    of BKC read back from the stored state when BKC < BK), S' = gamma_C S + (K * exp(b_C - b))^T U."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    b, h, rk, rv, mk, mv, kv_offs, kv_mask = state_block(i_v, i_bh, H, K, V, BK, BV)
    v0 = i_v * BV
    rows = tl.arange(0, BT)
    S = start_state(h0_ptr, i_bh.to(tl.int64), K, V, kv_offs, kv_mask, HAS_H0, BK, BV)
    c_lo, c_hi, b, i_buf = sequence_chunks(first_ptr, i_bh, b, H, NT, IS_VARLEN)
    n = c_lo
    while n < c_hi:  # not range(): breaks the Triton 3.6 interpreter
        t0, T_n = chunk_span(spans_ptr, n, n * BT, T, IS_VARLEN)
        row0 = i_buf * Tp + n * BT
        srow = i_buf.to(tl.int64) * NT + n
        store_state(states_ptr, S, srow, K, V, kv_offs, kv_mask)
        ws = add_w_state(
            tl.zeros([BT, BV], dtype=tl.float32), w_ptr, S, states_ptr, row0, srow * K, K, V, v0, BT, BK, BV, BKC, PREC
        )
        u = load_tile(ut_ptr, row0, BT, V, v0, BT, BV) - ws
        store_tile(u_ptr, u, row0, BT, V, v0, BT, BV)
        k = load_rows(k_ptr, b, h, t0, T_n, H, K, 0, BT, BK)
        if GATED:
            bc = tl.load(bcum_ptr + row0 + rows)
            b_last = tl.load(bcum_ptr + row0 + BT - 1)
            k = k * tl.exp(b_last - bc)[:, None]
            S = S * tl.exp(b_last)
        S += tl.dot(tl.trans(k), u, input_precision=PREC)
        n += 1
    if STORE_FINAL:
        store_state(ht_ptr, S, i_bh.to(tl.int64), K, V, kv_offs, kv_mask)


@triton.jit
def _output_fwd(
    q_ptr,
    k_ptr,
    bcum_ptr,
    states_ptr,
    u_ptr,
    o_ptr,
    spans_ptr,
    scale,
    T,
    H,
    K,
    V,
    Tp,
    NT,
    GATED: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    BT: tl.constexpr,
    BV: tl.constexpr,
    BKC: tl.constexpr,
    PREC: tl.constexpr,
):
    """Per chunk and V block: O = scale (diag(gamma) Q S + (M * Q K^T) U), Q K^T and Q S summed over key
    blocks of BKC."""
    i_n, i_bh, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h, t0, row0 = chunk_start(i_n, i_bh, H, Tp, BT)
    t0, T = chunk_span(spans_ptr, i_n, t0, T, IS_VARLEN)
    v0 = i_v * BV
    srow = (i_bh.to(tl.int64) * NT + i_n) * K
    scores = tl.zeros([BT, BT], dtype=tl.float32)
    qs = tl.zeros([BT, BV], dtype=tl.float32)
    k0 = 0
    while k0 < K:
        qb = load_rows(q_ptr, b, h, t0, T, H, K, k0, BT, BKC)
        scores += tl.dot(qb, tl.trans(load_rows(k_ptr, b, h, t0, T, H, K, k0, BT, BKC)), input_precision=PREC)
        qs += tl.dot(qb, load_tile(states_ptr, srow + k0, K - k0, V, v0, BKC, BV), input_precision=PREC)
        k0 += BKC
    u = load_tile(u_ptr, row0, BT, V, v0, BT, BV)
    if GATED:
        bc = tl.load(bcum_ptr + row0 + tl.arange(0, BT))
    else:
        bc = tl.zeros([BT], dtype=tl.float32)
    scores = scores * _decay_matrix(bc, GATED, False, BT)
    o = qs * tl.exp(bc)[:, None] + tl.dot(scores, u, input_precision=PREC)
    store_rows(o_ptr, o * scale, b, h, t0, T, H, V, v0, BT, BV)


@triton.jit
def _state_bwd(
    q_ptr,
    k_ptr,
    do_ptr,
    w_ptr,
    bcum_ptr,
    dht_ptr,
    dstates_ptr,
    du_ptr,
    dh0_ptr,
    spans_ptr,
    first_ptr,
    scale,
    T,
    H,
    K,
    V,
    Tp,
    NT,
    GATED: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BKC: tl.constexpr,
    PREC: tl.constexpr,
):
    """Reverse loop: dS (gradient of the state leaving chunk n) and dU = scale scores^T dO + Kd dS, the
    contractions over keys in blocks of BKC (Kd dS from the stored dS when BKC < BK)."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    b, h, rk, rv, mk, mv, kv_offs, kv_mask = state_block(i_v, i_bh, H, K, V, BK, BV)
    v0 = i_v * BV
    rows = tl.arange(0, BT)
    dS = start_state(dht_ptr, i_bh.to(tl.int64), K, V, kv_offs, kv_mask, HAS_DHT, BK, BV)
    c_lo, c_hi, b, i_buf = sequence_chunks(first_ptr, i_bh, b, H, NT, IS_VARLEN)
    i = c_lo
    while i < c_hi:  # not range(): breaks the Triton 3.6 interpreter
        n = c_hi - 1 - (i - c_lo)
        t0, T_n = chunk_span(spans_ptr, n, n * BT, T, IS_VARLEN)
        row0 = i_buf * Tp + n * BT
        srow = i_buf.to(tl.int64) * NT + n
        store_state(dstates_ptr, dS, srow, K, V, kv_offs, kv_mask)
        if GATED:
            bc = tl.load(bcum_ptr + row0 + rows)
            b_last = tl.load(bcum_ptr + row0 + BT - 1)
        else:
            bc = tl.zeros([BT], dtype=tl.float32)
            b_last = 0.0
        to_end = tl.exp(b_last - bc)[:, None]
        # scores^T[i, t] = exp(b_t - b_i) k_i . q_t for t >= i, and Kd dS, Kd = K * exp(b_C - b)
        scores_t = tl.zeros([BT, BT], dtype=tl.float32)
        kd_ds = tl.zeros([BT, BV], dtype=tl.float32)
        if BKC < BK:
            tl.debug_barrier()  # dS just stored, read back in key blocks
        k0 = 0
        while k0 < K:
            kb = load_rows(k_ptr, b, h, t0, T_n, H, K, k0, BT, BKC)
            scores_t += tl.dot(kb, tl.trans(load_rows(q_ptr, b, h, t0, T_n, H, K, k0, BT, BKC)), input_precision=PREC)
            if BKC < BK:
                ds_block = load_tile(dstates_ptr, srow * K + k0, K - k0, V, v0, BKC, BV)
                kd_ds += tl.dot(kb * to_end, ds_block, input_precision=PREC)
            else:
                kd_ds += tl.dot(kb * to_end, dS, input_precision=PREC)
            k0 += BKC
        do = load_rows(do_ptr, b, h, t0, T_n, H, V, v0, BT, BV)
        scores_t = scores_t * tl.trans(_decay_matrix(bc, GATED, False, BT))
        du = scale * tl.dot(scores_t, do, input_precision=PREC) + kd_ds
        store_tile(du_ptr, du, row0, BT, V, v0, BT, BV)
        w = load_tile(w_ptr, row0, BT, K, 0, BT, BK)
        qg = load_rows(q_ptr, b, h, t0, T_n, H, K, 0, BT, BK) * (scale * tl.exp(bc))[:, None]
        dS = (
            dS * tl.exp(b_last)
            + tl.dot(tl.trans(qg), do, input_precision=PREC)
            - tl.dot(tl.trans(w), du, input_precision=PREC)
        )
        i += 1
    if STORE_DH0:
        store_state(dh0_ptr, dS, i_bh.to(tl.int64), K, V, kv_offs, kv_mask)


@triton.jit
def _grads_output_state(
    q_ptr,
    k_ptr,
    bcum_ptr,
    u_ptr,
    states_ptr,
    dstates_ptr,
    do_ptr,
    dq_ptr,
    dk_ptr,
    db_ptr,
    spans_ptr,
    scale,
    T,
    H,
    K,
    V,
    Tp,
    NT,
    GATED: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BVC: tl.constexpr,
    PREC: tl.constexpr,
):
    """Per chunk and key block of BK (the contractions over values in blocks of BVC), the output and
    state-update paths: that block's columns of dq and dk (part), and its share of db (b = chunk cumsum
    of g), stored at ``db_ptr``'s row block ``i_k`` ([NK, B*H*Tp]; the host sums the key blocks).

    Terms whose decay exponent is exactly 0 (the scores' diagonal, the chunk's last step in the state
    update) are left out of db, so that they do not leave rounding noise in tiny decay gradients."""
    i_n, i_bh, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h, t0, row0 = chunk_start(i_n, i_bh, H, Tp, BT)
    t0, T = chunk_span(spans_ptr, i_n, t0, T, IS_VARLEN)
    k0 = i_k * BK
    srow = (i_bh.to(tl.int64) * NT + i_n) * K + k0
    rows = tl.arange(0, BT)
    # dO U^T, dO S^T, U dS^T and sum(dS * S) over value blocks
    do_u = tl.zeros([BT, BT], dtype=tl.float32)
    do_s = tl.zeros([BT, BK], dtype=tl.float32)
    u_ds = tl.zeros([BT, BK], dtype=tl.float32)
    ds_s = tl.zeros([BK], dtype=tl.float32)
    v0 = 0
    while v0 < V:
        do = load_rows(do_ptr, b, h, t0, T, H, V, v0, BT, BVC)
        u = load_tile(u_ptr, row0, BT, V, v0, BT, BVC)
        S = load_tile(states_ptr, srow, K - k0, V, v0, BK, BVC)
        dS = load_tile(dstates_ptr, srow, K - k0, V, v0, BK, BVC)
        do_u += tl.dot(do, tl.trans(u), input_precision=PREC)
        do_s += tl.dot(do, tl.trans(S), input_precision=PREC)
        u_ds += tl.dot(u, tl.trans(dS), input_precision=PREC)
        ds_s += tl.sum(dS * S, 1)
        v0 += BVC
    q = load_rows(q_ptr, b, h, t0, T, H, K, k0, BT, BK)
    k = load_rows(k_ptr, b, h, t0, T, H, K, k0, BT, BK)
    if GATED:
        bc = tl.load(bcum_ptr + row0 + rows)
        b_last = tl.load(bcum_ptr + row0 + BT - 1)
    else:
        bc = tl.zeros([BT], dtype=tl.float32)
        b_last = 0.0
    # output: O = scale (diag(gamma) Q S + (M * Q K^T) U)
    p = do_u * _decay_matrix(bc, GATED, False, BT) * scale
    dq_gamma = do_s * (scale * tl.exp(bc))[:, None]
    dq = dq_gamma + tl.dot(p, k, input_precision=PREC)
    dk = tl.dot(tl.trans(p), q, input_precision=PREC)
    pqk = tl.where(rows[:, None] > rows[None, :], p * tl.dot(q, tl.trans(k), input_precision=PREC), 0.0)
    db = tl.sum(dq_gamma * q, 1) + tl.sum(pqk, 1) - tl.sum(pqk, 0)
    # state update: S' = gamma_C S + (K * exp(b_C - b))^T U
    dk_state = u_ds * tl.exp(b_last - bc)[:, None]
    dk += dk_state
    d_end = tl.where(rows < BT - 1, tl.sum(dk_state * k, 1), 0.0)
    db -= d_end
    db_last = tl.sum(d_end, 0) + tl.exp(b_last) * tl.sum(ds_s, 0)
    db = tl.where(rows == BT - 1, db + db_last, db)
    store_rows(dq_ptr, dq, b, h, t0, T, H, K, k0, BT, BK)
    store_rows(dk_ptr, dk, b, h, t0, T, H, K, k0, BT, BK)
    if GATED:
        tl.store(db_ptr + i_k.to(tl.int64) * tl.num_programs(1) * Tp + row0 + rows, db)


@triton.jit
def _grads_solve(
    k_ptr,
    v_ptr,
    beta_ptr,
    bcum_ptr,
    ainv_ptr,
    w_ptr,
    ut_ptr,
    states_ptr,
    du_ptr,
    dk_ptr,
    dv_ptr,
    dbeta_ptr,
    db_ptr,
    spans_ptr,
    T,
    H,
    K,
    V,
    Tp,
    NT,
    GATED: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    BT: tl.constexpr,
    BKC: tl.constexpr,
    BVC: tl.constexpr,
    PREC: tl.constexpr,
):
    """Per chunk, the WY path U = U~ - W S, [U~ | W] = Ai [diag(beta) V | diag(beta gamma) K]:
    dv, dbeta, and the rest of dk and db (added to what ``_grads_output_state`` stored).

    Values in blocks of BVC: dXv = Ai^T dU (dv, dbeta, dA); keys in blocks of BKC: dXk = -Ai^T dU S^T
    (dk, db, dbeta, dA) and K K^T; then, once dA is whole, the K K^T term of dk, key block by key block
    (dk read back and stored twice)."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    b, h, t0, row0 = chunk_start(i_n, i_bh, H, Tp, BT)
    t0, T = chunk_span(spans_ptr, i_n, t0, T, IS_VARLEN)
    rows = tl.arange(0, BT)
    srow = (i_bh.to(tl.int64) * NT + i_n) * K
    beta = load_steps(beta_ptr, b, h, t0, T, H, BT)
    ainv_t = tl.trans(load_tile(ainv_ptr, row0, BT, BT, 0, BT, BT))
    if GATED:
        bc = tl.load(bcum_ptr + row0 + rows)
    else:
        bc = tl.zeros([BT], dtype=tl.float32)
    gamma = tl.exp(bc)
    # A = strict_lower(diag(beta) exp(b_t - b_j) K K^T), Ai = (I + A)^-1: dA = -(dXv U~^T + dXk W^T)
    da = tl.zeros([BT, BT], dtype=tl.float32)
    dbeta = tl.zeros([BT], dtype=tl.float32)
    v0 = 0
    while v0 < V:
        dxv = tl.dot(ainv_t, load_tile(du_ptr, row0, BT, V, v0, BT, BVC), input_precision=PREC)
        store_rows(dv_ptr, dxv * beta[:, None], b, h, t0, T, H, V, v0, BT, BVC)
        dbeta += tl.sum(dxv * load_rows(v_ptr, b, h, t0, T, H, V, v0, BT, BVC), 1)
        da += tl.dot(dxv, tl.trans(load_tile(ut_ptr, row0, BT, V, v0, BT, BVC)), input_precision=PREC)
        v0 += BVC
    kk = tl.zeros([BT, BT], dtype=tl.float32)
    dxk_k = tl.zeros([BT], dtype=tl.float32)
    k0 = 0
    while k0 < K:
        du_st = tl.zeros([BT, BKC], dtype=tl.float32)
        v0 = 0
        while v0 < V:
            du_st += tl.dot(
                load_tile(du_ptr, row0, BT, V, v0, BT, BVC),
                tl.trans(load_tile(states_ptr, srow + k0, K - k0, V, v0, BKC, BVC)),
                input_precision=PREC,
            )
            v0 += BVC
        dxk = -tl.dot(ainv_t, du_st, input_precision=PREC)
        kb = load_rows(k_ptr, b, h, t0, T, H, K, k0, BT, BKC)
        dxk_k += tl.sum(dxk * kb, 1)
        da += tl.dot(dxk, tl.trans(load_tile(w_ptr, row0, BT, K, k0, BT, BKC)), input_precision=PREC)
        kk += tl.dot(kb, tl.trans(kb), input_precision=PREC)
        dk = dxk * (beta * gamma)[:, None] + load_rows(dk_ptr, b, h, t0, T, H, K, k0, BT, BKC)
        store_rows(dk_ptr, dk, b, h, t0, T, H, K, k0, BT, BKC)
        k0 += BKC
    dbeta += gamma * dxk_k
    db = beta * gamma * dxk_k
    da = -da * _decay_matrix(bc, GATED, True, BT)
    dbeta += tl.sum(da * kk, 1)
    dkk = da * beta[:, None]
    da_a = dkk * kk  # dA * A
    db += tl.sum(da_a, 1) - tl.sum(da_a, 0)
    store_steps(dbeta_ptr, dbeta, b, h, t0, T, H, BT)
    if GATED:
        tl.store(db_ptr + row0 + rows, db + tl.load(db_ptr + row0 + rows))
    tl.debug_barrier()  # dk of this chunk stored above, read back by other threads
    k0 = 0
    while k0 < K:
        kb = load_rows(k_ptr, b, h, t0, T, H, K, k0, BT, BKC)
        dk = tl.dot(dkk, kb, input_precision=PREC) + tl.dot(tl.trans(dkk), kb, input_precision=PREC)
        dk += load_rows(dk_ptr, b, h, t0, T, H, K, k0, BT, BKC)
        store_rows(dk_ptr, dk, b, h, t0, T, H, K, k0, BT, BKC)
        k0 += BKC


def _chunk(q, v) -> int:
    """Chunk length: ``chunk_length``, at most ``_EXACT_CHUNK`` for fp32 inputs (exact dots)."""
    return _blocks(q.shape[-1], v.shape[-1], q.dtype).BT


class _Layout:
    """Sizes and chunk layout of one call: B, T, H, K, V, the block sizes (``blk``, :class:`_Blocks`), BT,
    NT (chunks per row), Tp = NT BT (buffer rows per batch x head), NS (state-loop programs per head row:
    B, or N sequences), and with packed sequences the :class:`~kernels.ops.utils.chunk_table.ChunkTable`
    (``table``; None otherwise)."""

    def __init__(self, q, v, table=None):
        self.B, self.T, self.H, self.K = q.shape
        self.V = v.shape[-1]
        self.blk = _blocks(self.K, self.V, q.dtype)
        self.BT = self.blk.BT
        self.table = table
        self.NT = table.NT if table is not None else triton.cdiv(self.T, self.BT)
        self.Tp = self.NT * self.BT
        self.NS = table.N if table is not None else self.B

    def varlen_args(self, dummy):
        """(spans, first) pointers and the IS_VARLEN flag of the kernels (``dummy`` when not packed)."""
        if self.table is None:
            return dummy, dummy, False
        return self.table.spans, self.table.first, True


def _forward(q, k, v, beta, bcum, scale, h0, need_final, L: _Layout):
    B, T, H, K, V, BT, NT, Tp, blk = L.B, L.T, L.H, L.K, L.V, L.BT, L.NT, L.Tp, L.blk
    prec = dot_precision(q.dtype)
    gated = bcum is not None
    f32 = dict(device=q.device, dtype=torch.float32)
    ainv = torch.empty(B, H, Tp, BT, **f32)
    w = torch.empty(B, H, Tp, K, **f32)
    ut = torch.empty(B, H, Tp, V, **f32)
    u = torch.empty(B, H, Tp, V, **f32)
    states = torch.empty(B, H, NT, K, V, **f32)
    ht = torch.empty(L.NS, H, K, V, **f32) if need_final else states
    bc = bcum if gated else w  # placeholder pointer when ungated
    spans, first, varlen = L.varlen_args(w)
    _prep_fwd[(NT, B * H)](
        k,
        v,
        beta,
        bc,
        ainv,
        w,
        ut,
        spans,
        T,
        H,
        K,
        V,
        Tp,
        GATED=gated,
        IS_VARLEN=varlen,
        BT=BT,
        BKC=blk.BKC,
        BVC=blk.BVC,
        PREC=prec,
        **LAUNCH,
    )
    _state_fwd[(triton.cdiv(V, blk.BVS), L.NS * H)](
        k,
        w,
        ut,
        bc,
        h0 if h0 is not None else states,
        states,
        u,
        ht,
        spans,
        first,
        T,
        H,
        K,
        V,
        Tp,
        NT,
        GATED=gated,
        HAS_H0=h0 is not None,
        STORE_FINAL=need_final,
        IS_VARLEN=varlen,
        BT=BT,
        BK=blk.BK,
        BV=blk.BVS,
        BKC=blk.BKC,
        PREC=prec,
        **LAUNCH,
    )
    o = torch.empty(B, T, H, V, device=q.device, dtype=q.dtype)
    _output_fwd[(NT, B * H, triton.cdiv(V, blk.BVS))](
        q,
        k,
        bc,
        states,
        u,
        o,
        spans,
        scale,
        T,
        H,
        K,
        V,
        Tp,
        NT,
        GATED=gated,
        IS_VARLEN=varlen,
        BT=BT,
        BV=blk.BVS,
        BKC=blk.BKC,
        PREC=prec,
        **LAUNCH,
    )
    return o, (ht if need_final else None), (ainv, w, ut, u, states)


class DeltaRuleChunkFunction(torch.autograd.Function):
    """Autograd wrapper of the chunked kernels; inputs contiguous, states fp32 [B, H, K, V] (packed
    sequences: ``table`` given, B = 1, states [N, H, K, V])."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, scale, h0, output_final_state, table=None):
        L = _Layout(q, v, table)
        if g is None:
            bcum = None
        else:
            bcum = table.cumsum(g) if table is not None else chunk_cumsum(g, L.BT)
        o, ht, saved = _forward(q, k, v, beta, bcum, scale, h0, output_final_state, L)
        ctx.save_for_backward(q, k, v, beta, bcum, *saved)
        ctx.scale, ctx.gated, ctx.has_h0, ctx.table = scale, g is not None, h0 is not None, table
        ctx.g_dtype = g.dtype if g is not None else None
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, bcum, ainv, w, ut, u, states = ctx.saved_tensors
        L = _Layout(q, v, ctx.table)
        B, T, H, K, V, BT, NT, Tp, blk = L.B, L.T, L.H, L.K, L.V, L.BT, L.NT, L.Tp, L.blk
        prec = dot_precision(q.dtype)
        gated = ctx.gated
        do = do.contiguous()
        f32 = dict(device=q.device, dtype=torch.float32)
        dstates = torch.empty(B, H, NT, K, V, **f32)
        du = torch.empty(B, H, Tp, V, **f32)
        dh0 = torch.empty(L.NS, H, K, V, **f32) if ctx.has_h0 else None
        bc = bcum if gated else w
        spans, first, varlen = L.varlen_args(w)
        _state_bwd[(triton.cdiv(V, blk.BVSB), L.NS * H)](
            q,
            k,
            do,
            w,
            bc,
            dht.contiguous() if dht is not None else dstates,
            dstates,
            du,
            dh0 if dh0 is not None else dstates,
            spans,
            first,
            ctx.scale,
            T,
            H,
            K,
            V,
            Tp,
            NT,
            GATED=gated,
            HAS_DHT=dht is not None,
            STORE_DH0=dh0 is not None,
            IS_VARLEN=varlen,
            BT=BT,
            BK=blk.BK,
            BV=blk.BVSB,
            BKC=blk.BKC,
            PREC=prec,
            **_BWD_LAUNCH,
        )
        dq = torch.empty(B, T, H, K, **f32)
        dk = torch.empty(B, T, H, K, **f32)
        dv = torch.empty(B, T, H, V, **f32)
        dbeta = torch.empty(B, T, H, **f32)
        NKg = triton.cdiv(K, blk.BKG)
        db_parts = torch.empty(NKg, B, H, Tp, **f32) if gated else None
        _grads_output_state[(NT, B * H, NKg)](
            q,
            k,
            bc,
            u,
            states,
            dstates,
            do,
            dq,
            dk,
            db_parts if gated else dbeta,
            spans,
            ctx.scale,
            T,
            H,
            K,
            V,
            Tp,
            NT,
            GATED=gated,
            IS_VARLEN=varlen,
            BT=BT,
            BK=blk.BKG,
            BVC=blk.BVC,
            PREC=prec,
            **_BWD_LAUNCH,
        )
        db = db_parts.sum(0) if gated else None
        _grads_solve[(NT, B * H)](
            k,
            v,
            beta,
            bc,
            ainv,
            w,
            ut,
            states,
            du,
            dk,
            dv,
            dbeta,
            db if gated else dbeta,
            spans,
            T,
            H,
            K,
            V,
            Tp,
            NT,
            GATED=gated,
            IS_VARLEN=varlen,
            BT=BT,
            BKC=blk.BKD,
            BVC=blk.BVD,
            PREC=prec,
            **_BWD_LAUNCH,
        )
        dg = None
        if gated:
            dg = ctx.table.reverse_cumsum(db) if ctx.table is not None else chunk_reverse_cumsum(db, T, BT)
            dg = dg.to(ctx.g_dtype)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbeta.to(beta.dtype), dg, None, dh0, None, None)


def delta_rule_triton_chunked(
    q, k, v, beta, g, scale, initial_state=None, output_final_state=False, cu_seqlens=None, offsets=None
):
    """Chunked Triton path; same signature and result as the reference. ``cu_seqlens`` [N+1]: packed
    sequences (B = 1, states [N, H, K, V]) in chunks aligned to sequence starts
    (:class:`~kernels.ops.utils.chunk_table.ChunkTable`, built from ``offsets``, the validated host copy
    of ``cu_seqlens``, or from one host read of it)."""
    table = None
    if cu_seqlens is not None:
        table = ChunkTable(host_offsets(cu_seqlens, offsets), _chunk(q, v), q.device)
    if q.shape[1] == 0:
        return empty_result(q, v, initial_state, output_final_state, n_states=table.N if table else None)
    q, k, v, beta = (x.contiguous() for x in (q, k, v, beta))
    g = g.contiguous() if g is not None else None
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    return DeltaRuleChunkFunction.apply(q, k, v, beta, g, float(scale), h0, bool(output_final_state), table)


mark_varlen(delta_rule_triton_chunked, host_offsets=True)
