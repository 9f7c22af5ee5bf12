"""Fused-recurrent Triton kernels for gated linear attention (short sequences, generation).

One program per (batch x head, block of V columns) keeps its [K, BV] slice of the state in
registers and loops over time: ``S <- exp(g_t)[:, None] * S + k_t v_t^T``, ``o_t = scale S^T q_t``.

Backward, same grid: a forward-time loop recomputes S_t for ``dq_t = scale S_t do_t`` (a partial
sum over this program's V columns), then a reverse-time loop carries
``dS_t = scale q_t do_t^T + exp(g_{t+1}) dS_{t+1}`` (from the final-state gradient) for
``dk_t = dS_t v_t`` (partial over V columns) and ``dv_t = dS_t^T k_t``; ``dS_0`` decayed once more is
the initial-state gradient. dg uses the identity of ``triton_chunk.py`` over the whole sequence:
``dg_t = sum_{t' >= t} (q dq - k dk)_t' + sum_v S_T dS_T`` (a short reverse cumsum in PyTorch,
with the cancelling part ``k_T (dS_T v_T)`` of the last two terms removed from both).
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from kernels import _triton_compat as interpreter_compat
from kernels._varlen import host_offsets, mark_varlen
from kernels.ops.utils.chunks import empty_result

interpreter_compat.install()


@triton.jit
def _fused_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    h0_ptr,
    o_ptr,
    ht_ptr,
    cu_ptr,
    scale,
    T,
    H,
    K,
    V,
    NSEQ,
    PER_HEAD: tl.constexpr,
    HAS_H0: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """One program per (batch x head, V block); with VARLEN (B = 1) it runs the NSEQ packed sequences
    ``cu[m] <= t < cu[m + 1]`` one after the other, each from its own initial state."""
    i_bh, i_v = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    kk = tl.arange(0, BK)
    vv = i_v * BV + tl.arange(0, BV)
    k_ok, v_ok = kk < K, vv < V
    kv_ok = k_ok[:, None] & v_ok[None, :]
    tok0 = i_b.to(tl.int64) * T * H + i_h
    for m in range(0, NSEQ):
        if VARLEN:
            t_start = tl.load(cu_ptr + m)
            t_end = tl.load(cu_ptr + m + 1)
            state_offs = (m * H + i_h).to(tl.int64) * K * V + kk[:, None] * V + vv[None, :]
        else:
            t_start = T * 0
            t_end = T
            state_offs = i_bh.to(tl.int64) * K * V + kk[:, None] * V + vv[None, :]
        _fused_fwd_sequence(
            q_ptr,
            k_ptr,
            v_ptr,
            g_ptr,
            h0_ptr,
            o_ptr,
            ht_ptr,
            scale,
            tok0,
            t_start,
            t_end,
            state_offs,
            H,
            K,
            V,
            kk,
            vv,
            k_ok,
            v_ok,
            kv_ok,
            PER_HEAD,
            HAS_H0,
            BK,
            BV,
        )


@triton.jit
def _fused_fwd_sequence(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    h0_ptr,
    o_ptr,
    ht_ptr,
    scale,
    tok0,
    t_start,
    t_end,
    state_offs,
    H,
    K,
    V,
    kk,
    vv,
    k_ok,
    v_ok,
    kv_ok,
    PER_HEAD: tl.constexpr,
    HAS_H0: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    if HAS_H0:
        S = tl.load(h0_ptr + state_offs, mask=kv_ok, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    for t in range(t_start, t_end):
        tok = tok0 + t * H
        q = tl.load(q_ptr + tok * K + kk, mask=k_ok, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + tok * K + kk, mask=k_ok, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + tok * V + vv, mask=v_ok, other=0.0).to(tl.float32)
        if PER_HEAD:
            g = tl.zeros([BK], dtype=tl.float32) + tl.load(g_ptr + tok).to(tl.float32)
        else:
            g = tl.load(g_ptr + tok * K + kk, mask=k_ok, other=0.0).to(tl.float32)
        S = S * tl.exp(g)[:, None] + k[:, None] * v[None, :]
        o = tl.sum(S * q[:, None], 0) * scale
        tl.store(o_ptr + tok * V + vv, o.to(o_ptr.dtype.element_ty), mask=v_ok)
    tl.store(ht_ptr + state_offs, S, mask=kv_ok)


@triton.jit
def _fused_bwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    h0_ptr,
    do_ptr,
    dht_ptr,
    dq_ptr,
    dk_ptr,
    dv_ptr,
    dh0_ptr,
    cu_ptr,
    scale,
    T,
    H,
    K,
    V,
    B,
    NSEQ,
    PER_HEAD: tl.constexpr,
    HAS_H0: tl.constexpr,
    HAS_DHT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    VARLEN: tl.constexpr,
):
    i_bh, i_v = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    kk = tl.arange(0, BK)
    vv = i_v * BV + tl.arange(0, BV)
    k_ok, v_ok = kk < K, vv < V
    kv_ok = k_ok[:, None] & v_ok[None, :]
    part = i_v.to(tl.int64) * B * T * H * K  # dq, dk partial sums per V block: [NV, B, T, H, K]
    tok0 = i_b.to(tl.int64) * T * H + i_h
    for m in range(0, NSEQ):
        if VARLEN:
            t_start = tl.load(cu_ptr + m)
            t_end = tl.load(cu_ptr + m + 1)
            state_offs = (m * H + i_h).to(tl.int64) * K * V + kk[:, None] * V + vv[None, :]
        else:
            t_start = T * 0
            t_end = T
            state_offs = i_bh.to(tl.int64) * K * V + kk[:, None] * V + vv[None, :]
        _fused_bwd_sequence(
            q_ptr,
            k_ptr,
            v_ptr,
            g_ptr,
            h0_ptr,
            do_ptr,
            dht_ptr,
            dq_ptr,
            dk_ptr,
            dv_ptr,
            dh0_ptr,
            scale,
            tok0,
            part,
            t_start,
            t_end,
            state_offs,
            H,
            K,
            V,
            kk,
            vv,
            k_ok,
            v_ok,
            kv_ok,
            PER_HEAD,
            HAS_H0,
            HAS_DHT,
            BK,
            BV,
        )


@triton.jit
def _fused_bwd_sequence(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    h0_ptr,
    do_ptr,
    dht_ptr,
    dq_ptr,
    dk_ptr,
    dv_ptr,
    dh0_ptr,
    scale,
    tok0,
    part,
    t_start,
    t_end,
    state_offs,
    H,
    K,
    V,
    kk,
    vv,
    k_ok,
    v_ok,
    kv_ok,
    PER_HEAD: tl.constexpr,
    HAS_H0: tl.constexpr,
    HAS_DHT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    if HAS_H0:
        S = tl.load(h0_ptr + state_offs, mask=kv_ok, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    for t in range(t_start, t_end):  # forward in time: dq_t = scale S_t do_t
        tok = tok0 + t * H
        k = tl.load(k_ptr + tok * K + kk, mask=k_ok, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + tok * V + vv, mask=v_ok, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + tok * V + vv, mask=v_ok, other=0.0).to(tl.float32)
        if PER_HEAD:
            g = tl.zeros([BK], dtype=tl.float32) + tl.load(g_ptr + tok).to(tl.float32)
        else:
            g = tl.load(g_ptr + tok * K + kk, mask=k_ok, other=0.0).to(tl.float32)
        S = S * tl.exp(g)[:, None] + k[:, None] * v[None, :]
        tl.store(dq_ptr + part + tok * K + kk, tl.sum(S * do[None, :], 1) * scale, mask=k_ok)
    if HAS_DHT:
        dS = tl.load(dht_ptr + state_offs, mask=kv_ok, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros([BK, BV], dtype=tl.float32)
    for i in range(t_start, t_end):  # backward in time
        t = t_end - 1 - (i - t_start)
        tok = tok0 + t * H
        q = tl.load(q_ptr + tok * K + kk, mask=k_ok, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + tok * K + kk, mask=k_ok, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + tok * V + vv, mask=v_ok, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + tok * V + vv, mask=v_ok, other=0.0).to(tl.float32)
        if PER_HEAD:
            g = tl.zeros([BK], dtype=tl.float32) + tl.load(g_ptr + tok).to(tl.float32)
        else:
            g = tl.load(g_ptr + tok * K + kk, mask=k_ok, other=0.0).to(tl.float32)
        dS += scale * q[:, None] * do[None, :]
        tl.store(dk_ptr + part + tok * K + kk, tl.sum(dS * v[None, :], 1), mask=k_ok)
        tl.store(dv_ptr + tok * V + vv, tl.sum(dS * k[:, None], 0).to(dv_ptr.dtype.element_ty), mask=v_ok)
        dS = dS * tl.exp(g)[:, None]
    if HAS_H0:
        tl.store(dh0_ptr + state_offs, dS, mask=kv_ok)


#: largest [BK, BV] state slice of one program: at K = 256 a [256, 64] slice spilled 280-320 bytes per
#: thread in the backward (V = K + 1, compile gate), so wide keys take narrower value blocks
MAX_STATE_TILE = 128 * 64


def _blocks(K: int, V: int) -> Tuple[int, int]:
    BK = max(16, triton.next_power_of_2(K))
    return BK, min(64, max(16, triton.next_power_of_2(V)), max(16, MAX_STATE_TILE // BK))


class _GLAFusedTriton(torch.autograd.Function):
    """(o, final states); with ``cu`` (int32 [M + 1], non-empty packed sequences, B = 1) the states
    are per sequence [M, H, K, V]."""

    @staticmethod
    def forward(ctx, q, k, v, g, scale, h0, cu=None):
        q, k, v, g = (x.contiguous() for x in (q, k, v, g))
        B, T, H, K = q.shape
        V = v.shape[-1]
        BK, BV = _blocks(K, V)
        nseq = 1 if cu is None else cu.numel() - 1
        h0c = None if h0 is None else h0.float().contiguous()
        o = torch.empty_like(v)
        ht = torch.empty(B * nseq, H, K, V, device=q.device, dtype=torch.float32)
        _fused_fwd_kernel[(B * H, triton.cdiv(V, BV))](
            q,
            k,
            v,
            g,
            h0c if h0c is not None else ht,
            o,
            ht,
            cu if cu is not None else ht,
            scale,
            T,
            H,
            K,
            V,
            nseq,
            PER_HEAD=g.dim() == 3,
            HAS_H0=h0c is not None,
            BK=BK,
            BV=BV,
            VARLEN=cu is not None,
            num_warps=8,
        )
        ctx.save_for_backward(q, k, v, g, h0c, ht, cu)
        ctx.scale, ctx.h0_dtype = scale, (None if h0 is None else h0.dtype)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0c, ht, cu = ctx.saved_tensors
        B, T, H, K = q.shape
        V = v.shape[-1]
        BK, BV = _blocks(K, V)
        NV = triton.cdiv(V, BV)
        nseq = 1 if cu is None else cu.numel() - 1
        do = torch.zeros_like(v) if do is None else do.contiguous()
        dq = torch.empty(NV, B, T, H, K, device=q.device, dtype=torch.float32)
        dk = torch.empty_like(dq)
        dv = torch.empty_like(v)
        dh0 = torch.empty_like(ht) if h0c is not None else None
        dummy = ht
        _fused_bwd_kernel[(B * H, NV)](
            q,
            k,
            v,
            g,
            h0c if h0c is not None else dummy,
            do,
            dht.contiguous() if dht is not None else dummy,
            dq,
            dk,
            dv,
            dh0 if dh0 is not None else dummy,
            cu if cu is not None else dummy,
            ctx.scale,
            T,
            H,
            K,
            V,
            B,
            nseq,
            PER_HEAD=g.dim() == 3,
            HAS_H0=h0c is not None,
            HAS_DHT=dht is not None,
            BK=BK,
            BV=BV,
            VARLEN=cu is not None,
            num_warps=8,
        )
        dq, dk = dq.sum(0), dk.sum(0)
        dg = _dg(q, k, v, dq, dk, ht, dht, cu)
        if g.dim() == 3:
            dg = dg.sum(-1)
        return (
            dq.to(q.dtype),
            dk.to(k.dtype),
            dv,
            dg.to(g.dtype),
            None,
            None if dh0 is None else dh0.to(ctx.h0_dtype),
            None,
        )


def _dg(q, k, v, dq, dk, ht, dht, cu):
    """dg_t = sum_{t' >= t in t's sequence} (q dq - k dk)_t' + sum_v S_e dS_e (e: the sequence's last
    step), with the part k_e (dS_e v_e) of both last terms dropped (they cancel; the rest is small
    under strong decay). Without ``cu`` one sequence per batch row; with it (B = 1) each packed one."""
    x = q.float() * dq - k.float() * dk  # [B, T, H, K]
    T = x.shape[1]
    if cu is None:
        last = torch.full((1,), T - 1, dtype=torch.long, device=x.device)
        k_last, v_last = k[:, -1].float(), v[:, -1].float()  # [B, H, K], [B, H, V]
    else:
        last = cu[1:].long() - 1
        k_last, v_last = k[0, last].float(), v[0, last].float()  # [M, H, K], [M, H, V]
    if dht is not None:
        dht = dht.float()
        fix = k_last * torch.einsum("bhkv,bhv->bhk", dht, v_last)
        if cu is None:
            x[:, -1] += fix
        else:
            x[0].index_add_(0, last, fix)
    rev = x.double().flip(1).cumsum(1).flip(1)  # fp64: the per-sequence sums are differences
    if cu is None:
        dg = rev
    else:
        # output_size: the lengths sum to T (validated), and a known size needs no device-to-host sync
        seq = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=x.device), cu.diff().long(), output_size=T)
        after = torch.cat([rev, rev.new_zeros(1, 1, *rev.shape[2:])], 1)[0, cu[1:].long()]  # [M, H, K]
        dg = rev - after[seq][None]
    dg = dg.float()
    if dht is not None:
        edge = ((ht - k_last[..., None] * v_last[..., None, :]) * dht).sum(-1)
        dg = dg + (edge[:, None] if cu is None else edge[seq][None])
    return dg


def gla_fused_recurrent(q, k, v, g, scale, initial_state=None, output_final_state=False, cu_seqlens=None, offsets=None):
    """Fused-recurrent Triton GLA (fwd + bwd), same contract as ``gla_reference``; with ``cu_seqlens``
    (B = 1, states [N, H, K, V]; ``offsets``: their validated host copy) one launch runs every packed
    sequence from its own initial state."""
    B, T, H, K = q.shape
    if cu_seqlens is not None:
        from kernels.ops.utils import packed as varlen

        L = varlen.Layout(host_offsets(cu_seqlens, offsets), T, 1, q.device)
        if L.M == 0:
            return empty_result(q, v, initial_state, output_final_state, n_states=L.N)
        cu = torch.tensor(L.starts + [T], dtype=torch.int32, device=q.device)
        o, finals = _GLAFusedTriton.apply(q, k, v, g, scale, L.select(initial_state), cu)
        return o, (varlen.assemble_finals(finals, initial_state, L) if output_final_state else None)
    if T == 0:
        return empty_result(q, v, initial_state, output_final_state)
    o, final = _GLAFusedTriton.apply(q, k, v, g, scale, initial_state)
    return o, (final if output_final_state else None)


mark_varlen(gla_fused_recurrent, host_offsets=True)
