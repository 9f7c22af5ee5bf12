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
        _compare_without_gate("triton", T=65 if triton_path == "chunk" else 7, with_state=True, **self.TRITON_SHAPE)


@harness.triton_test
@pytest.mark.parametrize("gated", [True, False])
def test_triton_chunk_grads_walk_key_blocks(monkeypatch, gated):
    # key block of the per-chunk gradient kernel and the key / value blocks of every contraction shrunk
    # to 16 so that K = 40 takes 3 blocks (the last half empty) and V = 24 two, with 32-step chunks, as
    # K = V = 128 takes 4 blocks of 32 in fp32 (2 of 64 in bf16, 4 of 32 in _grads_solve) on a GPU: the
    # state loops then read W S and Kd dS back from the states they store
    from kernels.ops.common import tiles as triton_utils
    from kernels.ops.delta_rule import triton_chunk

    monkeypatch.setattr(triton_chunk, "_GRAD_BK", 16)
    monkeypatch.setattr(triton_chunk, "_GRAD_BK_FP32", 16)
    monkeypatch.setattr(triton_chunk, "_EXACT_BLOCK", 16)
    monkeypatch.setattr(triton_chunk, "_SOLVE_BLOCK", 16)
    blk = triton_chunk._blocks(40, 24, torch.float32)
    assert (blk.BK, blk.BKC, blk.BVC, blk.BKD, blk.BVD, blk.BKG) == (64, 16, 16, 16, 16, 16)
    monkeypatch.setattr(triton_utils, "WIDE_HEAD", 16)
    monkeypatch.setattr(delta_rule_op, "RECURRENT_MAX_T", 0)
    shape = dict(B=1, T=40, H=1, K=40, V=24, with_state=True, seed=5)
    if gated:
        harness.compare_backends(OP, "triton", decay="moderate", **shape)
    else:
        _compare_without_gate("triton", **shape)


@harness.triton_test
def test_triton_chunk_blocks_of_bf16_heads_of_64(monkeypatch):
    # the blocks bf16 inputs take at K = V = 64 (64-step chunks): the backward state loop in value blocks of
    # 32 (the forward one whole), _grads_solve in key and value blocks of 32
    from kernels.ops.delta_rule import triton_chunk

    blk = triton_chunk._blocks(64, 64, torch.bfloat16)
    assert (blk.BT, blk.BVS, blk.BVSB, blk.BKD, blk.BVD) == (64, 64, 32, 32, 32)
    monkeypatch.setattr(delta_rule_op, "RECURRENT_MAX_T", 0)
    shape = dict(B=1, T=100, H=1, K=64, V=64, decay="moderate", with_state=True)
    harness.compare_backends(OP, "triton", dtype=torch.bfloat16, **shape)


@harness.triton_test
def test_triton_chunk_of_64_in_fp32(monkeypatch):
    # fp32 inputs take 32-step chunks and 16-wide state blocks (smaller tiles for the exact dots); the
    # 64-step chunk and 64-wide state blocks that bf16 inputs take at K, V <= 64 checked in fp32 too
    from kernels.ops.delta_rule import triton_chunk

    monkeypatch.setattr(triton_chunk, "_EXACT_CHUNK", 64)
    monkeypatch.setattr(triton_chunk, "_EXACT_STATE_BV", 64)
    monkeypatch.setattr(delta_rule_op, "RECURRENT_MAX_T", 0)
    harness.compare_backends(OP, "triton", B=1, T=70, H=2, K=32, V=16, decay="moderate", with_state=True)


@pytest.mark.parametrize("T", [1, 65, 200])
def test_torch_without_gate(T):
    _compare_without_gate("torch", T=T, with_state=True, seed=T)


@pytest.mark.parametrize("gated", [True, False])
def test_torch_segments_carry_the_state(monkeypatch, gated):
    """Long inputs on CPU run in passes of SEGMENT_CPU tokens; with segments of 64 (four passes
    over T=200, the last one short) outputs, state and every gradient still equal the reference."""
    from kernels.ops.delta_rule import torch_chunk

    monkeypatch.setattr(torch_chunk, "SEGMENT_CPU", 64)
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


# ---- packed sequences (cu_seqlens): the chunked PyTorch path natively, vs each sequence run alone ----


def _check_varlen(cu, gated, with_state, decay="moderate", dtype=torch.float32, H=2, K=8, V=6, **kw):
    from kernels.ops.delta_rule.torch_chunk import delta_rule_chunked
    from kernels.ops.delta_rule.reference import delta_rule_reference

    assert getattr(delta_rule_chunked, "varlen", False)
    gen = torch.Generator().manual_seed(0)
    T, N = cu[-1], len(cu) - 1
    inputs = [
        torch.randn(1, T, H, K, generator=gen),
        torch.nn.functional.normalize(torch.randn(1, T, H, K, generator=gen), dim=-1),
        torch.randn(1, T, H, V, generator=gen),
        torch.rand(1, T, H, generator=gen),
    ]
    if gated:
        inputs.append(torch.full((1, T, H), -5.0) if decay == "strong" else -torch.rand(1, T, H, generator=gen))
    if with_state:
        inputs.append(torch.randn(N, H, K, V, generator=gen))
    results = []
    for fast in (False, True):
        xs = [x.to(dtype if fast and i < 4 else torch.float32).requires_grad_() for i, x in enumerate(inputs)]
        q, k, v, beta = xs[:4]
        g = xs[4] if gated else None
        h0 = xs[-1] if with_state else None
        if fast:
            o, s = delta_rule_chunked(q, k, v, beta, g, 0.3, h0, True, cu_seqlens=torch.tensor(cu), **kw)
        else:
            parts = [
                delta_rule_reference(
                    q[:, a:b],
                    k[:, a:b],
                    v[:, a:b],
                    beta[:, a:b],
                    None if g is None else g[:, a:b],
                    0.3,
                    None if h0 is None else h0[n : n + 1],
                    True,
                )
                for n, (a, b) in enumerate(zip(cu[:-1], cu[1:]))
            ]
            o, s = torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 0)
        cot = torch.Generator().manual_seed(1)
        loss = (o.float() * torch.randn(o.shape, generator=cot)).sum() + (s * torch.randn(s.shape, generator=cot)).sum()
        results.append([o, s] + list(torch.autograd.grad(loss, xs)))
    names = ["output", "final_state", "grad q", "grad k", "grad v", "grad beta"] + (["grad g"] if gated else [])
    names += ["grad initial_state"] if with_state else []
    for name, actual, expected in zip(names, results[1], results[0]):
        harness.assert_close(name, actual, expected, harness.TOL[dtype])


VARLEN_CUS = [
    pytest.param([0, 5, 70, 71, 71, 130, 200], id="inside-chunks"),
    pytest.param([0, 0, 64, 64, 128, 129, 150], id="chunk-edges"),
    pytest.param([0, 3, 3, 10], id="short"),
]


@pytest.mark.parametrize("cu", VARLEN_CUS)
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("with_state", [False, True])
def test_torch_varlen_native(cu, gated, with_state):
    _check_varlen(cu, gated, with_state)


def test_torch_varlen_strong_decay_segments_bf16():
    _check_varlen([0, 5, 70, 71, 130], True, True, decay="strong")
    _check_varlen([0, 100, 101, 300], True, True, segment=128)  # CPU passes carry the state
    _check_varlen([0, 5, 70, 71, 130], True, True, dtype=torch.bfloat16)
