"""Fused-recurrent Triton kernels for ``srwm`` at large heads: the weights in global memory, in row blocks.

At D = V = 128 the four weight matrices are 388 x 128 fp32 numbers per (batch, head) (199 KB; the
backward also holds their gradient): more than a program's registers, and more than sm_80's shared
memory. These kernels keep the stacked weights ``W`` [R, D] (``R = V + 2D + 4`` rows, the layout of
:mod:`kernels.ops.srwm.triton_recurrent`) in a per-program fp32 scratch in global memory (L2-resident)
and walk it in blocks of ``BR`` rows every step. Every row of the stack updates alone given the step's
``q``, ``k`` and its matrix's beta, so a step is one pass over the rows (the forward) or two (the
backward, whose column sums ``dk_a``, ``dc`` and the beta sums must be complete before ``dz`` is known).

Forward, step t (``z_t = W_{t-1} x_t`` already in the ``Z`` row, written by the previous step's pass)::

    q, k, b from z_t;  c = q - k;  for each row block:  d = W c;  W += (b_row d) k^T;  z_{t+1} = W x_{t+1}

Backward, step t in reverse (``W`` = W_t, ``dW`` = dL/dW_t in scratch; equations of
:mod:`kernels.ops.srwm.torch_recurrent`)::

    pass 1, each row block:  ds = dW k;  dk_a += dW^T s;  W <- W_{t-1} (= W - s k^T, or the checkpoint);
                             dd = b_row ds;  db_i += ds . d (matrix i's rows);  dc += W_{t-1}^T dd
    dz = (dy, softmax'(q) dc, softmax'(k) (dk_a - dc), db b (1 - b))
    pass 2, each row block:  dx += W_{t-1}^T dz;  dW += dd c^T + dz x^T

Cost against the register kernels: the weights cross the L1/L2 once each way per forward step (2 R D fp32
words), the weights and their gradient twice each way per backward step (6 R D words); a barrier per
step (forward) or two (backward) orders the scratch and the ``z``/``dd``/``dz`` rows between the program's
threads. Same launches (one forward, one backward kernel), same saved tensors.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels import _triton_compat as interpreter_compat
from kernels.ops.common.loop import masked_softmax, sequence_span, sigmoid_fp32

interpreter_compat.install()  # Triton 3.6 interpreter + NumPy 2: scalar loop bounds


@triton.jit
def _pick(vec, i4, i: tl.constexpr):
    """Element i of a [4] vector as a scalar."""
    return tl.sum(tl.where(i4 == i, vec, 0.0), 0)


@triton.jit
def step_gates(z_ptr, V, D, idd, ok_d, i4):
    """``(softmax(q), softmax(k), sigmoid(beta))`` of the step whose stacked row ``z = W x`` is at ``z_ptr``."""
    qs = masked_softmax(tl.load(z_ptr + V + idd, mask=ok_d, other=0.0), ok_d)
    ks = masked_softmax(tl.load(z_ptr + V + D + idd, mask=ok_d, other=0.0), ok_d)
    return qs, ks, sigmoid_fp32(tl.load(z_ptr + V + 2 * D + i4))


@triton.jit
def _row_block(r0, ir, idd, ok_d, R, D):
    """Rows ``r0 + ir`` of the stacked [R, D] weights: (rows, their mask, element offsets, element mask)."""
    rows = r0 + ir
    ok_r = rows < R
    return rows, ok_r, rows[:, None] * D + idd[None, :], ok_r[:, None] & ok_d[None, :]


@triton.jit
def _row_segment(rows, V, D):
    """Which matrix each stacked row belongs to: 0 (W_y), 1 (W_q), 2 (W_k), 3 (w_b)."""
    return (rows >= V).to(tl.int32) + (rows >= V + D).to(tl.int32) + (rows >= V + 2 * D).to(tl.int32)


@triton.jit
def _row_beta(seg, b, i4):
    """Each row's beta: ``b[seg]``."""
    return tl.where(
        seg == 0,
        _pick(b, i4, 0),
        tl.where(seg == 1, _pick(b, i4, 1), tl.where(seg == 2, _pick(b, i4, 2), _pick(b, i4, 3))),
    )


@triton.jit
def _srwm_fwd_rows_kernel(
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
    BR: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    pid = tl.program_id(0)
    i_h = pid % H
    pid64 = pid.to(tl.int64)
    bos, L, ck_row = sequence_span(cu_ptr, ckoff_ptr, pid64, H, T, NC, CHECKPOINT, IS_VARLEN)
    R = V + 2 * D + 4
    idd = tl.arange(0, BD)
    ir = tl.arange(0, BR)
    i4 = tl.arange(0, 4)
    ok_d = idd < D
    w0_ptr += pid64 * R * D
    wT_ptr += pid64 * R * D  # the scratch: the weights after the steps so far, the final weights at the end
    x_ptr += bos * H * D + i_h * D
    z_ptr += bos * H * R + i_h * R
    d_ptr += bos * H * R + i_h * R
    ck_ptr += ck_row * R * D
    # copy the initial weights into the scratch; z_0 = W_0 x_0
    x = tl.load(x_ptr + idd, mask=ok_d & (idd * 0 + L > 0), other=0.0).to(tl.float32)
    for r0 in range(0, R, BR):
        rows, ok_r, o_w, ok_w = _row_block(r0, ir, idd, ok_d, R, D)
        W = tl.load(w0_ptr + o_w, mask=ok_w, other=0.0)
        tl.store(wT_ptr + o_w, W, mask=ok_w)
        tl.store(z_ptr + rows, tl.sum(W * x[None, :], 1), mask=ok_r & (rows * 0 + L > 0))
    for t in range(0, L):
        tl.debug_barrier()  # the scratch rows and z_t written by other threads
        qs, ks, b = step_gates(z_ptr, V, D, idd, ok_d, i4)
        c = qs - ks
        x = tl.load(x_ptr + H * D + idd, mask=ok_d & (idd * 0 + t + 1 < L), other=0.0).to(tl.float32)
        ck = ck_ptr + tl.cast(t // CHECKPOINT, tl.int64) * R * D
        for r0 in range(0, R, BR):
            rows, ok_r, o_w, ok_w = _row_block(r0, ir, idd, ok_d, R, D)
            W = tl.load(wT_ptr + o_w, mask=ok_w, other=0.0)
            if t % CHECKPOINT == 0:
                tl.store(ck + o_w, W, mask=ok_w)
            d = tl.sum(W * c[None, :], 1)
            tl.store(d_ptr + rows, d, mask=ok_r)
            W += (_row_beta(_row_segment(rows, V, D), b, i4) * d)[:, None] * ks[None, :]
            tl.store(wT_ptr + o_w, W, mask=ok_w)
            tl.store(z_ptr + H * R + rows, tl.sum(W * x[None, :], 1), mask=ok_r & (rows * 0 + t + 1 < L))
        x_ptr += H * D
        z_ptr += H * R
        d_ptr += H * R


@triton.jit
def _srwm_bwd_rows_kernel(
    x_ptr,
    z_ptr,
    d_ptr,
    ck_ptr,
    w_ptr,
    do_ptr,
    dw_ptr,
    dx_ptr,
    rowbuf_ptr,
    cu_ptr,
    ckoff_ptr,
    T,
    H,
    D,
    V,
    NC,
    CHECKPOINT: tl.constexpr,
    BD: tl.constexpr,
    BR: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """``w_ptr`` holds a copy of the final weights and ``dw_ptr`` their gradient (rewritten in place:
    the initial weights' gradient at the end); ``rowbuf_ptr`` [programs, 2, R] the step's dd and dz rows."""
    pid = tl.program_id(0)
    i_h = pid % H
    pid64 = pid.to(tl.int64)
    bos, L, ck_row = sequence_span(cu_ptr, ckoff_ptr, pid64, H, T, NC, CHECKPOINT, IS_VARLEN)
    R = V + 2 * D + 4
    idd = tl.arange(0, BD)
    ir = tl.arange(0, BR)
    i4 = tl.arange(0, 4)
    ok_d = idd < D
    w_ptr += pid64 * R * D
    dw_ptr += pid64 * R * D
    dd_ptr = rowbuf_ptr + pid64 * 2 * R
    dz_ptr = dd_ptr + R
    row = bos + L - 1  # step L - 1 of this (sequence, head)
    x_ptr += row * H * D + i_h * D
    dx_ptr += row * H * D + i_h * D
    z_ptr += row * H * R + i_h * R
    d_ptr += row * H * R + i_h * R
    do_ptr += row * H * V + i_h * V
    ck_ptr += ck_row * R * D
    for i in range(0, L):
        t = L - 1 - i
        tl.debug_barrier()  # the previous step's dW rows
        qs, ks, b = step_gates(z_ptr, V, D, idd, ok_d, i4)
        ck = ck_ptr + tl.cast(t // CHECKPOINT, tl.int64) * R * D
        dka = tl.zeros([BD], dtype=tl.float32)
        dc = tl.zeros([BD], dtype=tl.float32)
        g = tl.zeros([4], dtype=tl.float32)
        for r0 in range(0, R, BR):
            rows, ok_r, o_w, ok_w = _row_block(r0, ir, idd, ok_d, R, D)
            seg = _row_segment(rows, V, D)
            beta = _row_beta(seg, b, i4)
            dvec = tl.load(d_ptr + rows, mask=ok_r, other=0.0)
            s = beta * dvec
            dW = tl.load(dw_ptr + o_w, mask=ok_w, other=0.0)
            ds = tl.sum(dW * ks[None, :], 1)
            dka += tl.sum(dW * s[:, None], 0)
            # M_{t-1}: invert the update, or reload the checkpoint
            if t % CHECKPOINT == 0:
                W = tl.load(ck + o_w, mask=ok_w, other=0.0)
            else:
                W = tl.load(w_ptr + o_w, mask=ok_w, other=0.0) - s[:, None] * ks[None, :]
            tl.store(w_ptr + o_w, W, mask=ok_w)
            dd = beta * ds
            tl.store(dd_ptr + rows, dd, mask=ok_r)
            g += tl.sum(tl.where(seg[:, None] == i4[None, :], (ds * dvec)[:, None], 0.0), 0)
            dc += tl.sum(W * dd[:, None], 0)
        dzb = g * b * (1.0 - b)
        dks = dka - dc
        dzq = qs * (dc - tl.sum(qs * dc, 0))
        dzk = ks * (dks - tl.sum(ks * dks, 0))
        tl.store(dz_ptr + V + idd, dzq, mask=ok_d)
        tl.store(dz_ptr + V + D + idd, dzk, mask=ok_d)
        tl.store(dz_ptr + V + 2 * D + i4, dzb)
        tl.debug_barrier()  # W_{t-1}, dd and dz rows
        x = tl.load(x_ptr + idd, mask=ok_d, other=0.0).to(tl.float32)
        c = qs - ks
        dx = tl.zeros([BD], dtype=tl.float32)
        for r0 in range(0, R, BR):
            rows, ok_r, o_w, ok_w = _row_block(r0, ir, idd, ok_d, R, D)
            dz = tl.load(do_ptr + rows, mask=rows < V, other=0.0).to(tl.float32) + tl.load(
                dz_ptr + rows, mask=ok_r & (rows >= V), other=0.0
            )
            W = tl.load(w_ptr + o_w, mask=ok_w, other=0.0)
            dx += tl.sum(W * dz[:, None], 0)
            dd = tl.load(dd_ptr + rows, mask=ok_r, other=0.0)
            dW = tl.load(dw_ptr + o_w, mask=ok_w, other=0.0) + dd[:, None] * c[None, :] + dz[:, None] * x[None, :]
            tl.store(dw_ptr + o_w, dW, mask=ok_w)
        tl.store(dx_ptr + idd, dx, mask=ok_d)
        x_ptr -= H * D
        dx_ptr -= H * D
        z_ptr -= H * R
        d_ptr -= H * R
        do_ptr -= H * V
