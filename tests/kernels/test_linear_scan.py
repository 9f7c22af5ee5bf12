"""linear_scan: the "torch" (chunked Hillis–Steele scan) and "triton" (scan kernel) paths equal
the reference recurrence h_t = a_t h_{t-1} + b_t: outputs, final state, gradients of a, b and
the initial state; fp32 tight, bf16 loose; odd lengths; coefficients of any sign, zero, and one.
"""

import pytest
import torch

import kernels
from tests.kernels.harness import (
    DECAYS,
    assert_close,
    check_split,
    compare_backends,
    forward_backward,
    needs_triton,
    triton_test,
)

OP = "linear_scan"


@pytest.mark.parametrize("T", [1, 7, 63, 64, 65, 200])
@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("with_state", [False, True])
def test_torch_matches_reference(T, decay, with_state):
    compare_backends(OP, "torch", T=T, decay=decay, with_state=with_state, B=2, K=12)


def test_torch_long_sequence_recursion():
    """T > C^2 exercises the recursive scan over chunk totals (two levels)."""
    compare_backends(OP, "torch", T=4200, with_state=True, B=1, K=3)


def test_torch_zero_coefficients():
    """a = 0 resets the state: no logarithms are taken, so zeros (and negatives) are exact."""
    args, state = _inputs_with_zeros()
    o_ref, s_ref, g_ref = forward_backward(OP, args, state, "reference")
    o, s, g = forward_backward(OP, args, state, "torch")
    _assert_all(o, s, g, o_ref, s_ref, g_ref, 1e-4)


def test_torch_bf16():
    compare_backends(OP, "torch", dtype=torch.bfloat16, T=130, with_state=True, B=2, K=12)


@pytest.mark.parametrize("split", [64, 37])
def test_torch_split_equals_one_pass(split):
    check_split(OP, "torch", split, T=150, with_state=True, B=2, K=5)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_non_contiguous_inputs(backend):
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(40, 2, 6, generator=gen).transpose(0, 1) * 2 - 1  # [B=2, T=40, D=6], strided
    b = torch.randn(2, 6, 40, generator=gen).transpose(1, 2)
    assert not a.is_contiguous() and not b.is_contiguous()
    out, final = kernels.linear_scan(a, b, output_final_state=True, backend=backend)
    ref, ref_final = kernels.linear_scan(a.contiguous(), b.contiguous(), output_final_state=True, backend="reference")
    assert_close("output", out, ref, 1e-5)
    assert_close("final_state", final, ref_final, 1e-5)


def test_bad_shapes_raise_naming_the_argument():
    a, b = torch.rand(2, 10, 4), torch.randn(2, 10, 4)
    with pytest.raises(ValueError, match="^b:"):
        kernels.linear_scan(a, b[:, :, :3], backend="torch")
    with pytest.raises(ValueError, match="initial_state"):
        kernels.linear_scan(a, b, initial_state=torch.zeros(2, 5), backend="torch")


# ---- Triton (CPU interpreter): small shapes --------------------------------------------------


@triton_test
@pytest.mark.parametrize(
    "T,decay,with_state", [(1, "moderate", True), (7, "strong", False), (65, "moderate", True), (65, "none", False)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_matches_reference(T, decay, with_state, dtype):
    compare_backends(OP, "triton", dtype=dtype, T=T, decay=decay, with_state=with_state, B=2, K=12)


@triton_test
def test_triton_several_column_blocks():
    """D spans several column blocks (the last one partial), B = 1."""
    compare_backends(OP, "triton", T=20, with_state=True, B=1, K=37)


@triton_test
def test_triton_zero_coefficients_and_split():
    args, state = _inputs_with_zeros()
    o_ref, s_ref, g_ref = forward_backward(OP, args, state, "reference")
    o, s, g = forward_backward(OP, args, state, "triton")
    _assert_all(o, s, g, o_ref, s_ref, g_ref, 1e-4)
    check_split(OP, "triton", 30, T=70, with_state=True, B=1, K=5)


def _inputs_with_zeros():
    gen = torch.Generator().manual_seed(4)
    a = torch.rand(2, 40, 6, generator=gen) * 2 - 1
    a[:, ::7] = 0.0
    a[:, 3::11] = 1.0
    args = {"a": a.requires_grad_(), "b": torch.randn(2, 40, 6, generator=gen).requires_grad_()}
    return args, torch.randn(2, 6, generator=gen).requires_grad_()


def _assert_all(o, s, g, o_ref, s_ref, g_ref, tol):
    assert_close("output", o, o_ref, tol)
    assert_close("final_state", s, s_ref, tol)
    for name in g_ref:
        assert_close(f"grad {name}", g[name], g_ref[name], tol)


# ---- packed sequences (cu_seqlens): native on torch and triton -------------------------------


def test_packed_paths_are_native():
    from kernels._varlen import is_varlen
    from kernels.ops.linear_scan import BACKENDS

    assert is_varlen(BACKENDS["torch"]())
    assert not is_varlen(BACKENDS["reference"]())  # the reference is the per-sequence loop (the spec)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_packed_with_zero_and_unit_coefficients(backend):
    """Zeros and ones in a (and of every sign) inside packed sequences: still each sequence alone."""
    from tests.kernels.varlen_cases import compare_packed

    compare_packed(OP, backend, 1e-5, with_state=True, K=5, decay="none")
    compare_packed(OP, backend, 1e-5, lengths=(3, 0, 40, 1, 26), with_state=True, K=5, seed=7)


def test_packed_long_row_through_the_chunk_recursion():
    """T > C^2 (two recursion levels of chunk totals) with 40 sequences of random lengths."""
    from tests.kernels.varlen_cases import compare_packed

    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 240, (40,), generator=gen).tolist()
    assert sum(lengths) > 64 * 64
    compare_packed(OP, "torch", 1e-5, lengths=lengths, with_state=True, K=3)
