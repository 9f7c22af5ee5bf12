"""Hybrid layer layouts: which token-mixer family each layer uses (``model.layers``).

``model.layers: null`` (the default) is the single-family model: every layer is ``model.family`` /
``model.variant`` with the options ``model.mixer``. Otherwise ``model.layers`` is one of

* a pattern ``{every: N, mixer: <layer>, offset: N - 1, default: <layer>}``: layer ``i``
  (0-based) is ``mixer`` when ``i % every == offset`` and ``default`` (default: ``model.family`` /
  ``model.variant``) otherwise; ``{every: 4, mixer: transformer}`` puts softmax attention in the
  last layer of every group of four (layers 3, 7, 11, ...);
* an explicit list of ``model.n_layers`` ``<layer>`` entries, one per layer.

A ``<layer>`` is a name -- a family (``transformer``, ``rwkv``: its default variant), a variant
(``gla``, ``gated_deltanet``: unique across families) or ``family/variant`` -- or a mapping
``{family: <name>, variant: <variant>, mixer: {<options of that family>}}``. The options of a layer
are ``model.mixer`` when the layer's family is ``model.family``, with the entry's own ``mixer``
merged on top (per-layer options, e.g. ``{family: transformer, mixer: {n_kv_heads: 1}}``).

Everything else of the skeleton (``d_model``, ``n_heads``, ``head_dim``, the channel mixer, norms)
is shared by all layers. Each layer's mixer is built as layer ``j`` of the ``m`` layers of its own
family (its config's ``family``, ``variant``, ``mixer`` and ``n_layers`` are the layer's, see
:meth:`LayerSpec.mixer_config`): depth-dependent initialisations (RWKV-7's) and cross-layer inputs
follow the layers of that family only. The cross-layer ``shared`` dict of a forward pass
(``TokenMixer.uses_shared``: RWKV-7's value residual, layer 0's values) is one dict per family: the
first RWKV-7 layer of a hybrid writes it, the later RWKV-7 layers read it, other families never see it.

:func:`resolve_layers` turns the config into one :class:`LayerSpec` per layer (once, when the model
is built; the config keeps the form the user wrote, so that a resumed run compares like with like).
Every mistake is a one-line :class:`~lm.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf

from lm.errors import ConfigError, did_you_mean

PATTERN_KEYS = ("every", "mixer", "offset", "default")
ENTRY_KEYS = ("family", "variant", "mixer")


@dataclass(frozen=True)
class LayerSpec:
    """One layer's token mixer: ``family``/``variant``, its option overrides ``mixer`` (before the
    variant's preset and the family's defaults), and its place among the layers of its family
    (``index`` of ``count``)."""

    family: str
    variant: str
    mixer: Dict[str, Any] = field(default_factory=dict, hash=False, compare=True)
    index: int = 0
    count: int = 1

    @property
    def name(self) -> str:
        return f"{self.family}/{self.variant}"

    def options(self) -> Any:
        """The family's options dataclass of this layer (defaults <- variant preset <- ``mixer``)."""
        from lm.models.registry import resolve_options

        return resolve_options(self.family, self.variant, self.mixer)

    def mixer_config(self, cfg: Any) -> Any:
        """The model config as this layer's mixer sees it: the model's, with the layer's family,
        variant, options and the number of layers of its family (``n_layers``). A single-family model
        (``cfg.layers`` null) gets ``cfg`` itself."""
        if getattr(cfg, "layers", None) is None:
            return cfg
        return dataclasses.replace(
            cfg, family=self.family, variant=self.variant, mixer=dict(self.mixer), n_layers=self.count, layers=None
        )


def is_hybrid(cfg: Any) -> bool:
    """True when ``model.layers`` is set (a mapping or an object with that attribute)."""
    return _get(cfg, "layers") is not None


def resolve_layers(cfg: Any) -> Tuple[LayerSpec, ...]:
    """One :class:`LayerSpec` per layer of the model config ``cfg`` (a ModelConfig, DictConfig or
    dict); see the module docstring for the forms of ``model.layers``."""
    from lm.models.registry import resolve_variant

    family = str(_get(cfg, "family"))
    variant = resolve_variant(family, _get(cfg, "variant"))
    base_mixer = _plain(_get(cfg, "mixer")) or {}
    n_layers = int(_get(cfg, "n_layers"))
    layers = _plain(_get(cfg, "layers"))
    if layers is None:
        return tuple(LayerSpec(family, variant, dict(base_mixer), i, n_layers) for i in range(n_layers))
    if isinstance(layers, Mapping):
        entries = _pattern(layers, n_layers, (family, variant, {}))
    elif isinstance(layers, (list, tuple)):
        if len(layers) != n_layers:
            raise ConfigError(
                f"model.layers: the list has {len(layers)} entries but model.n_layers is {n_layers}; "
                f"give one entry per layer (or set model.n_layers={len(layers)})"
            )
        entries = [_entry(e, f"model.layers[{i}]") for i, e in enumerate(layers)]
    else:
        raise ConfigError(
            f"model.layers: expected a pattern {{every: N, mixer: <family>}} or a list of families, "
            f"got {type(layers).__name__} {layers!r}"
        )
    counts = Counter(f for f, _, _ in entries)
    seen: Counter = Counter()
    specs = []
    for f, v, own in entries:
        options = {**base_mixer, **own} if f == family else dict(own)
        specs.append(LayerSpec(f, v, options, seen[f], counts[f]))
        seen[f] += 1
    return tuple(specs)


def layers_name(specs: Sequence[LayerSpec]) -> str:
    """The model name of a layout: ``family/variant`` when every layer is the same, else
    ``hybrid[a/x:9,b/y:3]`` (layer counts per mixer, in order of first appearance)."""
    names = Counter(s.name for s in specs)
    if len(names) == 1:
        return next(iter(names))
    return "hybrid[" + ",".join(f"{n}:{c}" for n, c in names.items()) + "]"


def layout(specs: Sequence[LayerSpec]) -> str:
    """Per-layer family names, e.g. ``gla gla gla transformer`` (the variant, or the family when it
    has only its own variant)."""
    return " ".join(s.variant for s in specs)


# ------------------------------------------------------------------------------------------ parsing
def _pattern(p: Mapping[str, Any], n_layers: int, base: Tuple[str, str, Dict[str, Any]]) -> List[Tuple]:
    unknown = [k for k in p if k not in PATTERN_KEYS]
    if unknown:
        key = str(unknown[0])
        raise ConfigError(
            f"model.layers: unknown key 'model.layers.{key}'{did_you_mean(key, PATTERN_KEYS)}; "
            f"a pattern takes {', '.join(PATTERN_KEYS)} (or give a list of one family per layer)"
        )
    for key in ("every", "mixer"):
        if p.get(key) is None:
            raise ConfigError(f"model.layers.{key}: missing; a pattern is {{every: N, mixer: <family>}}")
    every = _int(p["every"], "model.layers.every")
    if every < 1:
        raise ConfigError(f"model.layers.every: must be >= 1, got {every}")
    offset = _int(p.get("offset", every - 1) if p.get("offset") is not None else every - 1, "model.layers.offset")
    if not 0 <= offset < every:
        raise ConfigError(f"model.layers.offset: must be in 0..every-1 (0..{every - 1}), got {offset}")
    mixer = _entry(p["mixer"], "model.layers.mixer")
    default = _entry(p["default"], "model.layers.default") if p.get("default") is not None else base
    entries = [mixer if i % every == offset else default for i in range(n_layers)]
    if mixer not in entries:
        raise ConfigError(
            f"model.layers: every={every} offset={offset} places no '{mixer[1]}' layer among "
            f"model.n_layers={n_layers} layers; lower model.layers.every or model.layers.offset"
        )
    return entries


def _entry(e: Any, where: str) -> Tuple[str, str, Dict[str, Any]]:
    """(family, variant, own options) of one ``<layer>``."""
    from lm.models.registry import resolve_variant

    if isinstance(e, str):
        family, variant = _name(e, where)
        return family, variant, {}
    if not isinstance(e, Mapping):
        raise ConfigError(f"{where}: expected a family name or {{family:, variant:, mixer:}}, got {e!r}")
    unknown = [k for k in e if k not in ENTRY_KEYS]
    if unknown:
        key = str(unknown[0])
        raise ConfigError(
            f"{where}: unknown key '{where}.{key}'{did_you_mean(key, ENTRY_KEYS)}; a layer takes {', '.join(ENTRY_KEYS)}"
        )
    if e.get("family") is None:
        raise ConfigError(f"{where}.family: missing (a family, variant or family/variant name)")
    family, variant = _name(str(e["family"]), f"{where}.family")
    if e.get("variant") is not None:
        try:
            variant = resolve_variant(family, str(e["variant"]))
        except ConfigError as err:
            raise ConfigError(f"{where}.variant: {str(err).partition(': ')[2]}") from None
    own = e.get("mixer") or {}
    if not isinstance(own, Mapping):
        raise ConfigError(f"{where}.mixer: expected a mapping of {family} options, got {own!r}")
    return family, variant, dict(own)


def _name(name: str, where: str) -> Tuple[str, str]:
    """(family, variant) of a family, variant or ``family/variant`` name."""
    from lm.models.registry import FAMILIES, resolve_variant

    if "/" in name:
        family, _, variant = name.partition("/")
        if family not in FAMILIES:
            raise ConfigError(f"{where}: unknown family '{family}'{did_you_mean(family, FAMILIES)}")
        try:
            return family, resolve_variant(family, variant)
        except ConfigError as err:
            raise ConfigError(f"{where}: {str(err).partition(': ')[2]}") from None
    if name in FAMILIES:
        return name, FAMILIES[name].default_variant
    owners = [f for f, spec in FAMILIES.items() if name in spec.variants]
    if len(owners) == 1:
        return owners[0], name
    known = sorted(set(FAMILIES) | {v for spec in FAMILIES.values() for v in spec.variants})
    raise ConfigError(
        f"{where}: unknown family or variant '{name}'{did_you_mean(name, known)}; known: {', '.join(known)}"
    )


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    return value


def _get(cfg: Any, key: str) -> Any:
    if isinstance(cfg, (Mapping, DictConfig)):
        return cfg.get(key)
    return getattr(cfg, key, None)


def _plain(value: Any) -> Optional[Any]:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value
