"""The state carried from one training step to the next (``train.state_passing``, truncated BPTT).

Each batch row reads consecutive windows of its own stream (:class:`data.sampler.StreamBatchSampler`).
After a step the model's final state per row is kept, detached; the next step starts row ``b`` from it
when that row's window follows the previous one (``index[b] == previous_index[b] + 1``), and from the
fresh state otherwise (a stream's wrap, a new epoch, the first step). Gradients never cross a step.

In checkpoints the states of all ranks are gathered (every rank calls ``on_save_checkpoint``) and
stored with the window indices, ``{"index": [W, B], "state": tree of [W, B, ...]}``; each rank takes
its own row block back on resume, so a resumed run continues bit-exactly.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
from torch.utils._pytree import tree_map


def _detach(tree: Any) -> Any:
    return tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, tree)


def _select_rows(state: Any, fresh: Any, keep: torch.Tensor) -> Any:
    """Per leaf: ``state`` where ``keep`` [B] else ``fresh`` (a fresh None leaf reads as zeros)."""
    if isinstance(state, dict):
        return {k: _select_rows(v, None if fresh is None else fresh.get(k), keep) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        fresh = fresh if fresh is not None else [None] * len(state)
        return type(state)(_select_rows(s, f, keep) for s, f in zip(state, fresh))
    if not isinstance(state, torch.Tensor):
        return state
    base = torch.zeros_like(state) if fresh is None else fresh.to(state.dtype).expand_as(state)
    return torch.where(keep.view(-1, *([1] * (state.dim() - 1))), state, base)


class CarriedState:
    """The detached model state of this rank's batch rows and the windows it ended with."""

    def __init__(self) -> None:
        self.state: Any = None
        self.index: Optional[torch.Tensor] = None

    def reset(self) -> None:
        self.state, self.index = None, None

    def start(self, index: torch.Tensor, fresh: Callable[[int], Any]) -> Any:
        """The state to start the batch of windows ``index`` [B] from (None: all rows fresh)."""
        if self.state is None or self.index is None or self.index.shape != index.shape:
            return None
        keep = index.to(self.index.device) == self.index + 1
        if bool(keep.all()):
            return self.state
        if not bool(keep.any()):
            return None
        return _select_rows(self.state, fresh(index.shape[0]), keep.to(index.device))

    def update(self, state: Any, index: torch.Tensor) -> None:
        self.state, self.index = _detach(state), index.detach().clone()

    # ------------------------------------------------------------------------------ checkpoint
    def gathered(self, all_gather: Callable[[Any], Any], world_size: int) -> Optional[Dict[str, Any]]:
        """All ranks' states ``{"index": [W, B], "state": [W, B, ...] leaves}`` on the CPU (a collective:
        every rank must call it), or None before the first step."""
        if self.state is None:
            return None
        tree = {"index": self.index, "state": self.state}
        full = (
            all_gather(tree)
            if world_size > 1
            else tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, tree)
        )
        return tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, full)

    def load(self, saved: Optional[Dict[str, Any]], rank: int, device: torch.device) -> None:
        """Take this rank's rows of a :meth:`gathered` record."""
        if saved is None:
            self.reset()
            return
        rows = tree_map(lambda t: t[rank].to(device) if isinstance(t, torch.Tensor) else t, saved)
        self.state, self.index = rows["state"], rows["index"]
