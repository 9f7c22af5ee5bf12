"""recurrent_delta: the "torch" and "triton" paths equal the reference recurrence.

Outputs, final states (S, y) and the gradients of every input (q, k, v, beta, r_q, r_k, r_v, r_b and
the initial state) under a random cotangent; fp32 tight, bf16 loose; K != V; resuming from a state.
Packed sequences (``cu_seqlens``, native on both fast paths): rows stopping between checkpoints.
"""

import pytest
import torch

import kernels
from kernels.ops.recurrent_delta import BACKENDS, torch_recurrent
from kernels.ops.utils.step_rows import step_rows
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

OP = "recurrent_delta"


@pytest.mark.parametrize("T", [1, 7, 63, 64, 65, 200])
@pytest.mark.parametrize("with_state", [False, True])
def test_torch_matches_reference_fp32(T, with_state):
    compare_backends(OP, "torch", T=T, with_state=with_state, B=2, H=2, K=8, V=6)


def test_torch_matches_reference_bf16():
    compare_backends(OP, "torch", dtype=torch.bfloat16, T=40, with_state=True, B=2, H=2, K=8, V=6)


@pytest.mark.parametrize("checkpoint", [5, 10**9])
def test_torch_state_rebuild_across_segments(monkeypatch, checkpoint):
    """The backward rebuilds S_{t-1} by inverting the update: exact with many short segments and
    with a single segment (the inversion alone over the whole sequence)."""
    monkeypatch.setattr(torch_recurrent, "CHECKPOINT", checkpoint)
    compare_backends(OP, "torch", T=150, with_state=True, B=1, H=3, K=6, V=9)


@pytest.mark.parametrize("with_state", [False, True])
def test_torch_split_equals_one_pass(with_state):
    check_split(OP, "torch", split=17, T=40, with_state=with_state, B=2, H=2, K=8, V=6)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_empty_sequence_passes_the_state_through(backend):
    if backend == "triton":
        require_triton()
    args, state = make_inputs(OP, T=0, with_state=True, B=2, H=2, K=4, V=3)
    o, (S, y) = kernels.recurrent_delta(**args, initial_state=state, output_final_state=True, backend=backend)
    assert o.shape == (2, 0, 2, 3)
    assert torch.equal(S, state[0]) and torch.equal(y, state[1])
    (S.sum() + 2 * y.sum()).backward()
    assert torch.equal(state[0].grad, torch.ones_like(S))
    assert torch.equal(state[1].grad, torch.full_like(y, 2.0))


def _strided(x: torch.Tensor) -> torch.Tensor:
    """The same values stored with the dimension order reversed (non-contiguous)."""
    dims = list(range(x.dim()))[::-1]
    return x.detach().permute(*dims).contiguous().permute(*dims)


@pytest.mark.parametrize(
    "backend,T,B,H", [("torch", 23, 2, 3), pytest.param("triton", 5, 1, 2, marks=pytest.mark.triton)]
)
def test_non_contiguous_inputs(backend, T, B, H):
    if backend == "triton":
        require_triton()
    args, state = make_inputs(OP, T=T, with_state=True, B=B, H=H, K=5, V=4)
    strided = {n: _strided(x) for n, x in args.items()}
    assert not any(x.is_contiguous() for x in strided.values())
    o_ref, s_ref, g_ref = forward_backward(OP, args, state, "reference")
    o, s, g = forward_backward(OP, strided, state, backend)
    assert_close("output", o, o_ref, 1e-4)
    for i in range(2):
        assert_close(f"final_state[{i}]", s[i], s_ref[i], 1e-4)
    for name in g_ref:
        assert_close(f"grad {name}", g[name], g_ref[name], 1e-4)


def test_torch_saves_far_less_than_a_state_per_step():
    """Saved for backward besides the inputs: O(T V) per row plus a state every CHECKPOINT steps,
    not one state per step."""
    args, state = make_inputs(OP, T=256, with_state=True, B=2, H=2, K=16, V=16)
    inputs = {x.untyped_storage().data_ptr() for x in list(args.values()) + list(state)}
    sizes = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in inputs:
            sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kernels.recurrent_delta(**args, initial_state=state, backend="torch")
    per_step_states = 256 * 2 * 2 * 16 * 16 * 4
    assert sum(sizes.values()) < per_step_states / 4


@pytest.mark.parametrize("bad", ["r_v", "initial_state"])
def test_bad_shapes_raise_value_error(bad):
    args, state = make_inputs(OP, T=5, with_state=True, B=2, H=2, K=4, V=3)
    if bad == "r_v":
        args["r_v"] = torch.zeros(2, 4, 3)  # expected [H, V, V]
    else:
        state = (state[0], torch.zeros(2, 2, 4))  # y must be [B, H, V]
    with pytest.raises(ValueError, match=bad):
        kernels.recurrent_delta(**args, initial_state=state, backend="torch")


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
def test_triton_segments_and_k_ne_v(triton_backend, monkeypatch):
    """T = 33 with checkpoints every 8 steps (the backward rebuilds S across 5 segments), K != V."""
    from kernels.ops.recurrent_delta import triton_recurrent

    monkeypatch.setattr(triton_recurrent, "CHECKPOINT", 8)
    compare_backends(OP, "triton", T=33, with_state=True, B=1, H=2, K=16, V=8)


def _row_blocked(monkeypatch):
    """Force the backward's row-blocked reads of R (the K = V = 128 path) at a small size: 8-row blocks."""
    from kernels.ops.recurrent_delta import triton_recurrent

    monkeypatch.setattr(triton_recurrent, "ROW_BLOCKED_TILE", 0)
    monkeypatch.setattr(triton_recurrent, "ROW_BLOCK", 8)
    monkeypatch.setattr(triton_recurrent, "CHECKPOINT", 8)
    assert triton_recurrent._blocks(20, 12)[2] == 8


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_row_blocked_backward(triton_backend, monkeypatch, dtype):
    """K = 20, V = 12 in 8-row blocks of R (a partial last block), T = 33 across checkpoints, with a state."""
    _row_blocked(monkeypatch)
    compare_backends(OP, "triton", dtype=dtype, T=33, with_state=True, B=2, H=2, K=20, V=12)


@pytest.mark.triton
def test_triton_row_blocked_packed(triton_backend, monkeypatch):
    _row_blocked(monkeypatch)
    compare_packed(
        OP,
        "triton",
        TOL[torch.float32],
        lengths=(5, 0, 19, 1, 3),
        with_state=True,
        device=device_for("triton"),
        H=2,
        K=20,
        V=12,
    )


@pytest.mark.triton
def test_triton_rejects_a_sequence_past_int32_checkpoint_offsets(triton_backend):
    """A sequence's checkpoints are offset in int32 inside the kernels: a longer one is a clear error,
    raised on the host before any launch (meta tensors: nothing is allocated)."""
    from kernels.ops.recurrent_delta.triton_recurrent import recurrent_delta_triton

    T, K = 2**23 + 2**20, 128  # (T / 64) K^2 > 2^31
    x = torch.empty(1, T, 1, K, device="meta")
    r = torch.empty(1, K, K, device="meta")
    with pytest.raises(ValueError, match=f"T={T} with K=128, V=128 is too long for one fused sequence"):
        recurrent_delta_triton(x, x, x, torch.empty(1, T, 1, device="meta"), r, r, r, torch.empty(1, K, device="meta"))


@pytest.mark.triton
def test_triton_matches_reference_bf16(triton_backend):
    compare_backends(OP, "triton", dtype=torch.bfloat16, T=7, with_state=True, **TRITON_SHAPE)


@pytest.mark.triton
def test_triton_split_equals_one_pass(triton_backend):
    check_split(OP, "triton", split=3, T=7, with_state=True, **TRITON_SHAPE)


# ------------------------------------------------------------------- packed sequences (cu_seqlens)
#: unsorted lengths with empty and length-1 sequences; with 5-step checkpoints the rows stop at
#: different steps, between checkpoints and on them (the generic cases are in test_varlen.py)
PACKED = (7, 0, 23, 1, 12, 5, 0, 16)


def test_step_rows_layout():
    """Rows sorted longest first; step t holds the rows of the sequences longer than t; the
    time-major <-> packed maps are inverse; prev/last point at the previous step and the last step."""
    rows = step_rows(1, 8, 2, [0, 3, 3, 8], "cpu")  # lengths 3, 0, 5
    assert rows.order.tolist() == [2, 0, 1] and rows.unorder.tolist() == [1, 2, 0]
    assert rows.counts == [4, 4, 4, 2, 2]
    assert rows.gather.tolist() == [3, 0, 4, 1, 5, 2, 6, 7]
    assert torch.equal(rows.gather[rows.scatter], torch.arange(8))
    assert rows.prev.tolist() == [0, 1, 3, 4, 5, 6, 7, 9]  # t = 0: the initial state (sorted position)
    assert rows.last.tolist() == [10, 8, 2]  # empty sequence: its initial state


def test_native_backends_are_marked_varlen():
    assert BACKENDS["torch"]().varlen and not hasattr(BACKENDS["reference"](), "varlen")


@pytest.mark.parametrize("with_state", [False, True])
def test_torch_packed_across_checkpoints(monkeypatch, with_state):
    monkeypatch.setattr(torch_recurrent, "CHECKPOINT", 5)
    compare_packed(OP, "torch", TOL[torch.float32], lengths=PACKED, with_state=with_state, H=3, K=6, V=9)


def test_torch_packed_bf16():
    compare_packed(
        OP, "torch", TOL[torch.bfloat16], dtype=torch.bfloat16, lengths=PACKED, with_state=True, H=2, K=8, V=6
    )


def test_torch_one_sequence_is_the_plain_call():
    args, state = make_inputs(OP, B=1, T=37, with_state=True, H=2, K=5, V=4)
    with torch.no_grad():
        o, s = kernels.recurrent_delta(
            **args, initial_state=state, output_final_state=True, cu_seqlens=torch.tensor([0, 37]), backend="torch"
        )
        o1, s1 = kernels.recurrent_delta(**args, initial_state=state, output_final_state=True, backend="torch")
    assert torch.equal(o, o1) and all(torch.equal(a, b) for a, b in zip(s, s1))


@pytest.mark.triton
def test_triton_packed_across_checkpoints(triton_backend, monkeypatch):
    """One program per (sequence, head) from its first step; checkpoints in per-sequence slots."""
    from kernels.ops.recurrent_delta import triton_recurrent

    assert BACKENDS["triton"]().varlen
    monkeypatch.setattr(triton_recurrent, "CHECKPOINT", 4)
    compare_packed(
        OP,
        "triton",
        TOL[torch.float32],
        lengths=(5, 0, 9, 1, 3),
        with_state=True,
        device=device_for("triton"),
        H=2,
        K=16,
        V=8,
    )
