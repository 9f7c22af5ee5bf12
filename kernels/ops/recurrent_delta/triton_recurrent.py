"""Fused-recurrent Triton kernels for ``recurrent_delta``, forward and backward.

One program per (batch, head) walks time with the state ``S`` [K, V] and the previous output
``y`` [V] in registers (fp32 for any input dtype); the recurrent matrices are re-read every step
(they stay in L1/L2). Block sizes are the next powers of two of K and V (at least 16) with masks.

Forward step (as in ``reference.py``)::

    r = tanh(y);  q = softmax(q_t + R_q r);  k = softmax(k_t + R_k r);  v = v_t + R_v r
    b = sigmoid(beta_t + r_b . r);  u = b (v - S^T k);  S += k u^T;  y = S^T q

It writes ``y_t`` (fp32) and ``u_t`` per step, ``S`` every ``CHECKPOINT`` steps and the final
``S``. The backward kernel walks time in reverse with ``S`` and ``dS`` in registers: it
recomputes ``q, k, v, b`` from the saved ``y_{t-1}``, rebuilds ``S_{t-1} = S_t - k u^T`` (reset to
the saved checkpoint every ``CHECKPOINT`` steps) and applies the adjoint equations documented in
:mod:`kernels.ops.recurrent_delta.torch_recurrent`, writing the gradients of the four input parts per
step, ``r_t = tanh(y_{t-1})`` per step and the initial state's gradient at the end.
``dR = sum dz r^T`` is one matmul in PyTorch afterwards. At K = V = 128 (tiles over
:data:`ROW_BLOCKED_TILE`) whole [K, V] tiles of ``R`` next to ``S`` and ``dS`` spill, so the backward reads
``R`` in blocks of :data:`ROW_BLOCK` rows: ``R x`` is written into the step's ``dq``/``dk`` rows and read
back, ``R^T dz`` reads back the ``dz`` rows just stored (a CTA barrier around each; the same bytes of
``R`` read as before, plus 3 K + V fp32 words a step through L1), and it runs 8 warps.

With ``cu_seqlens`` a program is one (sequence, head) of the packed input (B = 1): it starts at the
sequence's first step ``cu[n]``, walks its ``L = cu[n+1] - cu[n]`` steps only (no step of another
sequence is touched, a zero-length sequence passes its state through) and keeps its checkpoints in a
per-sequence slot (:func:`sequence_span`); one launch for all sequences, no host sync.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch.autograd.function import once_differentiable
import triton
import triton.language as tl

from kernels.ops.common.loop import (
    checkpoint_layout,
    masked_softmax,
    num_warps_for,
    sequence_span,
    sigmoid_fp32,
    tanh_fp32,
)
from kernels.ops.recurrent_delta.torch_recurrent import CHECKPOINT

#: [BK, BV] state tiles larger than this (K = V = 128) make the backward read ``R_q``, ``R_k``, ``R_v`` in
#: blocks of :data:`ROW_BLOCK` rows (through the step's gradient rows in global memory) instead of whole
#: [K, V] tiles, which spill next to ``S`` and ``dS`` (module constants: tests lower them)
ROW_BLOCKED_TILE = 64 * 64
ROW_BLOCK = 16


@triton.jit
def _rows_matvec(m_ptr, x, a_ptr, out_ptr, n, V, iv, ok_v, BR: tl.constexpr):
    """``out[i] = a[i] + sum_j m[i, j] x[j]`` for the ``n`` rows of ``m`` [n, V], ``BR`` rows at a time."""
    for r0 in range(0, n, BR):
        rows = r0 + tl.arange(0, BR)
        ok = rows < n
        m = tl.load(m_ptr + rows[:, None] * V + iv[None, :], mask=ok[:, None] & ok_v[None, :], other=0.0)
        a = tl.load(a_ptr + rows, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, a + tl.sum(m * x[None, :], 1), mask=ok)


@triton.jit
def _rows_vecmat(m_ptr, d_ptr, n, V, iv, ok_v, BR: tl.constexpr):
    """``sum_i d[i] m[i, :]`` over the ``n`` rows of ``m`` [n, V] (fp32 ``d`` [n]), ``BR`` rows at a time."""
    acc = tl.zeros_like(iv).to(tl.float32)
    for r0 in range(0, n, BR):
        rows = r0 + tl.arange(0, BR)
        ok = rows < n
        m = tl.load(m_ptr + rows[:, None] * V + iv[None, :], mask=ok[:, None] & ok_v[None, :], other=0.0)
        acc += tl.sum(m * tl.load(d_ptr + rows, mask=ok, other=0.0)[:, None], 0)
    return acc


@triton.jit
def _rdn_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    beta_ptr,
    rq_ptr,
    rk_ptr,
    rv_ptr,
    rb_ptr,
    s0_ptr,
    y0_ptr,
    y_ptr,
    u_ptr,
    ck_ptr,
    sT_ptr,
    yT_ptr,
    cu_ptr,
    ckoff_ptr,
    T,
    H,
    K,
    V,
    NC,
    CHECKPOINT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    pid = tl.program_id(0)
    i_h = pid % H
    pid64 = pid.to(tl.int64)
    bos, L, ck_row = sequence_span(cu_ptr, ckoff_ptr, pid64, H, T, NC, CHECKPOINT, IS_VARLEN)
    ik = tl.arange(0, BK)
    iv = tl.arange(0, BV)
    ok_k = ik < K
    ok_v = iv < V
    ok_kv = ok_k[:, None] & ok_v[None, :]
    ok_vv = ok_v[:, None] & ok_v[None, :]
    kv = ik[:, None] * V + iv[None, :]
    vv = iv[:, None] * V + iv[None, :]
    rq_ptr += i_h * K * V
    rk_ptr += i_h * K * V
    rv_ptr += i_h * V * V
    rb_ptr += i_h * V
    S = tl.load(s0_ptr + pid64 * K * V + kv, mask=ok_kv, other=0.0)
    y = tl.load(y0_ptr + pid64 * V + iv, mask=ok_v, other=0.0)
    # pointers at step 0 of this (sequence, head); [B, T, H, n] layout
    q_ptr += bos * H * K + i_h * K
    k_ptr += bos * H * K + i_h * K
    v_ptr += bos * H * V + i_h * V
    beta_ptr += bos * H + i_h
    y_ptr += bos * H * V + i_h * V
    u_ptr += bos * H * V + i_h * V
    ck_ptr += ck_row * K * V
    for t in range(0, L):
        tl.store(ck_ptr + (t // CHECKPOINT) * K * V + kv, S, mask=ok_kv & (kv * 0 + t % CHECKPOINT == 0))
        r = tanh_fp32(y)
        zq = tl.load(q_ptr + ik, mask=ok_k, other=0.0).to(tl.float32) + tl.sum(
            tl.load(rq_ptr + kv, mask=ok_kv, other=0.0) * r[None, :], 1
        )
        zk = tl.load(k_ptr + ik, mask=ok_k, other=0.0).to(tl.float32) + tl.sum(
            tl.load(rk_ptr + kv, mask=ok_kv, other=0.0) * r[None, :], 1
        )
        zv = tl.load(v_ptr + iv, mask=ok_v, other=0.0).to(tl.float32) + tl.sum(
            tl.load(rv_ptr + vv, mask=ok_vv, other=0.0) * r[None, :], 1
        )
        zb = tl.load(beta_ptr).to(tl.float32) + tl.sum(tl.load(rb_ptr + iv, mask=ok_v, other=0.0) * r, 0)
        qs = masked_softmax(zq, ok_k)
        ks = masked_softmax(zk, ok_k)
        b = sigmoid_fp32(zb)
        u = b * (zv - tl.sum(S * ks[:, None], 0))
        S += ks[:, None] * u[None, :]
        y = tl.sum(S * qs[:, None], 0)
        tl.store(y_ptr + iv, y, mask=ok_v)
        tl.store(u_ptr + iv, u, mask=ok_v)
        q_ptr += H * K
        k_ptr += H * K
        v_ptr += H * V
        beta_ptr += H
        y_ptr += H * V
        u_ptr += H * V
    tl.store(sT_ptr + pid64 * K * V + kv, S, mask=ok_kv)
    tl.store(yT_ptr + pid64 * V + iv, y, mask=ok_v)


@triton.jit
def _rdn_bwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    beta_ptr,
    rq_ptr,
    rk_ptr,
    rv_ptr,
    rb_ptr,
    y0_ptr,
    y_ptr,
    u_ptr,
    ck_ptr,
    sT_ptr,
    do_ptr,
    dsT_ptr,
    dyT_ptr,
    dq_ptr,
    dk_ptr,
    dv_ptr,
    dbeta_ptr,
    ds0_ptr,
    dy0_ptr,
    r_ptr,
    cu_ptr,
    ckoff_ptr,
    T,
    H,
    K,
    V,
    NC,
    CHECKPOINT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BR: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    pid = tl.program_id(0)
    i_h = pid % H
    pid64 = pid.to(tl.int64)
    bos, L, ck_row = sequence_span(cu_ptr, ckoff_ptr, pid64, H, T, NC, CHECKPOINT, IS_VARLEN)
    ik = tl.arange(0, BK)
    iv = tl.arange(0, BV)
    ok_k = ik < K
    ok_v = iv < V
    ok_kv = ok_k[:, None] & ok_v[None, :]
    ok_vv = ok_v[:, None] & ok_v[None, :]
    kv = ik[:, None] * V + iv[None, :]
    vv = iv[:, None] * V + iv[None, :]
    rq_ptr += i_h * K * V
    rk_ptr += i_h * K * V
    rv_ptr += i_h * V * V
    rb_ptr += i_h * V
    S = tl.load(sT_ptr + pid64 * K * V + kv, mask=ok_kv, other=0.0)
    dS = tl.load(dsT_ptr + pid64 * K * V + kv, mask=ok_kv, other=0.0)
    dy_next = tl.load(dyT_ptr + pid64 * V + iv, mask=ok_v, other=0.0)
    y0 = tl.load(y0_ptr + pid64 * V + iv, mask=ok_v, other=0.0)
    # pointers at step L - 1 of this (sequence, head); [B, T, H, n] layout
    last = L - 1
    row = bos + last
    base_k = row * H * K + i_h * K
    base_v = row * H * V + i_h * V
    base_1 = row * H + i_h
    q_ptr += base_k
    k_ptr += base_k
    dq_ptr += base_k
    dk_ptr += base_k
    v_ptr += base_v
    y_ptr += base_v
    u_ptr += base_v
    do_ptr += base_v
    dv_ptr += base_v
    r_ptr += base_v
    beta_ptr += base_1
    dbeta_ptr += base_1
    ck_ptr += ck_row * K * V
    for i in range(0, L):
        t = last - i
        # recompute the step's activations from y_{t-1}
        # (a scalar condition is widened to a vector mask: the 3.9 interpreter rejects bool & scalar)
        y_prev = tl.load(y_ptr - H * V + iv, mask=ok_v & (iv * 0 + t > 0), other=0.0) + tl.where(t == 0, y0, 0.0)
        r = tanh_fp32(y_prev)
        tl.store(r_ptr + iv, r, mask=ok_v)
        if BR == BK:
            zq = tl.load(q_ptr + ik, mask=ok_k, other=0.0).to(tl.float32) + tl.sum(
                tl.load(rq_ptr + kv, mask=ok_kv, other=0.0) * r[None, :], 1
            )
            zk = tl.load(k_ptr + ik, mask=ok_k, other=0.0).to(tl.float32) + tl.sum(
                tl.load(rk_ptr + kv, mask=ok_kv, other=0.0) * r[None, :], 1
            )
        else:  # R x r in row blocks through this step's dq / dk rows (rewritten below)
            _rows_matvec(rq_ptr, r, q_ptr, dq_ptr, K, V, iv, ok_v, BR)
            _rows_matvec(rk_ptr, r, k_ptr, dk_ptr, K, V, iv, ok_v, BR)
            tl.debug_barrier()
            zq = tl.load(dq_ptr + ik, mask=ok_k, other=0.0)
            zk = tl.load(dk_ptr + ik, mask=ok_k, other=0.0)
            tl.debug_barrier()
        qs = masked_softmax(zq, ok_k)
        ks = masked_softmax(zk, ok_k)
        b = sigmoid_fp32(tl.load(beta_ptr).to(tl.float32) + tl.sum(tl.load(rb_ptr + iv, mask=ok_v, other=0.0) * r, 0))
        u = tl.load(u_ptr + iv, mask=ok_v, other=0.0)
        # adjoint of y_t = S_t^T q
        dy = tl.load(do_ptr + iv, mask=ok_v, other=0.0).to(tl.float32) + dy_next
        dS += qs[:, None] * dy[None, :]
        dq = tl.sum(S * dy[None, :], 1)
        # S_{t-1}: invert the update, or reload the checkpoint
        if t % CHECKPOINT == 0:
            S = tl.load(ck_ptr + (t // CHECKPOINT) * K * V + kv, mask=ok_kv, other=0.0)
        else:
            S = S - ks[:, None] * u[None, :]
        # adjoint of S_t = S_{t-1} + k u^T, u = b (v - S_{t-1}^T k)
        du = tl.sum(dS * ks[:, None], 0)
        dv = b * du
        dk = tl.sum(dS * u[None, :], 1) - tl.sum(S * dv[None, :], 1)
        dS -= ks[:, None] * dv[None, :]
        dzb = tl.sum(du * u, 0) * (1.0 - b)
        dzq = qs * (dq - tl.sum(qs * dq, 0))
        dzk = ks * (dk - tl.sum(ks * dk, 0))
        tl.store(dq_ptr + ik, dzq, mask=ok_k)
        tl.store(dk_ptr + ik, dzk, mask=ok_k)
        tl.store(dv_ptr + iv, dv, mask=ok_v)
        tl.store(dbeta_ptr, dzb)
        # through r = tanh(y_{t-1}) (R re-read here rather than kept live through the step)
        if BR == BK:
            dr = (
                tl.sum(tl.load(rq_ptr + kv, mask=ok_kv, other=0.0) * dzq[:, None], 0)
                + tl.sum(tl.load(rk_ptr + kv, mask=ok_kv, other=0.0) * dzk[:, None], 0)
                + tl.sum(tl.load(rv_ptr + vv, mask=ok_vv, other=0.0) * dv[:, None], 0)
            )
        else:  # R^T dz in row blocks, dz read back from the rows just stored
            tl.debug_barrier()
            dr = (
                _rows_vecmat(rq_ptr, dq_ptr, K, V, iv, ok_v, BR)
                + _rows_vecmat(rk_ptr, dk_ptr, K, V, iv, ok_v, BR)
                + _rows_vecmat(rv_ptr, dv_ptr, V, V, iv, ok_v, BR)
            )
        dr += tl.load(rb_ptr + iv, mask=ok_v, other=0.0) * dzb
        dy_next = dr * (1.0 - r * r)
        q_ptr -= H * K
        k_ptr -= H * K
        dq_ptr -= H * K
        dk_ptr -= H * K
        v_ptr -= H * V
        y_ptr -= H * V
        u_ptr -= H * V
        do_ptr -= H * V
        dv_ptr -= H * V
        r_ptr -= H * V
        beta_ptr -= H
        dbeta_ptr -= H
    tl.store(ds0_ptr + pid64 * K * V + kv, dS, mask=ok_kv)
    tl.store(dy0_ptr + pid64 * V + iv, dy_next, mask=ok_v)


def _blocks(K: int, V: int) -> Tuple[int, int, int, int, int]:
    """(BK, BV, BR, forward warps, backward warps). The backward reads ``R`` in blocks of ``BR`` rows when a
    [BK, BV] tile is over :data:`ROW_BLOCKED_TILE` (else ``BR = BK``: whole tiles), and then runs 8 warps
    (255 registers a thread for ``S`` and ``dS``; 16 warps cap a thread at 128 and spill)."""
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, triton.next_power_of_2(V))
    warps = num_warps_for(max(BK, BV) * BV)
    if BK * BV <= ROW_BLOCKED_TILE:
        return BK, BV, BK, warps, warps
    return BK, BV, min(BK, ROW_BLOCK), warps, 8


class RecurrentDeltaTriton(torch.autograd.Function):
    """Autograd wrapper of the two kernels (fp32 state, gradients in the inputs' dtypes).

    With ``cu_seqlens`` one program per (sequence, head) walks that sequence's steps of the packed input
    (B = 1); the states are per sequence ([N, ...])."""

    @staticmethod
    def forward(ctx, q, k, v, beta, r_q, r_k, r_v, r_b, S0, y0, cu_seqlens):
        B, T, H, K = q.shape
        V = v.shape[-1]
        if (T // CHECKPOINT + 1) * K * V >= 2**31:  # the kernels offset a sequence's checkpoints in int32
            raise ValueError(f"recurrent_delta (triton): T={T} with K={K}, V={V} is too long for one fused sequence")
        N = B if cu_seqlens is None else cu_seqlens.numel() - 1
        dev = q.device
        q_c, k_c, v_c, beta_c = (x.contiguous() for x in (q, k, v, beta))
        R = [x.float().contiguous() for x in (r_q, r_k, r_v, r_b)]
        S0_ = torch.zeros(N, H, K, V, device=dev) if S0 is None else S0.float().contiguous()
        y0_ = torch.zeros(N, H, V, device=dev) if y0 is None else y0.float().contiguous()
        Y = torch.empty(B, T, H, V, device=dev)
        U = torch.empty(B, T, H, V, device=dev)
        cu, ckoff, ck_rows, NC = checkpoint_layout(cu_seqlens, B, T, H, CHECKPOINT, y0_)
        ck = torch.empty(ck_rows, K, V, device=dev)
        S_T = torch.empty(N, H, K, V, device=dev)
        y_T = torch.empty(N, H, V, device=dev)
        BK, BV, _, warps, _ = _blocks(K, V)
        _rdn_fwd_kernel[(N * H,)](
            q_c,
            k_c,
            v_c,
            beta_c,
            *R,
            S0_,
            y0_,
            Y,
            U,
            ck,
            S_T,
            y_T,
            cu,
            ckoff,
            T,
            H,
            K,
            V,
            NC,
            CHECKPOINT=CHECKPOINT,
            BK=BK,
            BV=BV,
            IS_VARLEN=cu_seqlens is not None,
            num_warps=warps,
        )
        ctx.save_for_backward(q_c, k_c, v_c, beta_c, r_q, r_k, r_v, r_b, y0_, Y, U, ck, S_T, cu, ckoff)
        ctx.has_state = (S0 is not None, y0 is not None)
        ctx.meta = (NC, cu_seqlens is not None)
        ctx.set_materialize_grads(False)
        return Y.to(q.dtype), S_T, y_T

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dS_T, dy_T):
        q, k, v, beta, r_q, r_k, r_v, r_b, y0, Y, U, ck, S_T, cu, ckoff = ctx.saved_tensors
        NC, is_varlen = ctx.meta
        B, T, H, K = q.shape
        V = v.shape[-1]
        N = S_T.shape[0]
        dev = q.device
        do = torch.zeros(B, T, H, V, device=dev) if do is None else do.contiguous()
        dS_T = torch.zeros_like(S_T) if dS_T is None else dS_T.float().contiguous()
        dy_T = torch.zeros_like(y0) if dy_T is None else dy_T.float().contiguous()
        dq = torch.empty(B, T, H, K, device=dev)
        dk = torch.empty(B, T, H, K, device=dev)
        dv = torch.empty(B, T, H, V, device=dev)
        dbeta = torch.empty(B, T, H, device=dev)
        r = torch.empty(B, T, H, V, device=dev)  # tanh(y_{t-1}) of every step, for dR
        dS0 = torch.empty_like(S_T)
        dy0 = torch.empty_like(y0)
        BK, BV, BR, _, warps = _blocks(K, V)
        _rdn_bwd_kernel[(N * H,)](
            q,
            k,
            v,
            beta,
            *[x.float().contiguous() for x in (r_q, r_k, r_v, r_b)],
            y0,
            Y,
            U,
            ck,
            S_T,
            do,
            dS_T,
            dy_T,
            dq,
            dk,
            dv,
            dbeta,
            dS0,
            dy0,
            r,
            cu,
            ckoff,
            T,
            H,
            K,
            V,
            NC,
            CHECKPOINT=CHECKPOINT,
            BK=BK,
            BV=BV,
            BR=BR,
            IS_VARLEN=is_varlen,
            num_warps=warps,
            num_stages=1 if BR < BK else 3,  # the row-blocked path orders memory with barriers: no pipelining
        )
        dz = torch.cat([dq, dk, dv, dbeta.unsqueeze(-1)], -1)
        dR = torch.einsum("bthf,bthv->hfv", dz, r)
        has_S0, has_y0 = ctx.has_state
        return (
            dq.to(q.dtype),
            dk.to(k.dtype),
            dv.to(v.dtype),
            dbeta.to(beta.dtype),
            dR[:, :K].to(r_q.dtype),
            dR[:, K : 2 * K].to(r_k.dtype),
            dR[:, 2 * K : 2 * K + V].to(r_v.dtype),
            dR[:, -1].to(r_b.dtype),
            dS0 if has_S0 else None,
            dy0 if has_y0 else None,
            None,
        )


def recurrent_delta_triton(
    q, k, v, beta, r_q, r_k, r_v, r_b, initial_state=None, output_final_state=False, cu_seqlens=None
):
    """Same contract as :func:`recurrent_delta_reference`; state (S [B,H,K,V], y [B,H,V]) in fp32.

    With ``cu_seqlens`` [N+1] (packed input, B = 1): one launch, a program per (sequence, head) that
    walks only its sequence's steps; states [N, ...]. No host sync.
    """
    S0, y0 = (None, None) if initial_state is None else initial_state
    o, S, y = RecurrentDeltaTriton.apply(q, k, v, beta, r_q, r_k, r_v, r_b, S0, y0, cu_seqlens)
    return o, ((S, y) if output_final_state else None)


recurrent_delta_triton.varlen = True
