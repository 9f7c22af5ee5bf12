"""Per-layer mixer inputs and outputs of a model on a probe batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List

import torch

from lm.models.lm import LanguageModel


@dataclass
class LayerIO:
    """The token mixer of one block: its input (after the pre-norm) and output, [B, T, D], and
    its state after the sequence."""

    layer: int
    x: torch.Tensor
    y: torch.Tensor
    state: Any


@torch.no_grad()
def capture_layers(model: LanguageModel, inputs: torch.Tensor) -> List[LayerIO]:
    """Run the model block by block (whole-sequence form, each mixer once) and keep every mixer's
    input, output and final state."""
    h = model.embed(inputs)
    layers = []
    for i, block in enumerate(model.blocks):
        x = block.norm1(h)
        y, state = block.mixer(x, return_state=True)
        layers.append(LayerIO(i, x, y, state))
        h, _ = block.add_mixer_output(h, y)
    return layers
