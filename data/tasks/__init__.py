"""Synthetic tasks that serve both as training data (``data.source.kind: task``) and as the
in-context-learning evaluation suite (``lm eval icl``)."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Type

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.tasks.base import Task, TaskSpec, rng_for
from data.tasks.forecast import Forecast
from data.tasks.formal import FormalLanguage
from data.tasks.mqar import MQAR
from data.tasks.recall import AssociativeRecall, Induction
from data.tasks.regression import ICLRegression, LSATeacher, one_step_gd_loss

TASKS: Dict[str, Type[Task]] = {
    cls.name: cls for cls in (AssociativeRecall, Induction, ICLRegression, LSATeacher, FormalLanguage, MQAR, Forecast)
}


def build_task(name: str, params: Optional[Mapping[str, Any]] = None, prefix: str = "data.task") -> Task:
    """A task by name with validated parameters (unknown keys and names suggest the closest)."""
    from lm.errors import ConfigError, did_you_mean

    if name not in TASKS:
        raise ConfigError(f"{prefix}.name: unknown task '{name}'{did_you_mean(name, TASKS)}; known: {', '.join(TASKS)}")
    cls = TASKS[name]
    node = OmegaConf.structured(cls.Options)
    try:
        node = OmegaConf.merge(node, dict(params or {}))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        fields = [f.name for f in dataclasses.fields(cls.Options)]
        leaf = key.rpartition(".")[2]
        if leaf and leaf not in fields:
            raise ConfigError(
                f"{prefix}.params.{key}: unknown parameter of task '{name}'{did_you_mean(leaf, fields)}; "
                f"parameters: {', '.join(fields)}"
            ) from None
        raise ConfigError(f"{prefix}.params.{key}: {(getattr(e, 'msg', None) or str(e)).splitlines()[0]}") from None
    return cls(OmegaConf.to_object(node))


__all__ = ["TASKS", "Task", "TaskSpec", "build_task", "one_step_gd_loss", "rng_for"]


def task_from_config(data_cfg: Mapping[str, Any]) -> Task:
    """The task of a (resolved) ``data`` config section whose source kind is ``task``."""
    task = data_cfg["task"]
    return build_task(str(task["name"]), task.get("params") or {})
