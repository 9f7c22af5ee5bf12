"""srwm: the "torch" and "triton" paths equal the reference recurrence.

Outputs, the four final weight matrices and the gradients of x and of the initial weights (shared
[H, ...] parameters: summed over the batch; batched [B, H, ...]; or the initial_state tuple) under a
random cotangent; fp32 tight, bf16 loose; V != D; resuming from a state. Packed sequences
(``cu_seqlens``, native on both fast paths): rows stopping between checkpoints, shared or per-sequence weights.
"""

import pytest
import torch

import kernels
from kernels.ops.srwm import BACKENDS, torch_recurrent
from tests.kernels.harness import (
    TOL,
    assert_close,
    check_split,
    compare_backends,
    device_for,
    forward_backward,
    make_inputs,
    require_triton,
)
from tests.kernels.varlen_cases import compare_packed

OP = "srwm"
WEIGHTS = ("w_y", "w_q", "w_k", "w_b")


def _compare(args, state, backend, tol=1e-4):
    o_ref, s_ref, g_ref = forward_backward(OP, args, state, "reference")
    o, s, g = forward_backward(OP, args, state, backend)
    assert_close("output", o, o_ref, tol)
    for i in range(4):
        assert_close(f"final_state[{i}]", s[i], s_ref[i], tol)
    for name in g_ref:
        assert_close(f"grad {name}", g[name], g_ref[name], tol)


def _batched(args, B, names=WEIGHTS, seed=3):
    """Give the named weights a leading batch dim, with a different perturbation per batch row."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(args)
    for n in names:
        w = args[n].detach()
        noise = 0.1 * torch.randn((B,) + tuple(w.shape), generator=gen)
        out[n] = (w.unsqueeze(0) + noise).requires_grad_()
    return out


@pytest.mark.parametrize("T", [1, 7, 63, 64, 65, 200])
@pytest.mark.parametrize("with_state", [False, True])
def test_torch_matches_reference_fp32(T, with_state):
    """Shared [H, ...] weights (gradient summed over the batch) or an initial_state tuple."""
    compare_backends(OP, "torch", T=T, with_state=with_state, B=2, H=2, K=8, V=6)


@pytest.mark.parametrize("names", [WEIGHTS, ("w_y", "w_k")], ids=["all", "mixed"])
def test_torch_batched_weights(names):
    args, _ = make_inputs(OP, T=37, B=3, H=2, K=6, V=5)
    _compare(_batched(args, 3, names), None, "torch")


def test_torch_matches_reference_bf16():
    compare_backends(OP, "torch", dtype=torch.bfloat16, T=40, B=2, H=2, K=8, V=6)


@pytest.mark.parametrize("checkpoint", [5, 10**9])
def test_torch_state_rebuild_across_segments(monkeypatch, checkpoint):
    """The backward rebuilds W_{t-1} by inverting the update: exact with many short segments and
    with a single segment (the inversion alone over the whole sequence)."""
    monkeypatch.setattr(torch_recurrent, "CHECKPOINT", checkpoint)
    compare_backends(OP, "torch", T=150, with_state=True, B=1, H=3, K=7, V=4)


@pytest.mark.parametrize("with_state", [False, True])
def test_torch_split_equals_one_pass(with_state):
    check_split(OP, "torch", split=17, T=40, with_state=with_state, B=2, H=2, K=8, V=6)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_empty_sequence_returns_the_initial_weights(backend):
    if backend == "triton":
        require_triton()
    args, _ = make_inputs(OP, T=0, B=2, H=2, K=4, V=3)
    o, final = kernels.srwm(**args, output_final_state=True, backend=backend)
    assert o.shape == (2, 0, 2, 3)
    for name, w in zip(WEIGHTS, final):
        assert torch.equal(w, args[name].detach().expand_as(w))
    sum(w.sum() for w in final).backward()
    for name in WEIGHTS:
        assert torch.equal(args[name].grad, torch.full_like(args[name], 2.0))  # summed over B = 2


def _strided(x: torch.Tensor) -> torch.Tensor:
    """The same values stored with the dimension order reversed (non-contiguous)."""
    dims = list(range(x.dim()))[::-1]
    return x.detach().permute(*dims).contiguous().permute(*dims).requires_grad_()


@pytest.mark.parametrize(
    "backend,T,B,H", [("torch", 23, 2, 3), pytest.param("triton", 5, 1, 2, marks=pytest.mark.triton)]
)
def test_non_contiguous_inputs(backend, T, B, H):
    if backend == "triton":
        require_triton()
    args, _ = make_inputs(OP, T=T, B=B, H=H, K=5, V=4)
    strided = {n: _strided(x) for n, x in args.items()}
    assert not any(x.is_contiguous() for x in strided.values())
    _compare(strided, None, backend)


def test_torch_saves_far_less_than_a_state_per_step():
    """Saved for backward besides the inputs: O(T R) per row plus the weights every CHECKPOINT
    steps, not the weights of every step."""
    B, T, H, D, V = 2, 256, 2, 16, 16
    args, _ = make_inputs(OP, T=T, B=B, H=H, K=D, V=V)
    inputs = {x.untyped_storage().data_ptr() for x in args.values()}
    sizes = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in inputs:
            sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kernels.srwm(**args, backend="torch")
    per_step_states = T * B * H * (V + 2 * D + 4) * D * 4
    assert sum(sizes.values()) < per_step_states / 4


@pytest.mark.parametrize("bad", ["w_k", "initial_state[3]"])
def test_bad_shapes_raise_value_error(bad):
    args, state = make_inputs(OP, T=5, with_state=True, B=2, H=2, K=4, V=3)
    if bad == "w_k":
        args["w_k"] = torch.zeros(2, 3, 4)  # expected [H, D, D]
        state = None
    else:
        state = state[:3] + (torch.zeros(2, 2, 3, 4),)  # w_b must be [B, H, 4, D]
    with pytest.raises(ValueError, match=bad.replace("[", r"\[").replace("]", r"\]")):
        kernels.srwm(**args, initial_state=state, backend="torch")


# ----------------------------------------------------------------------------------- Triton
TRITON_SHAPE = dict(B=1, H=2, K=16, V=16)


@pytest.fixture
def triton_backend():
    require_triton()


@pytest.mark.triton
@pytest.mark.parametrize("T,with_state", [(1, False), (7, True)])
def test_triton_matches_reference_fp32(triton_backend, T, with_state):
    compare_backends(OP, "triton", T=T, with_state=with_state, **TRITON_SHAPE)


@pytest.mark.triton
def test_triton_segments_batched_weights_v_ne_d(triton_backend, monkeypatch):
    """T = 33 with checkpoints every 8 steps (the backward rebuilds W across 5 segments), batched
    weights, V != D."""
    from kernels.ops.srwm import triton_recurrent

    monkeypatch.setattr(triton_recurrent, "CHECKPOINT", 8)
    args, _ = make_inputs(OP, T=33, B=2, H=1, K=16, V=8)
    _compare(_batched(args, 2, ("w_y", "w_q")), None, "triton")


def _row_blocked(monkeypatch):
    """Force the row-blocked kernels (the D = V = 128 path, weights in global memory) at a small size:
    8-row blocks, checkpoints every 8 steps."""
    from kernels.ops.srwm import triton_recurrent

    monkeypatch.setattr(triton_recurrent, "ROWS_ABOVE_TILE", 0)
    monkeypatch.setattr(triton_recurrent, "ROW_BLOCK", 8)
    monkeypatch.setattr(triton_recurrent, "CHECKPOINT", 8)
    assert triton_recurrent._blocks(12, 10)[3]


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_row_blocked(triton_backend, monkeypatch, dtype):
    """D = 12, V = 10 (R = 38 rows: a partial last 8-row block, blocks straddling the matrices), T = 19
    across checkpoints, resumed from a state."""
    _row_blocked(monkeypatch)
    compare_backends(OP, "triton", dtype=dtype, T=19, with_state=True, B=2, H=2, K=12, V=10)


@pytest.mark.triton
def test_triton_row_blocked_shared_weights(triton_backend, monkeypatch):
    """The same path from shared [H, ...] weights (their gradient summed over the batch)."""
    _row_blocked(monkeypatch)
    compare_backends(OP, "triton", T=9, B=2, H=1, K=12, V=10)


@pytest.mark.triton
def test_triton_row_blocked_packed(triton_backend, monkeypatch):
    _row_blocked(monkeypatch)
    compare_packed(
        OP,
        "triton",
        TOL[torch.float32],
        lengths=(5, 0, 17, 1, 3),
        per_sequence_weights=True,
        device=device_for("triton"),
        H=2,
        K=12,
        V=10,
    )


@pytest.mark.triton
def test_triton_matches_reference_bf16(triton_backend):
    compare_backends(OP, "triton", dtype=torch.bfloat16, T=7, **TRITON_SHAPE)


@pytest.mark.triton
def test_triton_split_equals_one_pass(triton_backend):
    check_split(OP, "triton", split=3, T=7, **TRITON_SHAPE)


# ------------------------------------------------------------------- packed sequences (cu_seqlens)
#: unsorted lengths with empty and length-1 sequences; with 5-step checkpoints the rows stop at
#: different steps, between checkpoints and on them (the generic cases are in test_varlen.py)
PACKED = (7, 0, 23, 1, 12, 5, 0, 16)


@pytest.mark.parametrize("case", ["shared", "per_sequence", "state"])
def test_torch_packed_across_checkpoints(monkeypatch, case):
    """Shared [H, ...] weights start every sequence (gradient summed over them), [N, ...] weights or
    an initial_state one set per sequence."""
    monkeypatch.setattr(torch_recurrent, "CHECKPOINT", 5)
    assert BACKENDS["torch"]().varlen
    compare_packed(
        OP,
        "torch",
        TOL[torch.float32],
        lengths=PACKED,
        with_state=case == "state",
        per_sequence_weights=case == "per_sequence",
        H=3,
        K=7,
        V=4,
    )


def test_torch_packed_bf16():
    compare_packed(OP, "torch", TOL[torch.bfloat16], dtype=torch.bfloat16, lengths=PACKED, H=2, K=8, V=6)


def test_torch_one_sequence_is_the_plain_call():
    args, _ = make_inputs(OP, B=1, T=37, H=2, K=5, V=4)
    with torch.no_grad():
        o, s = kernels.srwm(**args, output_final_state=True, cu_seqlens=torch.tensor([0, 37]), backend="torch")
        o1, s1 = kernels.srwm(**args, output_final_state=True, backend="torch")
    assert torch.equal(o, o1) and all(torch.equal(a, b) for a, b in zip(s, s1))


@pytest.mark.triton
@pytest.mark.parametrize("per_sequence", [False, True])
def test_triton_packed_across_checkpoints(triton_backend, monkeypatch, per_sequence):
    """One program per (sequence, head) from its first step; checkpoints in per-sequence slots."""
    from kernels.ops.srwm import triton_recurrent

    assert BACKENDS["triton"]().varlen
    monkeypatch.setattr(triton_recurrent, "CHECKPOINT", 4)
    compare_packed(
        OP,
        "triton",
        TOL[torch.float32],
        lengths=(5, 0, 9, 1, 3),
        per_sequence_weights=per_sequence,
        device=device_for("triton"),
        H=2,
        K=16,
        V=8,
    )
