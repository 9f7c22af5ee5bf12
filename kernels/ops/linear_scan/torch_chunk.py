"""Chunked parallel scan for ``h_t = a_t * h_{t-1} + b_t`` (PyTorch, any device).

a, b: [B, T, D] in linear space (any sign, zeros allowed: no logarithms are taken).

Forward, with chunks of C = 64 steps:
1. inside every chunk (all chunks at once) a Hillis–Steele scan of the affine maps
   ``x -> a x + b``: after ``log2(C)`` levels position t holds ``P_t = prod_{s<=t} a_s`` and the
   local state ``L_t`` (the recurrence started from 0 at the chunk start);
2. the chunk totals ``(P_last, L_last)`` form a sequence N = T / C times shorter, scanned by the
   same function (recursively) from ``h_0`` to give the state entering every chunk;
3. fix-up ``h_t = L_t + P_t * carry``.
Work is ``O(T log C)`` (the recursion adds a geometric ``T / C`` term), so the cost per token is
flat in T.

Backward (custom autograd): the reversed scan ``delta_t = dL/dh_t + a_{t+1} delta_{t+1}`` (run by
the same forward scan on time-flipped inputs, with ``dL/dh_T`` from the final state as its initial
value), then ``grad_b = delta``, ``grad_a_t = delta_t h_{t-1}``, ``grad_h0 = a_1 delta_1``.
"""

from __future__ import annotations

from typing import Optional

import torch

from kernels.ops.utils.chunks import chunk_length, merge_chunks, pad_to_multiple, split_chunks

CHUNK = 64


def _scan_within_chunks(A: torch.Tensor, L: torch.Tensor) -> None:
    """In place: Hillis–Steele inclusive scan of affine maps along axis 2 of [B, N, C, D]."""
    C = A.shape[2]
    d = 1
    while d < C:
        # both right-hand sides are evaluated before the write; L must use the old A
        L[:, :, d:] = torch.addcmul(L[:, :, d:], A[:, :, d:], L[:, :, :-d])
        A[:, :, d:] = A[:, :, d:] * A[:, :, :-d]
        d *= 2


def scan(a: torch.Tensor, b: torch.Tensor, h0: Optional[torch.Tensor], chunk: int = CHUNK) -> torch.Tensor:
    """All states ``h_t`` [B, T, D] (fp32, no autograd) of the recurrence from ``h0`` [B, D] or 0."""
    B, T, D = a.shape
    chunk = chunk_length(T, chunk, power_of_two=True)  # short sequences: no padding to 64
    # fresh contiguous fp32 copies (scanned in place); padding a = 1, b = 0 keeps the state
    A = pad_to_multiple(a.float(), chunk, 1, value=1.0).contiguous()
    L = pad_to_multiple(b.float(), chunk, 1, value=0.0).contiguous()
    A = A.clone() if A.data_ptr() == a.data_ptr() else A
    L = L.clone() if L.data_ptr() == b.data_ptr() else L
    A, L = split_chunks(A, chunk), split_chunks(L, chunk)
    _scan_within_chunks(A, L)
    N = A.shape[1]
    if N == 1:
        carry = None if h0 is None else h0.float()[:, None]
    else:
        after = scan(A[:, :, -1], L[:, :, -1], h0, chunk)  # state after each chunk [B, N, D]
        first = after.new_zeros(B, 1, D) if h0 is None else h0.float()[:, None]
        carry = torch.cat([first, after[:, :-1]], 1)
    if carry is not None:
        L.addcmul_(A, carry[:, :, None])
    return merge_chunks(L)[:, :T]


class _LinearScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, h0):
        h = scan(a, b, h0)
        ctx.save_for_backward(a, h, h0)
        return h.to(a.dtype), h[:, -1].clone()

    @staticmethod
    def backward(ctx, grad_out, grad_final):
        a, h, h0 = ctx.saved_tensors
        B, T, D = a.shape
        gh = torch.zeros_like(h) if grad_out is None else grad_out.float()
        g_last = h.new_zeros(B, D) if grad_final is None else grad_final.float()
        a_next = torch.cat([a[:, 1:].float(), a.new_ones(B, 1, D, dtype=torch.float32)], 1)
        delta = scan(a_next.flip(1), gh.flip(1), g_last).flip(1)
        grad_a = grad_b = grad_h0 = None
        if ctx.needs_input_grad[0]:
            first = h.new_zeros(B, 1, D) if h0 is None else h0.float()[:, None]
            grad_a = (delta * torch.cat([first, h[:, :-1]], 1)).to(a.dtype)
        if ctx.needs_input_grad[1]:
            grad_b = delta.to(a.dtype)
        if h0 is not None and ctx.needs_input_grad[2]:
            grad_h0 = (a[:, 0].float() * delta[:, 0]).to(h0.dtype)
        return grad_a, grad_b, grad_h0


def linear_scan_chunked(a, b, initial_state=None, output_final_state=False):
    """Same contract as ``linear_scan_reference``: a, b [B, T, D]; h0 [B, D] -> (h [B, T, D], h_T [B, D])."""
    B, T, D = a.shape
    if T == 0:
        final = a.new_zeros(B, D, dtype=torch.float32) if initial_state is None else initial_state.float()
        return a.new_zeros(B, 0, D), (final if output_final_state else None)
    out, final = _LinearScan.apply(a, b, initial_state)
    return out, (final if output_final_state else None)
