"""train.state_passing (truncated BPTT) and data.packing in the training objective: the carried
state makes consecutive windows equal one long forward, rows that do not continue start fresh, the
checkpoint record round-trips, the document starts and the boundary key reach the loss, and the
config refuses what cannot work."""

from __future__ import annotations

import pytest
import torch

from lm.config import load_experiment, resolve
from lm.errors import ConfigError
from lm.training.module import LMModule
from lm.training.losses import boundary_targets, segment_starts, token_loss
from lm.training.state_passing import CarriedState


def module(family="gla", **train):
    cfg = load_experiment(
        None,
        [
            f"model={family}/tiny",
            "model.vocab_size=64",
            "model.d_model=32",
            "model.n_heads=2",
            "model.n_layers=2",
            *[f"train.{k}={v}" for k, v in train.items()],
        ],
    )
    torch.manual_seed(0)
    return LMModule(resolve(cfg))


@pytest.mark.parametrize("family", ["gla", "rwkv7", "aaren"])
def test_carried_state_makes_consecutive_windows_one_forward(family):
    m = module(family, state_passing=True).eval()
    T = 9
    stream = torch.randint(0, 64, (2, 3 * T + 1))
    with torch.no_grad():
        h, _ = m.model.hidden_states(stream[:, :-1])
        expected = torch.nn.functional.cross_entropy(m.model.logits(h).transpose(1, 2), stream[:, 1:], reduction="none")
        for w in range(3):
            batch = {"tokens": stream[:, w * T : (w + 1) * T + 1], "index": torch.tensor([10 + w, 20 + w])}
            total, count = m.carried_loss(batch)
            want = expected[:, w * T : (w + 1) * T].sum()
            assert count == 2 * T
            torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-5)


def test_a_row_that_does_not_continue_starts_fresh():
    m = module(state_passing=True).eval()
    T = 7
    a = torch.randint(0, 64, (2, 2 * T + 1))
    with torch.no_grad():
        m.carried_loss({"tokens": a[:, : T + 1], "index": torch.tensor([3, 8])})
        # row 0 continues (4 == 3 + 1), row 1 jumps (2 != 9): it must equal a fresh forward
        m.carried_loss({"tokens": a[:, T:], "index": torch.tensor([4, 2])})
        state = m.carried.state
        _, fresh = m.model.hidden_states(a[1:, T:-1], None, True)
        _, cont = m.model.hidden_states(a[:1, :-1], None, True)
    for got, want_fresh, want_cont in zip(_leaves(state), _leaves(fresh), _leaves(cont)):
        torch.testing.assert_close(got[1:], want_fresh, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[:1], want_cont, rtol=1e-5, atol=1e-6)


def _leaves(tree):
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


def test_checkpoint_record_round_trips():
    carried = CarriedState()
    assert carried.gathered(None, 1) is None
    state = [{"mixer": {"S": torch.randn(2, 3)}, "mlp": None}]
    carried.update(state, torch.tensor([4, 5]))
    record = carried.gathered(None, 1)
    assert record["index"].shape == (1, 2) and record["state"][0]["mixer"]["S"].shape == (1, 2, 3)
    back = CarriedState()
    back.load(record, rank=0, device=torch.device("cpu"))
    assert torch.equal(back.index, torch.tensor([4, 5]))
    assert torch.equal(back.state[0]["mixer"]["S"], state[0]["mixer"]["S"])
    assert back.start(torch.tensor([5, 6]), lambda n: None) is back.state


def test_document_starts_and_boundary_targets():
    # tokens: 0 is the end-of-document id; a document starts after each 0 (and at the window start here)
    tokens = torch.tensor([[5, 6, 0, 7, 8, 0, 9]])
    mask = torch.tensor([[True, False, False, True, False, False, True]])
    starts = segment_starts(mask)
    # inputs 5 6 0 7 8 0: the end-of-document ids open the next document's segment
    assert starts.tolist() == [[True, False, True, False, False, True]]
    targets = boundary_targets(tokens[:, 1:], mask)
    assert targets.tolist() == [[6, 0, -100, 8, 0, -100]]


def test_the_boundary_key_changes_what_is_scored():
    m = module()
    tokens = torch.randint(1, 64, (2, 12))
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, 4] = mask[1, 7] = True
    with torch.no_grad():
        full, n_full = token_loss(m.model, tokens, doc_start_mask=mask)
        part, n_part = token_loss(m.model, tokens, doc_start_mask=mask, loss_across_boundary=False)
    assert n_full == 22 and int(n_part) == 20
    assert part < full
    with pytest.raises(ValueError, match="loss_across_boundary"):
        token_loss(m.model, tokens, loss_across_boundary=False)


def test_config_refuses_state_passing_where_it_cannot_work():
    with pytest.raises(ConfigError, match="state_passing.*transformer"):
        load_experiment(None, ["model=transformer/tiny", "train.state_passing=true"])
    with pytest.raises(ConfigError, match="data.packing"):
        load_experiment(None, ["data.packing=resett"])
