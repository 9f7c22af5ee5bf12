"""Shared machinery for kernel tests: input generators for every op, a forward+backward runner,
and comparisons with per-tensor error messages.

Every fast path is compared against the op's reference on the same inputs: outputs, final states
and the gradients of every input (initial state included), for a random cotangent.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels._dispatch import triton_available, triton_interpret

OPS = ("linear_scan", "gla", "delta_rule", "dplr", "softmax_scan", "recurrent_delta", "srwm")

#: log-decay regimes: strong (-5 per step), moderate (random in [-1, 0]), none (exactly 0)
DECAYS = ("strong", "moderate", "none")

TOL = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 3e-2, torch.float16: 1e-2}


#: marks of a test (or a parametrised case) that runs Triton kernels: on a GPU, or on CPU tensors
#: under TRITON_INTERPRET=1
needs_triton = [
    pytest.mark.triton,
    pytest.mark.skipif(
        not (triton_available() and (triton_interpret() or torch.cuda.is_available())),
        reason="Triton tests run on CPU tensors under TRITON_INTERPRET=1",
    ),
]


def require_triton() -> None:
    """Skip the calling test unless Triton can run (on a GPU, or on CPU under TRITON_INTERPRET=1)."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and not triton_interpret():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")


def triton_test(fn):
    """Decorator form of :data:`needs_triton`."""
    for mark in needs_triton:
        fn = mark(fn)
    return fn


def device_for(backend: str) -> str:
    """Triton runs on CUDA tensors when a GPU exists (else on the CPU interpreter)."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _log_decay(shape, decay: str, gen: torch.Generator) -> torch.Tensor:
    if decay == "strong":
        return torch.full(shape, -5.0)
    if decay == "none":
        return torch.zeros(shape)
    return -torch.rand(shape, generator=gen)


def make_inputs(
    op: str,
    B: int = 2,
    T: int = 33,
    H: int = 2,
    K: int = 8,
    V: int = 6,
    decay: str = "moderate",
    per_head_gate: bool = False,
    with_state: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device: str = "cpu",
) -> Tuple[Dict[str, torch.Tensor], Optional[object]]:
    """Random, well-conditioned inputs (leaf tensors with requires_grad) and optionally a state."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    args: Dict[str, torch.Tensor]
    state = None
    if op == "linear_scan":
        D = K
        a = torch.rand(B, T, D, generator=gen) * 2 - 1  # any sign, |a| < 1
        if decay == "none":
            a = torch.ones(B, T, D)
        elif decay == "strong":
            a = a * 0.01
        elif decay == "nonnegative":  # [0, 1) with exact zeros (resets), as gated models give
            a = a.abs().masked_fill(torch.rand(B, T, D, generator=gen) < 0.1, 0.0)
        args = {"a": a, "b": randn(B, T, D)}
        if with_state:
            state = randn(B, D)
    elif op == "gla":
        g_shape = (B, T, H) if per_head_gate else (B, T, H, K)
        args = {
            "q": randn(B, T, H, K),
            "k": randn(B, T, H, K),
            "v": randn(B, T, H, V),
            "g": _log_decay(g_shape, decay, gen),
        }
        if with_state:
            state = randn(B, H, K, V)
    elif op == "delta_rule":
        args = {
            "q": randn(B, T, H, K),
            "k": F.normalize(randn(B, T, H, K), dim=-1),
            "v": randn(B, T, H, V),
            "beta": torch.rand(B, T, H, generator=gen),
            "g": _log_decay((B, T, H), decay, gen),
        }
        if with_state:
            state = randn(B, H, K, V)
    elif op == "dplr":
        kappa = F.normalize(randn(B, T, H, K), dim=-1)
        lr = torch.rand(B, T, H, K, generator=gen)
        args = {
            "q": randn(B, T, H, K),
            "k": randn(B, T, H, K) * 0.5,
            "v": randn(B, T, H, V),
            "a": -kappa,
            "b": kappa * lr,
            "g": _log_decay((B, T, H, K), decay, gen),
        }
        if with_state:
            state = randn(B, H, K, V)
    elif op == "softmax_scan":
        args = {"s": randn(B, T, H, scale=3.0), "v": randn(B, T, H, V)}
        if with_state:
            m = randn(B, H)
            state = (m, torch.rand(B, H, generator=gen) + 0.5, randn(B, H, V))
    elif op == "recurrent_delta":
        args = {
            "q": randn(B, T, H, K),
            "k": randn(B, T, H, K),
            "v": randn(B, T, H, V),
            "beta": randn(B, T, H),
            "r_q": randn(H, K, V, scale=0.3),
            "r_k": randn(H, K, V, scale=0.3),
            "r_v": randn(H, V, V, scale=0.3),
            "r_b": randn(H, V, scale=0.3),
        }
        if with_state:
            state = (randn(B, H, K, V, scale=0.5), randn(B, H, V))
    elif op == "srwm":
        D = K
        args = {
            "x": randn(B, T, H, D),
            "w_y": randn(H, V, D, scale=D**-0.5),
            "w_q": randn(H, D, D, scale=D**-0.5),
            "w_k": randn(H, D, D, scale=D**-0.5),
            "w_b": randn(H, 4, D, scale=D**-0.5),
        }
        if with_state:
            state = tuple(
                randn(B, *w.shape, scale=D**-0.5) for w in (args["w_y"], args["w_q"], args["w_k"], args["w_b"])
            )
    else:
        raise ValueError(op)
    args = {n: x.to(device=device, dtype=dtype).requires_grad_() for n, x in args.items()}
    if state is not None:
        state = _map(lambda x: x.to(device).float().requires_grad_(), state)
    return args, state


def _map(fn, state):
    if isinstance(state, (tuple, list)):
        return tuple(fn(x) for x in state)
    return fn(state)


def _flat(state) -> List[torch.Tensor]:
    if state is None:
        return []
    return list(state) if isinstance(state, (tuple, list)) else [state]


def run(op: str, args: Dict[str, torch.Tensor], state, backend: str, output_final_state=True, **kw):
    fn = getattr(kernels, op)
    return fn(**args, initial_state=state, output_final_state=output_final_state, backend=backend, **kw)


def forward_backward(op: str, args, state, backend: str, seed: int = 1, **kw):
    """Output, final state and gradients of every input under a fixed random cotangent."""
    args = {n: x.detach().clone().requires_grad_() for n, x in args.items()}
    state = None if state is None else _map(lambda x: x.detach().clone().requires_grad_(), state)
    out, final = run(op, args, state, backend, **kw)
    gen = torch.Generator().manual_seed(seed)
    loss = (out.float() * torch.randn(out.shape, generator=gen).to(out.device)).sum()
    for s in _flat(final):
        loss = loss + (s.float() * torch.randn(s.shape, generator=gen).to(s.device)).sum()
    inputs = list(args.values()) + _flat(state)
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    names = list(args) + [f"initial_state[{i}]" for i in range(len(_flat(state)))]
    return out, final, dict(zip(names, grads))


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    denom = expected.abs().max().clamp_min(1e-6)
    return float((actual - expected).abs().max() / denom)


def assert_close(name: str, actual, expected, tol: float) -> None:
    if expected is None:
        assert actual is None or float(actual.abs().max()) == 0.0, f"{name}: expected no gradient"
        return
    assert actual is not None, f"{name}: missing (expected a tensor of shape {tuple(expected.shape)})"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = rel_err(actual, expected)
    assert err <= tol, f"{name}: relative max error {err:.3g} > {tol:g}"


def compare_backends(
    op: str, backend: str, tol: Optional[float] = None, dtype=torch.float32, check_grads: bool = True, **make_kw
) -> None:
    """Assert ``backend`` equals the reference on outputs, final state and all gradients.

    For low precision the reference runs on the same (rounded) inputs in fp32.
    """
    make_kw.setdefault("device", device_for(backend))
    args, state = make_inputs(op, dtype=dtype, **make_kw)
    tol = TOL[dtype] if tol is None else tol
    ref_args = {n: x.detach().float() for n, x in args.items()} if dtype != torch.float32 else args
    o_ref, s_ref, g_ref = forward_backward(op, ref_args, state, "reference")
    if check_grads:
        o, s, g = forward_backward(op, args, state, backend)
    else:
        with torch.no_grad():
            o, s = run(op, args, state, backend)
        g = {}
    assert o.dtype == args[next(iter(args))].dtype, f"output dtype {o.dtype} != input dtype"
    assert_close("output", o, o_ref, tol)
    for i, (a, b) in enumerate(zip(_flat(s), _flat(s_ref))):
        assert_close(f"final_state[{i}]", a, b, tol)
    for name in g:
        assert_close(f"grad {name}", g[name], g_ref[name], tol)


def check_split(op: str, backend: str, split: int, tol: float = 1e-4, **make_kw) -> None:
    """Running [0, split) then [split, T) with the carried state equals one pass."""
    make_kw.setdefault("device", device_for(backend))
    args, state = make_inputs(op, **make_kw)
    with torch.no_grad():
        o_full, s_full = run(op, args, state, backend)
        seq = {
            n: x
            for n, x in args.items()
            if x.dim() >= 3
            and x.shape[1] == o_full.shape[1]
            and n not in ("r_q", "r_k", "r_v", "w_q", "w_k", "w_b", "w_y")
        }
        first = {n: (x[:, :split] if n in seq else x) for n, x in args.items()}
        second = {n: (x[:, split:] if n in seq else x) for n, x in args.items()}
        o1, s1 = run(op, first, state, backend)
        o2, s2 = run(op, second, s1, backend)
    assert_close("output (split)", torch.cat([o1, o2], 1), o_full, tol)
    for i, (a, b) in enumerate(zip(_flat(s2), _flat(s_full))):
        assert_close(f"final_state[{i}] (split)", a, b, tol)
