"""Seed 001's paper-faithful definitions (issue #21): the linear Transformer without the denominator
and DeltaNet with sum-normalised elu + 1 q/k (no convolution) equal their recurrences written out
here; the LSTM mixer equals torch.nn.LSTM run per document."""

import torch
import torch.nn.functional as F

from lm.models import build_model


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
