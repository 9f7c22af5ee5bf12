"""Native packed sequences (``cu_seqlens``) in the Triton backends of ``delta_rule``, ``dplr`` and
``softmax_scan``: both Triton paths of delta_rule and dplr (fused-recurrent for short rows, chunked in
chunks aligned to sequence starts), delta_rule gated and ungated, softmax_scan's segmented scan, with and without initial states, fp32 tight and bf16 loose, against every
sequence run alone through the reference (outputs, final states, gradients of every input and initial
state); the native path is taken (no per-sequence loop) and ``cu_seqlens`` is read to the host once.
``tests/kernels/test_varlen.py`` runs the default packing of every op and backend."""

import pytest
import torch

import kernels
from kernels._dispatch import resolve
from kernels._varlen import is_varlen
from tests.kernels.harness import TOL, _flat, device_for, needs_triton
from tests.kernels.varlen_cases import compare_packed, make_packed

pytestmark = needs_triton

SHAPES = {"H": 2, "K": 8, "V": 6}
#: T = 16: the fused-recurrent path (T <= RECURRENT_MAX_T); empty first/middle/last, length 1
SHORT = (0, 5, 1, 6, 0, 1, 3, 0)
#: chunked path (fp32: 32-step chunks, bf16: 64): a sequence of three chunks (70 = 32 + 32 + 6), one
#: across a 64-step boundary of the packed row, length 0 and 1, a boundary inside every chunk of the row
LONG = (3, 70, 0, 1, 29)
DEVICE = device_for("triton")

CASES = [
    pytest.param(lengths, drop, id=f"{path}-{'ungated' if drop else 'gated'}")
    for path, lengths in (("recurrent", SHORT), ("chunked", LONG))
    for drop in ((), ("g",))
]


@pytest.mark.parametrize("lengths,drop", CASES)
@pytest.mark.parametrize("with_state", [False, True], ids=["no_state", "state"])
def test_delta_rule_native_fp32(lengths, drop, with_state):
    compare_packed(
        "delta_rule", "triton", TOL[torch.float32], lengths=lengths, with_state=with_state, drop=drop, device=DEVICE,
        **SHAPES,
    )  # fmt: skip


@pytest.mark.parametrize("lengths,drop", CASES)
def test_delta_rule_native_bf16(lengths, drop):
    compare_packed(
        "delta_rule", "triton", TOL[torch.bfloat16], dtype=torch.bfloat16, lengths=lengths, with_state=True,
        drop=drop, device=DEVICE, **SHAPES,
    )  # fmt: skip


@pytest.mark.parametrize("lengths", [SHORT, LONG], ids=["short", "long"])
@pytest.mark.parametrize("with_state", [False, True], ids=["no_state", "state"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_softmax_scan_native(lengths, with_state, dtype):
    """The segmented scan: tiles of 32 steps inside each sequence, boundaries inside tiles of the row."""
    compare_packed(
        "softmax_scan", "triton", TOL[dtype], dtype=dtype, lengths=lengths, with_state=with_state, device=DEVICE,
        **SHAPES,
    )  # fmt: skip


@pytest.mark.parametrize(
    "lengths,with_state,dtype",
    [
        pytest.param(SHORT, True, torch.float32, id="recurrent-state-fp32"),
        pytest.param(SHORT, False, torch.bfloat16, id="recurrent-no_state-bf16"),
        pytest.param(LONG, False, torch.float32, id="chunked-no_state-fp32"),
        pytest.param(LONG, True, torch.float32, id="chunked-state-fp32"),
        pytest.param(LONG, True, torch.bfloat16, id="chunked-state-bf16"),
    ],
)
def test_dplr_native(lengths, with_state, dtype):
    """Both paths; per-key decays, so the chunk table's cumsum and its adjoint run over [T, H, K]."""
    compare_packed(
        "dplr", "triton", TOL[dtype], dtype=dtype, lengths=lengths, with_state=with_state, device=DEVICE, **SHAPES
    )


NATIVE_OPS = ("delta_rule", "softmax_scan", "dplr")


@pytest.mark.parametrize(
    "op,backend",
    [(op, "triton") for op in NATIVE_OPS + ("gla", "recurrent_delta", "srwm")]
    + [(op, "torch") for op in ("delta_rule", "dplr", "gla", "recurrent_delta", "srwm")],
)
@pytest.mark.parametrize("lengths", [SHORT, LONG], ids=["recurrent", "chunked"])
def test_native_path_taken(op, backend, lengths, monkeypatch):
    """The backend is marked varlen, never loops over sequences, and reads ``cu_seqlens`` to the host
    once (validation's read, passed on as ``offsets``)."""
    device = device_for(backend)
    assert is_varlen(resolve(op, backend, torch.device(device), sum(lengths)))

    def no_loop(*args, **kwargs):
        raise AssertionError("per_sequence called: the native path was not taken")

    monkeypatch.setattr("kernels._dispatch.per_sequence", no_loop)
    args, state, cu = make_packed(op, lengths, with_state=True, device=device, **SHAPES)
    reads = []
    tolist = torch.Tensor.tolist

    def counting_tolist(self):
        if self is cu:
            reads.append(1)
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    with torch.no_grad():
        o, s = getattr(kernels, op)(
            **args, initial_state=state, output_final_state=True, cu_seqlens=cu, backend=backend
        )
    assert o.shape[1] == sum(lengths) and _flat(s)[0].shape[0] == len(lengths)
    assert len(reads) == 1, f"cu_seqlens read to the host {len(reads)} times"


@pytest.mark.parametrize("op", NATIVE_OPS)
def test_all_sequences_empty(op):
    """T = 0 with N sequences: no output steps, every final state is the initial state."""
    args, state, cu = make_packed(op, (0, 0, 0), with_state=True, device=DEVICE, **SHAPES)
    with torch.no_grad():
        o, s = getattr(kernels, op)(
            **args, initial_state=state, output_final_state=True, cu_seqlens=cu, backend="triton"
        )
    assert o.shape[:2] == (1, 0)
    for a, b in zip(_flat(s), _flat(state)):
        torch.testing.assert_close(a, b.float())


@pytest.mark.parametrize("op", ["delta_rule", "dplr"])
def test_recurrent_value_blocks(op):
    """The fused-recurrent backward over packed sequences in several value blocks (V = 80 > 64: partial
    sums over the blocks, one program per (block, sequence, head))."""
    compare_packed(op, "triton", TOL[torch.float32], lengths=SHORT, with_state=True, device=DEVICE, H=1, K=8, V=80)


@pytest.mark.parametrize("lengths", [(5, 0, 16, 1, 17, 0), (0, 0), (8,), (3, 8, 8, 24)])
def test_chunk_table_matches_its_definition(lengths):
    """The vectorised chunk table equals the loop that defines it: chunks of at most BT steps that never
    cross a sequence, each sequence's first chunk, and the packed step of every buffer row (T: padding)."""
    from kernels.ops.utils.chunk_table import ChunkTable

    BT = 8
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    T = offsets[-1]
    spans, first, rows = [], [0], []
    for n in range(len(lengths)):
        start, end = offsets[n], offsets[n + 1]
        for t0 in range(start, end, BT):
            spans.append([t0, end])
            rows.extend(t if t < end else T for t in range(t0, t0 + BT))
        first.append(len(spans))
    table = ChunkTable(offsets, BT, "cpu")
    assert (table.N, table.NT, table.T, table.BT) == (len(lengths), len(spans), T, BT)
    assert table.spans.dtype == torch.int32 and table.spans.tolist() == spans
    assert table.first.dtype == torch.int32 and table.first.tolist() == first
    assert table.rows.dtype == torch.long and table.rows.tolist() == rows
