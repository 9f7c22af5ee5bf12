"""Learning-rate schedules (``train.schedule``), as a factor of the peak learning rate per optimizer step.

* ``cosine``: linear warmup, then cosine decay to ``min_lr_ratio * lr`` at max_steps;
* ``wsd`` (warmup-stable-decay): linear warmup, the peak lr held constant, then a linear decay to
  ``min_lr_ratio * lr`` over the last ``decay_fraction`` of max_steps.
"""

from __future__ import annotations

import math


def lr_multiplier(
    step: int,
    warmup_steps: int,
    max_steps: int,
    min_lr_ratio: float,
    schedule: str = "cosine",
    decay_fraction: float = 0.2,
) -> float:
    """Factor applied to the peak learning rate at optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if max_steps <= warmup_steps:
        return 1.0
    if schedule == "wsd":
        # the decay stage: the last decay_fraction of max_steps, never reaching into the warmup
        decay_steps = min(max_steps - warmup_steps, int(round(decay_fraction * max_steps)))
        decay_start = max_steps - decay_steps
        if decay_steps <= 0 or step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / decay_steps)
        return 1.0 - (1.0 - min_lr_ratio) * progress
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
