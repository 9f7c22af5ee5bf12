"""dplr fast paths (chunked PyTorch, chunked Triton, fused-recurrent Triton) against the reference:
outputs, final states and the gradients of every input (initial state included). The cases shared
with delta_rule are in :mod:`tests.kernels.chunked_op_cases`; packed sequences (``cu_seqlens``) on the
chunked PyTorch path against each sequence run alone through the reference at the end."""

import warnings

import pytest
import torch

import kernels
import kernels.ops.dplr as dplr_op
from tests.kernels import harness
from tests.kernels.chunked_op_cases import ChunkedOpCases
from tests.kernels.varlen_cases import compare_packed, make_packed

OP = "dplr"


class TestDplr(ChunkedOpCases):
    OP = OP
    OP_MODULE = dplr_op
    TRITON_SHAPE = dict(B=1, H=2, K=16, V=32)
    WIDE_HEAD_K = 260  # the chunked kernels take heads up to 256 wide


@harness.triton_test
def test_triton_chunk_blocks_over_keys_and_values(monkeypatch):
    # blocks shrunk so that K = 40 keys and V = 24 values take 3 key blocks (the last half empty) and 2
    # value blocks in every blocked loop, and 32-step chunks: each loop runs more than once and masks
    # its end, as K = V = 128 / 256 do on a GPU; the state loops contract W S in key blocks read back
    # from the stored states, as fp32 inputs do at K > 64 (the test runs in fp32: the exact sizes)
    from kernels.ops.common import tiles as triton_utils
    from kernels.ops.dplr import triton_chunk_tiles

    for prefix in ("_", "_EXACT_"):
        monkeypatch.setattr(triton_chunk_tiles, prefix + "BLOCK", 16)
        monkeypatch.setattr(triton_chunk_tiles, prefix + "STATE_ELEMS", 64 * 16)
        monkeypatch.setattr(triton_chunk_tiles, prefix + "GRAD_ELEMS", 32 * 16)
    monkeypatch.setattr(triton_chunk_tiles, "_EXACT_LOOP_KEYS", 16)
    monkeypatch.setattr(triton_utils, "WIDE_HEAD", 16)
    for exact in (False, True):
        bl = triton_chunk_tiles.blocks(40, 24, exact=exact)
        assert (bl.BT, bl.BK, bl.BV, bl.BKF, bl.BVS, bl.BKG) == (32, 16, 16, 64, 16, 16)
        assert bl.BKR == (16 if exact else 64)
    monkeypatch.setattr(dplr_op, "RECURRENT_MAX_T", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the PyTorch path
        harness.compare_backends(OP, "triton", B=1, T=40, H=1, K=40, V=24, decay="moderate", with_state=True)


@harness.triton_test
def test_triton_chunk_of_64_in_fp32(monkeypatch):
    # fp32 inputs take 32-step chunks (smaller tiles for the exact dots); the 64-step chunk that bf16
    # inputs take at K, V <= 64 checked at fp32 tolerance too
    from kernels.ops.dplr import triton_chunk_tiles

    monkeypatch.setattr(triton_chunk_tiles, "_EXACT_CHUNK", 64)
    assert triton_chunk_tiles.blocks(16, 32, exact=True).BT == 64
    monkeypatch.setattr(dplr_op, "RECURRENT_MAX_T", 0)
    harness.compare_backends(OP, "triton", B=1, T=70, H=2, K=16, V=32, decay="moderate", with_state=True)


def test_bad_shapes_name_the_argument():
    args, _ = harness.make_inputs(OP, T=5)
    bad = dict(args, a=args["a"][:, :, :, :3])
    with pytest.raises(ValueError, match="^a:"):
        kernels.dplr(**bad, backend="torch")
    bad = dict(args, g=args["g"][:, :, :1])
    with pytest.raises(ValueError, match="^g:"):
        kernels.dplr(**bad, backend="torch")
    with pytest.raises(ValueError, match="initial_state"):
        kernels.dplr(**args, initial_state=torch.zeros(2, 3, 8, 6), backend="torch")
    with pytest.raises(ValueError, match="^g: log-space decays must be <= 0"):  # value checks: test_checks.py
        kernels.dplr(**dict(args, g=args["g"].detach().abs() + 0.1), backend="reference")


# ---- packed sequences (cu_seqlens): the chunked PyTorch path natively, vs each sequence run alone ----

#: sequence lengths of one packed row (64-step chunks): boundaries inside chunks, on chunk edges, empty
#: and length-1 sequences, and a sequence that begins inside a chunk and crosses several more
VARLEN_LENGTHS = [
    pytest.param((5, 65, 1, 0, 59, 70), id="inside-chunks"),
    pytest.param((0, 64, 0, 64, 1, 21), id="chunk-edges"),
    pytest.param((3, 0, 7), id="short"),
    pytest.param((100, 1, 199, 0), id="across-chunks"),
]


@pytest.mark.parametrize("lengths", VARLEN_LENGTHS)
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("decay", ["moderate", "none"])  # none: a state leaking across a boundary survives
def test_torch_varlen_native(lengths, with_state, decay):
    from kernels._varlen import is_varlen

    assert is_varlen(dplr_op.BACKENDS["torch"]())
    compare_packed(OP, "torch", harness.TOL[torch.float32], lengths=lengths, with_state=with_state, decay=decay)


def test_torch_varlen_strong_decay_and_bf16():
    lengths = (5, 65, 1, 0, 59, 70)
    compare_packed(OP, "torch", harness.TOL[torch.float32], lengths=lengths, with_state=True, decay="strong")
    compare_packed(OP, "torch", harness.TOL[torch.bfloat16], dtype=torch.bfloat16, lengths=lengths, with_state=True)


def test_torch_varlen_is_one_pass(monkeypatch):
    """The packed row takes one chunked pass (not one per sequence)."""
    from kernels.ops.dplr import torch_chunk

    calls = []
    inner = torch_chunk._chunked_pass
    monkeypatch.setattr(torch_chunk, "_chunked_pass", lambda *a, **kw: calls.append(1) or inner(*a, **kw))
    args, state, cu = make_packed(OP, (5, 65, 1, 0, 59, 70), with_state=True)
    with torch.no_grad():
        kernels.dplr(**args, initial_state=state, output_final_state=True, cu_seqlens=cu, backend="torch")
    assert len(calls) == 1
