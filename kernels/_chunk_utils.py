"""Helpers shared by the chunked PyTorch paths (kernels/ops/*/chunk.py).

Stable API (other ops import these read-only):

- ``pad_to_multiple(x, C, dim=1, value=0.0)``: pad ``dim`` (the time axis) at the end up to a
  multiple of ``C``; returns ``x`` itself when nothing is missing. Choose ``value`` so that padded
  steps leave the state unchanged (e.g. k = v = 0 and log-decay 0, or a = 1, b = 0).
- ``split_chunks(x, C, dim=1)``: view ``dim`` (length N*C) as two axes ``(N, C)``.
- ``merge_chunks(x, dim=1)``: inverse of ``split_chunks`` (axes ``dim, dim+1`` -> one axis).
- ``causal_mask(C, device, diagonal=0)``: bool ``[C, C]`` (row t, column s), True where
  ``s <= t + diagonal``: at and below the diagonal (``diagonal=-1``: strictly below).
- ``masked_exp_diff(x_t, x_s, mask)``: ``exp(x_t - x_s)`` where ``mask`` holds, exactly 0 elsewhere,
  without ever forming ``exp`` of an unmasked (possibly positive, overflowing) difference and with
  zero (not NaN) gradients in the masked region.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_to_multiple(x: torch.Tensor, C: int, dim: int = 1, value: float = 0.0) -> torch.Tensor:
    """Pad axis ``dim`` of ``x`` at the end with ``value`` to a multiple of ``C``."""
    dim = dim % x.dim()
    missing = (-x.shape[dim]) % C
    if missing == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, missing]
    return F.pad(x, pad, value=value)


def split_chunks(x: torch.Tensor, C: int, dim: int = 1) -> torch.Tensor:
    """View axis ``dim`` (length a multiple of ``C``) as ``(N, C)``."""
    dim = dim % x.dim()
    n = x.shape[dim]
    if n % C:
        raise ValueError(f"split_chunks: axis {dim} has length {n}, not a multiple of the chunk size {C}")
    return x.unflatten(dim, (n // C, C))


def merge_chunks(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Merge axes ``dim`` and ``dim + 1`` (chunks, positions) back into one time axis."""
    dim = dim % x.dim()
    return x.flatten(dim, dim + 1)


def causal_mask(C: int, device=None, diagonal: int = 0) -> torch.Tensor:
    """Bool ``[C, C]`` lower-triangular mask (row t, column s): True where ``s <= t + diagonal``."""
    return torch.ones(C, C, dtype=torch.bool, device=device).tril(diagonal)


def masked_exp_diff(x_t: torch.Tensor, x_s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``exp(x_t - x_s)`` where ``mask`` is True and 0 elsewhere (broadcasting).

    The masked entries are replaced by ``-inf`` *before* the exponential, so no positive exponent
    from the masked region can overflow, and their gradient is exactly zero.
    """
    diff = x_t - x_s
    return torch.exp(torch.where(mask, diff, torch.full_like(diff, float("-inf"))))
