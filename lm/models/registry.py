"""Registry of token-mixer families and their variants, and the model-config validator.

A family registers its mixer class with a dataclass of options and a preset of options per
variant::

    @register("linear_attention", LinearAttentionOptions,
              variants={"gla": {...}, "deltanet": {...}}, default_variant="gla")
    class LinearAttention(TokenMixer): ...

``model.mixer`` in a config overrides the variant's preset; unknown option keys are rejected
with the full key path and a suggestion.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lm.config.loader import _suggest
from lm.errors import ConfigError


@dataclass
class FamilySpec:
    name: str
    mixer: type
    options: type
    variants: Dict[str, Dict[str, Any]]
    default_variant: str
    doc: str = ""
    aliases: List[str] = field(default_factory=list)


FAMILIES: Dict[str, FamilySpec] = {}


def register(
    name: str,
    options: type,
    variants: Optional[Dict[str, Dict[str, Any]]] = None,
    default_variant: Optional[str] = None,
) -> Callable[[type], type]:
    """Class decorator adding a token-mixer family to :data:`FAMILIES`."""

    def wrap(cls: type) -> type:
        table = variants or {name: {}}
        FAMILIES[name] = FamilySpec(
            name=name,
            mixer=cls,
            options=options,
            variants=table,
            default_variant=default_variant or next(iter(table)),
            doc=(cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "",
        )
        return cls

    return wrap


def get_family(name: str) -> FamilySpec:
    if name not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        raise ConfigError(f"model.family: unknown family '{name}'{_suggest(name, FAMILIES)}; known: {known}")
    return FAMILIES[name]


def resolve_variant(family: str, variant: Optional[str]) -> str:
    spec = get_family(family)
    if variant is None or variant == "":
        return spec.default_variant
    if variant not in spec.variants:
        known = ", ".join(spec.variants)
        raise ConfigError(
            f"model.variant: unknown variant '{variant}' of family '{family}'"
            f"{_suggest(variant, spec.variants)}; known: {known}"
        )
    return variant


def model_name(model_cfg: Any) -> str:
    """``family/variant`` with the family's default variant filled in (e.g. ``transformer/transformer``):
    the one name training, evaluation, probes and plots print for a model config (mapping or object).
    A hybrid (``model.layers``) is ``hybrid[family/variant:count,...]`` (:func:`lm.models.hybrid.layers_name`)."""
    from lm.models.hybrid import is_hybrid, layers_name, resolve_layers

    if is_hybrid(model_cfg):
        return layers_name(resolve_layers(model_cfg))
    get = model_cfg.get if hasattr(model_cfg, "get") else (lambda key: getattr(model_cfg, key, None))
    family = str(get("family"))
    return f"{family}/{resolve_variant(family, get('variant'))}"


def constant_state(model_cfg: Any) -> bool:
    """True when every layer's state has a constant size (no KV cache in any layer)."""
    from lm.models.hybrid import resolve_layers

    return all(get_family(s.family).mixer.constant_state for s in resolve_layers(model_cfg))


def resolve_options(family: str, variant: Optional[str], mixer: Any) -> Any:
    """The family's options dataclass: defaults <- variant preset <- ``model.mixer``."""
    spec = get_family(family)
    variant = resolve_variant(family, variant)
    node = OmegaConf.structured(spec.options)
    user = OmegaConf.create(mixer if mixer is not None else {})
    try:
        node = OmegaConf.merge(node, spec.variants[variant], user)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        leaf = key.rpartition(".")[2]
        fields = [f.name for f in dataclasses.fields(spec.options)]
        if leaf and leaf not in fields:
            raise ConfigError(
                f"model.mixer: unknown key 'model.mixer.{key}' for family '{family}'"
                f"{_suggest(leaf, fields)}; options: {', '.join(fields)}"
            ) from None
        msg = (getattr(e, "msg", None) or str(e)).splitlines()[0]
        raise ConfigError(f"model.mixer.{key}: {msg}") from None
    return OmegaConf.to_object(node)


def head_dim(cfg: Any) -> int:
    """Width of one head: ``model.head_dim`` if set, else ``d_model // n_heads``."""
    return int(cfg.head_dim) if cfg.head_dim else int(cfg.d_model) // int(cfg.n_heads)


def validate_model_config(cfg: Any) -> None:
    """Family, variant and options exist; dimensions are consistent. ``cfg`` is the model node.
    A hybrid (``model.layers``): every layer's family, variant and options, each checked by its family."""
    from lm.models.hybrid import is_hybrid, resolve_layers

    spec = get_family(cfg.family)
    variant = resolve_variant(cfg.family, cfg.variant)
    options = resolve_options(cfg.family, variant, cfg.mixer)
    if not cfg.head_dim and cfg.d_model % cfg.n_heads != 0:
        raise ConfigError(
            f"model.d_model ({cfg.d_model}) must be divisible by model.n_heads ({cfg.n_heads}) (or set model.head_dim)"
        )
    if not is_hybrid(cfg):
        check = getattr(spec.mixer, "check_config", None)
        if check is not None:
            check(cfg, options)
        return
    for i, layer in enumerate(resolve_layers(cfg)):
        try:
            layer_options = layer.options()
            check = getattr(get_family(layer.family).mixer, "check_config", None)
            if check is not None:
                check(cfg, layer_options)
        except ConfigError as e:
            raise ConfigError(f"model.layers (layer {i}, {layer.name}): {e}") from None


def _experiment_validator(cfg: DictConfig) -> None:
    validate_model_config(cfg.model)


def _install_validator() -> None:
    from lm.config import loader

    if _experiment_validator not in loader.VALIDATORS:
        loader.VALIDATORS.append(_experiment_validator)


_install_validator()
