"""Parameter counts on the meta device (no memory is allocated, so 1.3B configs are cheap)."""

from __future__ import annotations

import torch

from lm.models.lm import LanguageModel, as_model_config


def build_on_meta(cfg) -> LanguageModel:
    """The model with parameters on the meta device (shapes only)."""
    with torch.device("meta"):
        return LanguageModel(as_model_config(cfg))


def count_parameters(cfg) -> int:
    """Total parameters of the model a config describes (tied embeddings counted once)."""
    return build_on_meta(cfg).num_parameters()
