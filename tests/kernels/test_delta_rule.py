"""delta_rule fast paths (chunked PyTorch, chunked Triton, fused-recurrent Triton) against the reference:
outputs, final states and the gradients of every input (initial state included)."""

import pytest
import torch

import kernels
import kernels.ops.delta_rule as delta_rule_op
from tests.kernels import harness

OP_MODULE = delta_rule_op
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


#: small shapes for the Triton kernels (the CPU interpreter is slow)
TRITON_SHAPE = dict(B=1, H=2, K=32, V=16)


def _require_triton():
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and not kernels._dispatch.triton_interpret():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")


# ---------------------------------------------------------------- chunked PyTorch path

@pytest.mark.parametrize("T", [1, 7, 63, 64, 65, 200])
@pytest.mark.parametrize("decay", harness.DECAYS)
@pytest.mark.parametrize("with_state", [False, True])
def test_torch_matches_reference(T, decay, with_state):
    harness.compare_backends(OP, "torch", T=T, decay=decay, with_state=with_state, seed=T)


@pytest.mark.parametrize("T", [1, 65, 200])
def test_torch_without_gate(T):
    _compare_without_gate("torch", T=T, with_state=True, seed=T)


def test_torch_bf16():
    harness.compare_backends(OP, "torch", dtype=torch.bfloat16, T=130, with_state=True)


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


@pytest.mark.parametrize("split", [50, 64])
def test_torch_split_equals_one_pass(split):
    harness.check_split(OP, "torch", split, T=150, with_state=True)


def test_torch_larger_heads():
    harness.compare_backends(OP, "torch", B=1, T=100, H=3, K=32, V=48, decay="moderate", with_state=True)


def test_non_contiguous_inputs():
    args, state = harness.make_inputs(OP, T=70, with_state=True)
    # same values, non-contiguous layouts
    strided = {n: x.detach().transpose(1, 2).contiguous().transpose(1, 2) for n, x in args.items()}
    assert not strided["q"].is_contiguous()
    o_ref, s_ref = harness.run(OP, args, state, "reference")
    for backend in ("torch",):
        o, s = harness.run(OP, strided, state, backend)
        harness.assert_close(f"output ({backend})", o, o_ref, 1e-4)
        harness.assert_close(f"final_state ({backend})", s, s_ref, 1e-4)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_very_strong_decay_stays_finite(backend, monkeypatch):
    if backend == "triton":
        _require_triton()
        monkeypatch.setattr(OP_MODULE, "RECURRENT_MAX_T", 0)  # the chunked kernels
    # g = -30 per step: every exponent must stay <= 0 and the tiny decay gradients must not drown in rounding
    shape = TRITON_SHAPE if backend == "triton" else {}
    args, state = harness.make_inputs(OP, T=64, with_state=True, **shape)
    args["g"] = torch.full_like(args["g"], -30.0).requires_grad_()
    o_ref, s_ref, g_ref = harness.forward_backward(OP, args, state, "reference")
    o, s, grads = harness.forward_backward(OP, args, state, backend)
    harness.assert_close("output", o, o_ref, 1e-4)
    harness.assert_close("final_state", s, s_ref, 1e-4)
    for name in g_ref:
        harness.assert_close(f"grad {name}", grads[name], g_ref[name], 1e-4)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_empty_sequence_passes_the_state_through(backend):
    if backend == "triton":
        _require_triton()
    args, state = harness.make_inputs(OP, T=0, with_state=True)
    o, s = harness.run(OP, args, state, backend)
    assert o.shape == (2, 0, 2, 6) and o.dtype == args["q"].dtype
    assert torch.equal(s, state)


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
    with pytest.raises(ValueError, match="g"):
        kernels.delta_rule(**dict(args, g=args["g"].abs() + 0.1), backend="torch")


# ---------------------------------------------------------------- Triton paths (interpreter on CPU)

@pytest.fixture
def triton_path(request, monkeypatch):
    """Route backend='triton' to one path: 'chunk' or 'recurrent'."""
    _require_triton()
    monkeypatch.setattr(delta_rule_op, "RECURRENT_MAX_T", 0 if request.param == "chunk" else 10 ** 9)
    return request.param


@pytest.mark.triton
@pytest.mark.parametrize("triton_path", ["chunk", "recurrent"], indirect=True)
@pytest.mark.parametrize("T", [1, 7])
def test_triton_short(triton_path, T):
    harness.compare_backends(OP, "triton", T=T, decay="moderate", with_state=True, seed=T, **TRITON_SHAPE)


@pytest.mark.triton
@pytest.mark.parametrize("triton_path", ["chunk"], indirect=True)
@pytest.mark.parametrize("decay", harness.DECAYS)
def test_triton_chunk_decays(triton_path, decay):
    harness.compare_backends(OP, "triton", T=65, decay=decay, with_state=decay != "strong", **TRITON_SHAPE)


@pytest.mark.triton
@pytest.mark.parametrize("triton_path", ["chunk", "recurrent"], indirect=True)
def test_triton_without_gate(triton_path):
    _compare_without_gate("triton", T=65 if triton_path == "chunk" else 7, with_state=True, **TRITON_SHAPE)


@pytest.mark.triton
@pytest.mark.parametrize("triton_path", ["chunk", "recurrent"], indirect=True)
def test_triton_bf16(triton_path):
    harness.compare_backends(OP, "triton", dtype=torch.bfloat16, T=65 if triton_path == "chunk" else 7,
                             with_state=True, **TRITON_SHAPE)


@pytest.mark.triton
@pytest.mark.parametrize("triton_path", ["chunk"], indirect=True)
def test_triton_split_equals_one_pass(triton_path):
    harness.check_split(OP, "triton", 30, T=80, with_state=True, **TRITON_SHAPE)


@pytest.mark.triton
@pytest.mark.parametrize("triton_path", ["chunk"], indirect=True)
def test_triton_chunk_of_32_for_wide_heads(triton_path, monkeypatch):
    # heads wider than WIDE_HEAD run with 32-step chunks; pretend K = 32 is wide to cover that path
    import kernels.ops.delta_rule._triton_utils as triton_utils

    monkeypatch.setattr(triton_utils, "WIDE_HEAD", 16)
    assert triton_utils.chunk_length(32, 16) == 32
    harness.compare_backends(OP, "triton", T=70, decay="moderate", with_state=True, **TRITON_SHAPE)


@pytest.mark.triton
def test_triton_falls_back_for_very_wide_heads():
    _require_triton()
    args, state = harness.make_inputs(OP, B=1, T=20, H=1, K=130, V=8, with_state=True)
    with pytest.warns(UserWarning, match="chunked PyTorch path"):
        o, s = harness.run(OP, args, state, "triton")
    o_ref, s_ref = harness.run(OP, args, state, "reference")
    harness.assert_close("output", o, o_ref, 1e-4)
    harness.assert_close("final_state", s, s_ref, 1e-4)


@pytest.mark.triton
def test_triton_dispatch_picks_by_length():
    _require_triton()
    # default routing: fused-recurrent for short T, chunked otherwise; both through the public API
    for T in (delta_rule_op.RECURRENT_MAX_T, delta_rule_op.RECURRENT_MAX_T + 1):
        args, state = harness.make_inputs(OP, T=T, with_state=True, **TRITON_SHAPE)
        strided = {n: x.detach().transpose(1, 2).contiguous().transpose(1, 2) for n, x in args.items()}
        with torch.no_grad():
            o_ref, s_ref = harness.run(OP, args, state, "reference")
            o, s = harness.run(OP, strided, state, "triton")
        harness.assert_close("output", o, o_ref, 1e-4)
        harness.assert_close("final_state", s, s_ref, 1e-4)
