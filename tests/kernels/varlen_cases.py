"""Packed-sequence (``cu_seqlens``) cases for every op: inputs, and the specification's result.

The expected result runs every sequence alone through the op's reference backend (outputs concatenated
along T, final states stacked along N); it is computed from slices of the same leaf tensors, so
autograd gives the expected gradients of every packed input and of the per-sequence initial states.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

import kernels
from tests.kernels.harness import _flat, _map, assert_close, make_inputs

#: sequence lengths of the default packing (T = 100): empty sequences first, in the middle and last;
#: length-1 sequences; boundaries inside 64-step chunks (5, 6, 66, 79, 80) and a sequence across one
#: (6..66); the Triton interpreter's 16-step tiles see boundaries inside tiles too
LENGTHS = (0, 5, 1, 60, 13, 1, 0, 20, 0)

#: the time-loop ops (recurrent_delta, srwm: no chunks, and ~0.6 s per interpreted step on Triton):
#: a shorter packing with the same kinds of sequences (empty first/middle/last, length 1)
LOOP_LENGTHS = (0, 5, 1, 9, 0, 1, 3, 0)
LOOP_OPS = ("recurrent_delta", "srwm")


def lengths_for(op: str):
    return LOOP_LENGTHS if op in LOOP_OPS else LENGTHS


#: per-step input names of each op (sliced along T per sequence); the others are shared
STEP_ARGS = {
    "linear_scan": ("a", "b"),
    "gla": ("q", "k", "v", "g"),
    "delta_rule": ("q", "k", "v", "beta", "g"),
    "dplr": ("q", "k", "v", "a", "b", "g"),
    "softmax_scan": ("s", "v"),
    "recurrent_delta": ("q", "k", "v", "beta"),
    "srwm": ("x",),
}


def cu_seqlens_of(lengths: Sequence[int], device="cpu", dtype=torch.int32) -> torch.Tensor:
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=dtype, device=device)


def make_packed(
    op: str,
    lengths: Sequence[int] = LENGTHS,
    with_state: bool = False,
    dtype=torch.float32,
    device: str = "cpu",
    seed: int = 0,
    per_sequence_weights: bool = False,
    drop: Sequence[str] = (),
    **kw,
):
    """(args, initial_state [N, ...] or None, cu_seqlens) for one packed row (B = 1); ``drop``: optional
    inputs left out (``delta_rule`` without ``g``)."""
    T, N = sum(lengths), len(lengths)
    args, _ = make_inputs(op, B=1, T=T, dtype=dtype, device=device, seed=seed, **kw)
    for name in drop:
        del args[name]
    state = None
    if with_state:
        _, state = make_inputs(op, B=N, T=1, with_state=True, device=device, seed=seed + 1, **kw)
    if per_sequence_weights:  # srwm: initial weights with a leading N, one set per sequence
        assert op == "srwm"
        _, weights = make_inputs(op, B=N, T=1, with_state=True, device=device, seed=seed + 2, **kw)
        for name, w in zip(("w_y", "w_q", "w_k", "w_b"), weights):
            args[name] = w.detach().to(dtype).requires_grad_()
    return args, state, cu_seqlens_of(lengths, device)


def expected(op: str, args: Dict[str, torch.Tensor], state, cu_seqlens: torch.Tensor, **kw):
    """Each sequence alone through the reference: (output [1, T, ...], final states [N, ...])."""
    offsets = cu_seqlens.tolist()
    fn = getattr(kernels, op)
    outs, finals = [], []
    for n in range(len(offsets) - 1):
        lo, hi = offsets[n], offsets[n + 1]
        call = {}
        for name, x in args.items():
            if name in STEP_ARGS[op]:
                x = x[:, lo:hi]
            elif op == "srwm" and x.dim() == 4:
                x = x[n : n + 1]
            call[name] = x
        s = None if state is None else _map(lambda x: x[n : n + 1], state)
        o, f = fn(**call, initial_state=s, output_final_state=True, backend="reference", **kw)
        outs.append(o)
        finals.append(_flat(f))
    final = [torch.cat([f[i] for f in finals], 0) for i in range(len(finals[0]))]
    return torch.cat(outs, 1), (final[0] if len(final) == 1 else tuple(final))


def packed_forward_backward(op: str, args, state, cu_seqlens, backend: Optional[str], seed: int = 1, **kw):
    """Output, final state and gradients of every input; backend None computes :func:`expected`."""
    args = {n: x.detach().clone().requires_grad_() for n, x in args.items()}
    state = None if state is None else _map(lambda x: x.detach().clone().requires_grad_(), state)
    if backend is None:
        out, final = expected(op, args, state, cu_seqlens, **kw)
    else:
        out, final = getattr(kernels, op)(
            **args, initial_state=state, output_final_state=True, cu_seqlens=cu_seqlens, backend=backend, **kw
        )
    gen = torch.Generator().manual_seed(seed)
    loss = (out.float() * torch.randn(out.shape, generator=gen).to(out.device)).sum()
    for s in _flat(final):  # softmax_scan's empty sequences keep m = -inf: no cotangent there
        s = torch.where(torch.isfinite(s), s.float(), 0.0)
        loss = loss + (s * torch.randn(s.shape, generator=gen).to(s.device)).sum()
    inputs = list(args.values()) + _flat(state)
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    names = list(args) + [f"initial_state[{i}]" for i in range(len(_flat(state)))]
    return out, final, dict(zip(names, grads))


def compare_packed(
    op: str,
    backend: str,
    tol: float,
    dtype=torch.float32,
    lengths=None,
    with_state: bool = False,
    device: str = "cpu",
    per_sequence_weights: bool = False,
    drop: Sequence[str] = (),
    **make_kw,
) -> None:
    """``backend`` with ``cu_seqlens`` equals each sequence run alone through the reference: outputs,
    final states and every gradient. Low precision: the reference runs on the rounded inputs in fp32.
    ``lengths`` defaults to :func:`lengths_for` the op."""
    lengths = lengths_for(op) if lengths is None else lengths
    args, state, cu = make_packed(
        op, lengths, with_state, dtype, device, per_sequence_weights=per_sequence_weights, drop=drop, **make_kw
    )
    ref_args = {n: x.detach().float() for n, x in args.items()} if dtype != torch.float32 else args
    o_ref, s_ref, g_ref = packed_forward_backward(op, ref_args, state, cu, None)
    o, s, g = packed_forward_backward(op, args, state, cu, backend)
    assert o.dtype == dtype, f"output dtype {o.dtype} != input dtype {dtype}"
    assert_close("output", o, o_ref, tol)
    s_flat, ref_flat = _flat(s), _flat(s_ref)
    assert len(s_flat) == len(ref_flat)
    for i, (a, b) in enumerate(zip(s_flat, ref_flat)):
        assert a.shape[0] == len(lengths), f"final_state[{i}]: leading dim {a.shape[0]} != N = {len(lengths)}"
        infinite = ~torch.isfinite(b)  # softmax_scan's m of an empty sequence without a state: -inf
        assert torch.equal(a[infinite], b[infinite]), f"final_state[{i}]: non-finite entries differ"
        a, b = a.masked_fill(infinite, 0.0), b.masked_fill(infinite, 0.0)
        assert_close(f"final_state[{i}]", a, b, tol)
    for name in g_ref:
        assert_close(f"grad {name}", g[name], g_ref[name], tol)
