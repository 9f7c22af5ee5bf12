"""Chunked Triton path of ``dplr``: host glue and autograd of the kernels in
:mod:`kernels.ops.dplr.triton_chunk_fwd` and :mod:`kernels.ops.dplr.triton_chunk_bwd`.

Per chunk of BT = 64 steps (32 for heads wider than 64 or fp32 inputs, see ``blocks``) with entering state
S, per-key G = chunk-local cumsum(g), G'_t = G_{t-1} (G'_0 = 0) and z_t = S_{t-1}^T a_t (derivation
in :mod:`kernels.ops.dplr.torch_chunk`):

    Aqk[t, i] = sum_k q_tk k_ik e^{G_tk - G_ik},  Aqb: same with b      (i <= t)
    P[t, i]   = sum_k a_tk k_ik e^{G'_tk - G_ik}, R: same with b         (i < t)
    Ti = (I - R)^-1,  Z = Ti (A' S + P V) = Zv + Wz S,  A' = a * e^{G'}
    O = scale ((q * e^G) S + Aqk V + Aqb Z),  S' = e^{G_C} * S + (k e^{G_C - G})^T V + (b e^{G_C - G})^T Z

P and R are computed as the inclusive scores of a_next[t] = a[t+1] moved down one row (row t-1 of
those is row t of P), so every exponent-0 pair sits on a diagonal that does not depend on the decays.
The score matrices are built from sub-blocks of BS = 16 steps: an off-diagonal sub-block pair (r > c)
factors through the reference step e at the end of block c (both factors <= 1), a diagonal sub-block
forms the [16, 16, keys] tensor of masked exponent differences explicitly. No exp of a positive
number is formed anywhere.

No kernel holds more than a bounded block of the head dimension (block sizes in
:mod:`kernels.ops.dplr.triton_chunk_tiles`): the score and gradient kernels walk keys and values in blocks
with partial sums, and the two state-passing loops hold a [K, BV] block of the state with K * BV
bounded. Host glue: the chunk-local cumsum of g and, at the end, its adjoint.

Packed sequences (``cu_seqlens``, B = 1): the chunks are aligned to sequence starts
(:class:`~kernels.ops.utils.chunk_table.ChunkTable`); every kernel reads its chunk's first step and its
sequence's end from the table (``IS_VARLEN``), the state loops run one program per (sequence, head), and
the host glue maps buffer rows to steps through the table.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton

from kernels._varlen import host_offsets, mark_varlen
from kernels.ops.utils.chunk_table import ChunkTable
from kernels.ops.utils.chunks import empty_result
from kernels.ops.common.tiles import chunk_cumsum, chunk_reverse_cumsum, dot_precision
from kernels.ops.dplr.triton_chunk_bwd import (
    _dscores_bwd,
    _solve_bwd,
    _dv_bwd,
    _grads_diag,
    _grads_scores,
    _grads_state,
    _state_bwd,
)
from kernels.ops.dplr.triton_chunk_fwd import _decay_inputs, _output_fwd, _scores_fwd, _solve_fwd, _state_fwd
from kernels.ops.dplr.triton_chunk_tiles import KEY_SLICE, LAUNCH, SUB, Blocks, blocks


def _shift_down_in_chunks(x: torch.Tensor, BT: int) -> torch.Tensor:
    """[B, H, Tp, K] -> [B, H, Tp, K] with y[t] = x[t - 1] inside each chunk (0 at a chunk's start)."""
    B, H, Tp, K = x.shape
    x = x.view(B, H, Tp // BT, BT, K)
    return torch.nn.functional.pad(x[:, :, :, :-1], (0, 0, 1, 0)).view(B, H, Tp, K)


def _sizes(q, v, table=None) -> Tuple[int, int, int, int, int, int, int, Blocks]:
    """B, T, H, K, V, NT (chunks per row; with packed sequences the chunks of ``table``), Tp = NT BT, blocks."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    bl = blocks(K, V, exact=q.dtype == torch.float32)
    NT = table.NT if table is not None else triton.cdiv(T, bl.BT)
    return B, T, H, K, V, NT, NT * bl.BT, bl


def _packed_kw(table, dummy, state_loop: bool = False) -> dict:
    """The kernels' packed-sequence arguments: the chunk table's ``spans`` (and each sequence's ``first``
    chunk for the state loops) and ``IS_VARLEN``; ``dummy`` pointers when not packed."""
    kw = dict(spans_ptr=table.spans if table is not None else dummy, IS_VARLEN=table is not None)
    if state_loop:
        kw["first_ptr"] = table.first if table is not None else dummy
    return kw


def _decayed(q, k, a, b, G, sizes, table):
    """q e^G, k e^{G_C - G}, b e^{G_C - G}, a e^{G'}: fp32 [B, H, Tp, K] each."""
    B, T, H, K, V, NT, Tp, bl = sizes
    out = [torch.empty(B, H, Tp, K, device=q.device, dtype=torch.float32) for _ in range(4)]
    _decay_inputs[(NT, B * H, triton.cdiv(K, bl.BK))](
        q, k, a, b, G, *out, T, H, K, Tp, **_packed_kw(table, G), BT=bl.BT, BK=bl.BK, **LAUNCH
    )
    return out


def _forward(q, k, v, a, b, G, scale, h0, need_final, table=None):
    sizes = _sizes(q, v, table)
    B, T, H, K, V, NT, Tp, bl = sizes
    NS = table.N if table is not None else B  # states: per batch row, or per packed sequence
    pk = _packed_kw(table, G)
    BT = bl.BT
    prec = dot_precision(q.dtype)
    f32 = dict(device=q.device, dtype=torch.float32)
    aqk, aqb, pn, rn, tinv = (torch.empty(B, H, Tp, BT, **f32) for _ in range(5))
    _scores_fwd[(NT * bl.NC, B * H)](
        q, k, a, b, G, aqk, aqb, pn, rn, T, H, K, Tp, **pk, BT=BT, BS=SUB, BK=bl.BK, BKC=KEY_SLICE, PREC=prec, **LAUNCH
    )
    qg, kd, bd, ap = _decayed(q, k, a, b, G, sizes, table)
    wz, zv = torch.empty(B, H, Tp, K, **f32), torch.empty(B, H, Tp, V, **f32)
    _solve_fwd[(NT, B * H)](
        rn, pn, v, ap, tinv, wz, zv, T, H, K, V, Tp, **pk, BT=BT, BK=bl.BK, BV=bl.BV, PREC=prec, **LAUNCH
    )
    del ap, rn
    z = torch.empty(B, H, Tp, V, **f32)
    states = torch.empty(B, H, NT, K, V, **f32)
    ht = torch.empty(NS, H, K, V, **f32) if need_final else states
    _state_fwd[(triton.cdiv(V, bl.BVS), NS * H)](
        v,
        G,
        kd,
        bd,
        wz,
        zv,
        h0 if h0 is not None else states,
        states,
        z,
        ht,
        T,
        H,
        K,
        V,
        Tp,
        NT,
        **_packed_kw(table, G, state_loop=True),
        HAS_H0=h0 is not None,
        STORE_FINAL=need_final,
        BT=BT,
        BK=bl.BKF,
        BV=bl.BVS,
        BKR=bl.BKR,
        PREC=prec,
        **LAUNCH,
    )
    o = torch.empty(B, T, H, V, device=q.device, dtype=q.dtype)
    _output_fwd[(NT, B * H, triton.cdiv(V, bl.BV))](
        qg, v, aqk, aqb, states, z, o, scale, T, H, K, V, Tp, NT, **pk, BT=BT, BK=bl.BK, BV=bl.BV, PREC=prec, **LAUNCH
    )
    return o, (ht if need_final else None), (aqk, aqb, pn, tinv, states, z)


def _backward(q, k, v, a, b, G, aqk, aqb, pn, tinv, states, z, do, dht, scale, has_h0, table=None):
    """Gradients (fp32) of q, k, v, a, b, G's step decays g, and the initial state (or None)."""
    sizes = _sizes(q, v, table)
    B, T, H, K, V, NT, Tp, bl = sizes
    NS = table.N if table is not None else B
    pk = _packed_kw(table, G)
    BT = bl.BT
    prec = dot_precision(q.dtype)
    f32 = dict(device=q.device, dtype=torch.float32)
    qg, kd, bd, ap = _decayed(q, k, a, b, G, sizes, table)  # recomputed rather than kept from the forward
    dstates = torch.empty(B, H, NT, K, V, **f32)
    dy = torch.empty(B, H, Tp, V, **f32)
    dh0 = torch.empty(NS, H, K, V, **f32) if has_h0 else None
    wb, dyo = torch.empty(B, H, Tp, K, **f32), torch.empty(B, H, Tp, V, **f32)
    _solve_bwd[(NT, B * H)](
        tinv, aqb, bd, do, wb, dyo, scale, T, H, K, V, Tp, **pk, BT=BT, BK=bl.BK, BV=bl.BV, PREC=prec, **LAUNCH
    )
    _state_bwd[(triton.cdiv(V, bl.BVS), NS * H)](
        qg,
        wb,
        ap,
        G,
        do,
        dyo,
        dht if dht is not None else dstates,
        dstates,
        dy,
        dh0 if dh0 is not None else dstates,
        scale,
        T,
        H,
        K,
        V,
        Tp,
        NT,
        **_packed_kw(table, G, state_loop=True),
        HAS_DHT=dht is not None,
        STORE_DH0=dh0 is not None,
        BT=BT,
        BK=bl.BKF,
        BV=bl.BVS,
        BKR=bl.BKR,
        PREC=prec,
        **LAUNCH,
    )
    del qg, bd, ap, wb, dyo
    d_scores = [torch.empty(B, H, Tp, BT, **f32) for _ in range(4)]  # dAqk, dAqb, dPn, dRn
    _dscores_bwd[(NT, B * H, 2)](
        do, dy, v, z, *d_scores, scale, T, H, V, Tp, **pk, BT=BT, BV=bl.BV, PREC=prec, **LAUNCH
    )
    dv = torch.empty(B, T, H, V, **f32)
    _dv_bwd[(NT, B * H, triton.cdiv(V, bl.BV))](
        kd,
        do,
        aqk,
        pn,
        dstates,
        dy,
        dv,
        scale,
        T,
        H,
        K,
        V,
        Tp,
        NT,
        **pk,
        BT=BT,
        BK=bl.BK,
        BV=bl.BV,
        PREC=prec,
        **LAUNCH,
    )
    del kd
    dq, dk, da, db = (torch.empty(B, T, H, K, **f32) for _ in range(4))
    dG, dGx, dan = (torch.empty(B, H, Tp, K, **f32) for _ in range(3))
    _grads_state[(NT, B * H, triton.cdiv(K, bl.BKG))](
        q,
        k,
        v,
        a,
        b,
        G,
        do,
        states,
        dstates,
        z,
        dy,
        dq,
        dk,
        da,
        db,
        dG,
        dGx,
        scale,
        T,
        H,
        K,
        V,
        Tp,
        NT,
        **pk,
        BT=BT,
        BK=bl.BKG,
        BV=bl.BV,
        PREC=prec,
        **LAUNCH,
    )
    _grads_scores[(NT * bl.NC, B * H, triton.cdiv(K, bl.BK))](
        q, k, a, b, G, *d_scores, dq, dk, db, dG, dan, T, H, K, Tp, **pk, BT=BT, BS=SUB, BK=bl.BK, PREC=prec, **LAUNCH
    )
    _grads_diag[(NT, B * H, bl.NC)](
        q, k, a, b, G, *d_scores, dq, dk, db, dG, dan, T, H, K, Tp, **pk, BT=BT, BS=SUB, BKC=KEY_SLICE, **LAUNCH
    )
    # a_next[t] = a[t + 1] and G'_t = G_{t-1} inside each chunk, then G = chunk cumsum(g)
    dan = _shift_down_in_chunks(dan, BT)
    da += table.to_steps(dan) if table is not None else dan[:, :, :T].transpose(1, 2)
    dG = dG.view(B, H, NT, BT, K)
    dG[:, :, :, :-1] += dGx.view(B, H, NT, BT, K)[:, :, :, 1:]
    dG = dG.view(B, H, Tp, K)
    dg = table.reverse_cumsum(dG) if table is not None else chunk_reverse_cumsum(dG, T, BT)
    return dq, dk, dv, da, db, dg, dh0


class DplrChunkFunction(torch.autograd.Function):
    """Autograd wrapper of the chunked kernels; inputs contiguous, states fp32 [B, H, K, V] (packed
    sequences: ``table`` given, B = 1, states [N, H, K, V])."""

    @staticmethod
    def forward(ctx, q, k, v, a, b, g, scale, h0, output_final_state, table=None):
        if table is not None:
            G = table.cumsum(g)
        else:
            G = chunk_cumsum(g, blocks(q.shape[-1], v.shape[-1], exact=q.dtype == torch.float32).BT)
        o, ht, saved = _forward(q, k, v, a, b, G, scale, h0, output_final_state, table)
        ctx.save_for_backward(q, k, v, a, b, G, *saved)
        ctx.scale, ctx.has_h0, ctx.g_dtype, ctx.table = scale, h0 is not None, g.dtype, table
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, a, b = ctx.saved_tensors[:5]
        dq, dk, dv, da, db, dg, dh0 = _backward(
            *ctx.saved_tensors,
            do.contiguous(),
            dht.contiguous() if dht is not None else None,
            ctx.scale,
            ctx.has_h0,
            ctx.table,
        )
        return (
            dq.to(q.dtype),
            dk.to(k.dtype),
            dv.to(v.dtype),
            da.to(a.dtype),
            db.to(b.dtype),
            dg.to(ctx.g_dtype),
            None,
            dh0,
            None,
            None,
        )


def dplr_triton_chunked(
    q, k, v, a, b, g, scale, initial_state=None, output_final_state=False, cu_seqlens=None, offsets=None
):
    """Chunked Triton path; same signature and result as the reference. ``cu_seqlens`` [N+1]: packed
    sequences (B = 1, states [N, H, K, V]) in chunks aligned to sequence starts
    (:class:`~kernels.ops.utils.chunk_table.ChunkTable`, built from ``offsets``, the validated host copy
    of ``cu_seqlens``, or from one host read of it)."""
    table = None
    if cu_seqlens is not None:
        BT = blocks(q.shape[-1], v.shape[-1], exact=q.dtype == torch.float32).BT
        table = ChunkTable(host_offsets(cu_seqlens, offsets), BT, q.device)
    if q.shape[1] == 0:
        return empty_result(q, v, initial_state, output_final_state, n_states=table.N if table else None)
    q, k, v, a, b, g = (x.contiguous() for x in (q, k, v, a, b, g))
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    return DplrChunkFunction.apply(q, k, v, a, b, g, float(scale), h0, bool(output_final_state), table)


mark_varlen(dplr_triton_chunked, host_offsets=True)
