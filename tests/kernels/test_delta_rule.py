"""delta_rule fast paths (chunked PyTorch, chunked Triton, fused-recurrent Triton) against the reference:
outputs, final states and the gradients of every input (initial state included). The cases shared
with dplr are in :mod:`tests.kernels.chunked_op_cases`; here the ungated rule and the CPU passes."""

import pytest
import torch

import kernels
import kernels.ops.delta_rule as delta_rule_op
from tests.kernels import harness
from tests.kernels.chunked_op_cases import ChunkedOpCases

OP = "delta_rule"


def _compare_without_gate(backend, tol=1e-4, **make_kw):
    """Like harness.compare_backends, for the ungated delta rule (g=None)."""
    args, state = harness.make_inputs(OP, **make_kw)
    args.pop("g")
    o_ref, s_ref, g_ref = harness.forward_backward(OP, args, state, "reference")
    o, s, g = harness.forward_backward(OP, args, state, backend)
    harness.assert_close("output", o, o_ref, tol)
    harness.assert_close("final_state", s, s_ref, tol)
    assert set(g) == set(g_ref)
    for name in g_ref:
        harness.assert_close(f"grad {name}", g[name], g_ref[name], tol)


class TestDeltaRule(ChunkedOpCases):
    OP = OP
    OP_MODULE = delta_rule_op
    TRITON_SHAPE = dict(B=1, H=2, K=32, V=16)

    @pytest.mark.triton
    @pytest.mark.parametrize("triton_path", ["chunk", "recurrent"], indirect=True)
    def test_triton_without_gate(self, triton_path):
        _compare_without_gate("triton", T=65 if triton_path == "chunk" else 7, with_state=True,
                              **self.TRITON_SHAPE)


@pytest.mark.parametrize("T", [1, 65, 200])
def test_torch_without_gate(T):
    _compare_without_gate("torch", T=T, with_state=True, seed=T)


@pytest.mark.parametrize("gated", [True, False])
def test_torch_segments_carry_the_state(monkeypatch, gated):
    """Long inputs on CPU run in passes of SEGMENT_CPU tokens; with segments of 64 (four passes
    over T=200, the last one short) outputs, state and every gradient still equal the reference."""
    from kernels.ops.delta_rule import chunked

    monkeypatch.setattr(chunked, "SEGMENT_CPU", 64)
    if gated:
        harness.compare_backends(OP, "torch", T=200, decay="moderate", with_state=True, seed=3)
    else:
        _compare_without_gate("torch", T=200, with_state=True, seed=3)


def test_bad_shapes_name_the_argument():
    args, _ = harness.make_inputs(OP, T=5)
    bad = dict(args, beta=args["beta"][:, :4])
    with pytest.raises(ValueError, match="beta"):
        kernels.delta_rule(**bad, backend="torch")
    bad = dict(args, v=args["v"][:, :, :1])
    with pytest.raises(ValueError, match="^v:"):
        kernels.delta_rule(**bad, backend="torch")
    with pytest.raises(ValueError, match="initial_state"):
        kernels.delta_rule(**args, initial_state=torch.zeros(2, 2, 8, 7), backend="torch")
    with pytest.raises(ValueError, match="^g: log-space"):
        kernels.delta_rule(**dict(args, g=args["g"].abs() + 0.1), backend="reference")
