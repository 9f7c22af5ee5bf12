"""Pieces of the Lightning module: chunked LM-head cross-entropy equals the full one (values and
gradients), activation checkpointing leaves gradients unchanged, weight decay only on 2-D weights,
and the warmup + cosine schedule."""

import math

import pytest
import torch

from lm.config import load_experiment, resolve
from lm.training.losses import cross_entropy_sum
from lm.training.module import LMModule
from lm.training.schedule import lr_multiplier


def module(**train):
    cfg = load_experiment(
        None,
        [
            "model=gla/tiny",
            "model.vocab_size=64",
            "model.d_model=32",
            "model.n_heads=2",
            *[f"train.{k}={v}" for k, v in train.items()],
        ],
    )
    torch.manual_seed(0)
    return LMModule(resolve(cfg))


def grads(m, tokens):
    m.zero_grad()
    total, count = m.loss_sum(tokens)
    (total / count).backward()
    return total.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def test_chunked_cross_entropy_matches_full():
    tokens = torch.randint(0, 64, (3, 41))
    full = module()
    chunked = module(loss_chunk_size=16)
    a_loss, a_grads = grads(full, tokens)
    b_loss, b_grads = grads(chunked, tokens)
    assert torch.allclose(a_loss, b_loss, rtol=1e-5)
    for name in a_grads:
        assert torch.allclose(a_grads[name], b_grads[name], rtol=1e-4, atol=1e-7), name


def test_cross_entropy_sum_plain():
    h, w = torch.randn(50, 8), torch.randn(10, 8)
    t = torch.randint(0, 10, (50,))
    expected = torch.nn.functional.cross_entropy(h @ w.T, t, reduction="sum")
    assert torch.allclose(cross_entropy_sum(lambda x: x @ w.T, h, t, chunk_size=7), expected, rtol=1e-5)


def test_activation_checkpointing_same_gradients():
    tokens = torch.randint(0, 64, (2, 33))
    plain_m = module()
    ckpt_m = module(activation_checkpointing=True)
    assert ckpt_m.model.gradient_checkpointing
    ckpt_m.train()
    plain_m.train()
    _, a = grads(plain_m, tokens)
    _, b = grads(ckpt_m, tokens)
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-8), name


def test_weight_decay_only_on_matrices():
    """train.weight_decay_groups=matrices (the family recipes: tests/models/test_param_groups.py)."""
    m = module(weight_decay=0.1, weight_decay_groups="matrices")
    opt = m.configure_optimizers()["optimizer"]
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


def test_schedule_warmup_then_cosine():
    assert lr_multiplier(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_multiplier(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_multiplier(55, 10, 100, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_multiplier(500, 10, 100, 0.1) == pytest.approx(0.1)


@pytest.mark.slow
def test_compiled_blocks_match_eager():
    cfg = load_experiment(
        None,
        [
            "model=gla/tiny",
            "model.vocab_size=64",
            "model.d_model=32",
            "model.n_heads=2",
            "model.n_layers=1",
            "train.compile=true",
        ],
    )
    torch.manual_seed(0)
    compiled = LMModule(resolve(cfg))
    torch.manual_seed(0)
    eager = LMModule(
        resolve(
            load_experiment(
                None,
                ["model=gla/tiny", "model.vocab_size=64", "model.d_model=32", "model.n_heads=2", "model.n_layers=1"],
            )
        )
    )
    assert list(compiled.state_dict()) == list(eager.state_dict())
    tokens = torch.randint(0, 64, (2, 17))
    a_loss, a_grads = grads(eager, tokens)
    b_loss, b_grads = grads(compiled, tokens)
    assert torch.allclose(a_loss, b_loss, rtol=1e-5)
    for name in a_grads:
        assert torch.allclose(a_grads[name], b_grads[name], rtol=1e-4, atol=1e-6), name
