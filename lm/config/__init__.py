"""Typed experiment configs: schema (:mod:`.schema`) and composition/validation (:mod:`.loader`)."""

from lm.config.loader import (
    compose,
    config_root,
    load_data_config,
    load_experiment,
    plain,
    to_yaml,
    validate,
)
from lm.config.resolve import resolve, resolve_vocab, to_dict
from lm.config.schema import (
    CheckpointConfig,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    TrainConfig,
)

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "ExperimentConfig",
    "ModelConfig",
    "TrainConfig",
    "compose",
    "config_root",
    "load_data_config",
    "load_experiment",
    "plain",
    "resolve",
    "resolve_vocab",
    "to_dict",
    "to_yaml",
    "validate",
]
