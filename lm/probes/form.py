"""Probe 1, form equivalence: a layer's whole-sequence (training) form against token-by-token
stepping from ``init_state``, on the same input. Reports max absolute and relative errors of the
outputs and of the final state; a warning is raised above the tolerance of the dtype."""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch

TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def flatten_state(state: Any) -> List[torch.Tensor]:
    if state is None:
        return []
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for key in sorted(state) for t in flatten_state(state[key])]
    if isinstance(state, (tuple, list)):
        return [t for item in state for t in flatten_state(item)]
    return []


def _errors(a: torch.Tensor, b: torch.Tensor) -> tuple:
    diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    scale = b.double().abs().max().item() if b.numel() else 0.0
    return diff, diff / max(scale, 1e-12)


@torch.no_grad()
def stepped_outputs(mixer, x: torch.Tensor, kwargs: Optional[Dict[str, Any]] = None) -> Tuple[torch.Tensor, Any]:
    """The mixer applied token by token from ``init_state``: outputs [B, T, D] and the final state.
    ``kwargs``: the whole sequence's cross-layer inputs (``LayerIO.shared``), sliced per token."""
    state = mixer.init_state(x.shape[0], device=x.device, dtype=x.dtype)
    steps = []
    for t in range(x.shape[1]):
        y, state = mixer.step(x[:, t], state, **_token(kwargs or {}, t))
        steps.append(y)
    return torch.stack(steps, 1), state


def _token(kwargs: Dict[str, Any], t: int) -> Dict[str, Any]:
    """Token t of per-token tensors [B, T, ...] in (nested dicts of) keyword arguments, as [B, 1, ...]."""
    return {k: _token(v, t) if isinstance(v, dict) else v[:, t : t + 1] for k, v in kwargs.items()}


@torch.no_grad()
def form_equivalence(
    mixer, x: torch.Tensor, whole: Optional[Tuple[torch.Tensor, Any]] = None, kwargs: Optional[Dict[str, Any]] = None
) -> Dict[str, float]:
    """{out_abs, out_rel, state_abs, state_rel} for one mixer on x [B, T, D]; ``whole`` is the
    whole-sequence form's (output, final state) when already computed; ``kwargs`` the mixer's
    cross-layer inputs (``LayerIO.shared``)."""
    full, final = whole if whole is not None else mixer(x, return_state=True, **(kwargs or {}))
    stepped, state = stepped_outputs(mixer, x, kwargs)
    out_abs, out_rel = _errors(stepped, full)
    state_abs, state_rel = 0.0, 0.0
    for a, b in zip(flatten_state(state), flatten_state(final)):
        if a.shape == b.shape:
            abs_err, rel_err = _errors(a, b)
            state_abs, state_rel = max(state_abs, abs_err), max(state_rel, rel_err)
    tol = TOLERANCE.get(x.dtype, 1e-4)
    if max(out_rel, state_rel) > tol:
        warnings.warn(
            f"layer {getattr(mixer, 'layer_idx', '?')}: whole-sequence and stepped forms differ "
            f"(output rel {out_rel:.2e}, state rel {state_rel:.2e} > {tol:g})",
            RuntimeWarning,
        )
    return {"out_abs": out_abs, "out_rel": out_rel, "state_abs": state_abs, "state_rel": state_rel}
