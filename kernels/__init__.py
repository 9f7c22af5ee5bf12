"""Scan ops for every recurrent family, behind one API. The contract is ``kernels/README.md``.

Each public op validates its arguments (``ValueError`` naming the argument and expected shape; the
log-decay sign, a value check, only on the reference backend or with ``LM_KERNEL_CHECKS=1``),
then dispatches to a backend: ``"reference"`` (the step-by-step recurrence), ``"torch"``
(chunked/parallel PyTorch) or ``"triton"``; see :mod:`kernels._dispatch` for the rule.
All return ``(output, final_state or None)``. Backends run with autocast off: the inputs' dtypes and
the contract's precision rules decide, not autocast's op lists (which would turn a backend's fp32
state products into half-precision ones, or mix dtypes inside its loops).

Every op takes ``cu_seqlens`` (int32/int64 ``[N+1]``): packed sequences with B = 1, each run as if alone,
with ``initial_state`` and the final state per sequence (leading N instead of B); see
:mod:`kernels._varlen` and the README section "Packed sequences".
"""

from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch

from kernels._checks import check_floating, check_log_decay, check_same_dtype, check_tensor, value_checks_enabled
from kernels._dispatch import BACKENDS, call, choose_backend, is_reference, resolve
from kernels._varlen import check_cu_seqlens

__all__ = [
    "BACKENDS",
    "linear_scan",
    "gla",
    "delta_rule",
    "dplr",
    "softmax_scan",
    "recurrent_delta",
    "srwm",
]


def _run(
    op: str,
    backend: Optional[str],
    device: torch.device,
    *args,
    log_decay=None,
    cu_seqlens=None,
    offsets=None,
    n_steps: int = 0,
    batched=(),
):
    """Resolve the backend and call it; ``log_decay`` (g) is value-checked first on the reference
    backend or with ``LM_KERNEL_CHECKS=1`` (no host-device sync on the fast paths). With ``cu_seqlens``
    (validated into ``offsets``) the first ``n_steps`` args are per-step and ``batched`` indexes the
    args with a leading N (see :func:`kernels._dispatch.call`)."""
    T = args[0].shape[1]
    fn = resolve(op, choose_backend(backend, device), device, T)
    if log_decay is not None and value_checks_enabled(is_reference(op, fn)):
        check_log_decay("g", log_decay)
    with _autocast_off(device):
        return call(op, fn, args, cu_seqlens, offsets, n_steps, batched)


def _autocast_off(device: torch.device):
    """Autocast disabled for ``device`` while a backend runs (a no-op where it is not enabled)."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _lead(offsets) -> str:
    """The symbol of the states' leading dimension: B, or N (sequences) with ``cu_seqlens``."""
    return "B" if offsets is None else "N"


def _default_scale(scale: Optional[float], K: int) -> float:
    return float(K) ** -0.5 if scale is None else float(scale)


def linear_scan(
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``h_t = a_t * h_{t-1} + b_t`` for a, b: [B, T, D] (linear-space a, any sign).

    Returns all h_t [B, T, D] and, if requested, h_T [B, D] (fp32). With ``cu_seqlens`` (B = 1) the
    states are [N, D].
    """
    sizes: dict = {}
    check_tensor("a", a, ("B", "T", "D"), sizes)
    check_floating("a", a)
    check_tensor("b", b, ("B", "T", "D"), sizes, ref=a)
    check_same_dtype([("a", a), ("b", b)])
    offsets = check_cu_seqlens(cu_seqlens, sizes, a)
    if initial_state is not None:
        check_tensor("initial_state", initial_state, (_lead(offsets), "D"), sizes, ref=a)
    return _run(
        "linear_scan",
        backend,
        a.device,
        a,
        b,
        initial_state,
        output_final_state,
        cu_seqlens=cu_seqlens,
        offsets=offsets,
        n_steps=2,
    )


def _check_qkv(q, k, v, sizes):
    check_tensor("q", q, ("B", "T", "H", "K"), sizes)
    check_floating("q", q)
    check_tensor("k", k, ("B", "T", "H", "K"), sizes, ref=q)
    check_tensor("v", v, ("B", "T", "H", "V"), sizes, ref=q)
    check_same_dtype([("q", q), ("k", k), ("v", v)])


def _check_matrix_state(initial_state, sizes, q, offsets):
    if initial_state is not None:
        check_tensor("initial_state", initial_state, (_lead(offsets), "H", "K", "V"), sizes, ref=q)


def gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Gated linear attention: ``S_t = exp(g_t)[:, None] * S_{t-1} + k_t v_t^T``; ``o_t = scale S_t^T q_t``.

    q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H, K] (per-key) or [B, T, H] (per-head), <= 0.
    """
    sizes: dict = {}
    _check_qkv(q, k, v, sizes)
    if g.dim() == 3:
        check_tensor("g", g, ("B", "T", "H"), sizes, ref=q)
    else:
        check_tensor("g", g, ("B", "T", "H", "K"), sizes, ref=q)
    offsets = check_cu_seqlens(cu_seqlens, sizes, q)
    _check_matrix_state(initial_state, sizes, q, offsets)
    scale = _default_scale(scale, q.shape[-1])
    return _run(
        "gla",
        backend,
        q.device,
        q,
        k,
        v,
        g,
        scale,
        initial_state,
        output_final_state,
        log_decay=g,
        cu_seqlens=cu_seqlens,
        offsets=offsets,
        n_steps=4,
    )


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(Gated) delta rule: ``S' = exp(g_t) S_{t-1}``; ``S_t = S' + beta_t k_t (v_t - S'^T k_t)^T``.

    q, k: [B, T, H, K]; v: [B, T, H, V]; beta, g: [B, T, H] (g <= 0, None for no decay).
    """
    sizes: dict = {}
    _check_qkv(q, k, v, sizes)
    check_tensor("beta", beta, ("B", "T", "H"), sizes, ref=q)
    if g is not None:
        check_tensor("g", g, ("B", "T", "H"), sizes, ref=q)
    offsets = check_cu_seqlens(cu_seqlens, sizes, q)
    _check_matrix_state(initial_state, sizes, q, offsets)
    scale = _default_scale(scale, q.shape[-1])
    return _run(
        "delta_rule",
        backend,
        q.device,
        q,
        k,
        v,
        beta,
        g,
        scale,
        initial_state,
        output_final_state,
        log_decay=g,
        cu_seqlens=cu_seqlens,
        offsets=offsets,
        n_steps=5,
    )


def dplr(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    g: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Diagonal plus low rank: ``S_t = (diag(exp(g_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T``.

    q, k, a, b, g: [B, T, H, K] (g <= 0); v: [B, T, H, V].
    """
    sizes: dict = {}
    _check_qkv(q, k, v, sizes)
    for name, x in (("a", a), ("b", b), ("g", g)):
        check_tensor(name, x, ("B", "T", "H", "K"), sizes, ref=q)
    offsets = check_cu_seqlens(cu_seqlens, sizes, q)
    _check_matrix_state(initial_state, sizes, q, offsets)
    scale = _default_scale(scale, q.shape[-1])
    return _run(
        "dplr",
        backend,
        q.device,
        q,
        k,
        v,
        a,
        b,
        g,
        scale,
        initial_state,
        output_final_state,
        log_decay=g,
        cu_seqlens=cu_seqlens,
        offsets=offsets,
        n_steps=6,
    )


def softmax_scan(
    s: torch.Tensor,
    v: torch.Tensor,
    initial_state: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
):
    """Attention as a scan (Aaren): ``o_t = sum_{i<=t} exp(s_i) v_i / sum_{i<=t} exp(s_i)``.

    s: [B, T, H]; v: [B, T, H, V]; state (m [B, H], u [B, H], w [B, H, V]).
    """
    sizes: dict = {}
    check_tensor("s", s, ("B", "T", "H"), sizes)
    check_floating("s", s)
    check_tensor("v", v, ("B", "T", "H", "V"), sizes, ref=s)
    offsets = check_cu_seqlens(cu_seqlens, sizes, s)
    lead = _lead(offsets)
    if initial_state is not None:
        if len(initial_state) != 3:
            raise ValueError(f"initial_state: expected a tuple (m [{lead}, H], u [{lead}, H], w [{lead}, H, V])")
        m, u, w = initial_state
        check_tensor("initial_state[0] (m)", m, (lead, "H"), sizes, ref=s)
        check_tensor("initial_state[1] (u)", u, (lead, "H"), sizes, ref=s)
        check_tensor("initial_state[2] (w)", w, (lead, "H", "V"), sizes, ref=s)
    return _run(
        "softmax_scan",
        backend,
        s.device,
        s,
        v,
        initial_state,
        output_final_state,
        cu_seqlens=cu_seqlens,
        offsets=offsets,
        n_steps=2,
    )


def recurrent_delta(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    r_q: torch.Tensor,
    r_k: torch.Tensor,
    r_v: torch.Tensor,
    r_b: torch.Tensor,
    initial_state: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
):
    """Recurrent delta rule (recurrent fast weight programmer), see kernels/README.md.

    q, k: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H] (pre-activations of the input part);
    r_q, r_k: [H, K, V]; r_v: [H, V, V]; r_b: [H, V]; state (S [B, H, K, V], y [B, H, V]).
    """
    sizes: dict = {}
    _check_qkv(q, k, v, sizes)
    check_tensor("beta", beta, ("B", "T", "H"), sizes, ref=q)
    check_tensor("r_q", r_q, ("H", "K", "V"), sizes, ref=q)
    check_tensor("r_k", r_k, ("H", "K", "V"), sizes, ref=q)
    check_tensor("r_v", r_v, ("H", "V", "V"), sizes, ref=q)
    check_tensor("r_b", r_b, ("H", "V"), sizes, ref=q)
    offsets = check_cu_seqlens(cu_seqlens, sizes, q)
    lead = _lead(offsets)
    if initial_state is not None:
        if len(initial_state) != 2:
            raise ValueError(f"initial_state: expected a tuple (S [{lead}, H, K, V], y [{lead}, H, V])")
        check_tensor("initial_state[0] (S)", initial_state[0], (lead, "H", "K", "V"), sizes, ref=q)
        check_tensor("initial_state[1] (y)", initial_state[1], (lead, "H", "V"), sizes, ref=q)
    return _run(
        "recurrent_delta",
        backend,
        q.device,
        q,
        k,
        v,
        beta,
        r_q,
        r_k,
        r_v,
        r_b,
        initial_state,
        output_final_state,
        cu_seqlens=cu_seqlens,
        offsets=offsets,
        n_steps=4,
    )


def srwm(
    x: torch.Tensor,
    w_y: Optional[torch.Tensor],
    w_q: Optional[torch.Tensor],
    w_k: Optional[torch.Tensor],
    w_b: Optional[torch.Tensor],
    initial_state: Optional[Tuple[torch.Tensor, ...]] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
):
    """Self-referential weight matrix, see kernels/README.md.

    x: [B, T, H, D]; initial weights w_y: [H, V, D], w_q, w_k: [H, D, D], w_b: [H, 4, D] (or with a
    leading batch dim; with ``cu_seqlens`` a leading dim is N, one per sequence). ``initial_state`` (the four
    batched matrices) replaces them when given.
    """
    sizes: dict = {}
    check_tensor("x", x, ("B", "T", "H", "D"), sizes)
    check_floating("x", x)
    offsets = check_cu_seqlens(cu_seqlens, sizes, x)
    lead = _lead(offsets)
    batched = ()
    if initial_state is not None:
        if len(initial_state) != 4:
            raise ValueError("initial_state: expected a tuple (W_y, W_q, W_k, w_b) of batched weights")
        names = ("initial_state[0] (W_y)", "initial_state[1] (W_q)", "initial_state[2] (W_k)", "initial_state[3] (w_b)")
        shapes = (("H", "V", "D"), ("H", "D", "D"), ("H", "D", "D"), ("H", 4, "D"))
        for name, w, shape in zip(names, initial_state, shapes):
            check_tensor(name, w, (lead,) + shape, sizes, ref=x)
    else:
        for name, w, shape in (
            ("w_y", w_y, ("H", "V", "D")),
            ("w_q", w_q, ("H", "D", "D")),
            ("w_k", w_k, ("H", "D", "D")),
            ("w_b", w_b, ("H", 4, "D")),
        ):
            if w is None:
                raise ValueError(f"{name}: required when initial_state is None")
            check_tensor(name, w, (lead,) + shape if w.dim() == 4 else shape, sizes, ref=x)
        batched = tuple(i for i, w in enumerate((w_y, w_q, w_k, w_b), 1) if w.dim() == 4)
    return _run(
        "srwm",
        backend,
        x.device,
        x,
        w_y,
        w_q,
        w_k,
        w_b,
        initial_state,
        output_final_state,
        cu_seqlens=cu_seqlens,
        offsets=offsets,
        n_steps=1,
        batched=batched,
    )
