"""Per-layer mixer inputs and outputs of a model on a probe batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from lm.models.lm import LanguageModel


@dataclass
class LayerIO:
    """The token mixer of one block: its input (after the pre-norm) and output, [B, T, D]."""

    layer: int
    x: torch.Tensor
    y: torch.Tensor


@torch.no_grad()
def capture_layers(model: LanguageModel, inputs: torch.Tensor) -> List[LayerIO]:
    """Run the model block by block (whole-sequence form) and keep every mixer's input/output."""
    h = model.embed(inputs)
    layers = []
    for i, block in enumerate(model.blocks):
        x = block.norm1(h)
        y, _ = block.mixer(x)
        layers.append(LayerIO(i, x, y))
        h, _ = block(h)
    return layers
