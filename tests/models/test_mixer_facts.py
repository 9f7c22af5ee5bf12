"""Per-family facts declared by the token mixers (issue 20): FLOPs, weight-decay groups, state size.

The FLOPs and the weight-decay split must equal what the name switches they replaced computed
(``lm/models/flops.py`` by family/variant name, ``configure_optimizers`` by ``p.dim() >= 2``).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lm.config import load_experiment
from lm.errors import ConfigError
from lm.models import all_variants, build_model
from lm.models.counting import build_on_meta
from lm.models.flops import kernel_chunk, matmul_parameters, mixer_forward_flops, training_flops_per_token
from lm.models.mixer import state_bytes
from lm.models.registry import head_dim, resolve_options

VARIANTS = all_variants()
SMALL = dict(vocab_size=61, d_model=64, n_layers=2, n_heads=2)
WIDE = dict(vocab_size=61, d_model=256, n_layers=3, n_heads=2)  # 128-wide heads: the 32-step chunk with Triton

# --------------------------------------------------------------------------------------- FLOPs


def flops_by_name(model, seq_len: int) -> float:
    """``mixer_forward_flops`` as it was before the mixers declared it (switching on the names)."""
    cfg = model.cfg
    L, d, H = cfg.n_layers, cfg.d_model, cfg.n_heads
    hd = head_dim(cfg)
    variant = cfg.variant
    if cfg.family == "transformer":
        return L * 2.0 * d * seq_len
    if cfg.family == "linear_attention":
        mixer = model.blocks[0].mixer
        K, V = mixer.key_dim, mixer.value_dim
        delta = variant in ("deltanet", "gated_deltanet", "deltanet_sumnorm")
        C = kernel_chunk("delta_rule" if delta else "gla", K, V)
        per_head = 2 * C * (K + V) + 4 * K * V
        if delta:
            per_head += 2 * C * K + C * C
        return L * H * float(per_head)
    if cfg.family == "rwkv":
        K = V = hd
        C = kernel_chunk("dplr", K, V)
        return L * H * float(2 * C * (2 * K + V) + C * C + 6 * K * V)
    if cfg.family == "fwp":
        return L * H * 12.0 * hd * hd
    if cfg.family == "lstm" and variant == "lstm":  # torch.nn.LSTM's weights (not nn.Linear): 2 * 4N(d + N), N = d
        return L * 2.0 * 4 * d * (d + d)
    return 0.0


#: (mixer_forward_flops, training_flops_per_token) of the SMALL config, recorded from the name switches
#: (head width 32: the kernels' 64-step chunk with or without Triton)
RECORDED = {
    ("aaren", "aaren"): {256: (0.0, 613248.0), 2048: (0.0, 613248.0)},
    ("fwp", "recurrent_delta"): {256: (49152.0, 811392.0), 2048: (49152.0, 811392.0)},
    ("fwp", "srwm"): {256: (49152.0, 711552.0), 2048: (49152.0, 711552.0)},
    ("fwp", "recurrent_delta_paper"): {256: (49152.0, 811392.0), 2048: (49152.0, 811392.0)},
    ("fwp", "srwm_paper"): {256: (49152.0, 662400.0), 2048: (49152.0, 662400.0)},  # no in_proj: 6 * 2 * 64^2 less
    ("gated_rnn", "static"): {256: (0.0, 662400.0), 2048: (0.0, 662400.0)},
    ("gated_rnn", "x_gated"): {256: (0.0, 662400.0), 2048: (0.0, 662400.0)},
    ("gated_rnn", "state_gated"): {256: (0.0, 711552.0), 2048: (0.0, 711552.0)},
    ("gated_rnn", "input_dependent"): {256: (0.0, 711552.0), 2048: (0.0, 711552.0)},
    ("gated_rnn", "ungated"): {256: (0.0, 564096.0), 2048: (0.0, 564096.0)},
    ("linear_attention", "lsa"): {256: (49152.0, 809856.0), 2048: (49152.0, 809856.0)},
    ("linear_attention", "linear_transformer"): {256: (49152.0, 809856.0), 2048: (49152.0, 809856.0)},
    ("linear_attention", "retnet"): {256: (49152.0, 859008.0), 2048: (49152.0, 859008.0)},
    ("linear_attention", "gla"): {256: (49152.0, 883584.0), 2048: (49152.0, 883584.0)},
    ("linear_attention", "deltanet"): {256: (81920.0, 909696.0), 2048: (81920.0, 909696.0)},
    ("linear_attention", "linear_transformer_nonorm"): {256: (49152.0, 809856.0), 2048: (49152.0, 809856.0)},
    ("linear_attention", "deltanet_sumnorm"): {256: (81920.0, 909696.0), 2048: (81920.0, 909696.0)},
    ("lstm", "lstm"): {256: (131072.0, 908160.0), 2048: (131072.0, 908160.0)},
    ("lstm", "elstm"): {256: (0.0, 711552.0), 2048: (0.0, 711552.0)},  # element-wise recurrence, nn.Linear maps
    ("linear_attention", "gated_deltanet"): {256: (81920.0, 960384.0), 2048: (81920.0, 960384.0)},
    ("linear_attention", "mamba2"): {256: (49152.0, 811392.0), 2048: (49152.0, 811392.0)},
    ("rwkv", "rwkv7"): {256: (90112.0, 1153920.0), 2048: (90112.0, 1153920.0)},
    ("transformer", "transformer"): {256: (65536.0, 859008.0), 2048: (524288.0, 2235264.0)},
}


def test_every_variant_has_recorded_flops():
    assert sorted(RECORDED) == sorted(VARIANTS)


@pytest.mark.parametrize("family,variant", VARIANTS)
@pytest.mark.parametrize("seq_len", [256, 2048])
def test_flops_equal_the_recorded_values(family, variant, seq_len):
    model = build_on_meta(dict(family=family, variant=variant, **SMALL))
    assert (mixer_forward_flops(model, seq_len), training_flops_per_token(model, seq_len)) == RECORDED[family, variant][
        seq_len
    ]


@pytest.mark.parametrize("family,variant", VARIANTS)
@pytest.mark.parametrize("size", [SMALL, WIDE], ids=["small", "wide"])
def test_flops_equal_the_name_switches(family, variant, size):
    model = build_on_meta(dict(family=family, variant=variant, **size))
    for seq_len in (256, 2048):
        before = flops_by_name(model, seq_len)
        assert mixer_forward_flops(model, seq_len) == before
        assert training_flops_per_token(model, seq_len) == 6.0 * matmul_parameters(model) + 3.0 * before
        assert mixer_forward_flops(model, seq_len) == sum(b.mixer.forward_flops(seq_len) for b in model.blocks)


def test_flops_use_the_triton_chunk_when_triton_is_installed():
    """128-wide heads train with 32-step chunks on the Triton delta_rule / dplr kernels (64 on the PyTorch
    paths): pinned so that a moved kernel module cannot silently turn into the fallback."""
    wide = 32 if importlib.util.find_spec("triton") is not None else 64
    assert kernel_chunk("delta_rule", 128, 128) == kernel_chunk("dplr", 128, 128) == wide
    assert kernel_chunk("delta_rule", 64, 64) == kernel_chunk("gla", 128, 128) == 64


def test_only_attention_flops_grow_with_the_sequence():
    for family, variant in VARIANTS:
        mixer = build_on_meta(dict(family=family, variant=variant, **SMALL)).blocks[0].mixer
        grows = mixer.forward_flops(2048) > mixer.forward_flops(256)
        assert grows == (not mixer.constant_state), (family, variant)


# ------------------------------------------------------------------------------- weight decay

#: per family/variant, the token mixer's parameters (relative names, any layer) with weight decay and
#: those without under ``train.weight_decay_groups: matrices`` (matrices decay, the split before the
#: family recipes; those: tests/models/test_param_groups.py)
MIXER_DECAY = {
    "aaren/aaren": ("k_proj.weight o_proj.weight query v_proj.weight", ""),
    "fwp/recurrent_delta": (
        "b_proj.weight k_proj.weight o_norm.weight o_proj.weight q_proj.weight r_b r_k r_q r_v v_proj.weight",
        "b_proj.bias",
    ),
    "fwp/srwm": ("in_proj.weight o_norm.weight o_proj.weight w_b w_k w_q w_y", ""),
    "fwp/recurrent_delta_paper": (
        "b_proj.weight k_proj.weight o_proj.weight q_proj.weight r_b r_k r_q r_v v_proj.weight",
        "",
    ),
    "fwp/srwm_paper": ("o_proj.weight w_b w_k w_q w_y", ""),
    "gated_rnn/static": ("w_g.weight w_o.weight w_q.weight w_v.weight", "nu"),
    "gated_rnn/x_gated": ("w_g.weight w_o.weight w_q.weight w_v.weight", "nu"),
    "gated_rnn/state_gated": ("w_g.weight w_m.weight w_o.weight w_q.weight w_v.weight", "nu w_g.bias w_v.bias"),
    "gated_rnn/input_dependent": ("w_g.weight w_o.weight w_q.weight w_r.weight w_v.weight", "nu w_r.bias"),
    "gated_rnn/ungated": ("w_o.weight w_v.weight", "nu"),
    "linear_attention/lsa": ("k_proj.weight o_proj.weight q_proj.weight v_proj.weight", ""),
    "linear_attention/linear_transformer": ("k_proj.weight o_proj.weight q_proj.weight v_proj.weight", ""),
    "linear_attention/linear_transformer_nonorm": ("k_proj.weight o_proj.weight q_proj.weight v_proj.weight", ""),
    "linear_attention/deltanet_sumnorm": (
        "b_proj.weight k_proj.weight o_proj.weight q_proj.weight v_proj.weight",
        "b_proj.bias",
    ),
    "lstm/lstm": ("lstm.weight_hh_l0 lstm.weight_ih_l0 w_o.weight", "lstm.bias_hh_l0 lstm.bias_ih_l0"),
    "lstm/elstm": ("w_gate.weight w_o.weight w_zf.weight", "b_f b_z v_f v_z w_gate.bias"),
    "linear_attention/retnet": (
        "gate_proj.weight k_proj.weight o_norm.weight o_proj.weight q_proj.weight v_proj.weight",
        "",
    ),
    "linear_attention/gla": (
        "g_down.weight g_up.weight gate_proj.weight k_proj.weight o_norm.weight "
        "o_proj.weight q_proj.weight v_proj.weight",
        "g_up.bias",
    ),
    "linear_attention/deltanet": (
        "b_proj.weight conv_k.weight conv_q.weight conv_v.weight k_proj.weight "
        "o_norm.weight o_proj.weight q_proj.weight v_proj.weight",
        "b_proj.bias conv_k.bias conv_q.bias conv_v.bias",
    ),
    "linear_attention/gated_deltanet": (
        "a_proj.weight b_proj.weight conv_k.weight conv_q.weight conv_v.weight "
        "gate_proj.weight k_proj.weight o_norm.weight o_proj.weight "
        "q_proj.weight v_proj.weight",
        "A_log b_proj.bias conv_k.bias conv_q.bias conv_v.bias dt_bias",
    ),
    "linear_attention/mamba2": (
        "a_proj.weight conv_k.weight conv_q.weight conv_v.weight "
        "gate_proj.weight k_proj.weight o_norm.weight o_proj.weight "
        "q_proj.weight v_proj.weight",
        "A_log D conv_k.bias conv_q.bias conv_v.bias dt_bias",
    ),
    "rwkv/rwkv7": (
        "a_down.weight a_up.weight g_down.weight g_up.weight key.weight mu o_norm.bias "
        "o_norm.weight output.weight r_k receptance.weight v_down.weight v_up.weight value.weight "
        "w_down.weight w_up.weight",
        "a0 k_a k_k v0 w0",
    ),
    "transformer/transformer": ("o_proj.weight qkv.weight", ""),
}
#: the skeleton around the mixers (SwiGLU channel mixer, untied head off by default: tied)
SKELETON_DECAY = "embed.weight blocks.{i}.mlp.gate_up.weight blocks.{i}.mlp.down.weight"
SKELETON_NO_DECAY = "norm_f.weight blocks.{i}.norm1.weight blocks.{i}.norm2.weight"


def tiny(family: str, variant: str, **extra):
    torch.manual_seed(0)
    return build_model(
        dict(
            family=family,
            variant=variant,
            vocab_size=61,
            d_model=32,
            n_layers=2,
            n_heads=2,
            kernel_backend="torch",
            **extra,
        )
    )


def split_names(model, params):
    names = {id(p): n for n, p in model.named_parameters()}
    mixer = {names[id(p)].split(".mixer.", 1)[1] for p in params if ".mixer." in names[id(p)]}
    rest = {names[id(p)] for p in params if ".mixer." not in names[id(p)]}
    return mixer, rest


def matrices_split(model):
    """(decay, no_decay) parameters of the ``matrices`` split (two groups, one learning rate)."""
    decay, no_decay = model.weight_decay_groups(family=False, lr_multipliers=False)
    return decay.params, no_decay.params


def skeleton(template: str, n_layers: int = 2) -> set:
    return {name.format(i=i) for name in template.split() for i in range(n_layers)}


def test_every_variant_lists_its_weight_decay():
    assert sorted(MIXER_DECAY) == sorted(f"{f}/{v}" for f, v in VARIANTS)


@pytest.mark.parametrize("family,variant", VARIANTS)
def test_weight_decay_groups_list_per_family(family, variant):
    model = tiny(family, variant)
    decay, no_decay = matrices_split(model)
    (mixer_decay, rest_decay), (mixer_no_decay, rest_no_decay) = split_names(model, decay), split_names(model, no_decay)
    want_decay, want_no_decay = MIXER_DECAY[f"{family}/{variant}"]
    assert mixer_decay == set(want_decay.split()) and mixer_no_decay == set(want_no_decay.split())
    assert rest_decay == skeleton(SKELETON_DECAY)
    norm0 = {"blocks.0.norm0.weight"} if family == "rwkv" else set()  # RWKV-7's ln0 on the embedding
    assert rest_no_decay == skeleton(SKELETON_NO_DECAY) | norm0


@pytest.mark.parametrize("family,variant", VARIANTS)
def test_weight_decay_groups_are_the_optimizers_groups_of_before(family, variant):
    """Same parameters in the same order as ``configure_optimizers``' ``p.dim() >= 2`` split over
    ``parameters()``, so an optimizer built from them is the same optimizer."""
    model = tiny(family, variant, tie_embeddings=False, mlp="rwkv_cmix" if family == "rwkv" else "swiglu")
    model.blocks[0].norm1.weight.requires_grad_(False)  # frozen parameters stay out of both groups
    decay, no_decay = matrices_split(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [id(p) for p in decay] == [id(p) for p in trainable if p.dim() >= 2]
    assert [id(p) for p in no_decay] == [id(p) for p in trainable if p.dim() < 2]


def test_a_mixer_can_exempt_its_matrices():
    model = tiny("linear_attention", "gla")
    for block in model.blocks:
        block.mixer.no_weight_decay = lambda: {"o_norm.weight", "g_up.bias"}
    decay, no_decay = (g.params for g in model.weight_decay_groups())
    mixer_no_decay, rest = split_names(model, no_decay)
    assert mixer_no_decay == {"o_norm.weight", "g_up.bias"} and rest == skeleton(SKELETON_NO_DECAY)
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


# --------------------------------------------------------------------------------- state size


@pytest.mark.parametrize("family,variant", VARIANTS)
def test_state_size_is_the_state_a_forward_returns(family, variant):
    model = tiny(family, variant).eval()
    B, T = 2, 7
    tokens = torch.randint(0, 61, (B, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, state = model.hidden_states(tokens, None, return_state=True)
    for block, layer in zip(model.blocks, state):
        assert block.mixer.state_size(B, context=T) == state_bytes(layer["mixer"]) > 0
        assert block.mixer.state_size(B) == state_bytes(block.mixer.init_state(B, dtype=torch.float32))


@pytest.mark.parametrize("family,variant", VARIANTS)
def test_state_size_grows_only_without_constant_state(family, variant):
    mixer = build_on_meta(dict(family=family, variant=variant, **SMALL)).blocks[0].mixer
    short, long = mixer.state_size(1, context=16), mixer.state_size(1, context=4096)
    assert (short == long) == mixer.constant_state
    assert mixer.state_size(3, context=16) == 3 * short


def test_kv_cache_size():
    mixer = tiny("transformer", "transformer").blocks[0].mixer
    H, K = mixer.n_heads, mixer.head_dim
    assert mixer.state_size(1, context=100) == 2 * H * 100 * K * 4
    assert mixer.state_size(2, context=100, dtype=torch.bfloat16) == 2 * 2 * H * 100 * K * 2
    assert mixer.state_size() == 0


def test_state_size_follows_the_activation_dtype_where_the_state_does():
    mixer = tiny("linear_attention", "deltanet").blocks[0].mixer  # S in fp32, conv buffers in the activations'
    H, K, V, pad = mixer.n_heads, mixer.key_dim, mixer.value_dim, mixer.options.conv_size - 1
    S = H * K * V * 4
    assert mixer.state_size() == S + pad * H * (2 * K + V) * 4
    assert mixer.state_size(dtype=torch.bfloat16) == S + pad * H * (2 * K + V) * 2


# --------------------------------------------------------------------------- fwp kind option


def test_fwp_variants_set_the_kind_option():
    assert resolve_options("fwp", "recurrent_delta", None).kind == "recurrent_delta"
    assert resolve_options("fwp", "srwm", None).kind == "srwm"
    assert hasattr(tiny("fwp", "srwm").blocks[0].mixer, "w_y")
    with pytest.raises(ConfigError, match="model.mixer.kind: 'rdn' is not one of recurrent_delta, srwm"):
        load_experiment(None, ["model.family=fwp", "model.variant=srwm", "model.mixer.kind=rdn"])
