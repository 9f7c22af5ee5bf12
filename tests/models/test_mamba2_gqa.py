"""Mamba-2 (the ``linear_attention/mamba2`` variant) and grouped-query attention in the Transformer
(``model.mixer.n_kv_heads``): forward equals stepping, packed documents equal separate ones, the size
configs' parameter counts, the KV cache of fewer key/value heads, and config errors."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.utils._pytree import tree_leaves

from lm.config import load_experiment
from lm.errors import ConfigError
from lm.models import build_model
from lm.models.counting import count_parameters
from lm.models.linear_attention import LinearAttention

MODEL_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"
VOCAB = 48


def tiny(family, variant, **kw):
    cfg = dict(family=family, variant=variant, vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4)
    cfg.update(kw)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # off the initialisation, so that zero-initialised maps do not hide a path
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def tokens(B=2, T=19, seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def assert_forward_equals_step(model):
    x = tokens()
    with torch.no_grad():
        full, _ = model(x, return_state=True)
        state = model.init_state(x.shape[0])
        stepped = []
        for t in range(x.shape[1]):
            logits, state = model.step(x[:, t], state)
            stepped.append(logits)
    stepped = torch.stack(stepped, 1)
    assert (stepped - full).abs().max() <= 1e-5 * full.abs().max()


# ------------------------------------------------------------------------------------------ Mamba-2


def test_mamba2_forward_equals_step():
    assert_forward_equals_step(tiny("linear_attention", "mamba2"))


def test_mamba2_packed_equals_separate_documents():
    model = tiny("linear_attention", "mamba2")
    x = tokens(B=1, T=20)
    starts = torch.zeros(1, 20, dtype=torch.bool)
    starts[0, [0, 7, 8, 15]] = True
    with torch.no_grad():
        packed, _ = model(x, doc_starts=starts)
        for a, b in [(0, 7), (7, 8), (8, 15), (15, 20)]:
            alone, _ = model(x[:, a:b])
            assert (packed[:, a:b] - alone).abs().max() <= 1e-5 * alone.abs().max()


def test_mamba2_is_the_ssd_recurrence():
    """One mixer against the Mamba-2 recurrence written out: h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T,
    y_t = C_t^T h_t + D x_t, out = W_o norm(y_t * silu(z_t)) (B, C shared by the heads)."""
    model = tiny("linear_attention", "mamba2")
    mixer = model.blocks[0].mixer
    assert isinstance(mixer, LinearAttention) and mixer.qk_heads == 1
    H, N, P = mixer.n_heads, mixer.key_dim, mixer.value_dim
    u = torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y, _ = mixer(u)
        C, _ = mixer.conv_q(mixer.q_proj(u))
        Bm, _ = mixer.conv_k(mixer.k_proj(u))
        xs, _ = mixer.conv_v(mixer.v_proj(u))
        xs = xs.view(2, 11, H, P)
        dt = F.softplus(mixer.a_proj(u) + mixer.dt_bias)  # [B, T, H]
        A = -torch.exp(mixer.A_log)
        h = torch.zeros(2, H, N, P)
        outs = []
        for t in range(11):
            h = torch.exp(dt[:, t, :, None, None] * A[:, None, None]) * h + dt[:, t, :, None, None] * (
                Bm[:, t, None, :, None] * xs[:, t, :, None, :]
            )
            outs.append(torch.einsum("bn,bhnp->bhp", C[:, t], h) + mixer.D[:, None] * xs[:, t])
        o = torch.stack(outs, 1) * F.silu(mixer.gate_proj(u)).view(2, 11, H, P)
        want = mixer.o_proj(mixer.o_norm(o).reshape(2, 11, H * P))
    assert (y - want).abs().max() <= 1e-5 * want.abs().max()


def test_mamba2_implicit_attention_is_exact():
    mixer = tiny("linear_attention", "mamba2").blocks[0].mixer
    with torch.no_grad():
        ia = mixer.implicit_attention(torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(6)))
    assert ia.reconstruction_error() < 1e-5


@pytest.mark.parametrize("size", ["tiny", "small", "125m", "350m", "1.3b"])
def test_mamba2_size_configs_match_their_header(size):
    path = MODEL_DIR / "mamba2" / f"{size}.yaml"
    text = path.read_text()
    cfg = yaml.safe_load(text)
    assert (cfg["family"], cfg["variant"]) == ("linear_attention", "mamba2")
    vocab = 8192 if size in ("tiny", "small") else 50304
    n = count_parameters({**cfg, "vocab_size": vocab})
    assert text.startswith(f"# mamba2 {size}: {n / 1e6:.1f}M parameters")


def test_mamba2_options_are_checked():
    with pytest.raises(ConfigError, match="qk_groups"):
        load_experiment(None, ["model.family=linear_attention", "model.variant=mamba2", "model.mixer.qk_groups=3"])
    with pytest.raises(ConfigError, match="input_dt"):
        load_experiment(None, ["model.family=linear_attention", "model.variant=gla", "model.mixer.input_dt=true"])


# ------------------------------------------------------------------------------ grouped-query attention


def test_gqa_full_kv_heads_is_the_old_path_exactly():
    base, same = tiny("transformer", "transformer"), tiny("transformer", "transformer", mixer={"n_kv_heads": 4})
    assert [n for n, _ in base.named_parameters()] == [n for n, _ in same.named_parameters()]
    for p, q in zip(base.parameters(), same.parameters()):
        assert torch.equal(p, q)
    x = tokens()
    with torch.no_grad():
        a, sa = base(x, return_state=True)
        b, sb = same(x, return_state=True)
    assert torch.equal(a, b)
    leaves_a = [t for t in tree_leaves(sa) if t is not None]
    leaves_b = [t for t in tree_leaves(sb) if t is not None]
    assert len(leaves_a) == len(leaves_b) and all(torch.equal(u, w) for u, w in zip(leaves_a, leaves_b))
    assert base.blocks[0].mixer.state_size(1, 100) == same.blocks[0].mixer.state_size(1, 100)


@pytest.mark.parametrize("n_kv", [1, 2])
def test_gqa_forward_equals_step_and_smaller_cache(n_kv):
    model = tiny("transformer", "transformer", mixer={"n_kv_heads": n_kv})
    assert_forward_equals_step(model)
    mixer, full = model.blocks[0].mixer, tiny("transformer", "transformer").blocks[0].mixer
    assert mixer.state_size(1, 100) * (4 // n_kv) == full.state_size(1, 100)
    assert mixer.init_state(3)["k"].shape == (3, n_kv, 0, 8)
    with torch.no_grad():
        _, state = mixer(torch.randn(2, 5, 32), return_state=True)
    assert state["k"].shape == (2, n_kv, 5, 8)
    expected = sum(p.numel() for p in full.parameters()) - 2 * (4 - n_kv) * 8 * 32
    assert sum(p.numel() for p in mixer.parameters()) == expected


def test_gqa_packed_equals_separate_documents():
    model = tiny("transformer", "transformer", mixer={"n_kv_heads": 2})
    x = tokens(B=2, T=12)
    starts = torch.zeros(2, 12, dtype=torch.bool)
    starts[0, [0, 5]] = True
    starts[1, [0, 9]] = True
    with torch.no_grad():
        packed, _ = model(x, doc_starts=starts)
        for row, a, b in [(0, 0, 5), (0, 5, 12), (1, 0, 9), (1, 9, 12)]:
            alone, _ = model(x[row : row + 1, a:b])
            assert (packed[row : row + 1, a:b] - alone).abs().max() <= 1e-5 * alone.abs().max()


def test_gqa_implicit_attention_is_exact():
    mixer = tiny("transformer", "transformer", mixer={"n_kv_heads": 2}).blocks[0].mixer
    with torch.no_grad():
        ia = mixer.implicit_attention(torch.randn(2, 9, 32))
    assert ia.reconstruction_error() < 1e-5


@pytest.mark.parametrize("n_kv", [3, -1])
def test_gqa_invalid_kv_heads_is_a_config_error(n_kv):
    with pytest.raises(ConfigError, match="n_kv_heads"):
        load_experiment(None, ["model.family=transformer", "model.n_heads=4", f"model.mixer.n_kv_heads={n_kv}"])
