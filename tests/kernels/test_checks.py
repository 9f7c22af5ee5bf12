"""Argument checks: the log-decay sign (a value check) runs on the reference backend, or on every
backend with ``LM_KERNEL_CHECKS=1``; the fast paths never read the values by default (on a GPU that
read would be a host-device synchronisation per layer per forward). Shape checks always run."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels._checks import CHECKS_ENV
from tests.kernels.harness import make_inputs

OPS_WITH_DECAY = ("gla", "delta_rule", "dplr")


def _positive_decay(op: str, T: int = 12):
    args, _ = make_inputs(op, T=T, B=1, H=2, K=4, V=3)
    args = {n: x.detach() for n, x in args.items()}
    args["g"] = args["g"].abs() + 0.1
    return args


@pytest.mark.parametrize("op", OPS_WITH_DECAY)
def test_reference_backend_rejects_positive_log_decay(op, monkeypatch):
    monkeypatch.delenv(CHECKS_ENV, raising=False)
    with pytest.raises(ValueError, match=r"^g: log-space decays must be <= 0 .*maximum of"):
        getattr(kernels, op)(**_positive_decay(op), backend="reference")


@pytest.mark.parametrize("op", OPS_WITH_DECAY)
def test_fast_path_does_not_read_values(op, monkeypatch):
    """Without the switch the torch backend never calls the value check; the automatic choice of
    the reference step for short CPU sequences still does."""
    monkeypatch.delenv(CHECKS_ENV, raising=False)
    calls = []
    monkeypatch.setattr(kernels, "check_log_decay", lambda name, g: calls.append(name))
    getattr(kernels, op)(**_positive_decay(op), backend="torch")
    assert calls == []
    getattr(kernels, op)(**_positive_decay(op, T=3))  # automatic: CPU, T < SHORT_T -> reference
    assert calls == ["g"]


@pytest.mark.parametrize("op", OPS_WITH_DECAY)
def test_debug_switch_checks_every_backend(op, monkeypatch):
    monkeypatch.setenv(CHECKS_ENV, "1")
    with pytest.raises(ValueError, match="^g: log-space decays must be <= 0"):
        getattr(kernels, op)(**_positive_decay(op), backend="torch")
    monkeypatch.setenv(CHECKS_ENV, "0")
    out, _ = getattr(kernels, op)(**_positive_decay(op), backend="torch")
    assert out.shape[:3] == (1, 12, 2)


def test_shape_checks_still_run_on_the_fast_path(monkeypatch):
    monkeypatch.delenv(CHECKS_ENV, raising=False)
    args = _positive_decay("gla")
    with pytest.raises(ValueError, match=r"^g: expected shape"):
        kernels.gla(**dict(args, g=args["g"][..., :3]), backend="torch")
    with pytest.raises(ValueError, match="^v:"):
        kernels.gla(**dict(args, v=args["v"][:, :5]), backend="torch")


def test_meta_tensors_pass_the_public_checks():
    """No value is read on the fast path: meta tensors (which have none) go through the public
    wrapper's checks to the backend."""
    q = torch.empty(1, 20, 2, 4, device="meta")
    g = torch.empty(1, 20, 2, 4, device="meta")
    out, _ = kernels.gla(q, q, torch.empty(1, 20, 2, 3, device="meta"), g, backend="torch")
    assert out.shape == (1, 20, 2, 3) and out.device.type == "meta"


@pytest.mark.parametrize("op", ["linear_scan", "gla", "delta_rule", "dplr", "softmax_scan", "recurrent_delta", "srwm"])
def test_backends_run_with_autocast_off(op):
    """A forward under bf16 autocast computes exactly what it computes without it, gradients too (the
    backward outside autocast, as Lightning runs it): the inputs' dtype decides (recurrent_delta's fp32
    state products used to come out of autocast in bf16 and fail)."""
    from tests.kernels.harness import run

    args, state = make_inputs(op, T=21, B=1, H=2, K=4, V=4, with_state=True)
    results = []
    for autocast in (False, True):
        leaves = {n: x.detach().clone().requires_grad_() for n, x in args.items()}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, _ = run(op, leaves, state, "torch")
        out.square().sum().backward()
        results.append((out.detach(), {n: x.grad for n, x in leaves.items()}))
    (o, g), (o_cast, g_cast) = results
    assert o_cast.dtype == torch.float32 and torch.equal(o_cast, o)
    for name in g:  # srwm's w_* get no gradient when an initial state replaces them
        assert (g[name] is None and g_cast[name] is None) or torch.equal(g_cast[name], g[name]), name
