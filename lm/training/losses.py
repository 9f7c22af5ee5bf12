"""Next-token cross-entropy, optionally computed in chunks of tokens so that the full
``[B*T, vocab]`` logits tensor never exists at once (each chunk's logits are recomputed in the
backward pass by activation checkpointing)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def cross_entropy_sum(logits_fn: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, targets: torch.Tensor,
                      chunk_size: int = 0, ignore_index: int = -100) -> torch.Tensor:
    """Summed token cross-entropy of ``logits_fn(h)`` against ``targets``.

    h: [N, D] hidden states; targets: [N]; chunk_size > 0 processes ``chunk_size`` tokens at a time.
    """
    if chunk_size <= 0 or h.shape[0] <= chunk_size:
        return F.cross_entropy(logits_fn(h).float(), targets, ignore_index=ignore_index, reduction="sum")

    def piece(h_chunk: torch.Tensor, t_chunk: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits_fn(h_chunk).float(), t_chunk, ignore_index=ignore_index, reduction="sum")

    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        total = total + checkpoint(piece, h[sl], targets[sl], use_reentrant=False)
    return total
