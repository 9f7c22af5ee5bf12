"""Import RWKV-7 into ``rwkv/rwkv7``: fla-hub's Hugging Face format (``model_type: rwkv7``,
RWKV7ForCausalLM) and BlinkDL's ``.pth`` state dict (RWKV-LM ``RWKV-v7``: ``emb``, ``blocks.N.*``,
``ln_out``, ``head``). Per layer, ours <- fla <- BlinkDL (``a`` = ``attn``/``att``)::

    norm0 (block 0)          <- pre_norm (layer 0)            <- ln0 (block 0)             ln0
    norm1, norm2             <- attn_norm, ffn_norm           <- ln1, ln2
    mixer.mu [6, D]          <- a.x_r .. a.x_g (or a.x_x)     <- att.x_r .. att.x_g        r w k v a g
    mixer.w_down / w_up / w0 <- a.w_lora.lora.0 / .2 (+bias) <- att.w1^T / att.w2^T / att.w0
    mixer.a_down / a_up / a0 <- a.a_lora ...                  <- att.a1^T / att.a2^T / att.a0
    mixer.v_down / v_up / v0 <- a.v_lora ... (layers > 0)     <- att.v1^T / att.v2^T / att.v0 (block 0's: dropped)
    mixer.g_down / g_up      <- a.g_lora.lora.0 / .2          <- att.g1^T / att.g2^T
    mixer.k_k, k_a, r_k      <- a.k_k, a.k_a, a.r_k           <- att.k_k, att.k_a, att.r_k
    mixer.receptance/key/value/output <- a.r/k/v/o_proj       <- att.receptance/key/value/output
    mixer.o_norm [H, K]      <- a.g_norm [D] (eps head_dim * norm_eps) <- att.ln_x [D] (eps 64e-5)
    mlp.mu / key / value     <- ffn.x_k / key / value         <- ffn.x_k / key / value
    embed / norm_f / head    <- model.embeddings / model.norm / lm_head <- emb / ln_out / head

Refused by name: hybrid attention layers, a value width other than the model width, an activation
other than squared ReLU, a channel-mixer width that is not a multiple of 64, unknown weights (for
example RWKV-4/5/6 ``time_*`` parameters or RWKV-7 variants with extra maps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from lm.errors import LMError
from lm.hf.import_common import Unsupported, read_weights, take, write_export

BRANCHES = ("r", "w", "k", "v", "a", "g")

#: fla's RWKV7Config defaults for keys a config.json may omit
FLA_DEFAULTS = {
    "hidden_ratio": 4,
    "intermediate_size": None,
    "head_dim": 64,
    "num_heads": None,
    "hidden_act": "sqrelu",
    "max_position_embeddings": 2048,
    "norm_first": True,
    "norm_bias": True,
    "norm_eps": 1e-5,
    "attn": None,
    "tie_word_embeddings": False,
    "value_dim": None,
}


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


def model_config(
    D: int,
    H: int,
    L: int,
    vocab: int,
    ffn: int,
    ranks: Dict[str, int],
    norm_eps: float,
    head_norm_eps: float,
    tie: bool,
    embed_norm: bool,
    max_len: int,
    source: Any,
) -> Dict[str, Any]:
    """Our ``rwkv/rwkv7`` config (LayerNorms, RWKV channel mixer, value residual, GroupNorm ``ln_x``)."""
    if ffn % 64:
        raise Unsupported(source, f"a channel-mixer width of {ffn} (not a multiple of 64)")
    return {
        "family": "rwkv",
        "variant": "rwkv7",
        "vocab_size": vocab,
        "d_model": D,
        "n_layers": L,
        "n_heads": H,
        "mlp": "rwkv_cmix",
        "mlp_ratio": ffn / D,
        "norm": "layernorm",
        "norm_eps": norm_eps,
        "tie_embeddings": tie,
        "max_seq_len": max_len,
        "mixer": {
            "decay_low_rank": ranks["w"],
            "a_low_rank": ranks["a"],
            "gate_low_rank": ranks["g"],
            "v_low_rank": ranks.get("v", 32),
            "value_residual": True,
            "head_norm": "groupnorm",
            "head_norm_eps": head_norm_eps,
            "embed_norm": embed_norm,
        },
    }


def _layer(
    get: Callable[[str], torch.Tensor],
    lora: Callable[[str], tuple],
    b: str,
    i: int,
    H: int,
    out: Dict[str, torch.Tensor],
) -> None:
    """One block's weights from a layout's getters (``get(role)``; ``lora(name) -> (down, up, bias)``
    as our ``[r, D]``, ``[D, r]``, ``[D]``)."""
    x_x = get("x_x")  # fla's older single [6, D] lerp parameter
    out[f"{b}.mixer.mu"] = (
        torch.stack([_flat(get(f"x_{c}")) for c in BRANCHES]) if x_x is None else x_x.reshape(len(BRANCHES), -1)
    )
    for name in ("w", "a") + (("v",) if i > 0 else ()):
        down, up, bias = lora(name)
        out[f"{b}.mixer.{name}_down.weight"], out[f"{b}.mixer.{name}_up.weight"] = down, up
        out[f"{b}.mixer.{name}0"] = _flat(bias)
    out[f"{b}.mixer.g_down.weight"], out[f"{b}.mixer.g_up.weight"], _ = lora("g")
    out[f"{b}.mixer.k_k"], out[f"{b}.mixer.k_a"] = _flat(get("k_k")), _flat(get("k_a"))
    out[f"{b}.mixer.r_k"] = get("r_k")
    for ours in ("receptance", "key", "value", "output"):
        out[f"{b}.mixer.{ours}.weight"] = get(ours)
    out[f"{b}.mixer.o_norm.weight"] = get("ln_x.weight").reshape(H, -1)
    out[f"{b}.mixer.o_norm.bias"] = get("ln_x.bias").reshape(H, -1)
    for ours, role in (("norm1", "ln1"), ("norm2", "ln2")):
        out[f"{b}.{ours}.weight"], out[f"{b}.{ours}.bias"] = get(f"{role}.weight"), get(f"{role}.bias")
    out[f"{b}.mlp.mu"] = _flat(get("ffn.x_k"))
    out[f"{b}.mlp.key.weight"], out[f"{b}.mlp.value.weight"] = get("ffn.key"), get("ffn.value")


def _leftover(src: Dict[str, torch.Tensor], source: Any) -> None:
    if src:
        raise Unsupported(source, f"weights this importer does not know ({', '.join(sorted(src)[:4])})")


# ------------------------------------------------------------------------------------------ fla
FLA_NAMES = {
    "receptance": "attn.r_proj.weight",
    "key": "attn.k_proj.weight",
    "value": "attn.v_proj.weight",
    "output": "attn.o_proj.weight",
    "ln_x.weight": "attn.g_norm.weight",
    "ln_x.bias": "attn.g_norm.bias",
    "ln1.weight": "attn_norm.weight",
    "ln1.bias": "attn_norm.bias",
    "ln2.weight": "ffn_norm.weight",
    "ln2.bias": "ffn_norm.bias",
    "ffn.x_k": "ffn.x_k",
    "ffn.key": "ffn.key.weight",
    "ffn.value": "ffn.value.weight",
}


def fla_checked(cfg: Dict[str, Any], source: Any) -> Dict[str, Any]:
    """An fla RWKV7Config with its defaults, refusing features without an equivalent here."""
    cfg = {**FLA_DEFAULTS, **cfg}
    if cfg["attn"] is not None:
        raise Unsupported(source, f"hybrid softmax-attention layers (attn={cfg['attn']!r})")
    if cfg["hidden_act"] != "sqrelu":
        raise Unsupported(
            source, f"a channel-mixer activation other than squared ReLU (hidden_act={cfg['hidden_act']!r})"
        )
    D, L = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
    K = int(cfg["head_dim"]) if cfg["head_dim"] else D // int(cfg["num_heads"])
    value_dim = cfg["value_dim"]
    widths = [] if value_dim is None else [value_dim] * L if isinstance(value_dim, int) else value_dim
    if any(int(v) != D for v in widths):
        raise Unsupported(source, f"a value width other than hidden_size (value_dim={value_dim!r})")
    if D % K:
        raise LMError(f"{source}: hidden_size {D} is not a multiple of head_dim {K}")
    return cfg


def fla_import(cfg: Dict[str, Any], src: Dict[str, torch.Tensor], source: Any):
    """(our model config, our state dict) from an fla RWKV7Config and RWKV7ForCausalLM state dict."""
    cfg = fla_checked(cfg, source)
    D, L = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
    K = int(cfg["head_dim"]) if cfg["head_dim"] else D // int(cfg["num_heads"])
    src, out = dict(src), {}
    affine_bias = bool(cfg["norm_bias"])

    for i in range(L):
        a = f"model.layers.{i}"

        def get(role: str, a=a) -> Optional[torch.Tensor]:
            if role == "x_x":
                return src.pop(f"{a}.attn.x_x", None)
            if role.endswith(".bias") and role.startswith(("ln1", "ln2")) and not affine_bias:
                return torch.zeros(D)
            return take(src, f"{a}.{FLA_NAMES.get(role, 'attn.' + role)}", source)

        def lora(name: str, a=a):
            p = f"{a}.attn.{name}_lora.lora"
            bias = take(src, f"{p}.2.bias", source) if name != "g" else None
            return take(src, f"{p}.0.weight", source), take(src, f"{p}.2.weight", source), bias

        _layer(get, lora, f"blocks.{i}", i, D // K, out)
    embed_norm = bool(cfg["norm_first"])
    if embed_norm:
        out["blocks.0.norm0.weight"] = take(src, "model.layers.0.pre_norm.weight", source)
        out["blocks.0.norm0.bias"] = src.pop("model.layers.0.pre_norm.bias") if affine_bias else torch.zeros(D)
    out["embed.weight"] = take(src, "model.embeddings.weight", source)
    out["norm_f.weight"] = take(src, "model.norm.weight", source)
    out["norm_f.bias"] = take(src, "model.norm.bias", source) if affine_bias else torch.zeros(D)
    tie = bool(cfg["tie_word_embeddings"])
    if tie:
        src.pop("lm_head.weight", None)
    else:
        out["head.weight"] = take(src, "lm_head.weight", source)
    _leftover(src, source)
    ranks = {n: out[f"blocks.{L - 1}.mixer.{n}_down.weight"].shape[0] for n in ("w", "a", "g")}
    if L > 1:
        ranks["v"] = out[f"blocks.{L - 1}.mixer.v_down.weight"].shape[0]
    ffn = out["blocks.0.mlp.key.weight"].shape[0]
    model_cfg = model_config(
        D,
        D // K,
        L,
        out["embed.weight"].shape[0],
        ffn,
        ranks,
        float(cfg["norm_eps"]),
        K * float(cfg["norm_eps"]),
        tie,
        embed_norm,
        int(cfg["max_position_embeddings"]),
        source,
    )
    return model_cfg, out


# -------------------------------------------------------------------------------------- BlinkDL
BLINK_NAMES = {
    "receptance": "att.receptance.weight",
    "key": "att.key.weight",
    "value": "att.value.weight",
    "output": "att.output.weight",
    "ln_x.weight": "att.ln_x.weight",
    "ln_x.bias": "att.ln_x.bias",
    "ffn.x_k": "ffn.x_k",
    "ffn.key": "ffn.key.weight",
    "ffn.value": "ffn.value.weight",
    "ln1.weight": "ln1.weight",
    "ln1.bias": "ln1.bias",
    "ln2.weight": "ln2.weight",
    "ln2.bias": "ln2.bias",
}
#: BlinkDL's LayerNorms use torch's default eps; ln_x its fixed 64e-5 (RWKV-LM: "notice eps value")
BLINK_NORM_EPS, BLINK_LN_X_EPS = 1e-5, 64e-5


def blink_import(src: Dict[str, torch.Tensor], source: Any):
    """(our model config, our state dict) from a BlinkDL RWKV-7 state dict (no config: sizes come
    from the weights: ``emb`` [V, D], ``att.r_k`` [H, N], ``att.w1`` [D, r], ``ffn.key`` [F, D])."""
    src = dict(src)
    if "emb.weight" not in src or "blocks.0.att.r_k" not in src:
        hint = " (RWKV-4/5/6 weights?)" if any(".att.time_" in k for k in src) else ""
        raise LMError(
            f"{source}: not an RWKV-7 state dict in BlinkDL's layout: no 'emb.weight' or 'blocks.0.att.r_k'{hint}"
        )
    L = 1 + max(int(k.split(".")[1]) for k in src if k.startswith("blocks."))
    V, D = src["emb.weight"].shape
    H = src["blocks.0.att.r_k"].shape[0]
    out: Dict[str, torch.Tensor] = {}
    for i in range(L):
        a = f"blocks.{i}"

        def get(role: str, a=a) -> Optional[torch.Tensor]:
            if role == "x_x":
                return None
            return take(src, f"{a}.{BLINK_NAMES.get(role, 'att.' + role)}", source)

        def lora(name: str, a=a):
            bias = take(src, f"{a}.att.{name}0", source) if name != "g" else None
            return take(src, f"{a}.att.{name}1", source).t(), take(src, f"{a}.att.{name}2", source).t(), bias

        _layer(get, lora, a, i, H, out)
        if i == 0:  # the reference trainer creates v0/v1/v2 in block 0 too; its forward never reads them
            for name in ("v0", "v1", "v2"):
                src.pop(f"{a}.att.{name}", None)
    out["blocks.0.norm0.weight"] = take(src, "blocks.0.ln0.weight", source)
    out["blocks.0.norm0.bias"] = take(src, "blocks.0.ln0.bias", source)
    out["embed.weight"] = take(src, "emb.weight", source)
    out["norm_f.weight"], out["norm_f.bias"] = take(src, "ln_out.weight", source), take(src, "ln_out.bias", source)
    out["head.weight"] = take(src, "head.weight", source)
    _leftover(src, source)
    ranks = {n: out[f"blocks.0.mixer.{n}_down.weight"].shape[0] for n in ("w", "a", "g")}
    if L > 1:
        ranks["v"] = out["blocks.1.mixer.v_down.weight"].shape[0]
    ffn = out["blocks.0.mlp.key.weight"].shape[0]
    # max_seq_len only sets defaults elsewhere (an RNN has no length limit): the reference's ctx 4096
    model_cfg = model_config(D, H, L, V, ffn, ranks, BLINK_NORM_EPS, BLINK_LN_X_EPS, False, True, 4096, source)
    return model_cfg, out


def import_blink(source: str, out_dir: str, tokenizer: Optional[str] = None, eod: Optional[str] = None) -> Path:
    """A BlinkDL RWKV-7 ``.pth`` file as this project's export directory (``tokenizer``: an optional
    ``tokenizer.json`` to ship with it, ``eod`` its document-start token; BlinkDL's own World
    tokenizer is not a ``tokenizer.json``)."""
    path = Path(source)
    if not path.is_file():
        raise LMError(f"{source}: no such file (expected BlinkDL's RWKV-7 .pth)")
    try:
        src = read_weights(path)
    except Exception as err:  # torch.load's own message names the problem
        raise LMError(f"{source}: cannot read as a torch state dict: {str(err).splitlines()[0]}") from None
    model_cfg, state = blink_import(src, source)
    tok = Path(tokenizer) if tokenizer else None
    if tok is not None and not tok.is_file():
        raise LMError(f"{tokenizer}: no such tokenizer file")
    return write_export(Path(out_dir), model_cfg, state, source, tok, eod)
