"""Time-major row layout of the fused PyTorch loops (``recurrent_delta``, ``srwm``), packed sequences included.

The loops run N sequences at once, one state row per (sequence, head). The sequences are sorted by
length, longest first (stable), so at step ``t`` the sequences still running (length > t) are a prefix
of that order: step t updates the state rows ``[:counts[t]]`` (a view, ``counts[t] = n_t H``) and a row
at or past its length is not touched, which leaves its state equal to its final state. The per-step
inputs and outputs are stored step after step, ``counts[t]`` rows each (``sum(lengths) H`` rows in
all, no padding); ``gather`` / ``scatter`` convert between that layout and the packed one.

Without ``cu_seqlens`` the B batch rows are B sequences of length T (the order is the identity).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch


@dataclass
class StepRows:
    """Index tensors (on the inputs' device) of the time-major layout; see the module docstring."""

    n: int  #: sequences (the state's leading dimension)
    H: int  #: heads: state row ``i H + h`` is sorted sequence i, head h
    counts: List[int]  #: state rows active at each step (non-increasing, multiples of H)
    order: torch.Tensor  #: [n] sorted position -> sequence index
    unorder: torch.Tensor  #: [n] sequence index -> sorted position
    gather: torch.Tensor  #: [steps] time-major position -> packed position (packed = B*T flattened)
    scatter: torch.Tensor  #: [steps] packed position -> time-major position
    prev: torch.Tensor  #: [steps] position of the previous step in cat([initial (n), time-major])
    last: torch.Tensor  #: [n] position of each sorted sequence's last step in cat([initial, time-major])

    @property
    def steps(self) -> int:
        return int(self.gather.numel())

    def to_steps(self, x: torch.Tensor) -> torch.Tensor:
        """Packed per-step tensor [1 or B, T, H, f] -> fp32 time-major rows [steps H, 1, f]."""
        f = x.shape[-1]
        flat = x.reshape(-1, self.H, f)
        return flat.index_select(0, self.gather).float().reshape(-1, 1, f)

    def to_packed(self, rows: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """Time-major rows [steps H, 1, f] -> packed tensor of ``shape`` ([B, T, H, f])."""
        return rows.view(self.steps, self.H, rows.shape[-1]).index_select(0, self.scatter).view(*shape)

    def sort_state(self, x: torch.Tensor) -> torch.Tensor:
        """[n, H, ...] in sequence order -> [n H, ...] rows in sorted order."""
        return x.index_select(0, self.order).reshape(self.n * self.H, *x.shape[2:])

    def unsort_state(self, rows: torch.Tensor) -> torch.Tensor:
        """[n H, ...] rows in sorted order -> [n, H, ...] in sequence order."""
        return rows.reshape(self.n, self.H, *rows.shape[1:]).index_select(0, self.unorder)

    def expand(self, index: torch.Tensor) -> torch.Tensor:
        """A per-(step or sequence) index -> the index of its H rows."""
        return (index.unsqueeze(1) * self.H + torch.arange(self.H, device=index.device)).reshape(-1)


def step_rows(B: int, T: int, H: int, offsets: Optional[Sequence[int]], device) -> StepRows:
    """The layout for B rows of length T (``offsets`` None) or the packed sequences ``offsets`` (cu_seqlens)."""
    if offsets is None:
        starts = torch.arange(B, dtype=torch.long) * T
        lengths = torch.full((B,), T, dtype=torch.long)
    else:
        cu = torch.tensor(list(offsets), dtype=torch.long)
        starts, lengths = cu[:-1], cu[1:] - cu[:-1]
    n = int(lengths.numel())
    order = torch.sort(lengths, descending=True, stable=True).indices
    sorted_len = lengths[order]
    longest = int(sorted_len[0]) if n else 0
    active = sorted_len.unsqueeze(0) > torch.arange(longest).unsqueeze(1)  # [longest, n], prefixes
    per_step = active.sum(1)
    t_idx, i_idx = active.nonzero(as_tuple=True)  # time-major order
    gather = starts[order][i_idx] + t_idx
    scatter = torch.empty_like(gather)
    scatter[gather] = torch.arange(gather.numel())
    # previous step of (t, i): (t - 1, i), n_{t-1} positions earlier; the initial state (i) at t = 0
    step_start = torch.cumsum(per_step, 0) - per_step
    pos = torch.arange(gather.numel())
    prev_step = pos - torch.cat([per_step.new_zeros(1), per_step[:-1]])[t_idx]
    prev = torch.where(t_idx == 0, i_idx, n + prev_step)
    last_pos = (
        step_start[(sorted_len - 1).clamp_min(0)] + torch.arange(n) if longest else torch.zeros(n, dtype=torch.long)
    )
    last = torch.where(sorted_len > 0, n + last_pos, torch.arange(n))
    unorder = torch.empty_like(order)
    unorder[order] = torch.arange(n)
    move = lambda x: x.to(device)  # noqa: E731
    return StepRows(
        n,
        H,
        [int(c) * H for c in per_step.tolist()],
        move(order),
        move(unorder),
        move(gather),
        move(scatter),
        move(prev),
        move(last),
    )
