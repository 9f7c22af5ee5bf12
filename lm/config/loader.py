"""Load, compose, override and validate experiment configs (omegaconf structured configs).

Resolution order, later wins::

    schema defaults  <-  group files named in the experiment's ``defaults:``
                     <-  the experiment file's own keys  <-  command-line ``key=value`` overrides

An experiment file looks like::

    defaults: {data: stdlib, model: gla/small, train: cpu-demo}
    name: main
    train: {max_steps: 300}

On the command line ``model=transformer/small`` swaps a group file, ``train.lr=1e-3`` sets a key.
Every error is a one-line :class:`~lm.errors.ConfigError` naming the file, the full key path and,
for unknown keys or values, the closest valid ones.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, cast

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from lm.config.schema import GROUPS, DataConfig, ExperimentConfig, choices
from lm.errors import ConfigError, did_you_mean

#: allowed values of enumerated string keys (key path relative to the experiment root), declared on the
#: schema's fields (:func:`lm.config.schema.choice`)
CHOICES: Dict[str, Tuple[str, ...]] = choices(ExperimentConfig)

#: checks that need more than the schema (registered by lm.models, lm.training, ...):
#: each takes the merged experiment DictConfig and raises ConfigError
VALIDATORS: List[Callable[[DictConfig], None]] = []


def config_root() -> Path:
    """The ``configs/`` directory: ``$LM_CONFIG_DIR``, else ``./configs``, else the repository's."""
    env = os.environ.get("LM_CONFIG_DIR")
    if env:
        return Path(env)
    local = Path.cwd() / "configs"
    if (local / "experiment").is_dir():
        return local
    return Path(__file__).resolve().parents[2] / "configs"


def available(group: str) -> List[str]:
    """Names of the YAML files under ``configs/<group>/`` (sub-directories give ``a/b`` names)."""
    root = config_root() / group
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def find_config(group: str, name: str) -> Path:
    """Resolve ``name`` (a file path, or a name under ``configs/<group>/``) to a YAML path."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml"):
        if candidate.is_file():
            return candidate
        raise ConfigError(f"config file not found: {name}")
    path = config_root() / group / f"{name}.yaml"
    if path.is_file():
        return path
    known = available(group)
    hint = _suggest(name, known)
    raise ConfigError(
        f"unknown {group} config '{name}'{hint}; known: {', '.join(known) or '(none)'}"
        + (f" (or a prepared corpus: {PREPARED_ROOT}/<name> or its directory)" if group == "data" else "")
    )


#: where ``data=<name>`` looks for a prepared corpus when ``configs/data/<name>.yaml`` does not exist
PREPARED_ROOT = Path("artifacts") / "data"


def prepared_data_config(name: str) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """``data=<name or directory>`` naming a prepared corpus: (its ``metadata.json``, the data config
    stored there, with ``out_dir`` set to where it lies), or None when ``name`` is a data config
    file under ``configs/data/`` or no prepared corpus of that name exists (``artifacts/data/<name>``
    or the directory ``name``)."""
    import json

    if (config_root() / "data" / f"{name}.yaml").is_file() or Path(name).suffix in (".yaml", ".yml"):
        return None
    for directory in (Path(name), PREPARED_ROOT / name):
        meta = directory / "metadata.json"
        if not meta.is_file():
            continue
        try:
            stored = json.loads(meta.read_text(encoding="utf-8")).get("config")
        except (OSError, ValueError) as e:
            raise ConfigError(f"data={name}: cannot read {meta} ({e})") from None
        if not isinstance(stored, dict):
            raise ConfigError(
                f"data={name}: {meta} holds no data config (prepared by an older version? prepare "
                f"it again with lm data prepare)"
            )
        return meta, {**stored, "out_dir": str(directory)}
    return None


def _suggest(word: str, options: Iterable[str]) -> str:
    """:func:`lm.errors.did_you_mean` at the config's cutoff (0.5; lm.models.registry uses it too)."""
    return did_you_mean(word, options, cutoff=0.5)


def _read_yaml(path: Path) -> Dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _merge(base: DictConfig, update: Any, source: str, prefix: str = "") -> DictConfig:
    """``OmegaConf.merge`` with its errors turned into one line naming ``source`` and the key."""
    try:
        return cast(DictConfig, OmegaConf.merge(base, update))  # merging into a DictConfig gives one
    except OmegaConfBaseException as e:
        raise _config_error(e, base, source, prefix) from None
    except TypeError as e:  # OmegaConf: a dotted key into a list (data.sources.0.weight=2) gives a dict
        raise ConfigError(
            f"{source}: cannot merge {OmegaConf.to_yaml(update).strip()!r} ({e}); set a list whole: key=[...]"
        )


def _config_error(e: OmegaConfBaseException, base: DictConfig, source: str, prefix: str = "") -> ConfigError:
    key = getattr(e, "full_key", None) or ""
    full = f"{prefix}{key}" if key else prefix.rstrip(".")
    if isinstance(e, ConfigKeyError):
        parent_path, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(base, parent_path) if parent_path else base
        options = cast(List[str], list(parent.keys())) if isinstance(parent, DictConfig) else []
        return ConfigError(f"{source}: unknown key '{full}'{_suggest(leaf, options)}")
    msg = getattr(e, "msg", None) or str(e).splitlines()[0]
    return ConfigError(f"{source}: {full}: {msg.splitlines()[0]}")


def parse_overrides(overrides: Sequence[str]) -> Tuple[Dict[str, str], List[str]]:
    """Split ``key=value`` strings into group selections (``model=gla/small``) and key overrides."""
    groups: Dict[str, str] = {}
    keys: List[str] = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        if key in GROUPS:
            groups[key] = value
        else:
            keys.append(f"{key}={value}")
    return groups, keys


def _apply_dotlist(cfg: DictConfig, dotlist: Sequence[str], source: str) -> DictConfig:
    for item in dotlist:
        try:
            update = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as e:
            raise ConfigError(f"{source}: cannot parse override '{item}': {e}") from None
        cfg = _merge(cfg, update, source)
    return cfg


def compose(experiment: Optional[str], overrides: Sequence[str] = ()) -> Tuple[DictConfig, List[str]]:
    """Compose an experiment (a name under ``configs/experiment/``, a path, or None for defaults).

    Returns the merged config (not yet validated) and the list of files read, in order.
    """
    cfg = OmegaConf.structured(ExperimentConfig)
    sources: List[str] = []
    body: Dict[str, Any] = {}
    defaults: Dict[str, str] = {}
    exp_path: Optional[Path] = None
    if experiment:
        exp_path = find_config("experiment", experiment)
        body = _read_yaml(exp_path)
        defaults = body.pop("defaults", None) or {}
        if not isinstance(defaults, dict):
            raise ConfigError(f"{exp_path}: 'defaults' must map group names to config names")
        for group in defaults:
            if group not in GROUPS:
                raise ConfigError(
                    f"{exp_path}: unknown config group '{group}' in defaults"
                    f"{_suggest(group, GROUPS)}; known: {', '.join(GROUPS)}"
                )
    group_choice, dotlist = parse_overrides(overrides)
    defaults = {**defaults, **group_choice}
    for group, name in defaults.items():
        prepared = prepared_data_config(str(name)) if group == "data" else None
        if prepared is not None:
            cfg = _merge(cfg, {group: prepared[1]}, str(prepared[0]))
            sources.append(str(prepared[0]))
            continue
        path = find_config(group, str(name))
        cfg = _merge(cfg, {group: _read_yaml(path)}, str(path))
        sources.append(str(path))
    if exp_path is not None:
        cfg = _merge(cfg, body, str(exp_path))
        sources.append(str(exp_path))
        if "name" not in body:
            cfg.name = Path(experiment).stem if experiment else cfg.name
    cfg = _apply_dotlist(cfg, dotlist, "command line")
    return cfg, sources


def check_choices(cfg: DictConfig, prefix: str = "") -> None:
    """Reject enumerated string values outside :data:`CHOICES`."""
    for key, options in CHOICES.items():
        if prefix:
            if not key.startswith(prefix):
                continue
            rel = key[len(prefix) :]
        else:
            rel = key
        value = OmegaConf.select(cfg, rel, default=None)
        if value is None:
            continue
        if str(value) not in options:
            raise ConfigError(
                f"{key}: invalid value '{value}'{_suggest(str(value), options)}; choose one of: {', '.join(options)}"
            )


def check_ranges(cfg: DictConfig) -> None:
    """Value checks the schema's types cannot express."""
    positive = [
        "model.d_model",
        "model.n_layers",
        "model.n_heads",
        "train.seq_len",
        "train.micro_batch_size",
        "train.accumulate_grad_batches",
        "train.max_steps",
        "checkpoint.keep_last",
        "data.tokenizer.vocab_size",
    ]
    for key in positive:
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value <= 0:
            raise ConfigError(f"{key}: must be > 0, got {value}")
    nonneg = [
        "train.warmup_steps",
        "train.weight_decay",
        "train.grad_clip",
        "train.lr",
        "checkpoint.every_n_steps",
        "probes.every_n_steps",
        "train.devices",
        "train.threads",
    ]
    for key in nonneg:
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value}")
    lr = OmegaConf.select(cfg, "train.lr", default=None)
    if lr is not None and lr == 0:
        raise ConfigError("train.lr: 0 would train nothing (the weights never change); set a positive learning rate")
    regex = OmegaConf.select(cfg, "data.source.split_regex", default=None)
    if regex is not None and OmegaConf.select(cfg, "data.source.split_by", default=None) == "regex":
        import re

        try:
            re.compile(str(regex))
        except re.error as e:
            raise ConfigError(f"data.source.split_regex: invalid regular expression {regex!r} ({e})") from None
    invalid = OmegaConf.select(cfg, "data.source.max_invalid_utf8", default=None)
    if invalid is not None and not 0 <= invalid <= 1:
        raise ConfigError(f"data.source.max_invalid_utf8: must be in [0, 1], got {invalid}")
    for key in ("data.validation_fraction", "data.test_fraction"):
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not 0 <= value < 1:
            raise ConfigError(f"{key}: must be in [0, 1), got {value}")
    v = OmegaConf.select(cfg, "data.validation_fraction", default=0) or 0
    t = OmegaConf.select(cfg, "data.test_fraction", default=0) or 0
    if v + t >= 1:
        raise ConfigError(f"data.validation_fraction + data.test_fraction must be < 1, got {v + t}")
    decay = OmegaConf.select(cfg, "train.decay_fraction", default=None)
    if decay is not None and not 0 <= decay <= 1:
        raise ConfigError(f"train.decay_fraction: must be in [0, 1], got {decay}")
    init_from = OmegaConf.select(cfg, "init_from", default=None)
    resume = OmegaConf.select(cfg, "resume", default=None)
    # resume=auto (lm submit, requeues) starts from init_from until the run has a checkpoint of its own
    if init_from not in (None, "", "none", "None") and resume not in (None, "", "none", "null", "None", "auto"):
        raise ConfigError(
            f"init_from={init_from} starts a new run from those weights and resume={resume} continues a run; "
            f"set only one of them"
        )
    stage = OmegaConf.select(cfg, "train.zero_stage", default=None)
    if stage is not None and stage not in (1, 2, 3):
        raise ConfigError(f"train.zero_stage: must be 1, 2 or 3, got {stage}")
    if (
        OmegaConf.select(cfg, "train.strategy", default=None) == "deepspeed"
        and OmegaConf.select(cfg, "train.offload_params", default=False)
        and stage != 3
    ):
        raise ConfigError("train.offload_params needs train.zero_stage=3")


def validate(cfg: DictConfig) -> DictConfig:
    """Run every check: enumerations, ranges, then registered validators (model families, ...)."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise _config_error(e, cfg, "config") from None
    check_choices(cfg)
    check_ranges(cfg)
    _load_validators()
    for fn in VALIDATORS:
        fn(cfg)
    return cfg


def _check_task(cfg: DictConfig) -> None:
    """A synthetic task's name and parameters (only when ``data.source.kind`` is ``task``)."""
    if OmegaConf.select(cfg, "data.source.kind", default=None) != "task":
        return
    from data.tasks import build_task

    build_task(str(cfg.data.task.name), plain(cfg.data.task.params))


VALIDATORS.append(_check_task)


def _check_state_passing(cfg: DictConfig) -> None:
    """``train.state_passing`` needs corpus windows and a family whose state has a constant size."""
    if not OmegaConf.select(cfg, "train.state_passing", default=False):
        return
    if OmegaConf.select(cfg, "data.source.kind", default=None) == "task":
        raise ConfigError("train.state_passing: needs a corpus (data.source.kind: task gives independent examples)")
    import lm.models  # noqa: F401  (registers the families)
    from lm.models.registry import constant_state, model_name

    if not constant_state(cfg.model):  # a hybrid: any attention layer
        raise ConfigError(
            f"train.state_passing: model {model_name(cfg.model)} carries a state that grows with the "
            f"context (a KV cache); state passing is for constant-state families"
        )


VALIDATORS.append(_check_state_passing)


def _load_validators() -> None:
    """Import the packages that register validators (kept lazy: configs load without torch)."""
    import importlib

    for module in ("lm.models",):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:  # only tolerate the module itself being absent
            if e.name != module:
                raise


def load_experiment(experiment: Optional[str], overrides: Sequence[str] = ()) -> DictConfig:
    """Compose and validate an experiment config (see module docstring)."""
    cfg, _ = compose(experiment, overrides)
    return validate(cfg)


def load_data_config(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """A ``data`` section on its own, for ``lm data prepare <data-config> [key=value ...]``.

    Overrides may be written relative to the section (``tokenizer.vocab_size=4096``) or in full
    (``data.tokenizer.vocab_size=4096``).
    """
    path = find_config("data", name)
    cfg = OmegaConf.structured(DataConfig)
    cfg = _merge(cfg, _read_yaml(path), str(path), prefix="data.")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        key = key.strip().removeprefix("data.")
        try:
            update = OmegaConf.from_dotlist([f"{key}={value}"])
        except OmegaConfBaseException as e:
            raise ConfigError(f"command line: cannot parse override '{item}': {e}") from None
        cfg = _merge(cfg, update, "command line", prefix="data.")
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise _config_error(e, cfg, str(path), prefix="data.") from None
    check_choices(cfg, prefix="data.")
    check_ranges(OmegaConf.create({"data": resolved}))
    return cfg


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (interpolations substituted): a ``DictConfig`` or a typed config
    (:func:`lm.config.resolve.resolve`), the same text for both."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(cfg)))
    return OmegaConf.to_yaml(cfg, resolve=True)


def plain(cfg: Any) -> Any:
    """A resolved plain-Python copy (dicts and lists) of a config node or a typed section."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return dataclasses.asdict(cfg)
    return cfg
