"""From a validated config to the one typed, frozen :class:`~lm.config.schema.ExperimentConfig` of a run.

The loader composes and validates a ``DictConfig``; a few fields depend on the data and are filled
here, once, before anything else sees the config:

* a corpus: ``model.vocab_size: 0`` takes the tokenizer's size rounded up to a multiple of 64
  (:func:`resolve_vocab`);
* a synthetic task: the model's input side (``model.vocab_size`` of a token task, or
  ``model.input_dim`` of a continuous one), ``model.output_dim`` (continuous or multilabel outputs)
  and ``data.task_output`` (the task's output kind) from the task's spec.

:func:`resolve` returns the result as dataclass instances frozen by :func:`~lm.config.schema.freeze`
(assigning to a field raises ``dataclasses.FrozenInstanceError``; ``dataclasses.replace`` makes a
copy). The schema classes themselves stay mutable: OmegaConf merges into them while composing, and
``lm.models`` builds its own :class:`ModelConfig` from :func:`to_dict` output. Lists and dicts inside
(``model.mixer``, ``data.task.params``, tags) are plain containers and not frozen.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable, Dict, Mapping, Optional, Union, cast

from omegaconf import DictConfig, OmegaConf

from lm.config.schema import ExperimentConfig, freeze
from lm.errors import ConfigError

Echo = Optional[Callable[[str], None]]


def resolve(cfg: Union[DictConfig, Mapping[str, Any]], data: Any = None, echo: Echo = None) -> ExperimentConfig:
    """The frozen typed config of a run.

    cfg: a validated experiment config (a ``DictConfig``, or a plain dict such as a checkpoint's
    config); it is not modified. data: the run's datamodule, for the data-dependent fields: a
    synthetic task's (with ``.task``) or a corpus's (with ``.vocab_size``); None fills nothing.
    echo: where :func:`resolve_vocab` warns (None: silent).
    """
    node = (
        cast(DictConfig, OmegaConf.merge(OmegaConf.structured(ExperimentConfig), cfg))
        if not isinstance(cfg, DictConfig)
        else copy.deepcopy(cfg)
    )
    task = getattr(data, "task", None)
    if task is not None:
        _fill_task(node, task.spec)
    elif data is not None:
        node.model.vocab_size = resolve_vocab(node, int(data.vocab_size), echo)
    return freeze(OmegaConf.to_object(node))


def resolve_vocab(cfg: Any, data_vocab: int, echo: Echo = None) -> int:
    """model.vocab_size: 0 (every size config's default) takes the tokenizer's size rounded up to 64;
    a fixed size smaller than it is an error, larger than that rounded size a warning (``echo``):
    the extra embedding rows are never trained."""
    v = cfg.model.vocab_size
    rounded = 64 * math.ceil(data_vocab / 64)
    if v == 0:
        return rounded
    if v < data_vocab:
        raise ConfigError(
            f"model.vocab_size ({v}) is smaller than the tokenizer's vocabulary ({data_vocab}) of "
            f"{cfg.data.out_dir}; set model.vocab_size=0 to take it from the data"
        )
    if v > rounded and echo is not None:
        rows = v - data_vocab
        echo(
            f"warning: model.vocab_size={v} exceeds the tokenizer's {data_vocab} tokens of {cfg.data.out_dir}: "
            f"{rows} embedding rows ({rows * cfg.model.d_model:,} parameters per embedding matrix) are never "
            f"trained; model.vocab_size=0 takes the size from the data"
        )
    return v


def _fill_task(cfg: DictConfig, spec: Any) -> None:
    """The model's input/output shapes and ``data.task_output`` from a task's spec."""
    if spec.input_dim:
        cfg.model.input_dim = spec.input_dim
        cfg.model.vocab_size = 0
    else:
        cfg.model.vocab_size = spec.vocab_size
    cfg.model.output_dim = spec.output_dim if spec.output != "classes" else None
    if cfg.data.task_output not in (None, spec.output):
        raise ConfigError(
            f"data.task_output: the task {cfg.data.task.name} outputs {spec.output!r}, not "
            f"{cfg.data.task_output!r} (it is filled from the task: remove the key)"
        )
    cfg.data.task_output = spec.output


def to_dict(cfg: Any) -> Dict[str, Any]:
    """A plain-dict copy of a typed config or section (what checkpoints, loggers and Lightning's
    hyperparameters record)."""
    return dataclasses.asdict(cfg)
