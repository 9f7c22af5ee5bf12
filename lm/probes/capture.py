"""Per-layer mixer inputs and outputs of a model on a probe batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

import torch

from lm.models.lm import LanguageModel, layer_shared
from lm.models.mixer import shared_kwargs


@dataclass
class LayerIO:
    """The token mixer of one block: its input (after the pre-norm) and output, [B, T, D], and
    its state after the sequence; ``shared`` is what the mixer read from earlier layers (its
    keyword arguments, e.g. ``{"shared": {"v_first": ...}}`` for RWKV-7's value residual; ``{}``
    for mixers without cross-layer inputs)."""

    layer: int
    x: torch.Tensor
    y: torch.Tensor
    state: Any
    shared: Dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def capture_layers(model: LanguageModel, inputs: torch.Tensor) -> List[LayerIO]:
    """Run the model block by block (whole-sequence form, each mixer once) and keep every mixer's
    input, output and final state. Cross-layer inputs follow the model's rule (one dict per family,
    :func:`~lm.models.lm.layer_shared`), so the layers of a hybrid see what they see in training."""
    h = model.embed(inputs)
    layers = []
    shareds: Dict[str, Dict[str, Any]] = {}
    for i, block in enumerate(model.blocks):
        shared = layer_shared(shareds, block)
        if block.norm0 is not None:
            h = block.norm0(h)
        x, h = block.mixer_inputs(h)
        kwargs = shared_kwargs(block.mixer, shared)
        seen = {"shared": dict(shared)} if kwargs else {}  # before this layer adds to it
        y, state = block.mixer(x, return_state=True, **kwargs)
        layers.append(LayerIO(i, x, y, state, seen))
        h, _ = block.add_mixer_output(h, y)
    return layers
