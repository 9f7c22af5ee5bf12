"""StreamBatchSampler (train.state_passing): every row walks its own stream of consecutive windows,
an epoch covers each stream once, the order is resumable, and a changed layout is refused."""

from __future__ import annotations

import pytest

from data.sampler import StreamBatchSampler
from lm.errors import DataError


def test_rows_read_consecutive_windows_of_disjoint_streams():
    world, B, N = 2, 3, 61
    samplers = [StreamBatchSampler(N, B, seed=5, rank=r, world_size=world) for r in range(world)]
    L = N // (world * B)
    epochs = [[batch for batch in s] for s in samplers]
    seen = []
    for batches in epochs:
        assert len(batches) == L
        for row in range(B):
            column = [batch[row] for batch in batches]
            seen += column
            stream = column[0] // L
            assert all(w // L == stream for w in column), column  # one stream per row
            wraps = sum(1 for a, b in zip(column, column[1:]) if b != a + 1)
            assert wraps <= 1, column  # consecutive, but for one wrap at the seeded offset
    assert sorted(seen) == list(range(world * B * L))  # every stream window once per epoch


def test_resume_continues_the_same_batches_and_epochs_differ():
    straight = StreamBatchSampler(40, 2, seed=1)
    first = list(straight) + list(straight)  # two epochs
    resumed = StreamBatchSampler(40, 2, seed=1)
    it = iter(resumed)
    head = [next(it) for _ in range(7)]
    state = resumed.state_dict()
    again = StreamBatchSampler(40, 2, seed=1)
    again.load_state_dict(state)
    rest = list(again)
    assert head + rest == first[: len(head) + len(rest)]
    assert first[:20] != first[20:], "the epoch offset should change the start of each stream"


def test_a_changed_stream_layout_is_refused():
    s = StreamBatchSampler(40, 2, seed=1, rank=0, world_size=1)
    state = s.state_dict()
    other = StreamBatchSampler(40, 4, seed=1)
    with pytest.raises(DataError, match="train.state_passing.*batch_size"):
        other.load_state_dict(state)
    wider = StreamBatchSampler(40, 2, seed=1, rank=0, world_size=2)
    with pytest.raises(DataError, match="world_size"):
        wider.load_state_dict(state)
