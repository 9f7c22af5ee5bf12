"""Seed 001's paper-faithful definitions (issue #21): the linear Transformer without the denominator
and DeltaNet with sum-normalised elu + 1 q/k (no convolution) equal their recurrences written out
here; the LSTM mixer equals torch.nn.LSTM run per document; the recurrent delta and SRWM layers of the
official code (``fwp/recurrent_delta_paper``, ``fwp/srwm_paper``) have its parameters, initialisation
and layer equations, written out here in the official orientation (x W rather than W x)."""

import math

import pytest
import torch
import torch.nn.functional as F

from lm.errors import ConfigError
from lm.models import build_model
from tests.models import test_models, test_packed


def _mixer(family, variant, **kw):
    torch.manual_seed(0)
    model = build_model(dict(family=family, variant=variant, vocab_size=16, d_model=16, n_layers=1, n_heads=2, **kw))
    return model.blocks[0].mixer.eval()


def _heads(t, H):
    B, T, _ = t.shape
    return t.view(B, T, H, -1)


def test_linear_transformer_nonorm_is_elu1_without_denominator():
    m = _mixer("linear_attention", "linear_transformer_nonorm")
    x = torch.randn(2, 9, 16)
    phi = lambda t: F.elu(t) + 1  # noqa: E731
    q, k, v = _heads(phi(m.q_proj(x)), 2), _heads(phi(m.k_proj(x)), 2), _heads(m.v_proj(x), 2)
    S = torch.zeros(2, 2, q.shape[-1], v.shape[-1])
    outs = []
    for t in range(9):
        S = S + torch.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    want = m.o_proj(torch.stack(outs, 1).reshape(2, 9, -1))
    with torch.no_grad():
        got, _ = m(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


def test_deltanet_sumnorm_is_the_delta_rule_on_sum_normalised_features():
    m = _mixer("linear_attention", "deltanet_sumnorm")
    assert not hasattr(m, "conv_q") and not hasattr(m, "o_norm") and not hasattr(m, "gate_proj")
    x = torch.randn(2, 9, 16)

    def phi(t):
        t = F.elu(t) + 1
        return t / t.sum(-1, keepdim=True)

    q, k, v = (
        _heads(phi(_heads(m.q_proj(x), 2)).flatten(2), 2),
        _heads(phi(_heads(m.k_proj(x), 2)).flatten(2), 2),
        _heads(m.v_proj(x), 2),
    )
    assert torch.allclose(k.sum(-1), torch.ones(2, 9, 2))
    beta = torch.sigmoid(m.b_proj(x))
    K = q.shape[-1]
    S = torch.zeros(2, 2, K, v.shape[-1])
    outs = []
    for t in range(9):
        kt, vt, bt = k[:, t], v[:, t], beta[:, t, :, None]
        old = torch.einsum("bhkv,bhk->bhv", S, kt)
        S = S + torch.einsum("bhk,bhv->bhkv", kt, bt * (vt - old))
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]) * K**-0.5)
    want = m.o_proj(torch.stack(outs, 1).reshape(2, 9, -1))
    with torch.no_grad():
        got, _ = m(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


def test_lstm_mixer_is_torch_lstm_per_document():
    from lm.models.segments import Segments

    m = _mixer("lstm", "lstm", mixer={"hidden_dim": 12})
    x = torch.randn(2, 11, 16)
    starts = torch.zeros(2, 11, dtype=torch.bool)
    starts[0, 4] = starts[1, 0] = starts[1, 7] = True
    with torch.no_grad():
        got, state = m(x, return_state=True, segments=Segments.from_starts(starts))
        pieces = {0: [(0, 4), (4, 11)], 1: [(0, 7), (7, 11)]}
        for b, docs in pieces.items():
            for a, e in docs:
                out, (h, c) = m.lstm(x[b : b + 1, a:e])
                assert torch.allclose(got[b, a:e], m.w_o(out[0]), atol=1e-6)
            assert torch.allclose(state["h"][b], h[0, 0], atol=1e-6) and torch.allclose(
                state["c"][b], c[0, 0], atol=1e-6
            )


def test_state_gated_experiment_configs_build():
    from lm.config import load_experiment

    for name in ("repro-lsa-teacher-state_gated", "repro-icl-regression-state_gated"):
        cfg = load_experiment(name, [])
        assert cfg.model.family == "gated_rnn" and cfg.model.variant == "state_gated"
        model = build_model(dict(cfg.model, vocab_size=0, input_dim=4, output_dim=4))
        assert model.blocks[0].mixer.state_gated


# ------------------------------------------- recurrent delta and SRWM: the official layers (#21)

PAPER_FWP = ("recurrent_delta_paper", "srwm_paper")


def _params(mixer):
    return {n: tuple(p.shape) for n, p in mixer.named_parameters()}


def test_fwp_paper_layers_have_the_official_parameters():
    """RecUpdateTanhFastFFlayer: bias-free q/k/v/beta maps, R_q, R_k, R_v [D, D] and r_b [D] per head,
    W_o; no norm. SRWMlayer: the four initial matrices per head and W_o; no input projection, no norm."""
    H, K, D = 2, 8, 16
    rd = _mixer("fwp", "recurrent_delta_paper")
    assert _params(rd) == {
        "q_proj.weight": (H * K, D),
        "k_proj.weight": (H * K, D),
        "v_proj.weight": (H * K, D),
        "b_proj.weight": (H, D),
        "r_q": (H, K, K),
        "r_k": (H, K, K),
        "r_v": (H, K, K),
        "r_b": (H, K),
        "o_proj.weight": (D, H * K),
    }
    srwm = _mixer("fwp", "srwm_paper")
    assert _params(srwm) == {
        "w_y": (H, K, K),
        "w_q": (H, K, K),
        "w_k": (H, K, K),
        "w_b": (H, 4, K),
        "o_proj.weight": (D, H * K),
    }
    # the project's layers keep their extra parts
    assert {"b_proj.bias", "o_norm.weight"} <= set(_params(_mixer("fwp", "recurrent_delta")))
    assert {"in_proj.weight", "o_norm.weight"} <= set(_params(_mixer("fwp", "srwm")))


def _wide(variant):
    torch.manual_seed(0)
    model = build_model(dict(family="fwp", variant=variant, vocab_size=16, d_model=256, n_layers=1, n_heads=4))
    return model.blocks[0].mixer


def _assert_normal(p, mean, std, what):
    p = p.detach().double()
    n = p.numel()
    assert abs(p.mean().item() - mean) <= 4 * std / math.sqrt(n), f"{what}: mean {p.mean().item():.4g} != {mean}"
    assert abs(p.std().item() / std - 1) <= 4 / math.sqrt(2 * n), f"{what}: std {p.std().item():.4g} != {std:.4g}"


def _assert_torch_linear(lin, what):
    """nn.Linear's default: U(-b, b), b = 1/sqrt(fan_in), std b/sqrt(3)."""
    w = lin.weight.detach().double()
    bound = lin.weight.shape[1] ** -0.5
    assert w.abs().max().item() <= bound, f"{what}: beyond the uniform bound"
    _assert_normal(w, 0.0, bound / math.sqrt(3), what)  # mean and std of U(-b, b), within sampling error


def test_fwp_paper_layers_have_the_official_initialisation():
    """Official scales (layers.py): R_*, r_b ~ N(0, 1/sqrt(D)); W_y, W_k ~ N(0, 1/sqrt(D)), W_q ~ N(0,
    0.01/sqrt(D)), w_b ~ N(-1, 1/sqrt(D)); projections at nn.Linear's default (never re-initialised).
    D = 64 here; the bounds are 4 standard errors."""
    K = 64
    rd = _wide("recurrent_delta_paper")
    for name in ("r_q", "r_k", "r_v", "r_b"):
        _assert_normal(getattr(rd, name), 0.0, K**-0.5, name)
    for name in ("q_proj", "k_proj", "v_proj", "b_proj", "o_proj"):
        _assert_torch_linear(getattr(rd, name), name)
    srwm = _wide("srwm_paper")
    _assert_normal(srwm.w_y, 0.0, K**-0.5, "w_y")
    _assert_normal(srwm.w_k, 0.0, K**-0.5, "w_k")
    _assert_normal(srwm.w_q, 0.0, 0.01 * K**-0.5, "w_q")
    _assert_normal(srwm.w_b, -1.0, K**-0.5, "w_b")
    _assert_torch_linear(srwm.o_proj, "o_proj")
    # the project's layers are unchanged: R ~ N(0, 0.02), the SRWM matrices all N(0, 1/sqrt(D))
    _assert_normal(_wide("recurrent_delta").r_q, 0.0, 0.02, "project r_q")
    _assert_normal(_wide("srwm").w_b, 0.0, K**-0.5, "project w_b")


def test_recurrent_delta_paper_is_the_official_layer():
    """q = softmax(q_x + tanh(y_{t-1}) R_q) etc., beta = sigmoid(w_b x + tanh(y_{t-1}) r_b) (no bias),
    W <- W + beta k (v - W^T k)^T, y_t = W^T q, out = W_o y (no norm): rec_update_fwm_tanh's loop."""
    m = _mixer("fwp", "recurrent_delta_paper")
    with torch.no_grad():
        for p in m.parameters():  # off the initialisation so every term matters
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 9, 16)
    qx, kx, vx = _heads(m.q_proj(x), 2), _heads(m.k_proj(x), 2), _heads(m.v_proj(x), 2)
    bx = m.b_proj(x)
    # official orientation: r @ R with R [D_in, D_out] (ours is R^T, [D_out, D_in])
    Rq, Rk, Rv = (r.transpose(-1, -2) for r in (m.r_q, m.r_k, m.r_v))
    K = qx.shape[-1]
    W = torch.zeros(2, 2, K, K)
    y = torch.zeros(2, 2, K)
    outs = []
    for t in range(9):
        r = torch.tanh(y)
        q = torch.softmax(qx[:, t] + torch.einsum("bhi,hio->bho", r, Rq), -1)
        k = torch.softmax(kx[:, t] + torch.einsum("bhi,hio->bho", r, Rk), -1)
        v = vx[:, t] + torch.einsum("bhi,hio->bho", r, Rv)
        beta = torch.sigmoid(bx[:, t] + (r * m.r_b).sum(-1))[..., None]
        old = torch.einsum("bhkv,bhk->bhv", W, k)
        W = W + torch.einsum("bhk,bhv->bhkv", k, beta * (v - old))
        y = torch.einsum("bhkv,bhk->bhv", W, q)
        outs.append(y)
    want = m.o_proj(torch.stack(outs, 1).reshape(2, 9, -1))
    with torch.no_grad():
        got, _ = m(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


def test_srwm_paper_is_the_official_layer():
    """x split into heads as it is; y = x W_y, q = softmax(x W_q), k = softmax(x W_k), beta = sigmoid(x
    w_b) from the weights before the update; each M <- M + k (beta_M (q M - k M)); out = W_o y (no norm):
    self_ref_v0's loop."""
    m = _mixer("fwp", "srwm_paper")
    x = torch.randn(2, 9, 16)
    xs = _heads(x, 2)
    # official orientation: x @ M with M [D_in, D_out] (ours is M^T)
    Ms = [w.detach().transpose(-1, -2).expand(2, *w.transpose(-1, -2).shape) for w in (m.w_y, m.w_q, m.w_k, m.w_b)]
    outs = []
    for t in range(9):
        xt = xs[:, t]
        y, q, k, b = (torch.einsum("bhi,bhio->bho", xt, M) for M in Ms)
        outs.append(y)
        q, k, b = torch.softmax(q, -1), torch.softmax(k, -1), torch.sigmoid(b)
        Ms = [
            M + torch.einsum("bhi,bho->bhio", k, b[..., i, None] * (torch.einsum("bhi,bhio->bho", q - k, M)))
            for i, M in enumerate(Ms)
        ]
    want = m.o_proj(torch.stack(outs, 1).reshape(2, 9, -1))
    with torch.no_grad():
        got, _ = m(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "variant,norm_on_residual", [("srwm_paper", True), ("recurrent_delta_paper", False), ("srwm", False)]
)
def test_fwp_blocks_are_the_official_blocks(variant, norm_on_residual):
    """SRWMlayer's block is ``LN(h) + W_o srwm(h)`` (the layer reads the raw stream, the norm sits on
    the residual path); RecUpdateTanhFastFFlayer's (and the project's) is ``h + W_o f(LN(h))``."""
    torch.manual_seed(0)
    cfg = dict(family="fwp", variant=variant, vocab_size=16, d_model=16, n_layers=1, n_heads=2, mlp="none")
    block = build_model({**cfg, "norm": "layernorm"}).blocks[0].eval()
    with torch.no_grad():
        block.norm1.weight.uniform_(0.5, 1.5)
        block.norm1.bias.uniform_(-0.5, 0.5)
    h = 3.0 * torch.randn(2, 9, 16) + 1.0  # far from normalised: the two blocks differ
    with torch.no_grad():
        got, _ = block(h)
        normed = F.layer_norm(h, (16,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
        want = normed + block.mixer(h)[0] if norm_on_residual else h + block.mixer(normed)[0]
        other = h + block.mixer(normed)[0] if norm_on_residual else normed + block.mixer(h)[0]
    assert block.norm_on_residual is norm_on_residual
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - other).abs().max() > 0.1


@pytest.mark.parametrize("variant", PAPER_FWP)
def test_fwp_paper_layers_step_and_pack(variant):
    """The whole-sequence form equals stepping (and prefix + carried state); a packed window with
    document starts equals its documents run alone (outputs, states, gradients): the checks every
    variant gets in tests/models, run here on the official layers."""
    test_models.test_forward_equals_stepping_and_split("fwp", variant)
    test_packed.test_packed_equals_separate_documents("fwp", variant, True, "continue-len1end")


@pytest.mark.parametrize("variant", PAPER_FWP)
def test_fwp_paper_layers_train_a_formal_language_cell(variant):
    from lm.probes.repro_formal import MODELS, train_and_score

    assert ("fwp", variant) in MODELS.values()
    cell = train_and_score("fwp", variant, "parity", seed=0, steps=3, batch=4, d_model=16, n_test=4)
    assert math.isfinite(cell["final_train_loss"]) and len(cell["seq_acc"]) == 2


@pytest.mark.parametrize(
    "variant,mixer,message",
    [
        ("srwm_paper", {}, r"model.mixer.in_proj: false splits x into heads as it is and needs n_heads \* head_dim"),
        ("recurrent_delta", {"in_proj": False}, "model.mixer.in_proj: only the srwm layer has it"),
        ("srwm", {"beta_bias": False}, "model.mixer.beta_bias: only the recurrent_delta layer has it"),
        ("srwm", {"srwm_q_init_scale": -1.0}, "model.mixer.srwm_q_init_scale: -1.0 must be >= 0"),
        ("srwm_paper", {"proj_init": "xavier"}, "model.mixer.proj_init: 'xavier' is not one of skeleton, torch"),
        ("recurrent_delta", {"recurrent_init": "fan_in"}, "model.mixer.recurrent_init: 'fan_in' is not one of"),
        ("srwm", {"block_norm": "post"}, "model.mixer.block_norm: 'post' is not one of input, residual"),
    ],
)
def test_fwp_options_are_checked(variant, mixer, message):
    cfg = dict(family="fwp", variant=variant, vocab_size=16, d_model=16, n_layers=1, n_heads=2, mixer=mixer)
    if variant == "srwm_paper" and not mixer:
        cfg["head_dim"] = 4  # 2 heads of 4 != d_model 16
    with pytest.raises(ConfigError, match=message):
        build_model(cfg)


# ------------------------------------------------------------------ e-LSTM (QuasiLSTMlayer, #21)


def test_elstm_is_the_official_cell():
    """c_t = f c_{t-1} + (1 - f) z with z = tanh(W_z x + v_z c_{t-1} + b_z), f = sigmoid(W_f x + v_f c_{t-1}
    + b_f); h_t = c_t sigmoid(W_g [x; c_t] + b_g); out = W_o h (QuasiLSTMlayer + QuasiLSTMModel's gate),
    from a carried c."""
    m = _mixer("lstm", "elstm", mixer={"hidden_dim": 12})
    assert _params(m) == {
        "w_zf.weight": (24, 16),
        "v_z": (12,),
        "v_f": (12,),
        "b_z": (12,),
        "b_f": (12,),
        "w_gate.weight": (12, 28),
        "w_gate.bias": (12,),
        "w_o.weight": (16, 12),
    }
    x = torch.randn(2, 9, 16)
    c0 = torch.randn(2, 12)
    W_z, W_f = m.w_zf.weight[:12], m.w_zf.weight[12:]
    c, hs = c0, []
    for t in range(9):
        z = torch.tanh(x[:, t] @ W_z.T + m.v_z * c + m.b_z)
        f = torch.sigmoid(x[:, t] @ W_f.T + m.v_f * c + m.b_f)
        c = f * c + (1 - f) * z
        hs.append(c * torch.sigmoid(m.w_gate(torch.cat([x[:, t], c], -1))))
    want = m.w_o(torch.stack(hs, 1))
    with torch.no_grad():
        got, state = m(x, state={"c": c0}, return_state=True)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert torch.allclose(state["c"], c, atol=1e-6)


def test_elstm_has_the_official_initialisation():
    """QuasiLSTMlayer.init_weights: every weight and bias of the cell ~ N(0, 0.1); the output gate at
    nn.Linear's default (bounds: 4 standard errors)."""
    torch.manual_seed(0)
    model = build_model(dict(family="lstm", variant="elstm", vocab_size=16, d_model=256, n_layers=1, n_heads=4))
    m = model.blocks[0].mixer
    _assert_normal(m.w_zf.weight, 0.0, 0.1, "w_zf")
    _assert_normal(torch.cat([m.v_z, m.v_f, m.b_z, m.b_f]), 0.0, 0.1, "v, b")
    _assert_torch_linear(m.w_gate, "w_gate")


def test_elstm_steps_packs_and_trains():
    test_models.test_forward_equals_stepping_and_split("lstm", "elstm")
    for carry in (False, True):
        test_packed.test_packed_equals_separate_documents("lstm", "elstm", carry, "continue-len1end")
    from lm.probes.repro_formal import MODELS, train_and_score

    assert MODELS["e-LSTM"] == ("lstm", "elstm")
    cell = train_and_score("lstm", "elstm", "parity", seed=0, steps=3, batch=4, d_model=16, n_test=4)
    assert math.isfinite(cell["final_train_loss"])


def test_lstm_cell_option_is_checked():
    with pytest.raises(ConfigError, match="model.mixer.cell: 'gru' is not one of lstm, elstm"):
        build_model(dict(family="lstm", vocab_size=16, d_model=16, n_layers=1, n_heads=2, mixer={"cell": "gru"}))
