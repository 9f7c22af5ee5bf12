"""Packed sequences (``cu_seqlens``) on every op and backend: a packed row with empty, length-1 and
chunk-crossing sequences and boundaries inside chunks equals every sequence run alone through the
reference (outputs, final states, gradients of every input and of the per-sequence initial states);
fp32 tight, bf16 loose. Bad ``cu_seqlens`` raise a ``ValueError`` naming it."""

import pytest
import torch

import kernels
from tests.kernels.harness import OPS, TOL, device_for, needs_triton
from tests.kernels.varlen_cases import compare_packed, make_packed

BACKENDS = ("reference", "torch", pytest.param("triton", marks=needs_triton))
#: small heads keep the Triton interpreter fast
SHAPES = {"H": 2, "K": 8, "V": 6}


_ID = {False: "no_state", True: "state"}


def _cases(states):
    for op in OPS:
        for backend in BACKENDS:
            name = getattr(backend, "values", (backend,))[0]
            for with_state in states:
                marks = getattr(backend, "marks", ())
                yield pytest.param(
                    op, name, with_state, marks=marks, id=f"{op}-{name}-{_ID.get(with_state, with_state)}"
                )


@pytest.mark.parametrize("op,backend,with_state", list(_cases((False, True))))
def test_packed_equals_each_sequence_alone(op, backend, with_state):
    compare_packed(op, backend, TOL[torch.float32], with_state=with_state, device=device_for(backend), **SHAPES)


@pytest.mark.parametrize("op,backend,_", [c for c in _cases(("bf16",)) if c.values[1] != "reference"])
def test_packed_bf16(op, backend, _):
    compare_packed(
        op, backend, TOL[torch.bfloat16], dtype=torch.bfloat16, with_state=True, device=device_for(backend), **SHAPES
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_srwm_per_sequence_initial_weights(backend):
    """srwm's initial weights with a leading dim are one set per sequence ([N, ...])."""
    compare_packed("srwm", backend, TOL[torch.float32], per_sequence_weights=True, device=device_for(backend), **SHAPES)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_single_sequence_equals_unpacked(backend):
    """cu_seqlens = [0, T] is the plain call with B = 1 (int64 offsets accepted too)."""
    args, state, _ = make_packed("gla", (37,), with_state=True, **SHAPES)
    cu = torch.tensor([0, 37], dtype=torch.int64)
    with torch.no_grad():
        o, s = kernels.gla(**args, initial_state=state, output_final_state=True, cu_seqlens=cu, backend=backend)
        o1, s1 = kernels.gla(**args, initial_state=state, output_final_state=True, backend=backend)
    torch.testing.assert_close(o, o1)
    torch.testing.assert_close(s, s1)


def test_no_final_state_requested():
    args, state, cu = make_packed("softmax_scan", with_state=True, **SHAPES)
    with torch.no_grad():
        o, s = kernels.softmax_scan(**args, initial_state=state, cu_seqlens=cu, backend="torch")
        o_ref, _ = kernels.softmax_scan(**args, initial_state=state, cu_seqlens=cu, backend="reference")
    assert s is None
    torch.testing.assert_close(o, o_ref)


def test_all_sequences_empty():
    a = torch.zeros(1, 0, 3)
    h0 = torch.randn(2, 3)
    out, final = kernels.linear_scan(a, a, h0, True, cu_seqlens=torch.tensor([0, 0, 0]), backend="torch")
    assert out.shape == (1, 0, 3)
    torch.testing.assert_close(final, h0)


@pytest.mark.parametrize(
    "cu,match",
    [
        ([[0, 5, 10]], "1-D"),
        ([0], "N >= 1"),
        ([1, 5, 10], "start at 0"),
        ([0, 5, 9], "end at T = 10"),
        ([0, 6, 5, 10], "non-decreasing"),
    ],
)
def test_bad_cu_seqlens_raise(cu, match):
    a, b = torch.rand(1, 10, 4), torch.randn(1, 10, 4)
    with pytest.raises(ValueError, match=f"^cu_seqlens: .*{match}"):
        kernels.linear_scan(a, b, cu_seqlens=torch.tensor(cu), backend="torch")


def test_bad_cu_seqlens_dtype_batch_and_state():
    a, b = torch.rand(1, 10, 4), torch.randn(1, 10, 4)
    with pytest.raises(ValueError, match="^cu_seqlens: expected dtype int32 or int64"):
        kernels.linear_scan(a, b, cu_seqlens=torch.tensor([0.0, 10.0]), backend="torch")
    with pytest.raises(ValueError, match="^cu_seqlens: .*B = 1, got B = 2"):
        kernels.linear_scan(a.expand(2, 10, 4), b.expand(2, 10, 4), cu_seqlens=torch.tensor([0, 10]))
    cu = torch.tensor([0, 3, 10])
    with pytest.raises(ValueError, match=r"^initial_state: expected shape \[N, D\] = \[2, 4\]"):
        kernels.linear_scan(a, b, initial_state=torch.zeros(1, 4), cu_seqlens=cu, backend="torch")
    s, v = torch.randn(1, 10, 2), torch.randn(1, 10, 2, 3)
    bad = (torch.zeros(1, 2), torch.ones(2, 2), torch.zeros(2, 2, 3))
    with pytest.raises(ValueError, match=r"^initial_state\[0\] \(m\): expected shape \[N, H\]"):
        kernels.softmax_scan(s, v, initial_state=bad, cu_seqlens=cu, backend="torch")
    x = torch.randn(1, 10, 1, 4)
    w = [torch.randn(3, 1, 4, 4), torch.randn(1, 4, 4), torch.randn(1, 4, 4), torch.randn(1, 4, 4)]
    with pytest.raises(ValueError, match=r"^w_y: expected shape \[N, H, V, D\]"):
        kernels.srwm(x, *w, cu_seqlens=cu, backend="torch")
