"""Helpers shared by the chunked PyTorch paths (``kernels/ops/*/torch_chunk.py``).

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
- ``chunk_length(T, chunk, power_of_two=False)``: the chunk length for a sequence of T steps:
  ``chunk`` for long inputs, ``T`` for short ones (rounded up to a power of two if asked).
- ``empty_result(q, v, initial_state, output_final_state)``: the result of a length-0 sequence for
  the ops with a matrix state [B, H, K, V] (delta_rule, dplr, gla).
- ``default_segment(device, cpu_tokens)`` and ``run_in_segments(pass_fn, tensors, S, segment, ...)``:
  on CPU long inputs run in passes of ``cpu_tokens`` steps with the state carried between them.
- ``to_chunks(x, C)`` / ``from_chunks(x, T)`` / ``per_chunk(x)``: the chunk-major layout of ``delta_rule`` and
  ``dplr``: a time-major input ``[B, T, H, *rest]`` as fp32 chunks ``[N, B, H, C, *rest]`` (T zero-padded to
  ``N * C``; chunk-major so that the state-passing loop reads contiguous slices), back for an output
  ``[N, B, H, C, V]``, and per-chunk views. Zero padding (k = v = beta = a = b = 0, g = 0) leaves the final
  state of both ops unchanged.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

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


def chunk_length(T: int, chunk: int, power_of_two: bool = False) -> int:
    """``chunk`` for long inputs, else ``T`` (at least 1); with ``power_of_two`` the result is then
    rounded up to the smallest power of two (ops whose chunk algorithm needs one)."""
    C = min(chunk, max(1, T))
    if power_of_two:
        return 1 if C <= 1 else 1 << (C - 1).bit_length()
    return C


def empty_result(q: torch.Tensor, v: torch.Tensor, initial_state, output_final_state: bool, n_states=None):
    """(output [B, 0, H, V], final state) of a length-0 sequence: the state passes through unchanged
    (``n_states``: the leading dim of the states when not B, N packed sequences that are all empty)."""
    B, _, H, K = q.shape
    V = v.shape[-1]
    N = B if n_states is None else n_states
    S = initial_state.float() if initial_state is not None else q.new_zeros(N, H, K, V, dtype=torch.float32)
    return q.new_zeros(B, 0, H, V), (S if output_final_state else None)


def default_segment(device: torch.device, cpu_tokens: int) -> Optional[int]:
    """Tokens per pass: ``cpu_tokens`` on CPU (cache-sized temporaries, so the cost per token stays
    flat in T), None (one pass) elsewhere."""
    return cpu_tokens if device.type == "cpu" else None


def run_in_segments(
    pass_fn: Callable[..., Tuple[torch.Tensor, torch.Tensor]],
    tensors: Sequence[Optional[torch.Tensor]],
    S: torch.Tensor,
    segment: Optional[int],
    time_dim: int = 1,
    out_dim: int = 1,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``pass_fn(*tensors, S) -> (o, S)`` over the whole input, or over pieces of ``segment`` steps
    along ``time_dim`` of every tensor (None entries stay None) with the state carried from one
    piece to the next, the outputs concatenated along ``out_dim``. ``segment`` None: one pass."""
    T = next(x for x in tensors if x is not None).shape[time_dim]
    if segment is None or T <= segment:
        return pass_fn(*tensors, S)
    # torch.split: its backward is one concatenation (slicing would zero-fill per piece)
    n = -(-T // segment)
    pieces = [torch.split(x, segment, time_dim) if x is not None else [None] * n for x in tensors]
    outs = []
    for piece in zip(*pieces):
        o, S = pass_fn(*piece, S)
        outs.append(o)
    return torch.cat(outs, out_dim), S


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
