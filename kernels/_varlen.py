"""Packed sequences (``cu_seqlens``): validation, the per-sequence fallback, and helpers for native paths.

With ``cu_seqlens`` (int32/int64 ``[N+1]``: 0 = cu[0] <= cu[1] <= ... <= cu[N] = T) the inputs are packed
with B = 1 and sequence n is the steps ``cu[n] <= t < cu[n+1]`` (possibly none). The result is, by
definition, each sequence run alone from ``initial_state[n]`` (outputs concatenated along T, final states
stacked along a leading N): :func:`per_sequence` is exactly that loop. A backend callable that handles
``cu_seqlens`` itself is marked ``fn.varlen = True`` and receives ``cu_seqlens=`` as a keyword.

Validation reads ``cu_seqlens`` on the host once per call (one device sync on a GPU, as fla does).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

#: marker attribute of a backend callable that takes ``cu_seqlens=`` natively
VARLEN_ATTR = "varlen"
#: marker attribute of a native callable that also takes ``offsets=`` (the validated host copy)
OFFSETS_ATTR = "varlen_offsets"


def mark_varlen(fn: Callable, host_offsets: bool = False) -> Callable:
    """Mark ``fn`` as handling ``cu_seqlens`` natively (returns ``fn``); ``host_offsets``: it also takes
    ``offsets=``, the offsets that validation read to the host, so that it does not read them again."""
    setattr(fn, VARLEN_ATTR, True)
    setattr(fn, OFFSETS_ATTR, host_offsets)
    return fn


def host_offsets(cu_seqlens: torch.Tensor, offsets: Optional[Sequence[int]]) -> Sequence[int]:
    """The offsets as a list: ``offsets`` when the dispatcher passes the ones it validated, else one host
    read of ``cu_seqlens`` (a direct call of a backend)."""
    return offsets if offsets is not None else [int(x) for x in cu_seqlens.tolist()]


def call_native(fn: Callable, args: tuple, cu_seqlens: Optional[torch.Tensor], offsets: Optional[Sequence[int]]):
    """Call ``fn`` on ``args`` (the reference's positional arguments): plainly without ``cu_seqlens``, else
    natively with ``cu_seqlens=``, plus ``offsets=`` (validation's host copy) when ``fn`` is marked to take
    them, so that it does not read ``cu_seqlens`` to the host again."""
    if cu_seqlens is None:
        return fn(*args)
    if takes_offsets(fn):
        return fn(*args, cu_seqlens=cu_seqlens, offsets=offsets)
    return fn(*args, cu_seqlens=cu_seqlens)


def is_varlen(fn: Callable) -> bool:
    return bool(getattr(fn, VARLEN_ATTR, False))


def takes_offsets(fn: Callable) -> bool:
    """Whether the native ``fn`` takes ``offsets=`` (see :func:`mark_varlen`)."""
    return bool(getattr(fn, OFFSETS_ATTR, False))


def check_cu_seqlens(cu_seqlens: Optional[torch.Tensor], sizes: dict, ref: torch.Tensor) -> Optional[List[int]]:
    """Validate ``cu_seqlens`` against the already checked inputs (``sizes`` holds B and T).

    Returns the offsets as a Python list (None without ``cu_seqlens``) and records ``sizes["N"]``, the
    leading dimension of the initial and final states. One ``ValueError`` naming ``cu_seqlens`` per problem.
    """
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"cu_seqlens: expected a 1-D integer tensor [N+1], got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected a 1-D tensor [N+1] with N >= 1, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens: expected dtype int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.device != ref.device:
        raise ValueError(f"cu_seqlens: on {cu_seqlens.device}, expected the inputs' device ({ref.device})")
    if sizes["B"] != 1:
        raise ValueError(f"cu_seqlens: packed inputs must have batch size B = 1, got B = {sizes['B']}")
    offsets = [int(x) for x in cu_seqlens.tolist()]
    T = sizes["T"]
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens: must start at 0, got {offsets[0]}")
    if offsets[-1] != T:
        raise ValueError(f"cu_seqlens: must end at T = {T} (the packed length), got {offsets[-1]}")
    for n in range(len(offsets) - 1):
        if offsets[n + 1] < offsets[n]:
            raise ValueError(
                f"cu_seqlens: must be non-decreasing, got {offsets[n]} then {offsets[n + 1]} at positions {n}, {n + 1}"
            )
    sizes["N"] = len(offsets) - 1
    return offsets


def _slice_state(state, n: int):
    if state is None:
        return None
    if isinstance(state, (tuple, list)):
        return tuple(x[n : n + 1] for x in state)
    return state[n : n + 1]


def _stack_states(states: list):
    if isinstance(states[0], (tuple, list)):
        return tuple(torch.cat([s[i] for s in states], 0) for i in range(len(states[0])))
    return torch.cat(states, 0)


def per_sequence(
    fn: Callable,
    offsets: Sequence[int],
    args: tuple,
    n_steps: int,
    batched: Sequence[int] = (),
    empty_fn: Optional[Callable] = None,
):
    """Run ``fn`` once per packed sequence: the specification of ``cu_seqlens``, and the fallback.

    ``args`` is the backend's positional argument list ending with ``(initial_state,
    output_final_state)``; its first ``n_steps`` entries are per-step tensors ``[1, T, ...]`` (or None),
    sliced along T; entries whose index is in ``batched`` have a leading N and are sliced per sequence
    (as is ``initial_state``, a tensor or a tuple); the rest are shared. Zero-length sequences run
    through ``empty_fn`` (default ``fn``; the reference handles T = 0 by returning the state).
    Returns (outputs concatenated along T, final states stacked along N or None).
    """
    *inputs, initial_state, output_final_state = args
    outs, finals = [], []
    for n in range(len(offsets) - 1):
        start, end = offsets[n], offsets[n + 1]
        if start == end and not output_final_state and n != len(offsets) - 2:
            continue  # contributes no output and no state; the last call also fixes an all-empty output
        call = []
        for i, x in enumerate(inputs):
            if i < n_steps and x is not None:
                x = x[:, start:end]
            elif i in batched:
                x = x[n : n + 1]
            call.append(x)
        run = fn if (start < end or empty_fn is None) else empty_fn
        out, final = run(*call, _slice_state(initial_state, n), output_final_state)
        outs.append(out)
        finals.append(final)
    output = torch.cat(outs, 1)
    return output, (_stack_states(finals) if output_final_state else None)


# ---- helpers for native paths (computed on the device, no host sync) -----------------------------


def sequence_ids(cu_seqlens: torch.Tensor, T: int) -> torch.Tensor:
    """The sequence of every step: ``seq[t] = n`` with ``cu[n] <= t < cu[n+1]`` (int64 [T])."""
    steps = torch.arange(T, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), steps, right=True)


def start_mask(cu_seqlens: torch.Tensor, T: int) -> torch.Tensor:
    """bool [T]: True at the first step of every (non-empty) sequence, where the state resets."""
    mask = torch.zeros(T + 1, dtype=torch.bool, device=cu_seqlens.device)
    mask[cu_seqlens[:-1].long()] = True
    return mask[:T]


def last_steps(cu_seqlens: torch.Tensor):
    """(index [N] of each sequence's last step, clamped to >= 0; bool [N]: the sequence is non-empty)."""
    ends = cu_seqlens[1:].long()
    nonempty = ends > cu_seqlens[:-1].long()
    return (ends - 1).clamp_min(0), nonempty
