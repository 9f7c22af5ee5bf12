"""softmax_scan: the "torch" (chunked associative scan) and "triton" (scan kernels) paths equal the
reference recurrence over (m, u, w): outputs, final state, gradients of s, v and the initial state
(m0, u0, w0); fp32 tight, bf16 loose; odd lengths; large scores; the empty state m = -inf.
"""

import pytest
import torch

import kernels
from kernels.ops.softmax_scan.reference import empty_state
from tests.kernels.harness import (
    assert_close,
    check_split,
    compare_backends,
    forward_backward,
    make_inputs,
    needs_triton,
    triton_test,
)

OP = "softmax_scan"


def _compare(args, state, backend, tol=1e-4, state_tol=None):
    o_ref, s_ref, g_ref = forward_backward(OP, args, state, "reference")
    o, s, g = forward_backward(OP, args, state, backend)
    assert_close("output", o, o_ref, tol)
    for i in range(3):
        assert_close(f"final_state[{i}]", s[i], s_ref[i], tol)
    for name in g_ref:
        t = state_tol if (state_tol is not None and name.startswith("initial_state")) else tol
        assert_close(f"grad {name}", g[name], g_ref[name], t)


def _large_scores(scale=50.0, with_state=False, T=150):
    args, state = make_inputs(OP, T=T, B=2, H=3, V=5, with_state=with_state, seed=3)
    args["s"] = (args["s"].detach() * (scale / 3.0)).requires_grad_()  # make_inputs draws 3 * N(0, 1)
    return args, state


@pytest.mark.parametrize("T", [1, 7, 63, 64, 65, 200])
@pytest.mark.parametrize("with_state", [False, True])
def test_torch_matches_reference(T, with_state):
    compare_backends(OP, "torch", T=T, with_state=with_state, B=2, H=3, V=6)


def test_torch_bf16():
    compare_backends(OP, "torch", dtype=torch.bfloat16, T=150, with_state=True, B=2, H=3, V=6)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_large_scores_are_stable(backend):
    """Scores of magnitude ~50 (exp would overflow fp32 unstabilised): no inf/NaN, exact results.

    With an initial state, m0's gradient is a cancellation of O(1) terms wherever the state's
    weight has underflowed to nothing (true value ~0), hence the looser bound there."""
    _compare(*_large_scores(), backend)
    _compare(*_large_scores(with_state=True), backend, state_tol=1e-3)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_explicit_empty_state(backend):
    """Starting from (m, u, w) = (-inf, 0, 0) equals starting from nothing; gradients stay finite."""
    args, _ = make_inputs(OP, T=70, B=2, H=2, V=4)
    state = tuple(x.requires_grad_() for x in empty_state(2, 2, 4))
    _compare(args, state, backend)


@pytest.mark.parametrize("split", [64, 37])
def test_torch_split_equals_one_pass(split):
    check_split(OP, "torch", split, T=150, with_state=True, B=2, H=2, V=4)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_tied_maxima_route_like_the_reference(backend):
    """Equal scores (common in bf16): the final m's gradient is split exactly as the reference."""
    args, state = make_inputs(OP, T=40, B=1, H=2, V=3, with_state=True)
    s = args["s"].detach().clone()
    s[:, 5] = s[:, 17] = s[:, 30] = s.abs().max() + 1.0
    args["s"] = s.requires_grad_()
    _compare(args, state, backend)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_non_contiguous_inputs(backend):
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 50, generator=gen).permute(0, 2, 1) * 3  # [B, T, H], strided
    v = torch.randn(2, 3, 50, 4, generator=gen).transpose(1, 2)
    assert not s.is_contiguous() and not v.is_contiguous()
    out, final = kernels.softmax_scan(s, v, output_final_state=True, backend=backend)
    ref, ref_final = kernels.softmax_scan(s.contiguous(), v.contiguous(), output_final_state=True, backend="reference")
    assert_close("output", out, ref, 1e-5)
    for i in range(3):
        assert_close(f"final_state[{i}]", final[i], ref_final[i], 1e-5)


def test_bad_shapes_raise_naming_the_argument():
    s, v = torch.randn(2, 10, 3), torch.randn(2, 10, 3, 4)
    with pytest.raises(ValueError, match="^v:"):
        kernels.softmax_scan(s, v[:, :9], backend="torch")
    with pytest.raises(ValueError, match=r"initial_state\[2\]"):
        bad = (torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3, 5))
        kernels.softmax_scan(s, v, initial_state=bad, backend="torch")


# ---- Triton (CPU interpreter): small shapes --------------------------------------------------


@triton_test
@pytest.mark.parametrize("T,with_state", [(1, True), (7, False), (65, True), (100, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_matches_reference(T, with_state, dtype):
    compare_backends(OP, "triton", dtype=dtype, T=T, with_state=with_state, B=1, H=2, V=20)


@triton_test
def test_triton_several_value_blocks_and_split():
    """V = 70 spans two forward V blocks (the last partial)."""
    compare_backends(OP, "triton", T=40, with_state=True, B=1, H=2, V=70)
    check_split(OP, "triton", 33, T=80, with_state=True, B=1, H=2, V=6)


# ---- packed sequences (cu_seqlens): native segmented scan on torch ----------------------------


def test_packed_torch_is_native():
    from kernels._varlen import is_varlen
    from kernels.ops.softmax_scan import BACKENDS

    assert is_varlen(BACKENDS["torch"]())


@pytest.mark.parametrize("with_state", [False, True])
def test_packed_sequences_across_many_chunks(with_state):
    """Sequences spanning several 64-step chunks, and several chunks without a start, between short ones."""
    from tests.kernels.varlen_cases import compare_packed

    compare_packed(OP, "torch", 1e-4, lengths=(1, 300, 0, 2, 129, 64, 1, 70), with_state=with_state, H=3, V=5)


def test_packed_large_scores_and_ties():
    """Scores of magnitude ~50 and tied maxima inside sequences: finite, and m's gradient split like the
    reference within each sequence."""
    from tests.kernels.varlen_cases import compare_packed, make_packed, packed_forward_backward

    lengths = (7, 40, 1, 0, 52)
    args, state, cu = make_packed(OP, lengths, with_state=True, H=2, V=3, seed=5)
    s = args["s"].detach() * (50.0 / 3.0)
    s[:, 10] = s[:, 20] = s[:, 30] = s.abs().max() + 1.0  # ties inside the second sequence
    args["s"] = s.requires_grad_()
    o_ref, f_ref, g_ref = packed_forward_backward(OP, args, state, cu, None)
    o, f, g = packed_forward_backward(OP, args, state, cu, "torch")
    assert_close("output", o, o_ref, 1e-4)
    for i in range(3):
        assert_close(f"final_state[{i}]", f[i], f_ref[i], 1e-4)
    for name in g_ref:
        assert_close(f"grad {name}", g[name], g_ref[name], 1e-3 if name.startswith("initial") else 1e-4)
    compare_packed(OP, "torch", 1e-4, lengths=lengths, H=2, V=3, seed=6)
