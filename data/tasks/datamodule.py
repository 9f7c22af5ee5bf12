"""A LightningDataModule that generates task examples on the fly, resumably.

Training example ``i`` of rank ``r`` is global example ``r + W * i`` of stream 0, generated from
``(seed, 0, index)``: ranks are disjoint, and the loader's state (examples consumed) is the same
on every rank, so a resumed run continues with exactly the examples it would have seen.
Validation uses the first ``val_examples`` examples of stream 1 (split across ranks).
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from data.tasks.base import Task, rng_for

TRAIN_STREAM, VAL_STREAM, TEST_STREAM = 0, 1, 2


class TaskExamples(Dataset):
    """Example ``i`` of one stream (any non-negative index)."""

    def __init__(self, task: Task, seed: int, stream: int, size: int = 2**62, **overrides):
        self.task, self.seed, self.stream, self.size, self.overrides = task, seed, stream, size, overrides

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Dict[str, Any]:
        example: Dict[str, Any] = self.task.example(rng_for(self.seed, index, self.stream), **self.overrides)
        example["index"] = index
        return example


class StridedStream(Sampler[int]):
    """``rank, rank + W, rank + 2W, ...`` from a position, forever; stateful."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size, self.position = rank, world_size, 0

    def __iter__(self) -> Iterator[int]:
        for i in itertools.count(self.position):
            self.position = i + 1
            yield self.rank + self.world_size * i

    def state_dict(self) -> Dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.position = int(state["position"])


def collate_examples(examples: List[Dict[str, Any]], pad_id: int = 0) -> Dict[str, torch.Tensor]:
    """Pad to the longest example: inputs with ``pad_id`` (or 0.0), targets with 0, mask with False."""
    T = max(len(e["mask"]) for e in examples)

    def stack(key: str, fill) -> torch.Tensor:
        arrays = []
        for e in examples:
            a = e[key]
            pad = [(0, T - len(a))] + [(0, 0)] * (a.ndim - 1)
            arrays.append(np.pad(a, pad, constant_values=fill))
        return torch.from_numpy(np.stack(arrays))

    inputs_fill = pad_id if examples[0]["inputs"].dtype.kind == "i" else 0.0
    return {
        "inputs": stack("inputs", inputs_fill),
        "targets": stack("targets", 0),
        "mask": stack("mask", False),
        "index": torch.tensor([int(e["index"]) for e in examples]),
    }


class TaskDataModule(pl.LightningDataModule):
    def __init__(
        self,
        task: Task,
        micro_batch_size: int,
        seed: int,
        val_examples: int = 256,
        num_workers: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ):
        super().__init__()
        self.task = task
        self.micro_batch_size = int(micro_batch_size)
        self.seed = int(seed)
        self.val_examples = int(val_examples)
        self.num_workers = int(num_workers)
        self._rank, self._world = rank, world_size
        # a plain function (not a bound method): workers do not receive a copy of the datamodule
        self._collate = functools.partial(collate_examples, pad_id=task.spec.pad_id)

    def rank_and_world(self):
        if self._rank is not None:
            return self._rank, self._world or 1
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return 0, 1

    def train_dataloader(self) -> StatefulDataLoader:
        rank, world = self.rank_and_world()
        return StatefulDataLoader(
            TaskExamples(self.task, self.seed, TRAIN_STREAM),
            batch_size=self.micro_batch_size,
            sampler=StridedStream(rank, world),
            collate_fn=self._collate,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _eval_loader(self, stream: int) -> StatefulDataLoader:
        rank, world = self.rank_and_world()
        per_rank = self.val_examples // world
        indices = [rank + world * i for i in range(per_rank)]
        dataset = torch.utils.data.Subset(TaskExamples(self.task, self.seed, stream), indices)
        return StatefulDataLoader(
            dataset,
            batch_size=self.micro_batch_size,
            shuffle=False,
            collate_fn=self._collate,
            num_workers=self.num_workers,
        )

    def val_dataloader(self):
        return self._eval_loader(VAL_STREAM)

    def test_dataloader(self):
        return self._eval_loader(TEST_STREAM)
