"""Triton scan kernels for ``h_t = a_t * h_{t-1} + b_t`` (a, b: [B, T, D], linear space).

Forward: one program per (batch, block of BLOCK_D columns) walks T in tiles of BLOCK_T steps; a tile
is scanned with ``tl.associative_scan`` over the affine maps ``(a, b)`` (combine
``(a1, b1), (a2, b2) -> (a1 a2, a2 b1 + b2)``) and fixed up with the carry ``h = L + P * carry``.
a and b are read once and h written once (plus the fp32 final state).

Backward: the reversed scan ``delta_t = dL/dh_t + a_{t+1} delta_{t+1}`` (tiles loaded back to
front, the same associative scan), fused with ``grad_b = delta``, ``grad_a_t = delta_t h_{t-1}``
and ``grad_h0 = a_1 delta_1``; it reads a, h and dL/dh once and writes the two gradients.
Accumulation is fp32 for any input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import _triton_compat as interpreter_compat

interpreter_compat.install()

from kernels._dispatch import triton_interpret  # noqa: E402  (after the interpreter shims)

#: tile sizes; the CPU interpreter runs tl.associative_scan element by element in Python, so
#: there the tiles are kept small (the kernel code is the same)
BLOCK_T = 16 if triton_interpret() else 64
BLOCK_D = 16 if triton_interpret() else 32


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _linear_scan_fwd_kernel(
    a_ptr,
    b_ptr,
    h0_ptr,
    out_ptr,
    final_ptr,
    T,
    D,
    HAS_H0: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    rows = tl.arange(0, BLOCK_T)
    base = i_b.to(tl.int64) * T * D
    if HAS_H0:
        h = tl.load(h0_ptr + i_b * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_D], dtype=tl.float32)
    is_last = (rows == BLOCK_T - 1)[:, None]
    for t0 in range(0, T, BLOCK_T):
        t = t0 + rows
        ok = (t < T)[:, None] & col_ok[None, :]
        offs = base + t[:, None] * D + cols[None, :]
        a = tl.load(a_ptr + offs, mask=ok, other=1.0).to(tl.float32)  # padding: identity map
        b = tl.load(b_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        prod, local = tl.associative_scan((a, b), 0, _affine_combine)
        hs = local + prod * h[None, :]
        tl.store(out_ptr + offs, hs.to(out_ptr.dtype.element_ty), mask=ok)
        h = tl.sum(tl.where(is_last, hs, 0.0), 0)
    tl.store(final_ptr + i_b * D + cols, h, mask=col_ok)


@triton.jit
def _linear_scan_bwd_kernel(
    a_ptr,
    h_ptr,
    h0_ptr,
    dout_ptr,
    dfinal_ptr,
    da_ptr,
    db_ptr,
    dh0_ptr,
    T,
    D,
    HAS_H0: tl.constexpr,
    HAS_DFINAL: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    rows = tl.arange(0, BLOCK_T)
    base = i_b.to(tl.int64) * T * D
    if HAS_DFINAL:  # dL/dh_T enters delta_{T-1} with coefficient 1
        carry = tl.load(dfinal_ptr + i_b * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_H0:
        h0 = tl.load(h0_ptr + i_b * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        h0 = tl.zeros([BLOCK_D], dtype=tl.float32)
    is_last = (rows == BLOCK_T - 1)[:, None]
    for t0 in range(0, T, BLOCK_T):
        t = (T - 1 - t0) - rows  # row r holds step t = T-1-t0-r: back to front
        ok = (t >= 0)[:, None] & col_ok[None, :]
        offs = base + t[:, None] * D + cols[None, :]
        g = tl.load(dout_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        nxt = ok & (t + 1 < T)[:, None]
        coef = tl.load(a_ptr + offs + D, mask=nxt, other=1.0).to(tl.float32)  # a_{t+1}
        prod, local = tl.associative_scan((coef, g), 0, _affine_combine)
        delta = local + prod * carry[None, :]
        prev_ok = ok & (t >= 1)[:, None]
        h_prev = tl.load(h_ptr + offs - D, mask=prev_ok, other=0.0).to(tl.float32)
        h_prev = tl.where((t == 0)[:, None], h0[None, :], h_prev)
        tl.store(db_ptr + offs, delta.to(db_ptr.dtype.element_ty), mask=ok)
        tl.store(da_ptr + offs, (delta * h_prev).to(da_ptr.dtype.element_ty), mask=ok)
        carry = tl.sum(tl.where(is_last, delta, 0.0), 0)  # padding rows keep delta_0
    if HAS_H0:
        a0 = tl.load(a_ptr + base + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(dh0_ptr + i_b * D + cols, a0 * carry, mask=col_ok)


def _grid(B: int, D: int):
    return (B, triton.cdiv(D, BLOCK_D))


class _LinearScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, h0):
        a, b = a.contiguous(), b.contiguous()
        B, T, D = a.shape
        h0c = None if h0 is None else h0.float().contiguous()
        out = torch.empty_like(a)
        final = torch.empty(B, D, device=a.device, dtype=torch.float32)
        _linear_scan_fwd_kernel[_grid(B, D)](
            a,
            b,
            h0c if h0c is not None else final,
            out,
            final,
            T,
            D,
            HAS_H0=h0c is not None,
            BLOCK_T=BLOCK_T,
            BLOCK_D=BLOCK_D,
        )
        ctx.save_for_backward(a, out, h0c)
        ctx.h0_dtype = None if h0 is None else h0.dtype
        return out, final

    @staticmethod
    def backward(ctx, dout, dfinal):
        a, out, h0c = ctx.saved_tensors
        B, T, D = a.shape
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        da, db = torch.empty_like(a), torch.empty_like(a)
        dh0 = torch.empty(B, D, device=a.device, dtype=torch.float32) if h0c is not None else None
        dummy = da
        _linear_scan_bwd_kernel[_grid(B, D)](
            a,
            out,
            h0c if h0c is not None else dummy,
            dout,
            dfinal.contiguous() if dfinal is not None else dummy,
            da,
            db,
            dh0 if dh0 is not None else dummy,
            T,
            D,
            HAS_H0=h0c is not None,
            HAS_DFINAL=dfinal is not None,
            BLOCK_T=BLOCK_T,
            BLOCK_D=BLOCK_D,
        )
        return da, db, (None if dh0 is None else dh0.to(ctx.h0_dtype))


def linear_scan_triton(a, b, initial_state=None, output_final_state=False):
    """Same contract as ``linear_scan_reference`` (Triton kernels, fwd + bwd)."""
    B, T, D = a.shape
    if T == 0:
        final = a.new_zeros(B, D, dtype=torch.float32) if initial_state is None else initial_state.float()
        return a.new_zeros(B, 0, D), (final if output_final_state else None)
    out, final = _LinearScanTriton.apply(a, b, initial_state)
    return out, (final if output_final_state else None)
