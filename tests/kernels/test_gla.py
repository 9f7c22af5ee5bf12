"""gla: the "torch" (chunked, sub-blocked) path and the Triton chunked and fused-recurrent paths
equal the reference recurrence: outputs, final state, gradients of q, k, v, g and the initial
state; per-key and per-head gates; decays strong (-5 per step), moderate and none; fp32 tight, bf16
loose; odd lengths; K != V; resuming from a state.
"""

import pytest
import torch

import kernels
from tests.kernels.harness import (
    DECAYS,
    TOL,
    assert_close,
    check_split,
    compare_backends,
    device_for,
    forward_backward,
    make_inputs,
    needs_triton,
    triton_test,
)

OP = "gla"


@pytest.fixture(params=["chunked", "fused"])
def triton_path(request, monkeypatch):
    """Route backend="triton" to one path for every T (gla_triton picks by length otherwise)."""
    from kernels.ops.gla import triton_chunk

    monkeypatch.setattr(triton_chunk, "FUSED_MAX_T", 0 if request.param == "chunked" else 10**9)
    return request.param


GATES = [pytest.param(False, id="per_key"), pytest.param(True, id="per_head")]


@pytest.mark.parametrize("T", [1, 7, 63, 64, 65, 200])
@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("per_head_gate", GATES)
@pytest.mark.parametrize("with_state", [False, True])
def test_torch_matches_reference(T, decay, per_head_gate, with_state):
    compare_backends(
        OP, "torch", T=T, decay=decay, per_head_gate=per_head_gate, with_state=with_state, B=2, H=2, K=8, V=6
    )


@pytest.mark.parametrize("per_head_gate", GATES)
@pytest.mark.parametrize("decay", ["strong", "moderate"])
def test_torch_bf16(per_head_gate, decay):
    compare_backends(
        OP,
        "torch",
        dtype=torch.bfloat16,
        T=130,
        decay=decay,
        per_head_gate=per_head_gate,
        with_state=True,
        B=1,
        H=2,
        K=16,
        V=8,
    )


@pytest.mark.parametrize("per_head_gate", GATES)
def test_torch_extreme_decay_no_overflow(per_head_gate):
    """g = -30 per step: exp(b_t) underflows and any exp(-b) would overflow; results stay exact."""
    args, state = make_inputs(OP, T=100, B=1, H=2, K=8, V=4, per_head_gate=per_head_gate, with_state=True)
    args["g"] = (args["g"].detach() * 0 - 30.0).requires_grad_()
    o_ref, s_ref, g_ref = forward_backward(OP, args, state, "reference")
    o, s, g = forward_backward(OP, args, state, "torch")
    assert_close("output", o, o_ref, 1e-4)
    assert_close("final_state", s, s_ref, 1e-4)
    for name in g_ref:
        assert_close(f"grad {name}", g[name], g_ref[name], 1e-4)


def test_torch_segments_carry_the_state():
    """Long inputs on CPU run in segments of SEGMENT_CPU tokens; forcing tiny segments is exact."""
    from kernels.ops.gla import torch_chunk

    args, state = make_inputs(OP, T=300, B=1, H=2, K=8, V=4, with_state=True)
    out, final = torch_chunk.gla_chunked(**args, scale=0.3, initial_state=state, output_final_state=True, segment=128)
    ref, ref_final = torch_chunk.gla_chunked(
        **args, scale=0.3, initial_state=state, output_final_state=True, segment=None
    )
    assert_close("output", out, ref, 1e-5)
    assert_close("final_state", final, ref_final, 1e-5)


@pytest.mark.parametrize("per_head_gate", GATES)
@pytest.mark.parametrize("split", [64, 41])
def test_torch_split_equals_one_pass(per_head_gate, split):
    check_split(OP, "torch", split, T=150, per_head_gate=per_head_gate, with_state=True, B=2, H=2, K=8, V=6)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_non_contiguous_inputs(backend):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 20, 16, generator=gen).transpose(1, 2)  # [B, T, H, K], strided
    k = torch.randn(2, 16, 20, 2, generator=gen).permute(0, 2, 3, 1)
    v = torch.randn(2, 2, 20, 16, generator=gen).transpose(1, 2)
    g = -torch.rand(2, 2, 20, generator=gen).transpose(1, 2)  # per head
    assert not any(x.is_contiguous() for x in (q, k, v, g))
    out, final = kernels.gla(q, k, v, g, output_final_state=True, backend=backend)
    ref, ref_final = kernels.gla(
        q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), output_final_state=True, backend="reference"
    )
    assert_close("output", out, ref, 1e-5)
    assert_close("final_state", final, ref_final, 1e-5)


def test_bad_shapes_and_positive_decays_raise():
    q, k, v = torch.randn(1, 5, 2, 4), torch.randn(1, 5, 2, 4), torch.randn(1, 5, 2, 3)
    g = -torch.rand(1, 5, 2, 4)
    with pytest.raises(ValueError, match="^v:"):
        kernels.gla(q, k, v[:, :4], g, backend="torch")
    with pytest.raises(ValueError, match="^g:"):
        kernels.gla(q, k, v, g[..., :3], backend="torch")
    with pytest.raises(ValueError, match="^g: log-space decays must be <= 0"):
        kernels.gla(q, k, v, g.abs() + 0.1, backend="reference")  # value checks: tests/kernels/test_checks.py


# ---- Triton (CPU interpreter): small shapes --------------------------------------------------

TRITON_CASES = [  # (T, decay, per_head_gate, with_state, H): both paths
    pytest.param(1, "none", False, True, 2, id="T1-none-key-state"),
    pytest.param(7, "strong", True, False, 2, id="T7-strong-head"),
    pytest.param(65, "strong", False, True, 2, id="T65-strong-key-state"),
    pytest.param(65, "moderate", True, True, 1, id="T65-moderate-head-state"),
]


@triton_test
@pytest.mark.parametrize("T,decay,per_head_gate,with_state,H", TRITON_CASES)
def test_triton_matches_reference(triton_path, T, decay, per_head_gate, with_state, H):
    compare_backends(
        OP, "triton", T=T, decay=decay, per_head_gate=per_head_gate, with_state=with_state, B=1, H=H, K=32, V=16
    )


@triton_test
@pytest.mark.parametrize("T,per_head_gate", [(7, True), (65, False)])
def test_triton_bf16(triton_path, T, per_head_gate):
    compare_backends(
        OP,
        "triton",
        dtype=torch.bfloat16,
        T=T,
        decay="moderate",
        per_head_gate=per_head_gate,
        with_state=True,
        B=1,
        H=1,
        K=16,
        V=32,
    )


@triton_test
@pytest.mark.parametrize("K,V", [(8, 20), (80, 72)], ids=["K8-V20", "K80-V72"])
def test_triton_chunked_block_sizes(K, V):
    """K = 8, V = 20: single padded blocks; K = 80, V = 72: several K and V blocks, the last partial."""
    from kernels.ops.gla import triton_chunk

    assert triton_chunk.FUSED_MAX_T < 70
    compare_backends(OP, "triton", T=70, decay="moderate", with_state=True, B=1, H=1, K=K, V=V)


@triton_test
@pytest.mark.parametrize("per_head_gate", [False, True])
def test_triton_fused_narrow_value_blocks(monkeypatch, per_head_gate):
    """The fused-recurrent kernels with value blocks narrowed by MAX_STATE_TILE (the K = 256 case): K = 32,
    V = 40 in 16-column blocks (the last partial), dq/dk partial sums over 3 blocks, with a state."""
    from kernels.ops.gla import triton_chunk, triton_recurrent

    monkeypatch.setattr(triton_recurrent, "MAX_STATE_TILE", 32 * 16)
    assert triton_recurrent._blocks(32, 40) == (32, 16)
    assert triton_chunk.FUSED_MAX_T >= 9
    compare_backends(
        OP, "triton", T=9, decay="moderate", per_head_gate=per_head_gate, with_state=True, B=2, H=1, K=32, V=40
    )


@triton_test
def test_triton_split_equals_one_pass():
    """Chunked pass (T = 40) then fused pass (T = 12, the default choice for short T)."""
    check_split(OP, "triton", 40, T=52, with_state=True, B=1, H=2, K=16, V=16)


# ---- packed sequences (cu_seqlens), native paths vs each sequence run alone -------------------

#: boundaries inside chunks, at chunk edges, length-1 and length-0 sequences
VARLEN_CUS = [
    pytest.param([0, 5, 70, 71, 71, 130, 200], id="inside-chunks"),
    pytest.param([0, 0, 64, 64, 128, 129, 150], id="chunk-edges"),
    pytest.param([0, 3, 3, 10], id="short"),
]


def _per_sequence_reference(q, k, v, g, scale, h0, cu):
    from kernels.ops.gla.reference import gla_reference

    outs, finals = [], []
    for n in range(len(cu) - 1):
        a, b = cu[n], cu[n + 1]
        o, s = gla_reference(
            q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], scale, None if h0 is None else h0[n : n + 1], True
        )
        outs.append(o)
        finals.append(s)
    return torch.cat(outs, 1), torch.cat(finals, 0)


def check_varlen(
    fn, cu, per_head_gate, with_state, decay="moderate", dtype=torch.float32, H=2, K=8, V=6, device="cpu", **kw
):
    """``fn(..., cu_seqlens=cu)`` equals the per-sequence reference: outputs, final states, every gradient."""
    gen = torch.Generator().manual_seed(0)
    T, N = cu[-1], len(cu) - 1
    q = torch.randn(1, T, H, K, generator=gen)
    k = torch.randn(1, T, H, K, generator=gen) / K**0.5
    v = torch.randn(1, T, H, V, generator=gen)
    gs = (1, T, H) if per_head_gate else (1, T, H, K)
    g = {"strong": torch.full(gs, -5.0), "none": torch.zeros(gs)}.get(decay, -torch.rand(gs, generator=gen))
    h0 = torch.randn(N, H, K, V, generator=gen) if with_state else None
    inputs = [x.to(dtype) for x in (q, k, v, g)] + ([h0] if with_state else [])
    results = []
    for run_fn, cast in ((None, torch.float32), (fn, dtype)):
        xs = [x.detach().to(cast if i < 4 else torch.float32).to(device).requires_grad_() for i, x in enumerate(inputs)]
        state = xs[4] if with_state else None
        if run_fn is None:
            o, s = _per_sequence_reference(*xs[:4], 0.3, state, cu)
        else:
            o, s = run_fn(*xs[:4], 0.3, state, True, cu_seqlens=torch.tensor(cu, device=device), **kw)
        cot = torch.Generator().manual_seed(1)
        loss = (o.float() * torch.randn(o.shape, generator=cot).to(device)).sum()
        loss = loss + (s * torch.randn(s.shape, generator=cot).to(device)).sum()
        results.append([o, s] + list(torch.autograd.grad(loss, xs)))
    tol = TOL[dtype]
    names = ["output", "final_state", "grad q", "grad k", "grad v", "grad g", "grad initial_state"]
    for name, actual, expected in zip(names, results[1], results[0]):
        assert_close(name, actual, expected, tol)


@pytest.mark.parametrize("cu", VARLEN_CUS)
@pytest.mark.parametrize("per_head_gate", GATES)
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("decay", ["strong", "moderate"])
def test_torch_varlen_native(cu, per_head_gate, with_state, decay):
    from kernels.ops.gla.torch_chunk import gla_chunked

    assert getattr(gla_chunked, "varlen", False)
    check_varlen(gla_chunked, cu, per_head_gate, with_state, decay)


def test_torch_varlen_segments_and_bf16():
    """CPU passes of 128 steps carry the state across a sequence; bf16 inputs loosely."""
    from kernels.ops.gla.torch_chunk import gla_chunked

    check_varlen(gla_chunked, [0, 100, 101, 300], False, True, segment=128)
    check_varlen(gla_chunked, [0, 5, 70, 71, 130], True, True, dtype=torch.bfloat16)


TRITON_VARLEN_CASES = [  # (cu_seqlens, per_head_gate, with_state, decay)
    pytest.param([0, 5, 70, 71, 71, 130, 150], False, True, "moderate", id="inside-key-state"),
    pytest.param([0, 0, 64, 64, 128, 129, 150], True, True, "strong", id="edges-head-state"),
    pytest.param([0, 3, 3, 10, 11, 40], False, False, "moderate", id="short-key"),
]


@triton_test
@pytest.mark.parametrize("cu,per_head_gate,with_state,decay", TRITON_VARLEN_CASES)
def test_triton_varlen_native(triton_path, cu, per_head_gate, with_state, decay):
    from kernels.ops.gla.triton_chunk import gla_triton

    assert getattr(gla_triton, "varlen", False)
    check_varlen(gla_triton, cu, per_head_gate, with_state, decay, K=16, V=16, device=device_for("triton"))


@triton_test
def test_triton_varlen_bf16(triton_path):
    from kernels.ops.gla.triton_chunk import gla_triton

    check_varlen(
        gla_triton, [0, 5, 70, 71, 90], True, True, dtype=torch.bfloat16, K=16, V=16, device=device_for("triton")
    )


@triton_test
def test_triton_varlen_state_value_blocks(monkeypatch):
    """fp32 packed rows take half-width value blocks in the state loops: V = 40 walks two of them."""
    from kernels.ops.gla import triton_chunk

    monkeypatch.setattr(triton_chunk, "FUSED_MAX_T", 0)
    check_varlen(triton_chunk.gla_triton, [0, 5, 70, 90], False, True, K=16, V=40, device=device_for("triton"))
