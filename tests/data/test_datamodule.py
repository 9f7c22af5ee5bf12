"""TokenDataModule: window contents, rank sharding, exact resume (loader, module, Lightning)."""

from __future__ import annotations

import itertools
from typing import List

import numpy as np
import pytest
import torch

from lm.errors import DataError
from data.datamodule import TokenDataModule
from data.sampler import ResumableBatchSampler, epoch_permutation
from data.shards import TokenShards

SEQ, B = 16, 4


def make(prepared_dir, rank=0, world=1, seed=11, **kw) -> TokenDataModule:
    return TokenDataModule(prepared_dir, SEQ, B, seed=seed, rank=rank, world_size=world, **kw)


def indices(loader_iter, n) -> List[List[int]]:
    return [b["index"].tolist() for b in itertools.islice(loader_iter, n)]


def test_windows_are_shard_slices_with_one_token_overlap(prepared_dir):
    dm = make(prepared_dir, doc_start_mask=True)
    batch = next(iter(dm.train_dataloader()))
    shards = TokenShards(prepared_dir, "train")
    assert batch["tokens"].shape == (B, SEQ + 1) and batch["tokens"].dtype == torch.long
    assert batch["index"].shape == (B,)
    for row, i in zip(batch["tokens"], batch["index"].tolist()):
        assert np.array_equal(row.numpy(), shards.window(i * SEQ, SEQ + 1))
    ds = dm.train_dataset
    assert len(ds) == (len(shards) - 1) // SEQ
    assert torch.equal(ds[3]["tokens"][-1], ds[4]["tokens"][0])
    # the document-start mask marks split position 0 and every position after an eod id
    flat = shards.window(0, len(shards))
    starts = set(np.asarray(shards.doc_starts).tolist())
    assert starts == {0} | {int(p) + 1 for p in np.flatnonzero(flat == dm.eod_id)[:-1]}
    for row, mask, i in zip(batch["tokens"], batch["doc_start_mask"], batch["index"].tolist()):
        expect = [(i * SEQ + j) in starts for j in range(SEQ + 1)]
        assert mask.tolist() == expect
    assert dm.vocab_size == 300 and (dm.eod_id, dm.pad_id) == (0, 1)
    assert dm.tokenizer_path.is_file() and len(dm.tokenizer_sha256) == 64
    assert 1.0 < dm.bytes_per_token < 6.0


def test_epoch_order_is_seeded():
    assert torch.equal(epoch_permutation(100, 1, 0), epoch_permutation(100, 1, 0))
    assert not torch.equal(epoch_permutation(100, 1, 0), epoch_permutation(100, 1, 1))
    assert not torch.equal(epoch_permutation(100, 1, 0), epoch_permutation(100, 2, 0))


def test_two_ranks_disjoint_equal_and_cover_the_epoch(prepared_dir):
    per_rank = []
    for rank in range(2):
        loader = make(prepared_dir, rank=rank, world=2).train_dataloader()
        batches = indices(iter(loader), 10**6)
        assert len(batches) == len(loader) and all(len(b) == B for b in batches)
        per_rank.append([i for b in batches for i in b])
    a, b = set(per_rank[0]), set(per_rank[1])
    assert not (a & b) and len(per_rank[0]) == len(per_rank[1])
    n = len(make(prepared_dir).setup() or make(prepared_dir).train_dataloader().dataset)
    perm = epoch_permutation(n, 11, 0).tolist()
    assert sorted(a | b) == sorted(perm[: 2 * len(per_rank[0])])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_and_across_epoch_boundary(prepared_dir, num_workers):
    world = 2
    per_epoch = len(make(prepared_dir, world=world).train_dataloader())
    total = 2 * per_epoch + 3
    for rank in range(world):
        ref_loader = make(prepared_dir, rank, world).train_dataloader()
        straight = [indices(iter(ref_loader), 10**6) for _ in range(3)]  # 3 epochs
        straight = [b for epoch in straight for b in epoch][:total]
        assert straight[0] != straight[per_epoch]  # epochs differ
        for stop in (5, per_epoch - 1, per_epoch, per_epoch + 2):
            dm = make(prepared_dir, rank, world, num_workers=num_workers)
            loader = dm.train_dataloader()
            seen, epoch = [], 0
            while len(seen) < stop:  # a plain training loop with epochs
                loader.batch_sampler.sampler.set_epoch(epoch)
                it = iter(loader)
                for batch in it:
                    seen.append(batch["index"].tolist())
                    if len(seen) == stop:
                        break
                else:
                    epoch += 1
                    continue
                break
            loader_state, module_state = loader.state_dict(), dm.state_dict()
            del it
            assert seen == straight[:stop]
            assert module_state["consumed"] == (stop - (per_epoch if stop >= per_epoch else 0)) * B * world or (
                stop == per_epoch and module_state["consumed"] == per_epoch * B * world
            )

            for how in ("loader", "module"):
                dm2 = make(prepared_dir, rank, world, num_workers=num_workers)
                if how == "module":
                    dm2.load_state_dict(module_state)
                loader2 = dm2.train_dataloader()
                if how == "loader":
                    loader2.load_state_dict(loader_state)
                rest = []
                # Lightning calls set_epoch(current epoch) before each epoch: must not reset
                loader2.batch_sampler.sampler.set_epoch(epoch)
                while len(stop_plus := seen + rest) < total:
                    got = indices(iter(loader2), total - len(stop_plus))
                    if not got:  # restored exactly at the end of an epoch
                        epoch_after = loader2.batch_sampler.epoch
                        loader2.batch_sampler.sampler.set_epoch(epoch_after)
                        continue
                    rest += got
                assert seen + rest == straight, (rank, stop, how)


def test_state_is_identical_on_all_ranks(prepared_dir):
    states = []
    for rank in range(3):
        dm = make(prepared_dir, rank, 3)
        it = iter(dm.train_dataloader())
        indices(it, 4)
        states.append(dm.state_dict())
    assert states[0] == states[1] == states[2]
    assert states[0]["consumed"] == 4 * B * 3


def test_resume_with_other_world_size_covers_the_rest_of_the_epoch(prepared_dir):
    dm = make(prepared_dir, 0, 2)
    indices(iter(dm.train_dataloader()), 3)
    state = dm.state_dict()
    seen = set(epoch_permutation(state["num_windows"], 11, 0)[: state["consumed"]].tolist())
    rest = set()
    for rank in range(3):
        dm3 = make(prepared_dir, rank, 3)
        dm3.load_state_dict(state)
        with pytest.warns(UserWarning, match="world size 3"):
            loader = dm3.train_dataloader()
        rest |= {i for b in indices(iter(loader), 10**6) for i in b}
    assert not (rest & seen)
    assert len(rest) >= state["num_windows"] - state["consumed"] - 3 * B


def test_validation_is_ordered_strided_and_capped(prepared_dir):
    full = [i for b in make(prepared_dir).val_dataloader() for i in b["index"].tolist()]
    assert full == list(range(len(full))) and len(full) >= 4
    shares = [[i for b in make(prepared_dir, r, 2).val_dataloader() for i in b["index"].tolist()] for r in range(2)]
    assert len(shares[0]) == len(shares[1]) and not set(shares[0]) & set(shares[1])
    assert shares[0] == list(range(0, 2 * len(shares[0]), 2))
    capped = list(make(prepared_dir, 1, 2, val_batches=1).val_dataloader())
    assert len(capped) == 1 and capped[0]["index"].tolist() == [1, 3, 5, 7]


def test_too_small_splits_are_clear_errors(prepared_dir):
    big = TokenDataModule(prepared_dir, 4096, 64, seed=0)
    with pytest.raises(DataError, match="train split too small"):
        big.train_dataloader()
    with pytest.raises(DataError, match="validation split too small"):
        big.val_dataloader()
    with pytest.raises(DataError, match="windows"):
        ResumableBatchSampler(10, 4, 0).load_state_dict(
            {"epoch": 0, "consumed": 0, "seed": 0, "num_windows": 11, "world_size": 1, "batch_size": 4}
        )


def test_lightning_fit_resume_is_exact(prepared_dir, tmp_path):
    """A real Trainer: resuming from checkpoints saved mid-epoch, at the end of an epoch and in the
    next epoch reproduces the uninterrupted sequence of batches."""
    import pytorch_lightning as pl

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: List[List[int]] = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch["index"].tolist())
            return (self.w * batch["tokens"].float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    class SaveAt(pl.Callback):
        def __init__(self, steps):
            self.steps = set(steps)

        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step in self.steps:
                trainer.save_checkpoint(tmp_path / f"step{trainer.global_step}.ckpt")

    def fit(max_steps, ckpt=None, callbacks=()):
        module = Recorder()
        trainer = pl.Trainer(
            max_steps=max_steps,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            use_distributed_sampler=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            callbacks=list(callbacks),
        )
        trainer.fit(module, datamodule=make(prepared_dir, seed=5), ckpt_path=ckpt)
        return module.seen

    def strip(step, what):
        """A copy of a checkpoint without the loader's or without the datamodule's state."""
        ckpt = torch.load(tmp_path / f"step{step}.ckpt", weights_only=False)
        if what == "loader":
            del ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
        else:
            del ckpt["TokenDataModule"]
        path = tmp_path / f"step{step}-no-{what}.ckpt"
        torch.save(ckpt, path)
        return str(path)

    per_epoch = len(make(prepared_dir, seed=5).train_dataloader())
    steps = [3, per_epoch, per_epoch + 2]
    total = per_epoch + 6
    straight = fit(total, callbacks=[SaveAt(steps)])
    assert len(straight) == total and straight[0] != straight[per_epoch]
    for step in steps:
        resumed = fit(total, ckpt=str(tmp_path / f"step{step}.ckpt"))
        assert resumed == straight[step:], step
    # each of the two stored states is enough on its own
    for step, what in ((3, "loader"), (per_epoch + 2, "loader"), (per_epoch + 2, "datamodule")):
        assert fit(total, ckpt=strip(step, what)) == straight[step:], (step, what)
