"""Named sizes match their parameter counts (meta device), the construction makes a gated RNN an
exact linear self-attention layer, and bad model configs fail at config time with key names."""

from pathlib import Path

import pytest
import torch
import yaml

from lm.config import load_experiment
from lm.errors import ConfigError
from lm.models.counting import build_on_meta, count_parameters
from lm.models.gated_rnn import GatedRNN, linear_self_attention, set_lsa_construction
from lm.models.lm import as_model_config
from lm.models.registry import resolve_options

MODEL_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"
SIZED = sorted(p for p in MODEL_DIR.glob("*/*.yaml") if p.stem != "tiny")
TARGET = {"125m": 125e6, "350m": 350e6, "1.3b": 1.3e9}


@pytest.mark.parametrize("path", SIZED, ids=[f"{p.parent.name}/{p.stem}" for p in SIZED])
def test_named_sizes_parameter_counts(path):
    cfg = yaml.safe_load(path.read_text())
    assert cfg["vocab_size"] == 0, f"{path}: vocab_size should be 0 (the data's tokenizer size)"
    # the size's name assumes its nominal vocabulary (scripts/make_model_configs.py NOMINAL_VOCAB)
    n = count_parameters({**cfg, "vocab_size": 8192 if path.stem == "small" else 50304})
    if path.stem == "small":
        assert 5e6 <= n <= 10e6, f"{path}: {n / 1e6:.2f}M parameters, expected 5-10M"
    else:
        target = TARGET[path.stem]
        assert abs(n / target - 1) <= 0.10, f"{path}: {n / 1e6:.1f}M is not within 10% of {path.stem}"


def test_every_model_name_has_every_size():
    names = sorted(p.name for p in MODEL_DIR.iterdir() if p.is_dir())
    assert len(names) >= 13
    for name in names:
        sizes = {p.stem for p in (MODEL_DIR / name).glob("*.yaml")}
        assert sizes == {"tiny", "small", "125m", "350m", "1.3b"}, (name, sizes)


@pytest.mark.parametrize("name", ["gla", "rwkv7", "transformer", "srwm"])
def test_1p3b_configs_instantiate_on_meta(name):
    cfg = yaml.safe_load((MODEL_DIR / name / "1.3b.yaml").read_text())
    assert cfg["vocab_size"] == 0  # taken from the data; build with the size the config is named for
    model = build_on_meta({**cfg, "vocab_size": 50304})
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.num_parameters() > 1.1e9


@pytest.mark.parametrize("heads,dk,dv", [(1, 4, 4), (2, 3, 5)])
def test_construction_makes_gated_rnn_equal_linear_self_attention(heads, dk, dv):
    torch.manual_seed(0)
    D = 12
    cfg = as_model_config(
        dict(
            family="gated_rnn",
            variant="static",
            d_model=D,
            n_heads=2,
            vocab_size=8,
            mixer={"state_dim": heads * dk * dv},
        )
    )
    layer = GatedRNN(cfg, resolve_options("gated_rnn", "static", cfg.mixer), 0)
    W_Q, W_K = torch.randn(heads, dk, D) / D**0.5, torch.randn(heads, dk, D) / D**0.5
    W_V, W_O = torch.randn(heads, dv, D) / D**0.5, torch.randn(D, heads * dv) / (heads * dv) ** 0.5
    set_lsa_construction(layer, W_Q, W_K, W_V, W_O)
    x = torch.randn(3, 41, D)
    y, _ = layer(x)
    expected = linear_self_attention(x, W_Q, W_K, W_V, W_O)
    err = ((y - expected).abs().max() / expected.abs().max()).item()
    assert err <= 1e-5, f"construction error {err:.2e}"
    # and the step form computes the same
    state, steps = layer.init_state(3), []
    for t in range(x.shape[1]):
        y_t, state = layer.step(x[:, t], state)
        steps.append(y_t)
    assert ((torch.stack(steps, 1) - expected).abs().max() / expected.abs().max()).item() <= 1e-5


def _error(overrides):
    with pytest.raises(ConfigError) as info:
        load_experiment(None, overrides)
    return str(info.value)


def test_unknown_family_lists_known():
    msg = _error(["model.family=gru"])
    assert "model.family" in msg and "transformer" in msg and "linear_attention" in msg


def test_unknown_variant_lists_known():
    msg = _error(["model.family=linear_attention", "model.variant=deltanett"])
    assert "model.variant" in msg and "did you mean 'deltanet'" in msg and "gated_deltanet" in msg


def test_heads_must_divide_width():
    msg = _error(["model.d_model=250", "model.n_heads=4"])
    assert "model.d_model (250)" in msg and "model.n_heads (4)" in msg


def test_unknown_mixer_option_suggests():
    msg = _error(["model.family=linear_attention", "model.mixer.conv_sise=4"])
    assert "model.mixer.conv_sise" in msg and "conv_size" in msg
    assert "\n" not in msg
