"""Chunk layout helpers shared by the chunked PyTorch paths of ``delta_rule`` and ``dplr``.

``to_chunks`` turns a time-major input ``[B, T, H, *rest]`` into fp32 chunk-major chunks
``[N, B, H, C, *rest]`` (T zero-padded to ``N * C``; chunk-major so that the state-passing loop
reads contiguous slices); ``from_chunks`` undoes it for an output ``[N, B, H, C, V]``.
Zero padding (k = v = beta = a = b = 0, g = 0) leaves the final state of both ops unchanged.
``empty_result`` (the result of a length-0 sequence) lives in :mod:`kernels._chunk_utils` and is
re-exported here.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from kernels._chunk_utils import empty_result

__all__ = ["empty_result", "from_chunks", "per_chunk", "to_chunks"]


def to_chunks(x: torch.Tensor, C: int) -> torch.Tensor:
    """[B, T, H, *rest] -> contiguous fp32 [N, B, H, C, *rest] with N = ceil(T / C), zero padded in time."""
    B, T, H = x.shape[:3]
    rest = x.shape[3:]
    pad = (-T) % C
    x = x.float()
    if pad:
        x = F.pad(x, (0, 0) * len(rest) + (0, 0, 0, pad))
    x = x.reshape(B, (T + pad) // C, C, H, *rest).transpose(2, 3).transpose(0, 1)
    return x.contiguous()


def from_chunks(x: torch.Tensor, T: int) -> torch.Tensor:
    """[N, B, H, C, V] -> [B, T, H, V] (drops the padding)."""
    N, B, H, C, V = x.shape
    return x.permute(1, 0, 3, 2, 4).reshape(B, N * C, H, V)[:, :T]


def per_chunk(x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """[N, B, H, r, c] -> N tensors [B * H, r, c] (views; one unbind, so one stack in backward)."""
    N, B, H = x.shape[:3]
    return x.reshape(N, B * H, *x.shape[3:]).unbind(0)
