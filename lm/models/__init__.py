"""The model zoo: one skeleton (:mod:`.lm`), shared blocks (:mod:`.layers`), one file per
token-mixer family with its equations, and a registry by family/variant name (:mod:`.registry`).
"""

from lm.models import aaren, fwp, gated_rnn, linear_attention, lstm, rwkv, transformer  # noqa: F401  (register)
from lm.models.lm import LanguageModel, as_model_config
from lm.models.registry import FAMILIES, get_family, resolve_options, validate_model_config


def build_model(cfg) -> LanguageModel:
    """A :class:`LanguageModel` from a model config (dataclass, DictConfig or dict)."""
    return LanguageModel(cfg)


def all_variants():
    """[(family, variant)] for every registered mixer."""
    return [(name, v) for name, spec in sorted(FAMILIES.items()) for v in spec.variants]


__all__ = [
    "FAMILIES",
    "LanguageModel",
    "all_variants",
    "as_model_config",
    "build_model",
    "get_family",
    "resolve_options",
    "validate_model_config",
]
