"""The paper's gated RNN (``gated_rnn/state_gated``, issue #21): the explicit construction with query
neurons (decay 0, fed by the constant channel) and key-value neurons (decay 1) equals linear
self-attention; the old ``static`` name still builds the ``x_gated`` layer."""

import pytest
import torch

from lm.errors import ConfigError
from lm.models import build_model
from lm.models.gated_rnn import (
    GatedRNN,
    linear_self_attention,
    set_lsa_construction,
    set_lsa_construction_state_gated,
    state_gated_neurons,
)
from lm.models.lm import as_model_config
from lm.models.registry import resolve_options
from lm.probes.form import stepped_outputs


def _layer(variant, D, **mixer):
    cfg = as_model_config(dict(family="gated_rnn", variant=variant, d_model=D, n_heads=1, vocab_size=8, mixer=mixer))
    return GatedRNN(cfg, resolve_options("gated_rnn", variant, cfg.mixer), 0)


def _lsa(heads, dk, dv, D, gen):
    s = D**-0.5
    return (
        torch.randn(heads, dk, D, generator=gen) * s,
        torch.randn(heads, dk, D, generator=gen) * s,
        torch.randn(heads, dv, D, generator=gen) * s,
        torch.randn(D, heads * dv, generator=gen) * (heads * dv) ** -0.5,
    )


@pytest.mark.parametrize("heads,dk,dv", [(1, 4, 4), (2, 3, 5), (3, 2, 1)])
def test_state_gated_construction_is_linear_self_attention(heads, dk, dv):
    gen = torch.Generator().manual_seed(heads * 100 + dk * 10 + dv)
    D = 12
    N, M = state_gated_neurons(heads, dk, dv)
    assert (N, M) == (heads * (dk * dv + dk), heads * dk * dv)
    layer = _layer("state_gated", D, state_dim=N, gate_dim=M)
    W = _lsa(heads, dk, dv, D, gen)
    set_lsa_construction_state_gated(layer, *W)
    assert torch.all(torch.exp(-torch.exp(layer.nu))[:M] == 1) and torch.all(torch.exp(-torch.exp(layer.nu))[M:] == 0)
    x = torch.randn(3, 41, D, generator=gen)
    with torch.no_grad():
        y, _ = layer(x)
        stepped, _ = stepped_outputs(layer, x)
    expected = linear_self_attention(x, *W)
    scale = expected.abs().max()
    assert ((y - expected).abs().max() / scale).item() <= 1e-5
    assert ((stepped - expected).abs().max() / scale).item() <= 1e-5
    # a perturbed construction is not exact: the test can fail
    with torch.no_grad():
        layer.nu[0] = 0.0
        y_bad, _ = layer(x)
    assert ((y_bad - expected).abs().max() / scale).item() > 1e-3


def test_constructions_refuse_the_other_layer():
    gen = torch.Generator().manual_seed(0)
    W = _lsa(1, 2, 2, 6, gen)
    with pytest.raises(ValueError, match="state_gated"):
        set_lsa_construction_state_gated(_layer("x_gated", 6, state_dim=6, gate_dim=4), *W)
    with pytest.raises(ValueError, match="x_gated"):
        set_lsa_construction(_layer("state_gated", 6, state_dim=4), *W)
    with pytest.raises(ValueError, match="state_dim/gate_dim"):
        set_lsa_construction_state_gated(_layer("state_gated", 6, state_dim=4), *W)


def test_old_static_name_builds_the_x_gated_layer():
    torch.manual_seed(0)
    a = build_model(dict(family="gated_rnn", variant="static", vocab_size=16, d_model=16, n_layers=1, n_heads=1))
    torch.manual_seed(0)
    b = build_model(dict(family="gated_rnn", variant="x_gated", vocab_size=16, d_model=16, n_layers=1, n_heads=1))
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    tokens = torch.randint(0, 16, (2, 9))
    assert torch.equal(a(tokens)[0], b(tokens)[0])


def test_state_gated_layer_has_state_readout_and_bias_channel():
    layer = _layer("state_gated", 8, state_dim=20, gate_dim=6)
    assert layer.w_m.weight.shape == (6, 20) and layer.w_q.weight.shape == (6, 20) and layer.w_o.weight.shape == (8, 6)
    assert layer.w_v.bias is not None and layer.w_g.bias is not None
    lam = torch.exp(-torch.exp(layer.nu))
    assert lam.min() >= 0.05 - 1e-6 and lam.max() <= 0.95 + 1e-6


def test_bad_output_gate_is_a_config_error():
    from lm.config import load_experiment

    with pytest.raises(ConfigError, match="model.mixer.output_gate"):
        load_experiment(None, ["model.family=gated_rnn", "model.variant=state_gated", "model.mixer.output_gate=query"])
