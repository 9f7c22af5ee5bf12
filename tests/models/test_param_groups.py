"""Per-family parameter groups (issue 16): which parameters get weight decay and which learning-rate
multiplier, for every registered variant, written out by hand (not recomputed by the rule), and the
RWKV-7 reference initialisation against its formulas, written out independently of lm/models/rwkv.py.

The ``matrices`` split (the one before the family recipes) is tests/models/test_mixer_facts.py's table.
"""

from __future__ import annotations

import math

import pytest
import torch

from lm.config import load_experiment
from lm.errors import ConfigError
from lm.models import all_variants, build_model

VARIANTS = all_variants()

#: per family/variant under ``train.weight_decay_groups: family``: the token mixer's parameters (names
#: relative to the mixer, every layer) that decay, those that do not, and those trained at a multiple of
#: the learning rate ("name:multiplier", none decayed)
FAMILY = {
    "aaren/aaren": ("k_proj.weight o_proj.weight query v_proj.weight", "", ""),
    "fwp/recurrent_delta": (
        "b_proj.weight k_proj.weight o_proj.weight q_proj.weight r_b r_k r_q r_v v_proj.weight",
        "b_proj.bias o_norm.weight",
        "",
    ),
    "fwp/srwm": ("in_proj.weight o_proj.weight w_b w_k w_q w_y", "o_norm.weight", ""),
    "fwp/recurrent_delta_paper": (
        "b_proj.weight k_proj.weight o_proj.weight q_proj.weight r_b r_k r_q r_v v_proj.weight",
        "",
        "",
    ),
    "fwp/srwm_paper": ("o_proj.weight w_b w_k w_q w_y", "", ""),
    "gated_rnn/static": ("w_g.weight w_o.weight w_q.weight w_v.weight", "nu", ""),
    "gated_rnn/x_gated": ("w_g.weight w_o.weight w_q.weight w_v.weight", "nu", ""),
    "gated_rnn/state_gated": ("w_g.weight w_m.weight w_o.weight w_q.weight w_v.weight", "nu w_g.bias w_v.bias", ""),
    "gated_rnn/input_dependent": ("w_g.weight w_o.weight w_q.weight w_r.weight w_v.weight", "nu w_r.bias", ""),
    "gated_rnn/ungated": ("w_o.weight w_v.weight", "nu", ""),
    "linear_attention/lsa": ("k_proj.weight o_proj.weight q_proj.weight v_proj.weight", "", ""),
    "linear_attention/linear_transformer": ("k_proj.weight o_proj.weight q_proj.weight v_proj.weight", "", ""),
    "linear_attention/retnet": (
        "gate_proj.weight k_proj.weight o_proj.weight q_proj.weight v_proj.weight",
        "o_norm.weight",
        "",
    ),
    "linear_attention/gla": (
        "g_down.weight g_up.weight gate_proj.weight k_proj.weight o_proj.weight q_proj.weight v_proj.weight",
        "g_up.bias o_norm.weight",
        "",
    ),
    "linear_attention/deltanet": (
        "b_proj.weight conv_k.weight conv_q.weight conv_v.weight k_proj.weight o_proj.weight q_proj.weight "
        "v_proj.weight",
        "b_proj.bias conv_k.bias conv_q.bias conv_v.bias o_norm.weight",
        "",
    ),
    "linear_attention/gated_deltanet": (
        "a_proj.weight b_proj.weight conv_k.weight conv_q.weight conv_v.weight gate_proj.weight k_proj.weight "
        "o_proj.weight q_proj.weight v_proj.weight",
        "A_log b_proj.bias conv_k.bias conv_q.bias conv_v.bias dt_bias o_norm.weight",
        "",
    ),
    "linear_attention/linear_transformer_nonorm": ("k_proj.weight o_proj.weight q_proj.weight v_proj.weight", "", ""),
    "linear_attention/deltanet_sumnorm": (
        "b_proj.weight k_proj.weight o_proj.weight q_proj.weight v_proj.weight",
        "b_proj.bias",
        "",
    ),
    "lstm/lstm": ("lstm.weight_hh_l0 lstm.weight_ih_l0 w_o.weight", "lstm.bias_hh_l0 lstm.bias_ih_l0", ""),
    "lstm/elstm": ("w_gate.weight w_o.weight w_zf.weight", "b_f b_z v_f v_z w_gate.bias", ""),
    "linear_attention/mamba2": (
        "a_proj.weight conv_k.weight conv_q.weight conv_v.weight gate_proj.weight k_proj.weight o_proj.weight "
        "q_proj.weight v_proj.weight",
        "A_log D conv_k.bias conv_q.bias conv_v.bias dt_bias o_norm.weight",
        "",
    ),
    # BlinkDL's configure_optimizers: only the 2-D ``.weight`` projections decay, w0 in the 2x group
    "rwkv/rwkv7": (
        "key.weight output.weight receptance.weight value.weight",
        "a0 a_down.weight a_up.weight g_down.weight g_up.weight k_a k_k mu o_norm.bias o_norm.weight r_k v0 "
        "v_down.weight v_up.weight w_down.weight w_up.weight",
        "w0:2",
    ),
    "transformer/transformer": ("o_proj.weight qkv.weight", "", ""),
}
#: the skeleton around the mixers in ``tiny`` (SwiGLU channel mixer, RMSNorm, head tied to the embedding)
SKELETON_DECAY = {"embed.weight"} | {f"blocks.{i}.mlp.{n}.weight" for i in range(2) for n in ("gate_up", "down")}
SKELETON_NO_DECAY = {"norm_f.weight"} | {f"blocks.{i}.norm{j}.weight" for i in range(2) for j in (1, 2)}


def tiny(family: str, variant: str, **extra):
    torch.manual_seed(0)
    cfg = dict(family=family, variant=variant, vocab_size=61, d_model=32, n_layers=2, n_heads=2, kernel_backend="torch")
    return build_model({**cfg, **extra})


def named_groups(model, **flags):
    """{group name: set of parameter names} of ``weight_decay_groups(**flags)``, with each group's flags."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = model.weight_decay_groups(**flags)
    return {g.name: ({names[id(p)] for p in g.params}, g.decay, g.lr_multiplier) for g in groups}


def mixer_names(names: set) -> set:
    return {n.split(".mixer.", 1)[1] for n in names if ".mixer." in n}


def test_every_variant_lists_its_groups():
    assert sorted(FAMILY) == sorted(f"{f}/{v}" for f, v in VARIANTS)


@pytest.mark.parametrize("family,variant", VARIANTS)
def test_family_groups(family, variant):
    model = tiny(family, variant)
    groups = named_groups(model)
    want_decay, want_no_decay, want_scaled = FAMILY[f"{family}/{variant}"]
    scaled = dict(item.split(":") for item in want_scaled.split())
    expected_names = ["decay", "no_decay"] + [f"no_decay_lr{m}x" for m in sorted(set(scaled.values()))]
    assert list(groups) == expected_names
    decay, no_decay = groups["decay"][0], groups["no_decay"][0]
    assert mixer_names(decay) == set(want_decay.split())
    assert mixer_names(no_decay) == set(want_no_decay.split())
    assert decay - {n for n in decay if ".mixer." in n} == SKELETON_DECAY
    norm0 = {"blocks.0.norm0.weight"} if family == "rwkv" else set()  # RWKV-7's ln0 on the embedding
    assert no_decay - {n for n in no_decay if ".mixer." in n} == SKELETON_NO_DECAY | norm0
    for name, mult in scaled.items():
        params, decays, lr_mult = groups[f"no_decay_lr{mult}x"]
        assert mixer_names(params) == {name} and not decays and lr_mult == float(mult)
        assert len(params) == 2  # both layers
    # every trainable parameter in exactly one group
    total = sum(len(g[0]) for g in groups.values())
    assert total == len({n for n, _ in model.named_parameters()})


def test_rwkv7_reference_groups_on_its_own_skeleton():
    """The whole table of a ``configs/model/rwkv7`` model (LayerNorms, RWKV channel mixer), untied."""
    model = tiny("rwkv", "rwkv7", mlp="rwkv_cmix", norm="layernorm", tie_embeddings=False, n_layers=3)
    groups = named_groups(model)
    assert list(groups) == ["decay", "no_decay", "no_decay_lr2x"]
    assert groups["decay"][0] == {"embed.weight", "head.weight"} | {
        f"blocks.{i}.{n}.weight"
        for i in range(3)
        for n in ("mixer.receptance", "mixer.key", "mixer.value", "mixer.output", "mlp.key", "mlp.value")
    }
    assert groups["no_decay_lr2x"][0] == {"blocks.0.mixer.w0", "blocks.1.mixer.w0", "blocks.2.mixer.w0"}
    per_layer = (
        "norm1.weight norm1.bias norm2.weight norm2.bias mlp.mu mixer.mu mixer.a0 mixer.k_k mixer.k_a mixer.r_k "
        "mixer.w_down.weight mixer.w_up.weight mixer.a_down.weight mixer.a_up.weight mixer.g_down.weight "
        "mixer.g_up.weight mixer.o_norm.weight mixer.o_norm.bias"
    ).split()
    value_residual = "mixer.v0 mixer.v_down.weight mixer.v_up.weight".split()  # layers 1 and 2 only
    want = {"norm_f.weight", "norm_f.bias", "blocks.0.norm0.weight", "blocks.0.norm0.bias"}
    want |= {f"blocks.{i}.{n}" for i in range(3) for n in per_layer}
    want |= {f"blocks.{i}.{n}" for i in (1, 2) for n in value_residual}
    assert groups["no_decay"][0] == want


@pytest.mark.parametrize("family,variant", [("rwkv", "rwkv7"), ("linear_attention", "gla")])
def test_opt_outs(family, variant):
    """lr_multipliers=False: one rate (the 2x parameters join no_decay); family=False: the matrices split."""
    model = tiny(family, variant)
    flat = named_groups(model, lr_multipliers=False)
    assert list(flat) == ["decay", "no_decay"] and all(g[2] == 1.0 for g in flat.values())
    if family == "rwkv":
        assert {"blocks.0.mixer.w0", "blocks.1.mixer.w0"} <= flat["no_decay"][0]
    matrices = named_groups(model, family=False, lr_multipliers=False)
    shapes = dict(model.named_parameters())
    assert matrices["decay"][0] == {n for n, p in shapes.items() if p.dim() >= 2}
    assert matrices["no_decay"][0] == {n for n, p in shapes.items() if p.dim() < 2}
    # multipliers without the family's decay exemptions: w0 (a vector) still at 2x, without decay
    mixed = named_groups(model, family=False)
    if family == "rwkv":
        assert mixed["no_decay_lr2x"][0] == {"blocks.0.mixer.w0", "blocks.1.mixer.w0"}


def test_frozen_parameters_are_in_no_group():
    model = tiny("rwkv", "rwkv7")
    model.blocks[0].mixer.w0.requires_grad_(False)
    model.blocks[1].mixer.key.weight.requires_grad_(False)
    groups = named_groups(model)
    every = set().union(*(g[0] for g in groups.values()))
    assert "blocks.0.mixer.w0" not in every and "blocks.1.mixer.key.weight" not in every
    assert groups["no_decay_lr2x"][0] == {"blocks.1.mixer.w0"}


# ------------------------------------------------------------------------- RWKV-7 reference init
L, D, H = 3, 64, 2  # head size K = 32
K = D // H


def reference_model(**extra):
    return tiny("rwkv", "rwkv7", d_model=D, n_layers=L, n_heads=H, mlp="rwkv_cmix", norm="layernorm", **extra)


def gram(w: torch.Tensor) -> torch.Tensor:
    """W^T W for a tall or square W, W W^T for a wide one (the identity times gain^2 when orthogonal)."""
    w = w.detach().double()
    return w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T


def assert_orthogonal(w: torch.Tensor, gain: float):
    g = gram(w)
    torch.testing.assert_close(g, gain**2 * torch.eye(g.shape[0], dtype=torch.float64), atol=1e-5, rtol=0)


def expected_vectors(layer: int):
    """The reference's per-channel vectors of one layer, channel by channel (C = D here, N = K)."""
    C = D
    out = {"w0": [], "a0": [], "v0": [], "k_k": []}
    for n in range(C):
        linear = n / (C - 1) - 0.5
        z = ((n % K) - (K - 1) / 2) / ((K - 1) / 2)
        zigzag = z * abs(z)
        out["w0"].append(-6 + 6 * (n / (C - 1)) ** (1 + (layer / (L - 1)) ** 0.3) + 0.5 + zigzag * 2.5)
        out["a0"].append(-0.19 + zigzag * 0.3 + linear * 0.4)
        out["v0"].append(0.73 - linear * 0.4)
        out["k_k"].append(0.71 - linear * 0.1)
    return {k: torch.tensor(v) for k, v in out.items()}


@pytest.mark.parametrize("layer", range(L))
def test_rwkv7_reference_init_vectors(layer):
    mixer = reference_model().blocks[layer].mixer
    want = expected_vectors(layer)
    for name in ("w0", "a0", "k_k"):
        torch.testing.assert_close(getattr(mixer, name).detach(), want[name], atol=1e-5, rtol=0)
    if layer > 0:
        torch.testing.assert_close(mixer.v0.detach(), want["v0"], atol=1e-6, rtol=0)
    assert torch.all(mixer.k_a == 1.02) and torch.all(mixer.r_k == -0.04) and mixer.r_k.shape == (H, K)
    # spot values: layer 0's w0 at channels 0 and 31 (the first head's ends of the zigzag) and 63
    if layer == 0:
        assert mixer.w0[0].item() == pytest.approx(-6 + 0.5 - 2.5)
        assert mixer.w0[K - 1].item() == pytest.approx(-6 + 6 * (31 / 63) + 0.5 + 2.5, abs=1e-5)
        assert mixer.w0[D - 1].item() == pytest.approx(0.5 + 2.5)
    ratio = 1 - layer / L
    for i, p in enumerate((0.2, 0.9, 0.7, 0.7, 0.9, 0.2)):  # r, w, k, v, a, g
        want_mu = torch.tensor([1 - (d / D) ** (p * ratio) for d in range(D)])
        torch.testing.assert_close(mixer.mu[i].detach(), want_mu, atol=1e-6, rtol=0)
    want_gain = torch.full((H, K), ((layer + 1) / L) ** 0.7)
    torch.testing.assert_close(mixer.o_norm.weight.detach(), want_gain, atol=1e-7, rtol=0)
    assert torch.all(mixer.o_norm.bias == 0)


@pytest.mark.parametrize("layer", range(L))
def test_rwkv7_reference_init_matrices(layer):
    model = reference_model(tie_embeddings=False)
    block = model.blocks[layer]
    mixer = block.mixer
    assert_orthogonal(mixer.receptance.weight, 1.0)
    assert_orthogonal(mixer.value.weight, 1.0)
    assert_orthogonal(mixer.key.weight, 0.1)
    assert torch.all(mixer.output.weight == 0)
    downs = ["w_down", "a_down", "g_down"] + (["v_down"] if layer > 0 else [])
    for name in downs:
        assert torch.all(getattr(mixer, name).weight == 0), name
    # up maps [C, rank]: the reference's [rank, C] orthogonal * 0.1 (* sqrt(rank/C) when rank > C)
    assert mixer.w_up.weight.shape == (D, 32) and mixer.g_up.weight.shape == (D, 64)
    for name in ["w_up", "a_up", "g_up"] + (["v_up"] if layer > 0 else []):
        assert_orthogonal(getattr(mixer, name).weight, 0.1)
    # channel mixer: lerp 1 - (d/D)^((1 - l/L)^4), key orthogonal, value zero
    want_mu = torch.tensor([1 - (d / D) ** ((1 - layer / L) ** 4) for d in range(D)])
    torch.testing.assert_close(block.mlp.mu.detach(), want_mu, atol=1e-6, rtol=0)
    assert_orthogonal(block.mlp.key.weight, 1.0)
    assert torch.all(block.mlp.value.weight == 0)
    # embedding uniform(+-1e-4), untied head orthogonal with gain 0.5 sqrt(V/D) if V > D else 0.5
    emb = model.embed.weight.detach()
    assert emb.abs().max() <= 1e-4 and emb.abs().max() > 5e-5 and emb.abs().mean() > 3e-5
    assert_orthogonal(model.head.weight, 0.5)  # V = 61 < D = 64


def test_rwkv7_reference_init_keeps_a_tied_embedding_normal():
    """A head tied to the embedding: the shared matrix keeps the skeleton's normal(init_std) (the
    reference's uniform(+-1e-4) embedding would be the output layer too)."""
    model = reference_model()  # tie_embeddings: the skeleton's default
    assert model.head is None
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.all(model.blocks[0].mixer.output.weight == 0)  # the rest of the recipe applies


def test_rwkv7_reference_head_gain_grows_with_the_vocabulary():
    model = reference_model(tie_embeddings=False, vocab_size=256)
    assert_orthogonal(model.head.weight, 0.5 * math.sqrt(256 / D))


def test_rwkv7_low_rank_wider_than_the_model():
    """rank 64 > C = 32: the reference's gain sqrt(rank / C) * 0.1 on the gate's up map."""
    mixer = tiny("rwkv", "rwkv7", d_model=32, n_heads=2).blocks[0].mixer
    assert mixer.g_up.weight.shape == (32, 64)
    assert_orthogonal(mixer.g_up.weight, 0.1 * math.sqrt(64 / 32))


def test_rwkv7_simple_init_is_the_earlier_one():
    """``init: simple`` keeps the earlier values (bit-identical logits: tests/golden.py's old entries)."""
    model = reference_model(mixer={"init": "simple"})
    mixer = model.blocks[0].mixer
    assert mixer.w0[0].item() == pytest.approx(-7 + 0.5)
    assert torch.all(mixer.k_k == 0.85) and torch.all(mixer.k_a == 1.0) and torch.all(mixer.a0 == 0)
    assert torch.all(mixer.o_norm.weight == 1) and torch.all(model.blocks[0].mlp.mu == 0.5)
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert mixer.output.weight.abs().max() > 0


def test_rwkv7_unknown_init_is_a_config_error():
    want = r"model.mixer.init: 'refrence' .*did you mean 'reference'"
    with pytest.raises(ConfigError, match=want) as e:
        load_experiment(None, ["model=rwkv7/tiny", "model.mixer.init=refrence"])
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=want):
        reference_model(mixer={"init": "refrence"})


def test_reference_init_trains_from_a_zero_output():
    """With the output projections and channel-mixer values zero, the blocks start as the identity and the
    first gradients still reach every projection (nothing is stuck at zero)."""
    model = reference_model()
    tokens = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(0))
    logits, _ = model(tokens)
    torch.nn.functional.cross_entropy(logits.reshape(-1, 61), tokens.reshape(-1)).backward()
    for i, block in enumerate(model.blocks):
        assert block.mixer.output.weight.grad.abs().max() > 0, i
        assert block.mlp.value.weight.grad.abs().max() > 0, i
