"""Pieces of the fused time-loop Triton kernels of ``recurrent_delta`` and ``srwm``: fp32 activations
(``tanh``, ``sigmoid``, a masked softmax), the span of one program's sequence in a packed row with its
checkpoint slots (:func:`sequence_span`, laid out on the host by :func:`checkpoint_layout`) and the warps
for a register tile.

Importing this module installs the Triton 3.6 interpreter fix (:mod:`kernels._triton_compat`).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kernels import _triton_compat as interpreter_compat

interpreter_compat.install()  # Triton 3.6 interpreter + NumPy 2: scalar loop bounds


@triton.jit
def tanh_fp32(x):
    """tanh through exp (tl has no portable tanh): 2 sigmoid(2x) - 1."""
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def sigmoid_fp32(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def masked_softmax(z, ok):
    z = tl.where(ok, z, -1.0e30)  # finite padding: no inf - inf
    e = tl.where(ok, tl.exp(z - tl.max(z, 0)), 0.0)
    return e / tl.sum(e, 0)


@triton.jit
def sequence_span(cu_ptr, ckoff_ptr, pid64, H, T, NC, CHECKPOINT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(first step ``bos``, length ``L``, first checkpoint row) of program ``pid64`` = (sequence, head).

    Without ``cu_seqlens`` sequence b is steps [b T, b T + T) with NC checkpoints per program; with it,
    steps [cu[n], cu[n+1]) and ceil(L / CHECKPOINT) checkpoints per program, sequence n's H programs
    starting at row ``H ckoff[n]`` (``ckoff`` = exclusive cumulative sum of the per-sequence counts).
    """
    i_n = pid64 // H
    if IS_VARLEN:
        bos = tl.load(cu_ptr + i_n).to(tl.int64)
        L = (tl.load(cu_ptr + i_n + 1).to(tl.int64) - bos).to(tl.int32)
        ck_row = tl.load(ckoff_ptr + i_n).to(tl.int64) * H + (pid64 % H) * ((L + CHECKPOINT - 1) // CHECKPOINT)
    else:
        bos = i_n * T
        L = T
        ck_row = pid64 * NC
    return bos, L, ck_row


def num_warps_for(tile: int) -> int:
    """Warps per program for a [*, *] register tile of ``tile`` elements (fewer spills)."""
    return 4 if tile <= 32 * 32 else (8 if tile <= 64 * 64 else 16)


def checkpoint_layout(cu_seqlens: Optional[torch.Tensor], B: int, T: int, H: int, checkpoint: int, dummy):
    """(cu_seqlens, per-sequence checkpoint offsets, checkpoint rows to allocate, NC) for the kernels.

    Without ``cu_seqlens``: NC = ceil(T / checkpoint) per program (``dummy`` for the unused pointers).
    With it: sequence n keeps ceil(L_n / checkpoint) per head from row ``H ckoff[n]``; the buffer has room
    for ``H floor((T + N (checkpoint - 1)) / checkpoint)`` >= H sum_n ceil(L_n / checkpoint) rows (no host sync).
    """
    if cu_seqlens is None:
        NC = (T + checkpoint - 1) // checkpoint
        return dummy, dummy, B * H * NC, NC
    N = cu_seqlens.numel() - 1
    per_seq = (cu_seqlens[1:] - cu_seqlens[:-1] + checkpoint - 1) // checkpoint
    ckoff = (torch.cumsum(per_seq, 0) - per_seq).to(torch.int64)
    return cu_seqlens.contiguous(), ckoff, H * ((T + N * (checkpoint - 1)) // checkpoint), 0
