"""Fused-recurrent Triton kernels for ``srwm``, forward and backward.

One program per (batch, head) walks time with the four weight matrices in registers (fp32):
``W_y`` [V, D], ``W_q``, ``W_k`` [D, D] and ``w_b`` [4, D] (block sizes: next powers of two, at
least 16, with masks). They are read from and written to one stacked ``[B, H, R, D]`` tensor,
``R = V + 2D + 4`` rows, as in :mod:`kernels.ops.srwm.torch_recurrent`. Forward step::

    y = W_y x;  q = softmax(W_q x);  k = softmax(W_k x);  b = sigmoid(w_b x);  c = q - k
    M <- M + b_i (M c) k^T   for (M, b_i) in ((W_y, b_0), (W_q, b_1), (W_k, b_2), (w_b, b_3))

It writes ``z_t = (y, W_q x, W_k x, w_b x)`` and ``d_t = (M c for each M)`` (``R`` numbers each,
fp32) per step, the weights every ``CHECKPOINT`` steps and the final weights. The backward kernel
walks time in reverse with the weights and their gradients in registers, rebuilds
``M_{t-1} = M_t - b_i d_t k^T`` (reset to the checkpoint every ``CHECKPOINT`` steps) and applies
the adjoint equations of :mod:`kernels.ops.srwm.torch_recurrent`; it writes ``dx_t`` per step and the
initial weights' gradient at the end (summed over the batch afterwards for shared weights).
With ``cu_seqlens`` a program is one (sequence, head) of the packed input: it starts at the sequence's
first step and walks its length only (checkpoints laid out per sequence, see ``sequence_span``).
Registers: 8 tiles of up to [max(V, D), D] in the backward, which spill at D = V = 128: heads with
tiles over :data:`ROWS_ABOVE_TILE` take the row-blocked kernels of
:mod:`kernels.ops.srwm.triton_recurrent_rows` instead (weights in global memory).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch.autograd.function import once_differentiable
import triton
import triton.language as tl

from kernels import _triton_compat as interpreter_compat
from kernels.ops.common.loop import (
    checkpoint_layout,
    masked_softmax,
    num_warps_for,
    sequence_span,
    sigmoid_fp32,
)
from kernels.ops.srwm.torch_recurrent import CHECKPOINT, stack_weights
from kernels.ops.srwm.triton_recurrent_rows import _pick, _srwm_bwd_rows_kernel, _srwm_fwd_rows_kernel, step_gates

#: heads whose largest weight tile [max(V, D), D] (padded) is over this many elements (D = V = 128) take
#: the row-blocked kernels of :mod:`kernels.ops.srwm.triton_recurrent_rows` (weights in global memory,
#: :data:`ROW_BLOCK` rows at a time); below it the weights stay in registers (module constants: tests
#: lower them)
ROWS_ABOVE_TILE = 64 * 64
ROW_BLOCK = 32
ROWS_WARPS = 8

interpreter_compat.install()  # Triton 3.6 interpreter + NumPy 2: scalar loop bounds


@triton.jit
def _srwm_fwd_kernel(
    x_ptr,
    w0_ptr,
    z_ptr,
    d_ptr,
    ck_ptr,
    wT_ptr,
    cu_ptr,
    ckoff_ptr,
    T,
    H,
    D,
    V,
    NC,
    CHECKPOINT: tl.constexpr,
    BD: tl.constexpr,
    BV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    pid = tl.program_id(0)
    i_h = pid % H
    pid64 = pid.to(tl.int64)
    bos, L, ck_row = sequence_span(cu_ptr, ckoff_ptr, pid64, H, T, NC, CHECKPOINT, IS_VARLEN)
    R = V + 2 * D + 4
    idd = tl.arange(0, BD)
    iv = tl.arange(0, BV)
    i4 = tl.arange(0, 4)
    ok_d = idd < D
    ok_v = iv < V
    ok_yd = ok_v[:, None] & ok_d[None, :]
    ok_dd = ok_d[:, None] & ok_d[None, :]
    ok_4d = (i4 < 4)[:, None] & ok_d[None, :]
    # offsets of the four blocks inside one [R, D] stacked matrix
    o_y = iv[:, None] * D + idd[None, :]
    o_q = (V + idd[:, None]) * D + idd[None, :]
    o_k = (V + D + idd[:, None]) * D + idd[None, :]
    o_b = (V + 2 * D + i4[:, None]) * D + idd[None, :]
    w0_ptr += pid64 * R * D
    Wy = tl.load(w0_ptr + o_y, mask=ok_yd, other=0.0)
    Wq = tl.load(w0_ptr + o_q, mask=ok_dd, other=0.0)
    Wk = tl.load(w0_ptr + o_k, mask=ok_dd, other=0.0)
    Wb = tl.load(w0_ptr + o_b, mask=ok_4d, other=0.0)
    x_ptr += bos * H * D + i_h * D
    z_ptr += bos * H * R + i_h * R
    d_ptr += bos * H * R + i_h * R
    ck_ptr += ck_row * R * D
    for t in range(0, L):
        ck = ck_ptr + tl.cast(t // CHECKPOINT, tl.int64) * R * D
        tl.store(ck + o_y, Wy, mask=ok_yd & (o_y * 0 + t % CHECKPOINT == 0))
        tl.store(ck + o_q, Wq, mask=ok_dd & (o_q * 0 + t % CHECKPOINT == 0))
        tl.store(ck + o_k, Wk, mask=ok_dd & (o_k * 0 + t % CHECKPOINT == 0))
        tl.store(ck + o_b, Wb, mask=ok_4d & (o_b * 0 + t % CHECKPOINT == 0))
        x = tl.load(x_ptr + idd, mask=ok_d, other=0.0).to(tl.float32)
        y = tl.sum(Wy * x[None, :], 1)
        zq = tl.sum(Wq * x[None, :], 1)
        zk = tl.sum(Wk * x[None, :], 1)
        zb = tl.sum(Wb * x[None, :], 1)
        tl.store(z_ptr + iv, y, mask=ok_v)
        tl.store(z_ptr + V + idd, zq, mask=ok_d)
        tl.store(z_ptr + V + D + idd, zk, mask=ok_d)
        tl.store(z_ptr + V + 2 * D + i4, zb)
        qs = masked_softmax(zq, ok_d)
        ks = masked_softmax(zk, ok_d)
        b = sigmoid_fp32(zb)
        c = qs - ks
        dy = tl.sum(Wy * c[None, :], 1)
        dq = tl.sum(Wq * c[None, :], 1)
        dk = tl.sum(Wk * c[None, :], 1)
        db = tl.sum(Wb * c[None, :], 1)
        tl.store(d_ptr + iv, dy, mask=ok_v)
        tl.store(d_ptr + V + idd, dq, mask=ok_d)
        tl.store(d_ptr + V + D + idd, dk, mask=ok_d)
        tl.store(d_ptr + V + 2 * D + i4, db)
        Wy += (_pick(b, i4, 0) * dy)[:, None] * ks[None, :]
        Wq += (_pick(b, i4, 1) * dq)[:, None] * ks[None, :]
        Wk += (_pick(b, i4, 2) * dk)[:, None] * ks[None, :]
        Wb += (_pick(b, i4, 3) * db)[:, None] * ks[None, :]
        x_ptr += H * D
        z_ptr += H * R
        d_ptr += H * R
    wT_ptr += pid64 * R * D
    tl.store(wT_ptr + o_y, Wy, mask=ok_yd)
    tl.store(wT_ptr + o_q, Wq, mask=ok_dd)
    tl.store(wT_ptr + o_k, Wk, mask=ok_dd)
    tl.store(wT_ptr + o_b, Wb, mask=ok_4d)


@triton.jit
def _srwm_bwd_kernel(
    x_ptr,
    z_ptr,
    d_ptr,
    ck_ptr,
    wT_ptr,
    do_ptr,
    dwT_ptr,
    dx_ptr,
    dw0_ptr,
    cu_ptr,
    ckoff_ptr,
    T,
    H,
    D,
    V,
    NC,
    CHECKPOINT: tl.constexpr,
    BD: tl.constexpr,
    BV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    pid = tl.program_id(0)
    i_h = pid % H
    pid64 = pid.to(tl.int64)
    bos, L, ck_row = sequence_span(cu_ptr, ckoff_ptr, pid64, H, T, NC, CHECKPOINT, IS_VARLEN)
    R = V + 2 * D + 4
    idd = tl.arange(0, BD)
    iv = tl.arange(0, BV)
    i4 = tl.arange(0, 4)
    ok_d = idd < D
    ok_v = iv < V
    ok_yd = ok_v[:, None] & ok_d[None, :]
    ok_dd = ok_d[:, None] & ok_d[None, :]
    ok_4d = (i4 < 4)[:, None] & ok_d[None, :]
    o_y = iv[:, None] * D + idd[None, :]
    o_q = (V + idd[:, None]) * D + idd[None, :]
    o_k = (V + D + idd[:, None]) * D + idd[None, :]
    o_b = (V + 2 * D + i4[:, None]) * D + idd[None, :]
    wT_ptr += pid64 * R * D
    Wy = tl.load(wT_ptr + o_y, mask=ok_yd, other=0.0)
    Wq = tl.load(wT_ptr + o_q, mask=ok_dd, other=0.0)
    Wk = tl.load(wT_ptr + o_k, mask=ok_dd, other=0.0)
    Wb = tl.load(wT_ptr + o_b, mask=ok_4d, other=0.0)
    dwT_ptr += pid64 * R * D
    dWy = tl.load(dwT_ptr + o_y, mask=ok_yd, other=0.0)
    dWq = tl.load(dwT_ptr + o_q, mask=ok_dd, other=0.0)
    dWk = tl.load(dwT_ptr + o_k, mask=ok_dd, other=0.0)
    dWb = tl.load(dwT_ptr + o_b, mask=ok_4d, other=0.0)
    row = bos + L - 1  # step L - 1 of this (sequence, head)
    x_ptr += row * H * D + i_h * D
    dx_ptr += row * H * D + i_h * D
    z_ptr += row * H * R + i_h * R
    d_ptr += row * H * R + i_h * R
    do_ptr += row * H * V + i_h * V
    ck_ptr += ck_row * R * D
    for i in range(0, L):
        t = L - 1 - i
        # the step's activations and saved products
        qs, ks, b = step_gates(z_ptr, V, D, idd, ok_d, i4)
        b0 = _pick(b, i4, 0)
        b1 = _pick(b, i4, 1)
        b2 = _pick(b, i4, 2)
        b3 = _pick(b, i4, 3)
        vy = tl.load(d_ptr + iv, mask=ok_v, other=0.0)
        vq = tl.load(d_ptr + V + idd, mask=ok_d, other=0.0)
        vk = tl.load(d_ptr + V + D + idd, mask=ok_d, other=0.0)
        vb = tl.load(d_ptr + V + 2 * D + i4)
        # adjoint of M_t = M_{t-1} + s k^T (s = b_i d): ds = dM k, dk_a = sum dM^T s
        ds_y = tl.sum(dWy * ks[None, :], 1)
        ds_q = tl.sum(dWq * ks[None, :], 1)
        ds_k = tl.sum(dWk * ks[None, :], 1)
        ds_b = tl.sum(dWb * ks[None, :], 1)
        dka = (
            tl.sum(dWy * (b0 * vy)[:, None], 0)
            + tl.sum(dWq * (b1 * vq)[:, None], 0)
            + tl.sum(dWk * (b2 * vk)[:, None], 0)
            + tl.sum(dWb * (b3 * vb)[:, None], 0)
        )
        # M_{t-1}: invert the update, or reload the checkpoint
        is_ck = t % CHECKPOINT == 0
        ck = ck_ptr + tl.cast(t // CHECKPOINT, tl.int64) * R * D
        Wy = tl.where(
            is_ck,
            tl.load(ck + o_y, mask=ok_yd & (o_y * 0 + t % CHECKPOINT == 0), other=0.0),
            Wy - (b0 * vy)[:, None] * ks[None, :],
        )
        Wq = tl.where(
            is_ck,
            tl.load(ck + o_q, mask=ok_dd & (o_q * 0 + t % CHECKPOINT == 0), other=0.0),
            Wq - (b1 * vq)[:, None] * ks[None, :],
        )
        Wk = tl.where(
            is_ck,
            tl.load(ck + o_k, mask=ok_dd & (o_k * 0 + t % CHECKPOINT == 0), other=0.0),
            Wk - (b2 * vk)[:, None] * ks[None, :],
        )
        Wb = tl.where(
            is_ck,
            tl.load(ck + o_b, mask=ok_4d & (o_b * 0 + t % CHECKPOINT == 0), other=0.0),
            Wb - (b3 * vb)[:, None] * ks[None, :],
        )
        # through d = M c and the betas
        dd_y = b0 * ds_y
        dd_q = b1 * ds_q
        dd_k = b2 * ds_k
        dd_b = b3 * ds_b
        g = (
            tl.where(i4 == 0, tl.sum(ds_y * vy, 0), 0.0)
            + tl.where(i4 == 1, tl.sum(ds_q * vq, 0), 0.0)
            + tl.where(i4 == 2, tl.sum(ds_k * vk, 0), 0.0)
            + tl.where(i4 == 3, tl.sum(ds_b * vb, 0), 0.0)
        )
        dzb = g * b * (1.0 - b)
        dc = (
            tl.sum(Wy * dd_y[:, None], 0)
            + tl.sum(Wq * dd_q[:, None], 0)
            + tl.sum(Wk * dd_k[:, None], 0)
            + tl.sum(Wb * dd_b[:, None], 0)
        )
        dks = dka - dc
        dzq = qs * (dc - tl.sum(qs * dc, 0))
        dzk = ks * (dks - tl.sum(ks * dks, 0))
        dzy = tl.load(do_ptr + iv, mask=ok_v, other=0.0).to(tl.float32)
        # through z = M_{t-1} x
        dx = (
            tl.sum(Wy * dzy[:, None], 0)
            + tl.sum(Wq * dzq[:, None], 0)
            + tl.sum(Wk * dzk[:, None], 0)
            + tl.sum(Wb * dzb[:, None], 0)
        )
        tl.store(dx_ptr + idd, dx, mask=ok_d)
        x = tl.load(x_ptr + idd, mask=ok_d, other=0.0).to(tl.float32)
        c = qs - ks
        dWy += dd_y[:, None] * c[None, :] + dzy[:, None] * x[None, :]
        dWq += dd_q[:, None] * c[None, :] + dzq[:, None] * x[None, :]
        dWk += dd_k[:, None] * c[None, :] + dzk[:, None] * x[None, :]
        dWb += dd_b[:, None] * c[None, :] + dzb[:, None] * x[None, :]
        x_ptr -= H * D
        dx_ptr -= H * D
        z_ptr -= H * R
        d_ptr -= H * R
        do_ptr -= H * V
    dw0_ptr += pid64 * R * D
    tl.store(dw0_ptr + o_y, dWy, mask=ok_yd)
    tl.store(dw0_ptr + o_q, dWq, mask=ok_dd)
    tl.store(dw0_ptr + o_k, dWk, mask=ok_dd)
    tl.store(dw0_ptr + o_b, dWb, mask=ok_4d)


def _blocks(D: int, V: int) -> Tuple[int, int, int, bool]:
    """(BD, BV, warps, whether the row-blocked kernels run)."""
    BD = max(16, triton.next_power_of_2(D))
    BV = max(16, triton.next_power_of_2(V))
    if max(BD, BV) * BD > ROWS_ABOVE_TILE:
        return BD, BV, ROWS_WARPS, True
    return BD, BV, num_warps_for(max(BD, BV) * BD), False


class SrwmTriton(torch.autograd.Function):
    """Autograd wrapper of the two kernels; returns the output and the stacked final weights.

    With ``cu_seqlens`` one program per (sequence, head) walks that sequence's steps of the packed input
    (B = 1); the weights are per sequence ([N, ...]; shared ones broadcast, their gradient summed)."""

    @staticmethod
    def forward(ctx, x, V, cu_seqlens, w_y, w_q, w_k, w_b):
        B, T, H, D = x.shape
        N = B if cu_seqlens is None else cu_seqlens.numel() - 1
        R = V + 2 * D + 4
        dev = x.device
        x_c = x.contiguous()
        W0 = stack_weights((w_y, w_q, w_k, w_b), N).contiguous()
        Z = torch.empty(B, T, H, R, device=dev)
        Dd = torch.empty(B, T, H, R, device=dev)
        cu, ckoff, ck_rows, NC = checkpoint_layout(cu_seqlens, B, T, H, CHECKPOINT, W0)
        ck = torch.empty(ck_rows, R, D, device=dev)
        W_T = torch.empty(N, H, R, D, device=dev)
        BD, BV, warps, rows = _blocks(D, V)
        # the row-blocked kernel's scratch is ordered by barriers: no pipelining across them
        kernel, tiles = (
            (_srwm_fwd_rows_kernel, dict(BR=ROW_BLOCK, num_stages=1)) if rows else (_srwm_fwd_kernel, dict(BV=BV))
        )
        kernel[(N * H,)](
            *(x_c, W0, Z, Dd, ck, W_T, cu, ckoff, T, H, D, V, NC),
            CHECKPOINT=CHECKPOINT,
            BD=BD,
            IS_VARLEN=cu_seqlens is not None,
            num_warps=warps,
            **tiles,
        )
        ctx.save_for_backward(x_c, Z, Dd, ck, W_T, cu, ckoff)
        ctx.V = V
        ctx.meta = (NC, cu_seqlens is not None)
        ctx.shapes = [(w.dim(), w.dtype) for w in (w_y, w_q, w_k, w_b)]
        ctx.set_materialize_grads(False)
        return Z[..., :V].to(x.dtype, memory_format=torch.contiguous_format), W_T

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dW_T):
        x, Z, Dd, ck, W_T, cu, ckoff = ctx.saved_tensors
        V = ctx.V
        NC, is_varlen = ctx.meta
        B, T, H, D = x.shape
        N = W_T.shape[0]
        dev = x.device
        do = torch.zeros(B, T, H, V, device=dev) if do is None else do.contiguous()
        dW_T = torch.zeros_like(W_T) if dW_T is None else dW_T.float().contiguous()
        dx = torch.empty(B, T, H, D, device=dev)
        BD, BV, warps, rows = _blocks(D, V)
        if rows:  # scratch: the weights (from W_T back to W_0) and their gradient (ends as dW_0)
            dW0 = dW_T.clone()
            _srwm_bwd_rows_kernel[(N * H,)](
                x,
                Z,
                Dd,
                ck,
                W_T.clone(),
                do,
                dW0,
                dx,
                torch.empty(N * H, 2, V + 2 * D + 4, device=dev),
                cu,
                ckoff,
                T,
                H,
                D,
                V,
                NC,
                CHECKPOINT=CHECKPOINT,
                BD=BD,
                BR=ROW_BLOCK,
                IS_VARLEN=is_varlen,
                num_warps=warps,
                num_stages=1,
            )
            return (dx.to(x.dtype), None, None, *_weight_grads(dW0, ctx.shapes, V, D))
        dW0 = torch.empty_like(W_T)
        _srwm_bwd_kernel[(N * H,)](
            x,
            Z,
            Dd,
            ck,
            W_T,
            do,
            dW_T,
            dx,
            dW0,
            cu,
            ckoff,
            T,
            H,
            D,
            V,
            NC,
            CHECKPOINT=CHECKPOINT,
            BD=BD,
            BV=BV,
            IS_VARLEN=is_varlen,
            num_warps=warps,
        )
        return (dx.to(x.dtype), None, None, *_weight_grads(dW0, ctx.shapes, V, D))


def _weight_grads(dW0, shapes, V: int, D: int):
    """The four initial weights' gradients from the stacked ``dW0`` [N, H, R, D] (summed over the batch
    for weights shared by it), in their dtypes."""
    grads = []
    bounds = (0, V, V + D, V + 2 * D, V + 2 * D + 4)
    for (dim, dtype), lo, hi in zip(shapes, bounds[:-1], bounds[1:]):
        g = dW0[:, :, lo:hi]
        grads.append((g.sum(0) if dim == 3 else g).to(dtype))
    return grads


def srwm_triton(x, w_y, w_q, w_k, w_b, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Same contract as :func:`srwm_reference`; the final weights are returned in fp32.

    With ``cu_seqlens`` [N+1] (packed input, B = 1): one launch, a program per (sequence, head) that
    walks only its sequence's steps; final weights [N, ...]. No host sync.
    """
    weights = tuple(initial_state) if initial_state is not None else (w_y, w_q, w_k, w_b)
    V = weights[0].shape[-2]
    o, W = SrwmTriton.apply(x, V, cu_seqlens, *weights)
    if not output_final_state:
        return o, None
    D = x.shape[-1]
    return o, (W[:, :, :V], W[:, :, V : V + D], W[:, :, V + D : V + 2 * D], W[:, :, V + 2 * D :])


srwm_triton.varlen = True
