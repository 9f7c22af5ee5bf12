"""Chunks aligned to sequence starts: the packed-sequence (``cu_seqlens``) layout of the chunked Triton
kernels (``delta_rule``, ``dplr``).

A packed row (B = 1) of N sequences is cut into chunks of at most BT steps that never cross a sequence
boundary: sequence n (steps ``cu[n] <= t < cu[n+1]``) owns chunks ``first[n] <= c < first[n+1]``, chunk c
starting at step ``spans[c, 0] = cu[n] + (c - first[n]) BT`` and reading steps up to ``spans[c, 1] =
cu[n+1]`` (its last chunk is partial; an empty sequence owns none). The kernels' per-chunk fp32 buffers keep
their plain layout ``[H, NT BT, *]`` with NT = the number of chunks: only the last chunk of each sequence
has padded rows, which the kernels treat exactly like the padded tail of an unpacked row (zero inputs, log
decay 0). Built on the host from the offsets read once by validation (:func:`kernels._varlen.check_cu_seqlens`).
"""

from __future__ import annotations

from typing import Sequence

import torch


class ChunkTable:
    """``spans`` (int32 [NT, 2]: first step, end of the sequence), ``first`` (int32 [N+1]: each sequence's
    first chunk), ``NT``, ``N``, ``BT``; ``rows`` (long [NT BT]: the packed step of every buffer row, T
    for padded rows) for the chunk-local cumsums."""

    def __init__(self, offsets: Sequence[int], BT: int, device):
        cu = torch.tensor([int(x) for x in offsets], dtype=torch.long)
        self.N, self.BT, self.T = len(cu) - 1, BT, int(cu[-1])
        chunks = (cu[1:] - cu[:-1] + BT - 1) // BT  # chunks per sequence (0 for an empty one)
        first = torch.cat([cu.new_zeros(1), chunks.cumsum(0)])
        self.NT = int(first[-1])
        seq = torch.repeat_interleave(torch.arange(self.N), chunks)  # [NT]: the sequence of each chunk
        start = cu[seq] + (torch.arange(self.NT) - first[seq]) * BT
        end = cu[seq + 1]
        rows = start[:, None] + torch.arange(BT)[None, :]
        self.rows = torch.where(rows < end[:, None], rows, self.T).reshape(-1).to(device)
        self.spans = torch.stack([start, end], 1).to(torch.int32).to(device)
        self.first = first.to(torch.int32).to(device)

    def cumsum(self, x: torch.Tensor) -> torch.Tensor:
        """Chunk-local inclusive cumsum of x [1, T, H, *rest] -> fp32 [1, H, NT BT, *rest]; padded rows
        repeat their chunk's last value (as :func:`kernels.ops.common.tiles.chunk_cumsum`)."""
        H, rest = x.shape[2], tuple(x.shape[3:])
        xp = torch.cat([x[0].float(), x.new_zeros(1, H, *rest, dtype=torch.float32)], 0)  # row T: zeros
        xc = xp.index_select(0, self.rows).view(self.NT, self.BT, H, *rest).cumsum(1)
        return xc.view(self.NT * self.BT, H, *rest).transpose(0, 1).unsqueeze(0).contiguous()

    def to_steps(self, d: torch.Tensor) -> torch.Tensor:
        """Buffer rows back to the packed steps: d [1, H, NT BT, *rest] -> fp32 [1, T, H, *rest] (padded
        rows dropped)."""
        H, rest = d.shape[1], tuple(d.shape[3:])
        out = d.new_zeros(self.T + 1, H, *rest, dtype=torch.float32)
        out = out.index_add(0, self.rows, d[0].transpose(0, 1).float())
        return out[: self.T].unsqueeze(0)

    def reverse_cumsum(self, d: torch.Tensor) -> torch.Tensor:
        """Adjoint of :meth:`cumsum`: d [1, H, NT BT, *rest] -> fp32 [1, T, H, *rest]."""
        H, rest = d.shape[1], tuple(d.shape[3:])
        dc = d[0].transpose(0, 1).reshape(self.NT, self.BT, H, *rest).flip(1).cumsum(1).flip(1)
        return self.to_steps(dc.reshape(self.NT * self.BT, H, *rest).transpose(0, 1).unsqueeze(0))
