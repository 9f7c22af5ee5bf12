"""Document boundaries inside a batch of windows: per-document state reset (``data.packing: reset``).

A batch ``x [B, T, ...]`` whose rows hold several documents runs as ONE packed row of ``B*T`` steps
cut at every row start and every document start, the kernels' ``cu_seqlens`` (fla's convention)::

    starts [B, T] (True at a document's first token)  ->  segments n = 0 .. N-1 of the flat row
    cu_seqlens = [0, ..., b*T (every row start), b*T + t (every start with t > 0), ..., B*T]

Segment ``n`` of the flat row is ``x.reshape(1, B*T, ...)[:, cu[n]:cu[n+1]]``. A row's first segment
*continues* the row's state (the carried state of a long stream, or the fresh state) unless the row
itself begins with a document start; every other segment begins a document and starts from the fresh
state. Each row's state after the window is the final state of its last segment.

Building a :class:`Segments` reads the starts on the host once (one device synchronisation per forward
on a GPU, as fla's varlen path does); every layer of the pass shares it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Tuple

import torch


@dataclass(frozen=True, eq=False)
class Segments:
    """The packed layout of one forward pass (build with :meth:`from_starts`).

    starts: bool [B, T]; cu_seqlens: int32 [N+1] (device); offsets: the same on the host;
    row_first / row_last: int64 [B], each row's first and last segment; continues: bool [B], whether
    row b's first segment carries the row's state; position: int64 [B, T], steps since the start of the
    token's segment (0 at a row start or a document start).
    """

    starts: torch.Tensor
    cu_seqlens: torch.Tensor
    offsets: Tuple[int, ...]
    row_first: torch.Tensor
    row_last: torch.Tensor
    continues: torch.Tensor
    position: torch.Tensor

    @classmethod
    def from_starts(cls, starts: torch.Tensor) -> "Segments":
        """starts: bool [B, T] (True where a document starts) -> the packed layout."""
        if starts.dim() != 2 or starts.dtype != torch.bool:
            raise ValueError(
                f"document starts: expected a bool tensor [B, T], got {starts.dtype} {tuple(starts.shape)}"
            )
        B, T = starts.shape
        device = starts.device
        cut = starts.clone()
        cut[:, 0] = True  # every row starts a segment
        flat = cut.reshape(-1)
        begins = torch.nonzero(flat).flatten()  # [N] flat index of each segment's first step
        total = torch.tensor([B * T], device=device, dtype=begins.dtype)
        cu = torch.cat([begins, total]).to(torch.int32)
        offsets = tuple(int(v) for v in cu.tolist())
        seg_of_step = torch.cumsum(flat.to(torch.int64), 0) - 1  # [B*T] segment of each step
        rows = torch.arange(B, device=device)
        row_first = seg_of_step[rows * T]
        row_last = seg_of_step[rows * T + T - 1]
        steps = torch.arange(T, device=device).expand(B, T)
        last_cut = torch.cummax(torch.where(cut, steps, torch.zeros_like(steps)), dim=1).values
        return cls(
            starts=starts,
            cu_seqlens=cu,
            offsets=offsets,
            row_first=row_first,
            row_last=row_last,
            continues=~starts[:, 0],
            position=steps - last_cut,
        )

    # ------------------------------------------------------------------------------ layout
    @property
    def batch_size(self) -> int:
        return self.starts.shape[0]

    @property
    def seq_len(self) -> int:
        return self.starts.shape[1]

    @property
    def num_segments(self) -> int:
        return len(self.offsets) - 1

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [1, B*T, ...] (the kernels' packed row)."""
        return x.reshape(1, x.shape[0] * x.shape[1], *x.shape[2:])

    def unpack(self, y: torch.Tensor) -> torch.Tensor:
        """[1, B*T, ...] -> [B, T, ...]."""
        return y.reshape(self.batch_size, self.seq_len, *y.shape[2:])

    # ------------------------------------------------------------------------------- states
    def initial_state(self, state: Any, fresh: Callable[[int], Any]) -> Any:
        """The per-segment initial state [N, ...] (a tensor or a tuple of tensors): row b's ``state``
        (leading B) at its first segment when the row continues, ``fresh(N)`` everywhere else.
        ``state=None`` means every row starts fresh."""
        init = fresh(self.num_segments)
        if state is None:
            return init
        if isinstance(init, (tuple, list)):
            return tuple(self._scatter_rows(i, s) for i, s in zip(init, state))
        return self._scatter_rows(init, state)

    def _scatter_rows(self, init: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        if state.shape[0] != self.batch_size:
            raise ValueError(f"state: leading dim {state.shape[0]} != batch size {self.batch_size}")
        keep = self.continues.view(-1, *([1] * (state.dim() - 1)))
        rows = torch.where(keep, state.to(init.dtype), init[self.row_first])
        return init.index_copy(0, self.row_first, rows)

    def final_state(self, finals: Any) -> Any:
        """Per-segment final states [N, ...] -> each row's state after the window [B, ...]."""
        if finals is None:
            return None
        if isinstance(finals, (tuple, list)):
            return tuple(f[self.row_last] for f in finals)
        return finals[self.row_last]

    # ------------------------------------------------------------------------- local context
    def same_document(self, lag: int) -> torch.Tensor:
        """bool [B, T]: True where the input ``lag`` steps back (in this window or, for a continuing
        row's first segment, in the carried history) belongs to the token's document."""
        within = self.position >= lag
        if lag == 0:
            return within
        first_segment = self.position == torch.arange(self.seq_len, device=self.position.device)
        return within | (first_segment & self.continues[:, None])

    def same_document_after(self, lag: int) -> torch.Tensor:
        """bool [B]: True where the input ``lag`` steps before the token after the window (t = T, the
        next window's first token) belongs to the row's last document (a carried history, e.g.
        :class:`~lm.models.layers.ShortConv`'s, keeps only those inputs)."""
        pos = self.position[:, -1] + 1  # the position the next token would have in the last document
        first_segment = pos == self.seq_len
        return (pos >= lag) | (first_segment & self.continues)

    def has_starts(self) -> bool:
        """Whether any document starts in the window (at any position, 0 included): a host read."""
        return self.num_segments > self.batch_size or bool(self.starts[:, 0].any())

    def last_lengths(self) -> Tuple[int, ...]:
        """The length of each row's last segment (host ints, from :attr:`offsets`, no device read)."""
        T, lengths, n = self.seq_len, [], 0
        for b in range(self.batch_size):
            end = (b + 1) * T
            while self.offsets[n + 1] < end:
                n += 1
            lengths.append(end - self.offsets[n])
            n += 1
        return tuple(lengths)

    def document_id(self) -> torch.Tensor:
        """int64 [B, T]: the segment index (0 .. N-1) of every token."""
        flat = torch.zeros(self.batch_size * self.seq_len, dtype=torch.int64, device=self.starts.device)
        flat[self.cu_seqlens[1:-1].long()] += 1
        return torch.cumsum(flat, 0).view(self.batch_size, self.seq_len)
