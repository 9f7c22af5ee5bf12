"""Chunked Triton kernels for gated linear attention (forward and backward), and ``gla_triton``.

Notation as in ``torch_chunk.py``: chunks of C = 64 steps, sub-blocks of 16 rows, ``b`` the cumulative
log decay inside a chunk (per key; a per-head gate is broadcast over K by the cumsum kernel),
``S_n`` the state after chunk n. Kernels (grid axis 0 is batch x head everywhere):

- ``_chunk_cumsum``: b = cumsum of g inside every chunk (fp32).
- ``_fwd_states``: ``hs[n]`` = state entering chunk n, ``hs[N]`` = final state; loop over chunks,
  ``S <- exp(b_last) S + (k * exp(b_last - b))^T v``  (grid: K blocks x V blocks).
- ``_fwd_output``: per 16-row sub-block i: ``o_i = scale ((q_i e^b_i) S_prev + sum_{j<=i} A_ij v_j)``;
  ``A_ij`` (``_scores``) uses the reference point r_j = b at the end of block j for j < i (both
  factors <= 1, one ``tl.dot``) and the explicit masked ``exp(b_t - b_s)`` on the diagonal.
- backward: ``_bwd_states`` (``dhs[n]`` = dL/d(state entering chunk n), reverse loop:
  ``dS <- exp(b_last) dS + scale (q e^b)^T do``), ``_bwd_dqk`` (dq, dk and ``q dq - k dk``),
  ``_bwd_dv`` (dv), ``_bwd_dg`` (dg: a reverse cumulative sum of ``q dq - k dk`` inside the chunk
  plus ``sum_v S_n * dS_n``, the explicit dependence of ``S_n`` on b_last; arranged so that no
  two O(1) terms cancel, see the kernel).

The dg identity: the loss depends on chunk n's b only through ``q e^b``, ``k e^-b`` and the factor
``e^{b_last}`` of ``S_n``, so ``dL/db_t = q_t dq_t - k_t dk_t + [t = last] sum_v S_n dS_n``, and
``dg_t = sum_{t' >= t in the chunk} dL/db_t'``. States are recomputed in backward, not stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.ops.utils.chunks import empty_result
from kernels.ops.common.dot import dot, masked_exp
from kernels._varlen import host_offsets, mark_varlen

CHUNK = 64
SUB = 16
#: sequences up to this length use the fused-recurrent kernel in ``gla_triton``
FUSED_MAX_T = 16


def _block(n: int, cap: int = 64) -> int:
    return min(cap, max(16, triton.next_power_of_2(n)))


#: K block of the dq/dk kernel, which holds a [16, 16, BK] decay tensor
DQK_BLOCK_K = 32
#: 8 warps: no register spills for 64 x 64 fp32 state tiles (checked by compiling for sm_90)
NUM_WARPS = 8
#: steps per ``tl.dot`` in the fp32 state loops (``_fwd_states``, ``_bwd_states``); bf16 takes whole chunks
STATE_ROWS_FP32 = 16


@triton.jit
def _chunk_cumsum_kernel(g_ptr, b_ptr, T, H, K, PER_HEAD: tl.constexpr, C: tl.constexpr, BK: tl.constexpr):
    i_bh, i_n, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    t = i_n * C + tl.arange(0, C)
    kk = i_k * BK + tl.arange(0, BK)
    tok = i_b.to(tl.int64) * T * H + t * H + i_h
    ok = (t < T)[:, None] & (kk < K)[None, :]
    if PER_HEAD:
        g = tl.load(g_ptr + tok, mask=t < T, other=0.0).to(tl.float32)
        g = tl.zeros([C, BK], dtype=tl.float32) + g[:, None]
    else:
        g = tl.load(g_ptr + tok[:, None] * K + kk[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(b_ptr + tok[:, None] * K + kk[None, :], tl.cumsum(g, 0), mask=ok)


@triton.jit
def _kv_rows(k_ptr, v_ptr, b_ptr, sid_ptr, tok0, t, T, H, K, V, kk, vv, b_last, s1, flows, LOWP: tl.constexpr,
             VARLEN: tl.constexpr):  # fmt: skip
    """``(k * exp(b_last - b))^T v`` over the steps ``t`` of one chunk (with VARLEN only the chunk's last
    sequence's steps, and only if it flows into the next chunk)."""
    t_ok = t < T
    tok = tok0 + t * H
    k = tl.load(k_ptr + tok[:, None] * K + kk[None, :], mask=t_ok[:, None] & (kk < K)[None, :], other=0.0)
    v = tl.load(v_ptr + tok[:, None] * V + vv[None, :], mask=t_ok[:, None] & (vv < V)[None, :], other=0.0)
    b = tl.load(b_ptr + tok[:, None] * K + kk[None, :], mask=t_ok[:, None] & (kk < K)[None, :], other=0.0)
    if VARLEN:
        sid = tl.load(sid_ptr + t, mask=t_ok, other=-1)
        k_out = k.to(tl.float32) * masked_exp(b_last[None, :] - b, (t_ok & (sid == s1) & flows)[:, None])
    else:
        k_out = k.to(tl.float32) * masked_exp(b_last[None, :] - b, t_ok[:, None])
    return dot(tl.trans(k_out), v.to(tl.float32), LOWP)


@triton.jit
def _qdo_rows(q_ptr, do_ptr, b_ptr, sid_ptr, tok0, t, T, H, K, V, kk, vv, s0, scale, LOWP: tl.constexpr,
              VARLEN: tl.constexpr):  # fmt: skip
    """``scale (q * exp(b))^T do`` over the steps ``t`` of one chunk (with VARLEN only the chunk's first
    sequence's steps)."""
    t_ok = t < T
    tok = tok0 + t * H
    q = tl.load(q_ptr + tok[:, None] * K + kk[None, :], mask=t_ok[:, None] & (kk < K)[None, :], other=0.0)
    do = tl.load(do_ptr + tok[:, None] * V + vv[None, :], mask=t_ok[:, None] & (vv < V)[None, :], other=0.0)
    b = tl.load(b_ptr + tok[:, None] * K + kk[None, :], mask=t_ok[:, None] & (kk < K)[None, :], other=0.0)
    if VARLEN:
        first = t_ok & (tl.load(sid_ptr + t, mask=t_ok, other=-1) == s0)
        q_in = q.to(tl.float32) * masked_exp(b, first[:, None]) * scale
    else:
        q_in = q.to(tl.float32) * masked_exp(b, t_ok[:, None]) * scale
    return dot(tl.trans(q_in), do.to(tl.float32), LOWP)


@triton.jit
def _fwd_states_kernel(
    k_ptr,
    v_ptr,
    b_ptr,
    h0_ptr,
    hs_ptr,
    sid_ptr,
    x_ptr,
    flag_ptr,
    T,
    H,
    K,
    V,
    N,
    HAS_H0: tl.constexpr,
    LOWP: tl.constexpr,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    VARLEN: tl.constexpr,
    HAS_X: tl.constexpr,
    R: tl.constexpr,
):
    i_bh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    kk = i_k * BK + tl.arange(0, BK)
    vv = i_v * BV + tl.arange(0, BV)
    kv_ok = (kk < K)[:, None] & (vv < V)[None, :]
    state_offs = kk[:, None] * V + vv[None, :]
    hs_base = hs_ptr + i_bh.to(tl.int64) * (N + 1) * K * V
    x_base = x_ptr + i_bh.to(tl.int64) * (N + 1) * K * V
    if HAS_X:
        S = tl.load(x_base + state_offs, mask=kv_ok, other=0.0)
    elif HAS_H0:
        S = tl.load(h0_ptr + i_bh.to(tl.int64) * K * V + state_offs, mask=kv_ok, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    tok0 = i_b.to(tl.int64) * T * H + i_h
    rows = tl.arange(0, R)
    for n in range(0, N):
        tl.store(hs_base + n * K * V + state_offs, S, mask=kv_ok)
        t_last = tl.minimum(n * C + C, T) - 1
        b_last = tl.load(b_ptr + (tok0 + t_last * H) * K + kk, mask=kk < K, other=0.0)
        if VARLEN:  # only the last sequence's steps, and only if it continues into the next chunk
            s0, s1, flows = _chunk_seqs(sid_ptr, n * C, t_last, T)
            decay = tl.where(flows & (s0 == s1), tl.exp(b_last), 0.0)
        else:
            s1, flows = 0, True
            decay = tl.exp(b_last)
        # the chunk's k v^T in blocks of R rows (R < C for fp32: smaller FMA-dot operands)
        kv = _kv_rows(k_ptr, v_ptr, b_ptr, sid_ptr, tok0, n * C + rows, T, H, K, V, kk, vv, b_last, s1, flows, LOWP,
                      VARLEN)  # fmt: skip
        for j in tl.static_range(1, C // R):
            kv += _kv_rows(k_ptr, v_ptr, b_ptr, sid_ptr, tok0, n * C + j * R + rows, T, H, K, V, kk, vv, b_last, s1,
                           flows, LOWP, VARLEN)  # fmt: skip
        S = S * decay[:, None] + kv
        if VARLEN and HAS_X:  # a branch, not a masked load: the software pipeliner would prefetch the tile
            if (tl.load(flag_ptr + n + 1) & 1) != 0:
                S += tl.load(x_base + (n + 1) * K * V + state_offs, mask=kv_ok, other=0.0)
    tl.store(hs_base + N * K * V + state_offs, S, mask=kv_ok)


@triton.jit
def _chunk_seqs(sid_ptr, c0, t_last, T):
    """Packed sequences: the sequence at the chunk's first and last step, and whether the last one
    continues into the next chunk."""
    s0 = tl.load(sid_ptr + c0)
    s1 = tl.load(sid_ptr + t_last)
    nxt = tl.load(sid_ptr + tl.minimum(t_last + 1, T - 1))
    flows = (t_last + 1 < T) & (nxt == s1)
    return s0, s1, flows


@triton.jit
def _diagonal_decays(b_t, b_s, t_ok, SUB: tl.constexpr):
    """[SUB(t), SUB(s), k] tensor exp(b_tk - b_sk) for s <= t (and t valid), 0 elsewhere;
    the exponent is masked to -inf before the exp, so nothing positive is exponentiated."""
    r_idx = tl.arange(0, SUB)
    keep = (r_idx[:, None] >= r_idx[None, :])[:, :, None] & t_ok[:, None, None]
    return masked_exp(b_t[:, None, :] - b_s[None, :, :], keep)


@triton.jit
def _scores(
    q_ptr,
    k_ptr,
    b_ptr,
    sid_ptr,
    tok0,
    T,
    H,
    K,
    row0,
    col0,
    LOWP: tl.constexpr,
    SUB: tl.constexpr,
    BK: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """A[t, s] = sum_k q_tk k_sk exp(b_tk - b_sk), rows t = row0.., columns s = col0.. (col0 <= row0)."""
    r_idx = tl.arange(0, SUB)
    t = row0 + r_idx
    s = col0 + r_idx
    t_ok = t < T
    s_ok = s < T
    A = tl.zeros([SUB, SUB], dtype=tl.float32)
    if col0 < row0:  # earlier block: reference point r = b at its last row (both factors <= 1)
        for k0 in range(0, K, BK):
            kk = k0 + tl.arange(0, BK)
            k_ok = kk < K
            q = tl.load(
                q_ptr + (tok0 + t * H)[:, None] * K + kk[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0
            ).to(tl.float32)
            b_t = tl.load(
                b_ptr + (tok0 + t * H)[:, None] * K + kk[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0
            )
            k = tl.load(
                k_ptr + (tok0 + s * H)[:, None] * K + kk[None, :], mask=s_ok[:, None] & k_ok[None, :], other=0.0
            ).to(tl.float32)
            b_s = tl.load(
                b_ptr + (tok0 + s * H)[:, None] * K + kk[None, :], mask=s_ok[:, None] & k_ok[None, :], other=0.0
            )
            r = tl.load(b_ptr + (tok0 + (col0 + SUB - 1) * H) * K + kk, mask=k_ok, other=0.0)
            q_in = q * masked_exp(b_t - r[None, :], t_ok[:, None])
            k_in = k * tl.exp(r[None, :] - b_s)
            A += dot(q_in, tl.trans(k_in), LOWP)
    else:  # diagonal block: explicit [SUB, SUB, 16] decays, 16 keys at a time
        for k0 in range(0, K, 16):
            kk = k0 + tl.arange(0, 16)
            ok = t_ok[:, None] & (kk < K)[None, :]
            q = tl.load(q_ptr + (tok0 + t * H)[:, None] * K + kk[None, :], mask=ok, other=0.0).to(tl.float32)
            k = tl.load(k_ptr + (tok0 + t * H)[:, None] * K + kk[None, :], mask=ok, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + (tok0 + t * H)[:, None] * K + kk[None, :], mask=ok, other=0.0)
            E = _diagonal_decays(b, b, t_ok, SUB)
            A += tl.sum(q[:, None, :] * k[None, :, :] * E, 2)
    if VARLEN:  # pairs of one sequence only
        A = tl.where(_same_seq(sid_ptr, t, s, T), A, 0.0)
    return A


@triton.jit
def _same_seq(sid_ptr, t, s, T):
    """bool [len(t), len(s)]: steps t and s belong to one packed sequence (and exist)."""
    sid_t = tl.load(sid_ptr + t, mask=t < T, other=-1)
    sid_s = tl.load(sid_ptr + s, mask=s < T, other=-2)
    return sid_t[:, None] == sid_s[None, :]


@triton.jit
def _fwd_output_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    b_ptr,
    hs_ptr,
    o_ptr,
    sid_ptr,
    scale,
    T,
    H,
    K,
    V,
    N,
    LOWP: tl.constexpr,
    C: tl.constexpr,
    SUB: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    VARLEN: tl.constexpr,
):
    i_bh, i_sub, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    NSUB: tl.constexpr = C // SUB
    i_n = i_sub // NSUB
    i_i = i_sub % NSUB
    row0 = i_n * C + i_i * SUB
    tok0 = i_b.to(tl.int64) * T * H + i_h
    t = row0 + tl.arange(0, SUB)
    t_ok = t < T
    vv = i_v * BV + tl.arange(0, BV)
    v_ok = vv < V
    hs_base = hs_ptr + (i_bh.to(tl.int64) * (N + 1) + i_n) * K * V
    if row0 >= T:  # a sub-block past the end of the sequence
        return
    acc = tl.zeros([SUB, BV], dtype=tl.float32)
    first = t_ok  # rows reached by the entering state: the chunk's first sequence
    if VARLEN:
        first = first & (tl.load(sid_ptr + t, mask=t_ok, other=-1) == tl.load(sid_ptr + i_n * C))
    for k0 in range(0, K, BK):  # inter-chunk: (q e^b) S_prev
        kk = k0 + tl.arange(0, BK)
        k_ok = kk < K
        q = tl.load(
            q_ptr + (tok0 + t * H)[:, None] * K + kk[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0
        ).to(tl.float32)
        b = tl.load(b_ptr + (tok0 + t * H)[:, None] * K + kk[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        S = tl.load(hs_base + kk[:, None] * V + vv[None, :], mask=k_ok[:, None] & v_ok[None, :], other=0.0)
        acc += dot(q * masked_exp(b, first[:, None]), S, LOWP)
    for j in range(0, i_i + 1):  # intra-chunk: sum_{j <= i} A_ij v_j
        col0 = i_n * C + j * SUB
        A = _scores(q_ptr, k_ptr, b_ptr, sid_ptr, tok0, T, H, K, row0, col0, LOWP, SUB, BK, VARLEN)
        s = col0 + tl.arange(0, SUB)
        v = tl.load(
            v_ptr + (tok0 + s * H)[:, None] * V + vv[None, :], mask=(s < T)[:, None] & v_ok[None, :], other=0.0
        ).to(tl.float32)
        acc += dot(A, v, LOWP)
    tl.store(
        o_ptr + (tok0 + t * H)[:, None] * V + vv[None, :],
        (acc * scale).to(o_ptr.dtype.element_ty),
        mask=t_ok[:, None] & v_ok[None, :],
    )


@triton.jit
def _bwd_states_kernel(
    q_ptr,
    do_ptr,
    b_ptr,
    dht_ptr,
    dhs_ptr,
    sid_ptr,
    flag_ptr,
    scale,
    T,
    H,
    K,
    V,
    N,
    HAS_DHT: tl.constexpr,
    LOWP: tl.constexpr,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    VARLEN: tl.constexpr,
    R: tl.constexpr,
):
    """dhs[n] = dL/d(state entering chunk n) (dhs[N]: of the final state). With VARLEN, ``dht`` is
    [B * H, N + 1, K, V]: the gradients of all entering states from outside (the final states')."""
    i_bh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    kk = i_k * BK + tl.arange(0, BK)
    vv = i_v * BV + tl.arange(0, BV)
    kv_ok = (kk < K)[:, None] & (vv < V)[None, :]
    state_offs = kk[:, None] * V + vv[None, :]
    dhs_base = dhs_ptr + i_bh.to(tl.int64) * (N + 1) * K * V
    ext_base = dht_ptr + i_bh.to(tl.int64) * (N + 1) * K * V
    if VARLEN and HAS_DHT:
        dS = tl.load(ext_base + N * K * V + state_offs, mask=kv_ok, other=0.0)
    elif HAS_DHT:
        dS = tl.load(dht_ptr + i_bh.to(tl.int64) * K * V + state_offs, mask=kv_ok, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros([BK, BV], dtype=tl.float32)
    tok0 = i_b.to(tl.int64) * T * H + i_h
    rows = tl.arange(0, R)
    for i in range(0, N):
        n = N - 1 - i
        tl.store(dhs_base + (n + 1) * K * V + state_offs, dS, mask=kv_ok)
        t_last = tl.minimum(n * C + C, T) - 1
        b_last = tl.load(b_ptr + (tok0 + t_last * H) * K + kk, mask=kk < K, other=0.0)
        if VARLEN:
            s0, s1, flows = _chunk_seqs(sid_ptr, n * C, t_last, T)
            decay = tl.where(flows & (s0 == s1), tl.exp(b_last), 0.0)
        else:
            s0 = 0
            decay = tl.exp(b_last)
        # the chunk's scale (q e^b)^T do in blocks of R rows (R < C for fp32: smaller FMA-dot operands)
        qdo = _qdo_rows(q_ptr, do_ptr, b_ptr, sid_ptr, tok0, n * C + rows, T, H, K, V, kk, vv, s0, scale, LOWP, VARLEN)
        for j in tl.static_range(1, C // R):
            qdo += _qdo_rows(q_ptr, do_ptr, b_ptr, sid_ptr, tok0, n * C + j * R + rows, T, H, K, V, kk, vv, s0, scale,
                             LOWP, VARLEN)  # fmt: skip
        dS = dS * decay[:, None] + qdo
        if VARLEN and HAS_DHT:  # only chunks whose entering state a final state reads (flag bit 1)
            if (tl.load(flag_ptr + n) & 2) != 0:
                dS += tl.load(ext_base + n * K * V + state_offs, mask=kv_ok, other=0.0)
    tl.store(dhs_base + state_offs, dS, mask=kv_ok)


@triton.jit
def _bwd_dqk_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    b_ptr,
    do_ptr,
    hs_ptr,
    dhs_ptr,
    dq_ptr,
    dk_ptr,
    x_ptr,
    sid_ptr,
    scale,
    T,
    H,
    K,
    V,
    N,
    LOWP: tl.constexpr,
    C: tl.constexpr,
    SUB: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """dq, dk of the rows of sub-block i (K block i_k), and x = q dq - k dk for dg."""
    i_bh, i_sub, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    NSUB: tl.constexpr = C // SUB
    i_n = i_sub // NSUB
    i_i = i_sub % NSUB
    n_valid = tl.cdiv(tl.minimum(C, T - i_n * C), SUB)  # sub-blocks of this chunk holding tokens
    row0 = i_n * C + i_i * SUB
    if row0 >= T:  # a sub-block past the end: then every earlier block is complete
        return
    tok0 = i_b.to(tl.int64) * T * H + i_h
    r_idx = tl.arange(0, SUB)
    t = row0 + r_idx
    t_ok = t < T
    kk = i_k * BK + tl.arange(0, BK)
    k_ok = kk < K
    ik_ok = t_ok[:, None] & k_ok[None, :]
    qk_offs = (tok0 + t * H)[:, None] * K + kk[None, :]
    q_i = tl.load(q_ptr + qk_offs, mask=ik_ok, other=0.0).to(tl.float32)
    k_i = tl.load(k_ptr + qk_offs, mask=ik_ok, other=0.0).to(tl.float32)
    b_i = tl.load(b_ptr + qk_offs, mask=ik_ok, other=0.0)
    t_last = tl.minimum(i_n * C + C, T) - 1
    b_last = tl.load(b_ptr + (tok0 + t_last * H) * K + kk, mask=k_ok, other=0.0)
    hs_base = hs_ptr + (i_bh.to(tl.int64) * (N + 1) + i_n) * K * V  # state entering chunk n
    dhs_base = dhs_ptr + (i_bh.to(tl.int64) * (N + 1) + i_n + 1) * K * V  # dL/d(state after chunk n)
    dq = tl.zeros([SUB, BK], dtype=tl.float32)
    dk = tl.zeros([SUB, BK], dtype=tl.float32)
    P_ii = tl.zeros([SUB, SUB], dtype=tl.float32)  # do_t . v_s inside block i
    for v0 in range(0, V, BV):  # state terms and P_ii
        vv = v0 + tl.arange(0, BV)
        v_ok = vv < V
        do_i = tl.load(
            do_ptr + (tok0 + t * H)[:, None] * V + vv[None, :], mask=t_ok[:, None] & v_ok[None, :], other=0.0
        ).to(tl.float32)
        v_i = tl.load(
            v_ptr + (tok0 + t * H)[:, None] * V + vv[None, :], mask=t_ok[:, None] & v_ok[None, :], other=0.0
        ).to(tl.float32)
        S = tl.load(hs_base + kk[:, None] * V + vv[None, :], mask=k_ok[:, None] & v_ok[None, :], other=0.0)
        dS = tl.load(dhs_base + kk[:, None] * V + vv[None, :], mask=k_ok[:, None] & v_ok[None, :], other=0.0)
        dq += dot(do_i, tl.trans(S), LOWP)
        dk += dot(v_i, tl.trans(dS), LOWP)
        P_ii += dot(do_i, tl.trans(v_i), LOWP)
    first = t_ok  # rows reached by the entering state
    tail = t_ok  # rows whose k v^T enters the state passed on
    if VARLEN:
        s0, s1, flows = _chunk_seqs(sid_ptr, i_n * C, t_last, T)
        sid_i = tl.load(sid_ptr + t, mask=t_ok, other=-1)
        first = first & (sid_i == s0)
        tail = tail & (sid_i == s1) & flows
        P_ii = tl.where(_same_seq(sid_ptr, t, t, T), P_ii, 0.0)
    dq = dq * scale * masked_exp(b_i, first[:, None])
    dk = dk * masked_exp(b_last[None, :] - b_i, tail[:, None])
    dk_state_last = tl.where((t == t_last)[:, None], dk, 0.0)  # kept out of x, see _bwd_dg_kernel
    for j in range(0, i_i):  # earlier blocks j feed dq_i
        s = i_n * C + j * SUB + r_idx
        P = tl.zeros([SUB, SUB], dtype=tl.float32)
        for v0 in range(0, V, BV):
            vv = v0 + tl.arange(0, BV)
            v_ok = vv < V
            do_i = tl.load(
                do_ptr + (tok0 + t * H)[:, None] * V + vv[None, :], mask=t_ok[:, None] & v_ok[None, :], other=0.0
            ).to(tl.float32)
            v_j = tl.load(v_ptr + (tok0 + s * H)[:, None] * V + vv[None, :], mask=v_ok[None, :], other=0.0).to(
                tl.float32
            )
            P += dot(do_i, tl.trans(v_j), LOWP)
        if VARLEN:
            P = tl.where(_same_seq(sid_ptr, t, s, T), P, 0.0)
        k_j = tl.load(k_ptr + (tok0 + s * H)[:, None] * K + kk[None, :], mask=k_ok[None, :], other=0.0).to(tl.float32)
        b_j = tl.load(b_ptr + (tok0 + s * H)[:, None] * K + kk[None, :], mask=k_ok[None, :], other=0.0)
        r = tl.load(b_ptr + (tok0 + (i_n * C + j * SUB + SUB - 1) * H) * K + kk, mask=k_ok, other=0.0)
        dq += scale * masked_exp(b_i - r[None, :], t_ok[:, None]) * dot(P, k_j * tl.exp(r[None, :] - b_j), LOWP)
    r_i = tl.load(
        b_ptr + (tok0 + (row0 + SUB - 1) * H) * K + kk, mask=k_ok & ((kk * 0 + row0 + SUB - 1) < T), other=0.0
    )
    for m in range(i_i + 1, n_valid):  # later blocks m feed dk_i (block i is then complete)
        tm = i_n * C + m * SUB + r_idx
        tm_ok = tm < T
        P = tl.zeros([SUB, SUB], dtype=tl.float32)  # P[t, s] = do_t . v_s
        for v0 in range(0, V, BV):
            vv = v0 + tl.arange(0, BV)
            v_ok = vv < V
            do_m = tl.load(
                do_ptr + (tok0 + tm * H)[:, None] * V + vv[None, :], mask=tm_ok[:, None] & v_ok[None, :], other=0.0
            ).to(tl.float32)
            v_i = tl.load(
                v_ptr + (tok0 + t * H)[:, None] * V + vv[None, :], mask=t_ok[:, None] & v_ok[None, :], other=0.0
            ).to(tl.float32)
            P += dot(do_m, tl.trans(v_i), LOWP)
        if VARLEN:
            P = tl.where(_same_seq(sid_ptr, tm, t, T), P, 0.0)
        q_m = tl.load(
            q_ptr + (tok0 + tm * H)[:, None] * K + kk[None, :], mask=tm_ok[:, None] & k_ok[None, :], other=0.0
        ).to(tl.float32)
        b_m = tl.load(
            b_ptr + (tok0 + tm * H)[:, None] * K + kk[None, :], mask=tm_ok[:, None] & k_ok[None, :], other=0.0
        )
        q_in = q_m * masked_exp(b_m - r_i[None, :], tm_ok[:, None])
        dk += scale * tl.exp(r_i[None, :] - b_i) * dot(tl.trans(P), q_in, LOWP)
    # diagonal block: explicit masked decays E[t, s, k]
    E = _diagonal_decays(b_i, b_i, t_ok, SUB)
    dq += scale * tl.sum(P_ii[:, :, None] * k_i[None, :, :] * E, 1)
    dk += scale * tl.sum(P_ii[:, :, None] * q_i[:, None, :] * E, 0)
    tl.store(dq_ptr + qk_offs, dq.to(dq_ptr.dtype.element_ty), mask=ik_ok)
    tl.store(dk_ptr + qk_offs, dk.to(dk_ptr.dtype.element_ty), mask=ik_ok)
    tl.store(x_ptr + qk_offs, q_i * dq - k_i * (dk - dk_state_last), mask=ik_ok)


@triton.jit
def _bwd_dv_kernel(
    q_ptr,
    k_ptr,
    b_ptr,
    do_ptr,
    dhs_ptr,
    dv_ptr,
    sid_ptr,
    scale,
    T,
    H,
    K,
    V,
    N,
    LOWP: tl.constexpr,
    C: tl.constexpr,
    SUB: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """dv_j = sum_{i >= j} A_ij^T do_i + (k_j e^(b_last - b_j)) dS_n, rows of sub-block j."""
    i_bh, i_sub, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    NSUB: tl.constexpr = C // SUB
    i_n = i_sub // NSUB
    i_j = i_sub % NSUB
    n_valid = tl.cdiv(tl.minimum(C, T - i_n * C), SUB)
    col0 = i_n * C + i_j * SUB
    if col0 >= T:
        return
    tok0 = i_b.to(tl.int64) * T * H + i_h
    s = col0 + tl.arange(0, SUB)
    s_ok = s < T
    vv = i_v * BV + tl.arange(0, BV)
    v_ok = vv < V
    dhs_base = dhs_ptr + (i_bh.to(tl.int64) * (N + 1) + i_n + 1) * K * V
    t_last = tl.minimum(i_n * C + C, T) - 1
    acc = tl.zeros([SUB, BV], dtype=tl.float32)
    tail = s_ok
    if VARLEN:
        s0, s1, flows = _chunk_seqs(sid_ptr, i_n * C, t_last, T)
        tail = tail & (tl.load(sid_ptr + s, mask=s_ok, other=-1) == s1) & flows
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        k_ok = kk < K
        k = tl.load(
            k_ptr + (tok0 + s * H)[:, None] * K + kk[None, :], mask=s_ok[:, None] & k_ok[None, :], other=0.0
        ).to(tl.float32)
        b = tl.load(b_ptr + (tok0 + s * H)[:, None] * K + kk[None, :], mask=s_ok[:, None] & k_ok[None, :], other=0.0)
        b_last = tl.load(b_ptr + (tok0 + t_last * H) * K + kk, mask=k_ok, other=0.0)
        dS = tl.load(dhs_base + kk[:, None] * V + vv[None, :], mask=k_ok[:, None] & v_ok[None, :], other=0.0)
        acc += dot(k * masked_exp(b_last[None, :] - b, tail[:, None]), dS, LOWP)
    for i in range(i_j, n_valid):
        row0 = i_n * C + i * SUB
        A = _scores(q_ptr, k_ptr, b_ptr, sid_ptr, tok0, T, H, K, row0, col0, LOWP, SUB, BK, VARLEN)
        t = row0 + tl.arange(0, SUB)
        do = tl.load(
            do_ptr + (tok0 + t * H)[:, None] * V + vv[None, :], mask=(t < T)[:, None] & v_ok[None, :], other=0.0
        ).to(tl.float32)
        acc += scale * dot(tl.trans(A), do, LOWP)
    tl.store(
        dv_ptr + (tok0 + s * H)[:, None] * V + vv[None, :],
        acc.to(dv_ptr.dtype.element_ty),
        mask=s_ok[:, None] & v_ok[None, :],
    )


@triton.jit
def _bwd_dg_kernel(
    x_ptr,
    k_ptr,
    v_ptr,
    hs_ptr,
    dhs_ptr,
    dg_ptr,
    sid_ptr,
    inj_ptr,
    T,
    H,
    K,
    V,
    N,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    VARLEN: tl.constexpr,
    HAS_X: tl.constexpr,
):
    """dg_t = sum_{t' >= t in the chunk} x_t' + sum_v (S_n - k_l v_l^T) dS_n, l the chunk's last step.

    ``x = q dq - k dk`` except that at step l the state part ``dS_n v_l`` of dk is left out: it
    equals ``sum_v k_l v_l^T dS_n``, so both sides drop it. What remains,
    ``S_n - k_l v_l^T = e^{g_l} S_{l-1}``, is small under strong decay, so dg does not come out of
    the cancellation of two O(1) terms (computed with different roundings)."""
    i_bh, i_n, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    t = i_n * C + tl.arange(0, C)
    kk = i_k * BK + tl.arange(0, BK)
    k_ok = kk < K
    tok = i_b.to(tl.int64) * T * H + t * H + i_h
    ok = (t < T)[:, None] & k_ok[None, :]
    x = tl.load(x_ptr + tok[:, None] * K + kk[None, :], mask=ok, other=0.0)
    rev = tl.sum(x, 0)[None, :] - tl.cumsum(x, 0) + x
    base = (i_bh.to(tl.int64) * (N + 1) + i_n + 1) * K * V
    tok_last = i_b.to(tl.int64) * T * H + (tl.minimum(i_n * C + C, T) - 1) * H + i_h
    k_last = tl.load(k_ptr + tok_last * K + kk, mask=k_ok, other=0.0).to(tl.float32)
    edge = tl.zeros([BK], dtype=tl.float32)
    for v0 in range(0, V, BV):
        vv = v0 + tl.arange(0, BV)
        m = k_ok[:, None] & (vv < V)[None, :]
        S = tl.load(hs_ptr + base + kk[:, None] * V + vv[None, :], mask=m, other=0.0)
        dS = tl.load(dhs_ptr + base + kk[:, None] * V + vv[None, :], mask=m, other=0.0)
        v_last = tl.load(v_ptr + tok_last * V + vv, mask=vv < V, other=0.0).to(tl.float32)
        if HAS_X:  # the injected initial state does not depend on this chunk's decays
            S -= tl.load(inj_ptr + base + kk[:, None] * V + vv[None, :], mask=m, other=0.0)
        edge += tl.sum((S - k_last[:, None] * v_last[None, :]) * dS, 1)
    if VARLEN:  # no state passed on: no edge term
        t_last = tl.minimum(i_n * C + C, T) - 1
        s0, s1, flows = _chunk_seqs(sid_ptr, i_n * C, t_last, T)
        edge = tl.where(flows, edge, 0.0)
    tl.store(dg_ptr + tok[:, None] * K + kk[None, :], rev + edge[None, :], mask=ok)


class _Shapes:
    def __init__(self, q: torch.Tensor, v: torch.Tensor, varlen: bool = False):
        self.B, self.T, self.H, self.K = q.shape
        self.V = v.shape[-1]
        self.N = triton.cdiv(self.T, CHUNK)
        self.BK, self.BV = _block(self.K), _block(self.V)
        self.lowp = q.dtype != torch.float32
        # state loops: with packed sequences an external [BK, BV] tile is added inside the loop (the
        # injected initial states, the final states' gradients); in fp32 at 64 x 64 that spilled ~7 KB
        # per thread on sm_90 (compile gate), so those loops take half-width value blocks
        self.BV_states = self.BV if not varlen or self.lowp else _block(self.V, 32)
        # exact fp32 dots are FMA loops whose operands each thread holds over the whole reduction: the
        # state loops' [C, BK]^T [C, BV] products spilled 4-5 KB per thread on sm_80, so fp32 sums them
        # over blocks of STATE_ROWS_FP32 steps
        self.state_rows = CHUNK if self.lowp else STATE_ROWS_FP32


def _cumsum(g: torch.Tensor, s: _Shapes) -> torch.Tensor:
    b = torch.empty(s.B, s.T, s.H, s.K, device=g.device, dtype=torch.float32)
    _chunk_cumsum_kernel[(s.B * s.H, s.N, triton.cdiv(s.K, s.BK))](
        g, b, s.T, s.H, s.K, PER_HEAD=g.dim() == 3, C=CHUNK, BK=s.BK, num_warps=NUM_WARPS
    )
    return b


def _states(k, v, b, h0, s: _Shapes, sid=None, X=None, flags=None) -> torch.Tensor:
    hs = torch.empty(s.B, s.H, s.N + 1, s.K, s.V, device=k.device, dtype=torch.float32)
    _fwd_states_kernel[(s.B * s.H, triton.cdiv(s.K, s.BK), triton.cdiv(s.V, s.BV_states))](
        k,
        v,
        b,
        h0 if h0 is not None else hs,
        hs,
        sid if sid is not None else b,
        X if X is not None else hs,
        flags if flags is not None else b,
        s.T,
        s.H,
        s.K,
        s.V,
        s.N,
        HAS_H0=h0 is not None,
        LOWP=s.lowp,
        C=CHUNK,
        BK=s.BK,
        BV=s.BV_states,
        VARLEN=sid is not None,
        HAS_X=X is not None,
        R=s.state_rows,
        num_warps=NUM_WARPS,
    )
    return hs


class _GLAChunkTriton(torch.autograd.Function):
    """Returns (o, final state [B, H, K, V]); with ``sid`` (packed sequences, B = 1: the sequence of
    every step, int32 [T]) it returns (o without the initial states' in-chunk terms, the states
    entering every chunk [1, H, N + 1, K, V]), ``X`` being the injected initial states and ``flags``
    (int32 [N + 1]) the chunks that have an injection (bit 0) or a final-state read (bit 1), :mod:`kernels.ops.utils.packed`."""

    @staticmethod
    def forward(ctx, q, k, v, g, scale, h0, sid=None, X=None, flags=None):
        q, k, v, g = (x.contiguous() for x in (q, k, v, g))
        h0c = None if h0 is None else h0.float().contiguous()
        X = None if X is None else X.contiguous()
        s = _Shapes(q, v, sid is not None)
        b = _cumsum(g, s)
        hs = _states(k, v, b, h0c, s, sid, X, flags)
        o = torch.empty_like(v)
        _fwd_output_kernel[(s.B * s.H, s.N * (CHUNK // SUB), triton.cdiv(s.V, s.BV))](
            q,
            k,
            v,
            b,
            hs,
            o,
            sid if sid is not None else b,
            scale,
            s.T,
            s.H,
            s.K,
            s.V,
            s.N,
            LOWP=s.lowp,
            C=CHUNK,
            SUB=SUB,
            BK=s.BK,
            BV=s.BV,
            VARLEN=sid is not None,
            num_warps=NUM_WARPS,
        )
        ctx.save_for_backward(q, k, v, g, h0c, sid, X, flags)
        ctx.scale, ctx.h0_dtype = scale, (None if h0 is None else h0.dtype)
        if sid is not None:
            return o, hs
        return o, hs[:, :, s.N].clone()

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0c, sid, X, flags = ctx.saved_tensors
        scale = ctx.scale
        varlen = sid is not None
        s = _Shapes(q, v, varlen)
        sid_arg = sid if varlen else q
        do = torch.zeros_like(v) if do is None else do.contiguous()
        b = _cumsum(g, s)
        hs = _states(k, v, b, h0c, s, sid, X, flags)  # recomputed rather than stored
        dhs = torch.empty_like(hs)
        _bwd_states_kernel[(s.B * s.H, triton.cdiv(s.K, s.BK), triton.cdiv(s.V, s.BV_states))](
            q,
            do,
            b,
            dht.float().contiguous() if dht is not None else dhs,
            dhs,
            sid_arg,
            flags if flags is not None else sid_arg,
            scale,
            s.T,
            s.H,
            s.K,
            s.V,
            s.N,
            HAS_DHT=dht is not None,
            LOWP=s.lowp,
            C=CHUNK,
            BK=s.BK,
            BV=s.BV_states,
            VARLEN=varlen,
            R=s.state_rows,
            num_warps=NUM_WARPS,
        )
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        x = torch.empty_like(b)
        n_sub = s.N * (CHUNK // SUB)
        bk = _block(s.K, DQK_BLOCK_K)
        _bwd_dqk_kernel[(s.B * s.H, n_sub, triton.cdiv(s.K, bk))](
            q,
            k,
            v,
            b,
            do,
            hs,
            dhs,
            dq,
            dk,
            x,
            sid_arg,
            scale,
            s.T,
            s.H,
            s.K,
            s.V,
            s.N,
            LOWP=s.lowp,
            C=CHUNK,
            SUB=SUB,
            BK=bk,
            BV=s.BV,
            VARLEN=varlen,
            num_warps=NUM_WARPS,
        )
        _bwd_dv_kernel[(s.B * s.H, n_sub, triton.cdiv(s.V, s.BV))](
            q,
            k,
            b,
            do,
            dhs,
            dv,
            sid_arg,
            scale,
            s.T,
            s.H,
            s.K,
            s.V,
            s.N,
            LOWP=s.lowp,
            C=CHUNK,
            SUB=SUB,
            BK=s.BK,
            BV=s.BV,
            VARLEN=varlen,
            num_warps=NUM_WARPS,
        )
        dg = torch.empty_like(b)
        _bwd_dg_kernel[(s.B * s.H, s.N, triton.cdiv(s.K, s.BK))](
            x,
            k,
            v,
            hs,
            dhs,
            dg,
            sid_arg,
            X if X is not None else hs,
            s.T,
            s.H,
            s.K,
            s.V,
            s.N,
            C=CHUNK,
            BK=s.BK,
            BV=s.BV,
            VARLEN=varlen,
            HAS_X=X is not None,
            num_warps=NUM_WARPS,
        )
        dg = (dg.sum(-1) if g.dim() == 3 else dg).to(g.dtype)
        dh0 = None if h0c is None else dhs[:, :, 0].to(ctx.h0_dtype)
        dX = None if X is None else dhs[0]
        return dq, dk, dv, dg, None, dh0, None, dX, None


def gla_triton_chunked_varlen(
    q, k, v, g, scale: float, initial_state, output_final_state: bool, cu_seqlens, offsets=None
):
    """Chunked Triton GLA over packed sequences (B = 1, states [N, H, K, V]): one launch sequence for
    the whole input; the initial states' in-chunk terms and the final states come from :mod:`kernels.ops.utils.packed`."""
    from kernels.ops.utils import packed as varlen

    T = q.shape[1]
    L = varlen.Layout(host_offsets(cu_seqlens, offsets), T, CHUNK, q.device)
    if T == 0:
        return empty_result(q, v, initial_state, output_final_state, n_states=L.N)
    h0 = L.select(initial_state)
    X = varlen.injection(g, h0, L)
    o, hs = _GLAChunkTriton.apply(q, k, v, g, scale, None, L.seq.to(torch.int32), X, L.chunk_flags())
    extra = varlen.initial_state_output(q, g, h0, L, scale)
    if extra is not None:
        o = (o.float() + extra[None]).to(q.dtype)
    if not output_final_state:
        return o, None
    finals = varlen.final_states(k, v, g, hs[0, :, : L.NC], h0, L)
    return o, varlen.assemble_finals(finals, initial_state, L)


def gla_triton_chunked(q, k, v, g, scale, initial_state=None, output_final_state=False):
    """Chunked Triton GLA, same contract as ``gla_reference``."""
    if q.shape[1] == 0:
        return empty_result(q, v, initial_state, output_final_state)
    o, final = _GLAChunkTriton.apply(q, k, v, g, scale, initial_state)
    return o, (final if output_final_state else None)


def gla_triton(q, k, v, g, scale, initial_state=None, output_final_state=False, cu_seqlens=None, offsets=None):
    """The ``"triton"`` backend: fused-recurrent for T <= FUSED_MAX_T (generation), chunked otherwise;
    both handle packed sequences (``cu_seqlens``, B = 1, states [N, H, K, V]; ``offsets``: their validated
    host copy) natively."""
    if q.shape[1] <= FUSED_MAX_T:
        from kernels.ops.gla.triton_recurrent import gla_fused_recurrent

        return gla_fused_recurrent(
            q, k, v, g, scale, initial_state, output_final_state, cu_seqlens=cu_seqlens, offsets=offsets
        )
    if cu_seqlens is not None:
        return gla_triton_chunked_varlen(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, offsets)
    return gla_triton_chunked(q, k, v, g, scale, initial_state, output_final_state)


mark_varlen(gla_triton, host_offsets=True)
