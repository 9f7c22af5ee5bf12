"""The packed layout of a batch with document starts (lm.models.segments.Segments)."""

import pytest
import torch

from lm.models.segments import Segments


def starts_of(B, T, positions):
    s = torch.zeros(B, T, dtype=torch.bool)
    for b, ts in enumerate(positions):
        s[b, ts] = True
    return s


# row 0: documents [0,3) [3,4) [4,6) (start at 0); row 1: continues, then [2,6); row 2: continues only
STARTS = starts_of(3, 6, [[0, 3, 4], [2], []])


def test_offsets_rows_and_positions():
    seg = Segments.from_starts(STARTS)
    assert seg.offsets == (0, 3, 4, 6, 8, 12, 18)
    assert seg.cu_seqlens.dtype == torch.int32 and seg.cu_seqlens.tolist() == list(seg.offsets)
    assert seg.num_segments == 6 and seg.batch_size == 3 and seg.seq_len == 6
    assert seg.row_first.tolist() == [0, 3, 5]
    assert seg.row_last.tolist() == [2, 4, 5]
    assert seg.continues.tolist() == [False, True, True]
    assert seg.position.tolist() == [[0, 1, 2, 0, 0, 1], [0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]
    assert seg.document_id().tolist() == [[0, 0, 0, 1, 2, 2], [3, 3, 4, 4, 4, 4], [5] * 6]
    assert seg.last_lengths() == (2, 4, 6)
    assert seg.has_starts()
    assert not Segments.from_starts(torch.zeros(2, 5, dtype=torch.bool)).has_starts()
    assert Segments.from_starts(starts_of(2, 5, [[0], []])).has_starts()


def test_pack_unpack_round_trip():
    seg = Segments.from_starts(STARTS)
    x = torch.randn(3, 6, 2, 4)
    packed = seg.pack(x)
    assert packed.shape == (1, 18, 2, 4)
    assert torch.equal(packed[0, 8:12], x[1, 2:6])  # segment 4 = row 1's second document
    assert torch.equal(seg.unpack(packed), x)


def test_initial_and_final_state_scatter_gather():
    seg = Segments.from_starts(STARTS)
    state = torch.arange(3.0)[:, None].expand(3, 2) + 10  # row b's carried state: 10 + b
    init = seg.initial_state(state, fresh=lambda n: torch.full((n, 2), -1.0))
    # row 0 starts with a document (fresh); row 1 and 2 carry their state into their first segment
    assert init[:, 0].tolist() == [-1, -1, -1, 11, -1, 12]
    assert seg.initial_state(None, fresh=lambda n: torch.zeros(n, 2)).shape == (6, 2)
    pair = seg.initial_state((state, state[:, :1]), fresh=lambda n: (torch.zeros(n, 2), torch.zeros(n, 1)))
    assert pair[1][:, 0].tolist() == [0, 0, 0, 11, 0, 12]
    finals = torch.arange(6.0)[:, None]
    assert seg.final_state(finals)[:, 0].tolist() == [2, 4, 5]
    assert [f[:, 0].tolist() for f in seg.final_state((finals, finals * 2))] == [[2, 4, 5], [4, 8, 10]]
    assert seg.final_state(None) is None
    with pytest.raises(ValueError, match="leading dim 2 != batch size 3"):
        seg.initial_state(torch.zeros(2, 2), fresh=lambda n: torch.zeros(n, 2))


def test_same_document():
    seg = Segments.from_starts(STARTS)
    assert seg.same_document(0).all()
    # lag 1: false only at a document's first token (and row 0's start, which starts a document)
    assert seg.same_document(1).tolist() == [
        [False, True, True, False, False, True],
        [True, True, False, True, True, True],
        [True] * 6,
    ]
    assert seg.same_document(2).tolist() == [
        [False, False, True, False, False, False],
        [True, True, False, False, True, True],
        [True] * 6,
    ]
    # after the window: row 0's last document is [4, 6) (2 tokens), row 1's [2, 6), row 2 continues
    assert seg.same_document_after(1).tolist() == [True, True, True]
    assert seg.same_document_after(2).tolist() == [True, True, True]
    assert seg.same_document_after(3).tolist() == [False, True, True]
    assert seg.same_document_after(5).tolist() == [False, False, True]
    assert seg.same_document_after(9).tolist() == [False, False, True]


@pytest.mark.parametrize(
    "bad",
    [torch.zeros(2, 3), torch.zeros(6, dtype=torch.bool), torch.zeros(1, 2, 3, dtype=torch.bool)],
    ids=["float", "1d", "3d"],
)
def test_bad_input(bad):
    with pytest.raises(ValueError, match=r"document starts: expected a bool tensor \[B, T\]"):
        Segments.from_starts(bad)
