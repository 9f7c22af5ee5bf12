"""Import a flash-linear-attention (fla-hub) Hugging Face checkpoint: a directory with
``config.json`` (``model_type``) and ``model.safetensors`` (optionally ``tokenizer.json``).

``gla`` (GLAForCausalLM) -> ``linear_attention/gla``; ``delta_net`` (DeltaNetForCausalLM) ->
``linear_attention/deltanet`` (its short convolutions and beta projection added to the same
mapping); ``gated_deltanet`` (GatedDeltaNetForCausalLM) -> ``linear_attention/gated_deltanet``
(DeltaNet's mapping plus ``a_proj``, ``A_log``, ``dt_bias`` and the output gate ``g_proj``);
``rwkv7`` (RWKV7ForCausalLM) -> ``rwkv/rwkv7`` in :mod:`lm.hf.import_rwkv7`. The GLA mapping per layer::

    attn_norm -> norm1;  attn.{q,k,v,o}_proj -> mixer.{q,k,v,o}_proj;  attn.g_proj -> mixer.gate_proj
    attn.gk_proj.0 / .1 -> mixer.g_down / g_up   (log alpha = logsigmoid(.) / 16, both)
    attn.g_norm(_swish_gate).weight [Dv] -> mixer.o_norm.weight [H, Dv] (shared by the heads)
    mlp_norm -> norm2;  mlp.{gate,up}_proj -> mlp.gate_up (gate rows first);  mlp.down_proj -> mlp.down
    model.embeddings -> embed;  model.norm -> norm_f;  lm_head -> head (or tied)

Features fla has and this project does not (grouped key/value heads, clamped gates, hybrid
softmax-attention layers, attention residuals, un-normalised/affine-free variants, ...) are refused
by name. Only the weights and config are read: neither fla nor transformers is needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from lm.errors import LMError
from lm.hf.import_common import Unsupported, read_weights, swiglu_ratio, take, write_export

#: fla's config defaults (GLAConfig) for keys a config.json may omit
GLA_DEFAULTS = {
    "expand_k": 0.5,
    "expand_v": 1.0,
    "hidden_ratio": 4,
    "intermediate_size": None,
    "num_kv_heads": None,
    "feature_map": None,
    "use_short_conv": False,
    "conv_size": 4,
    "use_output_gate": True,
    "clamp_min": None,
    "hidden_act": "swish",
    "max_position_embeddings": 2048,
    "elementwise_affine": True,
    "norm_eps": 1e-6,
    "use_gk": True,
    "use_gv": False,
    "attn": None,
    "tie_word_embeddings": False,
    "attnres_block_size": None,
}


def _refuse_if(source: Any, cfg: Dict[str, Any], key: str, ok, feature: str) -> None:
    if not ok(cfg.get(key)):
        raise Unsupported(source, f"{feature} ({key}={cfg.get(key)!r})")


def intermediate_size(cfg: Dict[str, Any]) -> int:
    """fla's GatedMLP width: ``intermediate_size`` or 2/3 * hidden_ratio * d rounded up to 256."""
    if cfg.get("intermediate_size"):
        return int(cfg["intermediate_size"])
    ratio = cfg.get("hidden_ratio") or 4
    width = int(cfg["hidden_size"] * ratio * 2 / 3)
    return 256 * ((width + 255) // 256)


def gla_config(cfg: Dict[str, Any], source: Any) -> Dict[str, Any]:
    """Our model config for an fla GLAConfig (refusing what has no equivalent)."""
    cfg = {**GLA_DEFAULTS, **cfg}
    _refuse_if(source, cfg, "attn", lambda v: v is None, "hybrid softmax-attention layers")
    _refuse_if(source, cfg, "attnres_block_size", lambda v: v is None, "attention residuals")
    _refuse_if(source, cfg, "num_kv_heads", lambda v: v is None or v == cfg["num_heads"], "grouped key/value heads")
    _refuse_if(source, cfg, "clamp_min", lambda v: v is None, "a clamped log gate")
    _refuse_if(source, cfg, "use_gk", lambda v: v is True, "a GLA without the per-key gate")
    _refuse_if(source, cfg, "use_gv", lambda v: not v, "a per-value gate")
    _refuse_if(source, cfg, "hidden_act", lambda v: v == "swish", "an activation other than swish")
    _refuse_if(source, cfg, "use_short_conv", lambda v: not v, "GLA with a short convolution")
    _refuse_if(source, cfg, "feature_map", lambda v: v is None, "a q/k feature map in GLA")
    D, H = int(cfg["hidden_size"]), int(cfg["num_heads"])
    if (D * cfg["expand_k"]) % H or (D * cfg["expand_v"]) % H:
        raise LMError(f"{source}: hidden_size * expand_k/v must be divisible by num_heads")
    return {
        "family": "linear_attention",
        "variant": "gla",
        "vocab_size": int(cfg["vocab_size"]),
        "d_model": D,
        "n_layers": int(cfg["num_hidden_layers"]),
        "n_heads": H,
        "mlp": "swiglu",
        "mlp_ratio": swiglu_ratio(intermediate_size(cfg), D, source),
        "norm": "rmsnorm",
        "norm_eps": float(cfg["norm_eps"]),
        "tie_embeddings": bool(cfg["tie_word_embeddings"]),
        "max_seq_len": int(cfg["max_position_embeddings"]),
        "mixer": {
            "expand_k": float(cfg["expand_k"]),
            "expand_v": float(cfg["expand_v"]),
            "gate_low_rank": 16,
            "gate_normalizer": 16.0,
            "output_gate": bool(cfg["use_output_gate"]),
            "output_norm": True,
        },
    }


def _norm_weight(src: Dict[str, torch.Tensor], prefix: str, n: int, source: Any, affine: bool) -> torch.Tensor:
    """A norm's weight (ones when the source's norm has none)."""
    key = f"{prefix}.weight"
    if key in src:
        return src.pop(key)
    if affine:
        raise LMError(f"{source}: missing weight '{key}'")
    return torch.ones(n)


def _skeleton_state(
    src: Dict[str, torch.Tensor], model_cfg: Dict[str, Any], source: Any, mixer_weights
) -> Dict[str, torch.Tensor]:
    """Our state dict from an fla ``*ForCausalLM`` state dict ``src`` (consumed): the shared
    skeleton (embedding, final norm, head, per-layer norms, q/k/v/o projections, SwiGLU MLP) plus
    ``mixer_weights(src, out, a, b)`` for the family's own weights of layer ``a`` -> ``b``.
    Any source key left over is refused by name."""
    out = {
        "embed.weight": take(src, "model.embeddings.weight", source),
        "norm_f.weight": take(src, "model.norm.weight", source),
    }
    if model_cfg["tie_embeddings"]:
        src.pop("lm_head.weight", None)
    else:
        out["head.weight"] = take(src, "lm_head.weight", source)
    for i in range(model_cfg["n_layers"]):
        a, b = f"model.layers.{i}", f"blocks.{i}"
        out[f"{b}.norm1.weight"] = take(src, f"{a}.attn_norm.weight", source)
        out[f"{b}.norm2.weight"] = take(src, f"{a}.mlp_norm.weight", source)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{b}.mixer.{name}.weight"] = take(src, f"{a}.attn.{name}.weight", source)
        mixer_weights(src, out, a, b)
        gate, up = take(src, f"{a}.mlp.gate_proj.weight", source), take(src, f"{a}.mlp.up_proj.weight", source)
        out[f"{b}.mlp.gate_up.weight"] = torch.cat([gate, up], dim=0)
        out[f"{b}.mlp.down.weight"] = take(src, f"{a}.mlp.down_proj.weight", source)
    if src:
        raise Unsupported(source, f"weights this importer does not know ({', '.join(sorted(src)[:4])})")
    return out


def gla_state(
    src: Dict[str, torch.Tensor], cfg: Dict[str, Any], model_cfg: Dict[str, Any], source: Any
) -> Dict[str, torch.Tensor]:
    """Our state dict from an fla GLAForCausalLM state dict (every source key consumed)."""
    cfg = {**GLA_DEFAULTS, **cfg}
    H = model_cfg["n_heads"]
    affine = bool(cfg["elementwise_affine"])
    dv = int(model_cfg["d_model"] * model_cfg["mixer"]["expand_v"]) // H

    def mixer_weights(src, out, a, b):
        if model_cfg["mixer"]["output_gate"]:
            out[f"{b}.mixer.gate_proj.weight"] = take(src, f"{a}.attn.g_proj.weight", source)
        out[f"{b}.mixer.g_down.weight"] = take(src, f"{a}.attn.gk_proj.0.weight", source)
        out[f"{b}.mixer.g_up.weight"] = take(src, f"{a}.attn.gk_proj.1.weight", source)
        out[f"{b}.mixer.g_up.bias"] = take(src, f"{a}.attn.gk_proj.1.bias", source)
        norm = f"{a}.attn.g_norm_swish_gate" if f"{a}.attn.g_norm_swish_gate.weight" in src else f"{a}.attn.g_norm"
        out[f"{b}.mixer.o_norm.weight"] = _norm_weight(src, norm, dv, source, affine).expand(H, dv).clone()

    return _skeleton_state(dict(src), model_cfg, source, mixer_weights)


DELTANET_DEFAULTS = {
    "expand_k": 1.0,
    "expand_v": 1.0,
    "use_gate": False,
    "use_short_conv": True,
    "allow_neg_eigval": False,
    "conv_size": 4,
    "use_beta": True,
    "use_output_norm": True,
    "qk_norm": "l2",
    "qk_activation": "silu",
    "max_position_embeddings": 2048,
    "hidden_ratio": 4,
    "intermediate_size": None,
    "hidden_act": "swish",
    "norm_eps": 1e-6,
    "attn": None,
    "tie_word_embeddings": False,
    "attnres_block_size": None,
    "conv_bias": False,
}


def deltanet_config(cfg: Dict[str, Any], source: Any) -> Dict[str, Any]:
    """Our ``linear_attention/deltanet`` config for an fla DeltaNetConfig."""
    cfg = {**DELTANET_DEFAULTS, **cfg}
    _refuse_if(source, cfg, "attn", lambda v: v is None, "hybrid softmax-attention layers")
    _refuse_if(source, cfg, "attnres_block_size", lambda v: v is None, "attention residuals")
    _refuse_if(source, cfg, "use_gate", lambda v: not v, "DeltaNet with an output gate")
    _refuse_if(source, cfg, "use_short_conv", lambda v: v is True, "DeltaNet without the short convolution")
    _refuse_if(source, cfg, "allow_neg_eigval", lambda v: not v, "negative eigenvalues (beta in (0, 2))")
    _refuse_if(source, cfg, "use_beta", lambda v: v is True, "a fixed beta of 1")
    _refuse_if(source, cfg, "use_output_norm", lambda v: v is True, "DeltaNet without the output norm")
    _refuse_if(source, cfg, "qk_norm", lambda v: v == "l2", "a q/k normalisation other than L2")
    _refuse_if(source, cfg, "qk_activation", lambda v: v == "silu", "a q/k activation other than silu")
    _refuse_if(source, cfg, "hidden_act", lambda v: v == "swish", "an activation other than swish")
    D, H = int(cfg["hidden_size"]), int(cfg["num_heads"])
    return {
        "family": "linear_attention",
        "variant": "deltanet",
        "vocab_size": int(cfg["vocab_size"]),
        "d_model": D,
        "n_layers": int(cfg["num_hidden_layers"]),
        "n_heads": H,
        "mlp": "swiglu",
        "mlp_ratio": swiglu_ratio(intermediate_size(cfg), D, source),
        "norm": "rmsnorm",
        "norm_eps": float(cfg["norm_eps"]),
        "tie_embeddings": bool(cfg["tie_word_embeddings"]),
        "max_seq_len": int(cfg["max_position_embeddings"]),
        "mixer": {
            "expand_k": float(cfg["expand_k"]),
            "expand_v": float(cfg["expand_v"]),
            "conv_size": int(cfg["conv_size"]),
        },
    }


def deltanet_state(
    src: Dict[str, torch.Tensor], cfg: Dict[str, Any], model_cfg: Dict[str, Any], source: Any
) -> Dict[str, torch.Tensor]:
    """Our state dict from an fla DeltaNetForCausalLM state dict: as GLA's, plus the short
    convolutions (weight [C, 1, K] -> [C, K], bias or zeros) and beta's projection (bias zeros)."""
    H = model_cfg["n_heads"]

    def mixer_weights(src, out, a, b):
        for ours, theirs in (("conv_q", "q_conv1d"), ("conv_k", "k_conv1d"), ("conv_v", "v_conv1d")):
            w = take(src, f"{a}.attn.{theirs}.weight", source)
            out[f"{b}.mixer.{ours}.weight"] = w.reshape(w.shape[0], -1)
            out[f"{b}.mixer.{ours}.bias"] = src.pop(f"{a}.attn.{theirs}.bias", torch.zeros(w.shape[0]))
        beta = take(src, f"{a}.attn.b_proj.weight", source)
        out[f"{b}.mixer.b_proj.weight"] = beta
        out[f"{b}.mixer.b_proj.bias"] = src.pop(f"{a}.attn.b_proj.bias", torch.zeros(beta.shape[0]))
        dv = int((model_cfg.get("head_dim") or model_cfg["d_model"] // H) * model_cfg["mixer"]["expand_v"])
        out[f"{b}.mixer.o_norm.weight"] = take(src, f"{a}.attn.o_norm.weight", source).expand(H, dv).clone()

    return _skeleton_state(dict(src), model_cfg, source, mixer_weights)


GATED_DELTANET_DEFAULTS = {
    "expand_v": 2.0,
    "use_gate": True,
    "use_short_conv": True,
    "allow_neg_eigval": False,
    "conv_size": 4,
    "head_dim": 256,
    "num_heads": 6,
    "num_v_heads": None,
    "max_position_embeddings": 2048,
    "hidden_ratio": 4,
    "intermediate_size": None,
    "hidden_act": "swish",
    "norm_eps": 1e-6,
    "attn": None,
    "tie_word_embeddings": False,
    "attnres_block_size": None,
    "output_gate_activation": "swish",
    "conv_bias": False,
}


def gated_deltanet_config(cfg: Dict[str, Any], source: Any) -> Dict[str, Any]:
    """Our ``linear_attention/gated_deltanet`` config for an fla GatedDeltaNetConfig: fla's
    ``head_dim`` is the key width per head (``model.head_dim``, ``expand_k`` 1) and the value width
    is ``head_dim * expand_v``; the output gate is silu after the per-head RMS norm."""
    cfg = {**GATED_DELTANET_DEFAULTS, **cfg}
    _refuse_if(source, cfg, "attn", lambda v: v is None, "hybrid softmax-attention layers")
    _refuse_if(source, cfg, "attnres_block_size", lambda v: v is None, "attention residuals")
    _refuse_if(
        source,
        cfg,
        "num_v_heads",
        lambda v: v is None or v == cfg["num_heads"],
        "grouped value heads (num_v_heads != num_heads)",
    )
    _refuse_if(source, cfg, "use_short_conv", lambda v: v is True, "Gated DeltaNet without the short convolution")
    _refuse_if(source, cfg, "allow_neg_eigval", lambda v: not v, "negative eigenvalues (beta in (0, 2))")
    _refuse_if(
        source,
        cfg,
        "output_gate_activation",
        lambda v: v in ("swish", "silu"),
        "an output gate activation other than swish",
    )
    _refuse_if(source, cfg, "hidden_act", lambda v: v == "swish", "an activation other than swish")
    D, H, K = int(cfg["hidden_size"]), int(cfg["num_heads"]), int(cfg["head_dim"])
    if abs(K * float(cfg["expand_v"]) - round(K * float(cfg["expand_v"]))) > 1e-6:
        raise LMError(f"{source}: head_dim * expand_v must be an integer")
    return {
        "family": "linear_attention",
        "variant": "gated_deltanet",
        "vocab_size": int(cfg["vocab_size"]),
        "d_model": D,
        "n_layers": int(cfg["num_hidden_layers"]),
        "n_heads": H,
        "head_dim": K,
        "mlp": "swiglu",
        "mlp_ratio": swiglu_ratio(intermediate_size(cfg), D, source),
        "norm": "rmsnorm",
        "norm_eps": float(cfg["norm_eps"]),
        "tie_embeddings": bool(cfg["tie_word_embeddings"]),
        "max_seq_len": int(cfg["max_position_embeddings"]),
        "mixer": {
            "expand_k": 1.0,
            "expand_v": float(cfg["expand_v"]),
            "conv_size": int(cfg["conv_size"]),
            "output_gate": bool(cfg["use_gate"]),
        },
    }


def gated_deltanet_state(
    src: Dict[str, torch.Tensor], cfg: Dict[str, Any], model_cfg: Dict[str, Any], source: Any
) -> Dict[str, torch.Tensor]:
    """Our state dict from an fla GatedDeltaNetForCausalLM state dict: DeltaNet's mapping plus the
    decay (``a_proj``, ``A_log``, ``dt_bias`` by name) and the output gate ``g_proj -> gate_proj``."""
    src = dict(src)
    a_keys = {}
    for i in range(model_cfg["n_layers"]):
        a, b = f"model.layers.{i}.attn", f"blocks.{i}.mixer"
        for theirs, ours in (("a_proj.weight", "a_proj.weight"), ("A_log", "A_log"), ("dt_bias", "dt_bias")):
            a_keys[f"{b}.{ours}"] = take(src, f"{a}.{theirs}", source)
        if model_cfg["mixer"]["output_gate"]:
            a_keys[f"{b}.gate_proj.weight"] = take(src, f"{a}.g_proj.weight", source)
    return {**deltanet_state(src, cfg, model_cfg, source), **a_keys}


CONVERTERS = {
    "gla": (gla_config, gla_state),
    "delta_net": (deltanet_config, deltanet_state),
    "gated_deltanet": (gated_deltanet_config, gated_deltanet_state),
}


def tokenizer_files(src: Path) -> Tuple[Optional[Path], Optional[str], Optional[str]]:
    """(tokenizer.json, the token that starts a document (bos, else eos), pad) of a HF directory."""
    tok = src / "tokenizer.json"
    if not tok.is_file():
        return None, None, None
    conf: Dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (src / name).is_file():
            conf = {**json.loads((src / name).read_text()), **conf}

    def text(v):
        return v.get("content") if isinstance(v, dict) else v

    return tok, text(conf.get("bos_token")) or text(conf.get("eos_token")), text(conf.get("pad_token"))


def import_fla(source: str, out_dir: str) -> Path:
    """Convert an fla Hugging Face directory into this project's export directory."""
    src = Path(source)
    if not (src / "config.json").is_file():
        raise LMError(f"{source}: no config.json (expected a Hugging Face model directory)")
    cfg = json.loads((src / "config.json").read_text())
    kind = cfg.get("model_type")
    if kind not in CONVERTERS and kind != "rwkv7":
        known = ", ".join([*CONVERTERS, "rwkv7"])
        raise LMError(f"{source}/config.json: model_type '{kind}' is not importable; known: {known}")
    if kind == "rwkv7":
        from lm.hf.import_rwkv7 import fla_checked, fla_import

        fla_checked(cfg, source)
        model_cfg, state = fla_import(cfg, read_weights(src), source)
    else:
        to_config, to_state = CONVERTERS[kind]
        model_cfg = to_config(cfg, source)
        state = to_state(read_weights(src), cfg, model_cfg, source)
    tok, eod, pad = tokenizer_files(src)
    return write_export(Path(out_dir), model_cfg, state, source, tok, eod, pad)
