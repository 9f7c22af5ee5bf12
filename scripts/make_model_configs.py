"""Write configs/model/<name>/<size>.yaml for every model name and size.

Sizes follow the usual GPT shapes (125m: d=768, L=12; 350m: d=1024, L=24; 1.3b: d=2048, L=24)
counted with a vocabulary of 50304; 'small' (5-10M, the CPU demo) uses d=256, L=6, counted with 8192;
'tiny' is for tests. Every config sets ``vocab_size: 0``: the model takes the prepared corpus's
tokenizer size (rounded up to 64), so no embedding row goes untrained; the size's name and the
header's count assume the nominal vocabulary (:data:`NOMINAL_VOCAB`). A fixed size is set only when
asked (``model.vocab_size=N``; larger than the tokenizer's is a warning). Where the standard shape misses the size's name by more than 5%, the layer count and MLP
ratio are adjusted so that the parameter count is within 10% of it; ``tests/models/test_sizes.py`` checks this on the meta
device. Hybrids (``hybrid-<family>``: ``model.layers`` puts softmax attention in the last layer of
every group of four, lm/models/hybrid.py) keep their depth a multiple of the pattern's period (tiny: 4
layers, small: 8), so every size has exactly one attention layer in four.
Run: ``python scripts/make_model_configs.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lm.models.counting import count_parameters  # noqa: E402

#: model name -> base model keys
NAMES = {
    "transformer": {"family": "transformer"},
    "gated_rnn": {"family": "gated_rnn", "variant": "static"},
    "rglru": {"family": "gated_rnn", "variant": "input_dependent"},
    "linear_rnn": {"family": "gated_rnn", "variant": "ungated"},
    "rwkv7": {"family": "rwkv", "variant": "rwkv7", "mlp": "rwkv_cmix", "norm": "layernorm"},
    "linear_transformer": {"family": "linear_attention", "variant": "linear_transformer"},
    "retnet": {"family": "linear_attention", "variant": "retnet"},
    "gla": {"family": "linear_attention", "variant": "gla"},
    "deltanet": {"family": "linear_attention", "variant": "deltanet"},
    "gated_deltanet": {"family": "linear_attention", "variant": "gated_deltanet"},
    "mamba2": {"family": "linear_attention", "variant": "mamba2"},
    "recurrent_delta": {"family": "fwp", "variant": "recurrent_delta"},
    "srwm": {"family": "fwp", "variant": "srwm"},
    "aaren": {"family": "aaren", "variant": "aaren"},
    # hybrids: the default layers are the family's, every 4th layer (3, 7, 11, ...) softmax attention
    "hybrid-gla": {"family": "linear_attention", "variant": "gla", "layers": {"every": 4, "mixer": "transformer"}},
    "hybrid-gated_deltanet": {
        "family": "linear_attention",
        "variant": "gated_deltanet",
        "layers": {"every": 4, "mixer": "transformer"},
    },
}

#: size -> (target params or None, shape); vocab_size 0: the data's
SIZES = {
    "tiny": (None, {"d_model": 64, "n_layers": 2, "n_heads": 2, "vocab_size": 0, "max_seq_len": 512}),
    "small": (None, {"d_model": 256, "n_layers": 6, "n_heads": 4, "vocab_size": 0, "max_seq_len": 1024}),
    "125m": (125e6, {"d_model": 768, "n_layers": 12, "n_heads": 12, "vocab_size": 0, "max_seq_len": 4096}),
    "350m": (350e6, {"d_model": 1024, "n_layers": 24, "n_heads": 16, "vocab_size": 0, "max_seq_len": 4096}),
    "1.3b": (1.3e9, {"d_model": 2048, "n_layers": 24, "n_heads": 16, "vocab_size": 0, "max_seq_len": 4096}),
}
#: the vocabulary a size's name and parameter count assume (the default BPE's 8192; GPT-2's 50257 -> 50304)
NOMINAL_VOCAB = {"tiny": 8192, "small": 8192, "125m": 50304, "350m": 50304, "1.3b": 50304}


def nominal_parameters(cfg: dict, size: str) -> int:
    """Parameters of a size config with its nominal vocabulary (when ``vocab_size`` is 0)."""
    return count_parameters({**cfg, "vocab_size": cfg.get("vocab_size") or NOMINAL_VOCAB[size]})


def layer_period(keys: dict) -> int:
    """The depth a model name's layer count must be a multiple of: a hybrid pattern's ``every``, else 1."""
    layers = keys.get("layers")
    return int(layers["every"]) if isinstance(layers, dict) else 1


def fit(base: dict, target: float | None, size: str) -> dict:
    cfg = dict(base)
    period = layer_period(cfg)
    cfg["n_layers"] = period * -(-cfg["n_layers"] // period)  # rounded up to whole periods
    if target is None or abs(nominal_parameters(cfg, size) / target - 1) <= 0.05:
        return cfg
    # small models: change the depth; large ones: also allow the MLP ratio to move
    best = None
    for n_layers in range(max(2, cfg["n_layers"] - 6), cfg["n_layers"] + 7):
        if n_layers % period:
            continue
        for ratio in (4.0, 3.5, 4.5, 3.0, 5.0):
            trial = {**cfg, "n_layers": n_layers, "mlp_ratio": ratio}
            err = abs(nominal_parameters(trial, size) / target - 1)
            # prefer the standard depth and ratio: penalise departures slightly
            score = err + 0.01 * abs(n_layers - cfg["n_layers"]) + 0.005 * abs(ratio - 4.0)
            if best is None or score < best[0]:
                best = (score, trial, err)
    _, trial, err = best
    assert err <= 0.1, (base, err)
    return trial


def main() -> None:
    out_root = ROOT / "configs" / "model"
    for name, keys in NAMES.items():
        for size, (target, shape) in SIZES.items():
            cfg = fit({**keys, **shape}, target, size)
            if cfg.get("mlp_ratio") == 4.0:
                cfg.pop("mlp_ratio")
            n = nominal_parameters(cfg, size)
            path = out_root / name / f"{size}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            header = (
                f"# {name} {size}: {n / 1e6:.1f}M parameters with a vocabulary of {NOMINAL_VOCAB[size]} tokens; "
                "vocab_size 0 takes the data's tokenizer size.\n"
                "# Generated by scripts/make_model_configs.py.\n"
            )
            path.write_text(header + yaml.safe_dump(cfg, sort_keys=False))
            print(f"{name:20s} {size:6s} {n / 1e6:9.2f}M  layers={cfg['n_layers']} ratio={cfg.get('mlp_ratio', 4.0)}")


if __name__ == "__main__":
    main()
