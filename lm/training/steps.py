"""Where a micro-batch falls in gradient accumulation (shared by the training callbacks)."""

from __future__ import annotations


def ends_optimizer_step(trainer, batch_idx: int) -> bool:
    """True when micro-batch ``batch_idx`` is the last one of an optimizer step (accumulation)."""
    accumulate = max(1, int(trainer.accumulate_grad_batches))
    return (batch_idx + 1) % accumulate == 0
