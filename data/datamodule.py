"""A LightningDataModule over prepared token shards, resumable mid-epoch on any number of ranks.

Training: :class:`~data.dataset.WindowDataset` windows of ``seq_len + 1`` tokens in the shuffled,
rank-sharded order of :class:`~data.sampler.ResumableBatchSampler`, loaded by torchdata's
``StatefulDataLoader`` (run the Trainer with ``use_distributed_sampler=False``). Batches are
``{"tokens": LongTensor[B, seq_len + 1], "index": LongTensor[B]}`` (+ ``"doc_start_mask"``
BoolTensor[B, seq_len + 1] with ``doc_start_mask=True``).

Resuming: the loader's own ``state_dict`` (stored by Lightning's fit loop) and this module's
``state_dict`` (stored under the class name) both hold the sampler state ``{epoch, consumed,
seed, num_windows, world_size, batch_size}``, identical on every rank; loading either one
continues with exactly the batches an uninterrupted run would have produced.

Validation/test: consecutive windows in order, rank ``r`` of ``W`` takes windows ``r, r + W, ...``,
equal counts per rank, at most ``val_batches`` batches per rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from lm.errors import DataError

from data.dataset import MixtureWindows, WindowDataset, collate_windows
from data.sampler import (
    MixtureBatchSampler,
    ResumableBatchSampler,
    SourceStridedBatchSampler,
    StreamBatchSampler,
    StridedBatchSampler,
)
from data.shards import TokenShards, check_compatible, read_metadata
from data.streaming import StreamWindows


class TokenDataModule(pl.LightningDataModule):
    """Shuffled resumable training windows and deterministic evaluation windows (module docstring).

    Args:
        data_dir: a directory written by ``lm data prepare``.
        seq_len: tokens per training example (windows hold ``seq_len + 1``).
        micro_batch_size: windows per batch on each rank.
        seed: shuffling seed (epoch ``e`` uses ``mix(seed, e)``).
        num_workers: DataLoader worker processes.
        val_batches: at most this many validation batches per rank (None: all).
        expected_tokenizer_hash: sha256 (or tokenizer.json path) the shards must have been made with.
        rank, world_size: override what the Trainer / torch.distributed report (tests).
        doc_start_mask: add ``"doc_start_mask"`` to batches (``data.packing: reset``).
        state_passing: consecutive windows per batch row (:class:`~data.sampler.StreamBatchSampler`,
            ``train.state_passing``) instead of the shuffled order.
    """

    def __init__(
        self,
        data_dir: Union[str, Path],
        seq_len: int,
        micro_batch_size: int,
        seed: int,
        num_workers: int = 0,
        val_batches: Optional[int] = None,
        expected_tokenizer_hash: Optional[str] = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        doc_start_mask: bool = False,
        state_passing: bool = False,
    ):
        super().__init__()
        if seq_len <= 0 or micro_batch_size <= 0:
            raise DataError(f"seq_len and micro_batch_size must be > 0, got {seq_len}, {micro_batch_size}")
        self.data_dir = Path(data_dir)
        self.seq_len = int(seq_len)
        self.micro_batch_size = int(micro_batch_size)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.val_batches = val_batches
        self.doc_start_mask = doc_start_mask
        self.state_passing = state_passing
        self._rank, self._world_size = rank, world_size
        if expected_tokenizer_hash is not None:
            self.metadata = check_compatible(self.data_dir, expected_tokenizer_hash)
        else:
            self.metadata = read_metadata(self.data_dir)
        self.train_dataset: Optional[WindowDataset] = None
        self.val_dataset: Optional[WindowDataset] = None
        self.test_dataset: Optional[WindowDataset] = None
        self.batch_sampler: Optional[Union[ResumableBatchSampler, MixtureBatchSampler]] = None
        self._train_loader: Optional[StatefulDataLoader] = None
        self._pending_state: Optional[Dict[str, Any]] = None

    # ------------------------------------------------------------------------------ metadata
    @property
    def vocab_size(self) -> int:
        return int(self.metadata["vocab_size"])

    @property
    def eod_id(self) -> int:
        return int(self.metadata["eod_id"])

    @property
    def pad_id(self) -> int:
        return int(self.metadata["pad_id"])

    @property
    def tokenizer_path(self) -> Path:
        return self.data_dir / self.metadata["tokenizer"]["file"]

    @property
    def tokenizer_sha256(self) -> str:
        return str(self.metadata["tokenizer_sha256"])

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes per token of the validation split (train if there is none): for bits/byte."""
        if self.stream:  # measured on the first documents when the stream was set up
            return float(self.stream["bytes_per_token"])
        splits = self.metadata["splits"]
        for name in ("validation", "train"):
            s = splits.get(name)
            if s and s.get("tokens"):
                return float(s["bytes"]) / float(s["tokens"])
        raise DataError(f"{self.data_dir}: no tokens in the validation or train split")

    # --------------------------------------------------------------------------- distribution
    def rank_and_world(self) -> Tuple[int, int]:
        """Explicit values, else the attached Trainer's, else torch.distributed's, else (0, 1)."""
        if self._rank is not None or self._world_size is not None:
            return int(self._rank or 0), int(self._world_size or 1)
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    # ---------------------------------------------------------------------------------- setup
    @property
    def mixture(self) -> List[Dict[str, Any]]:
        """The sources of a mixture directory (``data.sources``), else []."""
        return list(self.metadata.get("mixture") or [])

    def _source_windows(self, split: str) -> Optional[MixtureWindows]:
        parts = []
        for entry in self.mixture:
            sub = self.data_dir / entry["dir"]
            parts.append(WindowDataset(TokenShards(sub, split), self.seq_len, self.doc_start_mask))
        return MixtureWindows(parts) if any(len(p) for p in parts) else None

    @property
    def stream(self) -> Optional[Dict[str, Any]]:
        """A streaming directory's description (``data.streaming``), else None."""
        return self.metadata.get("stream")

    def _stream_windows(self, split: str, max_windows: Optional[int] = None) -> StreamWindows:
        conf = self.metadata["config"]
        rank, world = self.rank_and_world()
        return StreamWindows(
            {**conf["source"], "paths": self.stream["files"]} if self.stream else {},
            list(self.stream["files"]) if self.stream else [],
            self.tokenizer_path.read_text(encoding="utf-8"),
            self.eod_id,
            self.seq_len,
            split,
            int(conf["split_seed"]),
            float(conf["validation_fraction"]),
            float(conf["test_fraction"]),
            rank,
            world,
            self.doc_start_mask,
            max_windows,
        )

    def setup(self, stage: Optional[str] = None) -> None:
        splits = self.metadata["splits"]
        if self.stream:
            if self.state_passing:
                raise DataError("train.state_passing: not available with data.streaming")
            conf = self.metadata["config"]
            cap = (self.val_batches or 32) * self.micro_batch_size
            if self.train_dataset is None:
                self.train_dataset = self._stream_windows("train")  # type: ignore[assignment]
            if self.val_dataset is None and float(conf["validation_fraction"]) > 0:
                self.val_dataset = self._stream_windows("validation", cap)  # type: ignore[assignment]
            if self.test_dataset is None and float(conf["test_fraction"]) > 0:
                self.test_dataset = self._stream_windows("test", cap)  # type: ignore[assignment]
            return
        if self.mixture:
            if self.state_passing:
                raise DataError("train.state_passing: not available with a mixture (data.sources)")
            if self.train_dataset is None:
                self.train_dataset = self._source_windows("train")  # type: ignore[assignment]
            if self.val_dataset is None and splits.get("validation", {}).get("tokens"):
                self.val_dataset = self._source_windows("validation")  # type: ignore[assignment]
            if self.test_dataset is None and splits.get("test", {}).get("tokens"):
                self.test_dataset = self._source_windows("test")  # type: ignore[assignment]
            return
        if self.train_dataset is None:
            self.train_dataset = WindowDataset(TokenShards(self.data_dir, "train"), self.seq_len, self.doc_start_mask)
        if self.val_dataset is None and splits.get("validation", {}).get("tokens"):
            self.val_dataset = WindowDataset(
                TokenShards(self.data_dir, "validation"), self.seq_len, self.doc_start_mask
            )
        if self.test_dataset is None and splits.get("test", {}).get("tokens"):
            self.test_dataset = WindowDataset(TokenShards(self.data_dir, "test"), self.seq_len, self.doc_start_mask)

    def _loader_kwargs(self) -> Dict[str, Any]:
        kw: Dict[str, Any] = {"num_workers": self.num_workers, "collate_fn": collate_windows}
        if self.num_workers > 0:
            kw["persistent_workers"] = False
        return kw

    def train_dataloader(self) -> StatefulDataLoader:
        self.setup("fit")
        assert self.train_dataset is not None  # setup builds it
        if isinstance(self.train_dataset, StreamWindows):
            # the dataset is its own stateful iterator: the loader collects every worker's state
            self._train_loader = StatefulDataLoader(
                self.train_dataset, batch_size=self.micro_batch_size, **self._loader_kwargs()
            )
            return self._train_loader
        rank, world = self.rank_and_world()
        sampler: Union[ResumableBatchSampler, MixtureBatchSampler]
        if isinstance(self.train_dataset, MixtureWindows):
            weights = [float(m["weight"]) for m in self.mixture]
            sampler = MixtureBatchSampler(
                self.train_dataset.sizes, weights, self.micro_batch_size, self.seed, rank, world
            )
        else:
            kind = StreamBatchSampler if self.state_passing else ResumableBatchSampler
            sampler = kind(len(self.train_dataset), self.micro_batch_size, self.seed, rank, world)
        if self._pending_state is not None:
            sampler.load_state_dict(self._pending_state)
            self._pending_state = None
        elif self.batch_sampler is not None and self.batch_sampler.world_size == world:
            # a rebuilt loader (e.g. reload_dataloaders_every_n_epochs) continues where we were
            sampler.load_state_dict(self.batch_sampler.state_dict())
        self.batch_sampler = sampler
        self._train_loader = StatefulDataLoader(self.train_dataset, batch_sampler=sampler, **self._loader_kwargs())
        return self._train_loader

    def _eval_loader(self, dataset: Optional[WindowDataset], name: str):
        if dataset is None:
            return []
        if isinstance(dataset, StreamWindows):  # one pass over the files, in this process
            return DataLoader(dataset, batch_size=self.micro_batch_size, collate_fn=collate_windows)
        rank, world = self.rank_and_world()
        if len(dataset) < world:
            raise DataError(
                f"{name} split too small: {len(dataset.shards)} tokens give {len(dataset)} windows of "
                f"{self.seq_len + 1} tokens, fewer than the {world} rank(s)"
            )
        sampler: Union[StridedBatchSampler, SourceStridedBatchSampler]
        if isinstance(dataset, MixtureWindows):  # one source per batch, val_batches per source
            sampler = SourceStridedBatchSampler(dataset.sizes, self.micro_batch_size, rank, world, self.val_batches)
        else:
            sampler = StridedBatchSampler(len(dataset), self.micro_batch_size, rank, world, self.val_batches)
        return DataLoader(dataset, batch_sampler=sampler, **self._loader_kwargs())

    def val_dataloader(self) -> Union[DataLoader, List]:
        """Validation windows in order ([] when the directory has no validation split)."""
        self.setup("validate")
        return self._eval_loader(self.val_dataset, "validation")

    def test_dataloader(self) -> Union[DataLoader, List]:
        self.setup("test")
        return self._eval_loader(self.test_dataset, "test")

    # ---------------------------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        """The training order's position, counting only batches the loader has yielded (a stream's
        position is the loader's own state, which Lightning stores in the checkpoint)."""
        if self.stream:
            return {}
        if self.batch_sampler is None:
            return dict(self._pending_state) if self._pending_state else {}
        state = self.batch_sampler.state_dict()
        loader = self._train_loader
        if self.num_workers > 0 and loader is not None and getattr(loader, "_iterator", None) is not None:
            # workers prefetch: the sampler is ahead of what was consumed; use the loader's snapshot
            state = sampler_state_from_loader_state(loader.state_dict(), state)
            if isinstance(self.batch_sampler, MixtureBatchSampler):  # counts of the snapshot's position
                k = int(state["epoch"]) * self.batch_sampler.samples_per_epoch * self.batch_sampler.world_size
                state["counts"] = self.batch_sampler.counts_at(k + int(state["consumed"])).tolist()
        return state

    def callbacks(self) -> List[Any]:
        """Callbacks the trainer adds for this data: a mixture's per-source metrics."""
        if not self.mixture:
            return []
        from data.mixture_metrics import MixtureMetrics

        return [MixtureMetrics(self)]

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if not state_dict or self.stream:
            return
        if self.batch_sampler is not None:
            self.batch_sampler.load_state_dict(state_dict)
        else:
            self._pending_state = dict(state_dict)


def sampler_state_from_loader_state(loader_state: Dict[str, Any], current: Dict[str, Any]) -> Dict[str, Any]:
    """The batch sampler state at the point a StatefulDataLoader's state describes.

    Single-process loaders store the sampler state directly. Multi-process ones store a snapshot
    of the sampler right after it drew the batch yielded at the snapshot step, plus the number of
    batches yielded since: add those.
    """
    if "_index_sampler_state" in loader_state:
        return dict(loader_state["_index_sampler_state"] or current)
    snap = loader_state.get("_snapshot", {}).get("_main_snapshot", {})
    base = snap.get("_index_sampler_state")
    if not base:
        return current
    state = dict(base)
    steps = int(loader_state.get("_steps_since_snapshot", 0))
    state["consumed"] = int(state["consumed"]) + steps * int(state["batch_size"]) * int(state["world_size"])
    return state
