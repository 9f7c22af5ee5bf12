"""Batch samplers over window indices: shuffled + resumable for training, strided for evaluation.

Training order (:class:`ResumableBatchSampler`). Epoch ``e`` uses the permutation
``perm_e = randperm(N, generator seeded by mix(seed, e))`` of the ``N`` windows. Rank ``r`` of
``W`` takes ``perm_e[c + r :: W]`` where ``c`` is the number of samples all ranks together have
consumed this epoch, cut to whole batches and to the same count on every rank (drop_last). So after
``k`` batches of size ``B`` on every rank, exactly ``perm_e[: k * B * W]`` has been seen, and the
state ``{epoch, consumed = k * B * W, seed, num_windows, ...}`` is the same on all ranks: resuming
from it continues the uninterrupted sequence (and still covers the rest of the epoch when the world
size changed).
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Sampler

from lm.errors import DataError

_MASK63 = (1 << 63) - 1


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed of one epoch: a SplitMix64 mix of ``(seed, epoch)``."""
    from data.split import splitmix64

    return splitmix64(splitmix64(seed & ((1 << 64) - 1)) ^ epoch) & _MASK63


def epoch_permutation(num_windows: int, seed: int, epoch: int) -> torch.Tensor:
    """LongTensor [num_windows]: the epoch's order of all window indices."""
    g = torch.Generator()
    g.manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(num_windows, generator=g)


class _EpochHook:
    """What Lightning finds at ``loader.batch_sampler.sampler``: forwards ``set_epoch``.

    Lightning's fit loop calls ``set_epoch`` on a loader's ``sampler`` and on its
    ``batch_sampler.sampler``, not on the batch sampler itself.
    """

    def __init__(self, owner: "ResumableBatchSampler"):
        self._owner = owner

    def set_epoch(self, epoch: int) -> None:
        self._owner.set_epoch(epoch)

    def __len__(self) -> int:
        return self._owner.samples_per_epoch


class ResumableBatchSampler(Sampler[List[int]]):
    """Shuffled, rank-sharded, resumable batches of window indices (see module docstring).

    ``state_dict()`` -> ``{"epoch", "consumed", "seed", "num_windows", "world_size",
    "batch_size"}``; ``consumed`` counts samples over all ranks and includes every batch this
    sampler has handed out. After the last batch of an epoch the sampler moves to the next epoch;
    ``set_epoch(e)`` with a new ``e`` starts that epoch from its beginning, with the current epoch
    it changes nothing (so a restored mid-epoch position survives Lightning's call).
    """

    def __init__(self, num_windows: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.num_windows = int(num_windows)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0
        self.consumed = 0
        self.sampler = _EpochHook(self)
        if self.batches_per_epoch == 0:
            raise DataError(
                f"train split too small: {self.num_windows} windows cannot give each of "
                f"{self.world_size} rank(s) one batch of {self.batch_size} (lower "
                f"train.micro_batch_size or train.seq_len, or use more data)"
            )

    # -- sizes
    @property
    def batches_per_epoch(self) -> int:
        """Batches per rank in a full epoch (the same on every rank)."""
        return self.num_windows // self.world_size // self.batch_size

    @property
    def samples_per_epoch(self) -> int:
        return self.batches_per_epoch * self.batch_size

    def __len__(self) -> int:
        return self.batches_per_epoch

    def remaining_batches(self) -> int:
        """Batches this rank still has in the current epoch."""
        left = max(0, self.num_windows - self.consumed)
        return left // self.world_size // self.batch_size

    # -- epochs and state
    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self.consumed = 0

    def state_dict(self) -> Dict[str, Any]:
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seed": self.seed,
            "num_windows": self.num_windows,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if int(state["num_windows"]) != self.num_windows:
            raise DataError(
                f"cannot resume the data order: the checkpoint's train split has "
                f"{state['num_windows']} windows, this one {self.num_windows} "
                f"(different data directory or seq_len)"
            )
        if int(state["seed"]) != self.seed:
            warnings.warn(
                f"resuming the data order of seed {state['seed']} (configured seed {self.seed})", stacklevel=2
            )
        if int(state.get("world_size", self.world_size)) != self.world_size:
            warnings.warn(
                f"resuming with world size {self.world_size} (checkpoint: {state['world_size']}): "
                f"the rest of the epoch is re-divided among the ranks",
                stacklevel=2,
            )
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.consumed = int(state["consumed"])

    # -- iteration
    def rank_indices(self) -> torch.Tensor:
        """This rank's remaining window indices of the current epoch (whole batches only)."""
        perm = epoch_permutation(self.num_windows, self.seed, self.epoch)
        mine = perm[self.consumed + self.rank :: self.world_size]
        return mine[: self.remaining_batches() * self.batch_size]

    def __iter__(self) -> Iterator[List[int]]:
        indices = self.rank_indices().tolist()
        step = self.batch_size * self.world_size
        for b in range(0, len(indices), self.batch_size):
            self.consumed += step
            yield indices[b : b + self.batch_size]
        # the epoch ran out: the next iteration starts the next epoch
        self.epoch += 1
        self.consumed = 0


class StridedBatchSampler(Sampler[List[int]]):
    """Evaluation batches: windows ``0..N-1`` in order, rank ``r`` takes ``r, r + W, ...``.

    Every rank gets the same number of windows (``N // W``, at most ``max_batches * batch_size``);
    the last batch may be short (the same length on every rank).
    """

    def __init__(
        self, num_windows: int, batch_size: int, rank: int = 0, world_size: int = 1, max_batches: Optional[int] = None
    ):
        per_rank = num_windows // world_size
        if max_batches is not None:
            per_rank = min(per_rank, max_batches * batch_size)
        self.indices = list(range(rank, per_rank * world_size, world_size))
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[List[int]]:
        for b in range(0, len(self.indices), self.batch_size):
            yield self.indices[b : b + self.batch_size]


class StreamBatchSampler(ResumableBatchSampler):
    """Consecutive windows per batch row, for truncated BPTT (``train.state_passing``).

    The ``N`` windows are cut into ``S = B * W`` streams of ``L = N // S`` consecutive windows; row
    ``b`` of rank ``r`` reads stream ``s = r * B + b``. Batch ``k`` of epoch ``e`` gives that row the
    window ``s * L + (k + o_e) mod L``, where ``o_e`` is a seeded offset per epoch: every row walks its
    stream in order (wrapping once), so the window of the next batch follows the one of this batch.
    The state (``{epoch, consumed, ...}``, ``consumed = k * B * W``) is that of
    :class:`ResumableBatchSampler`; the stream layout depends on ``B`` and ``W``, which therefore cannot
    change on resume.
    """

    @property
    def batches_per_epoch(self) -> int:
        return self.num_windows // (self.world_size * self.batch_size)

    def remaining_batches(self) -> int:
        return max(0, self.batches_per_epoch - self.consumed // (self.batch_size * self.world_size))

    def epoch_offset(self) -> int:
        g = torch.Generator()
        g.manual_seed(epoch_seed(self.seed, self.epoch))
        return int(torch.randint(self.batches_per_epoch, (1,), generator=g))

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key, now in (("world_size", self.world_size), ("batch_size", self.batch_size)):
            if int(state.get(key, now)) != now:
                raise DataError(
                    f"train.state_passing: the checkpoint's data streams were laid out for {key} "
                    f"{state[key]}, this run has {now}; resume with the same number of ranks and "
                    f"train.micro_batch_size"
                )
        super().load_state_dict(state)

    def rank_indices(self) -> torch.Tensor:
        L = self.batches_per_epoch
        done = self.consumed // (self.batch_size * self.world_size)
        k = (torch.arange(done, L) + self.epoch_offset()) % L  # [remaining]
        streams = self.rank * self.batch_size + torch.arange(self.batch_size)  # [B]
        return (streams[None, :] * L + k[:, None]).reshape(-1)


# ------------------------------------------------------------------------------------- mixtures

#: the hash stream of the mixture's source draws (data.split uses 1 and 2)
MIXTURE_SALT = 3


def unit_hashes(seed: int, salt: int, index: np.ndarray) -> np.ndarray:
    """float64 [n]: :func:`data.split.unit_hash` of ``(seed, salt, index[i])``, vectorised."""
    from data.split import splitmix64

    def mix(x: np.ndarray) -> np.ndarray:
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))

    base = np.uint64(splitmix64(splitmix64(seed & ((1 << 64) - 1)) ^ salt))
    with np.errstate(over="ignore"):
        key = mix(np.asarray(index, dtype=np.uint64) ^ base)
    return (key >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class MixtureBatchSampler(Sampler[List[int]]):
    """Training batches drawn from several sources in proportion to their weights.

    Sources ``s = 0..S-1`` hold ``N_s`` windows; a window's global index is ``offset_s + i``. The
    sample at global position ``k = 0, 1, ...`` (all ranks together, in batch order) comes from the
    source ``s_k`` with ``cum_{s-1} <= u_k < cum_s``, ``u_k = unit_hash(seed, MIXTURE_SALT, k)`` and
    ``cum`` the normalised cumulative weights: a deterministic i.i.d. categorical draw, so source
    ``s`` gives a share ``w_s / sum(w)`` of the samples up to sampling error. Its ``c``-th sample
    (``c`` = earlier draws of ``s``) is window ``perm_s(c // N_s)[c mod N_s]``, the source's own
    epochs of :func:`epoch_permutation` with seed ``mix(seed, s)``: every source is read in full
    before any of its windows repeats, independently of the others.

    Batch ``b`` covers positions ``[k0, k0 + B W)`` with ``k0 = (epoch * E + consumed)``, ``E`` the
    samples of an epoch (``sum N_s`` cut to whole batches): rank ``r`` takes ``k0 + r, k0 + r + W, ...``.
    The state ``{epoch, consumed, seed, sizes, weights, world_size, batch_size, counts}`` is the same
    on every rank; ``counts`` (samples drawn per source so far) follow from ``k`` and are recomputed on
    load, so a resumed run draws exactly the batches of an uninterrupted one (``B`` and ``W`` cannot
    change on resume: the epoch length depends on them).
    """

    def __init__(
        self, sizes: List[int], weights: List[float], batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        if len(sizes) != len(weights) or not sizes:
            raise ValueError("one weight per source")
        for n in sizes:
            if n <= 0:
                raise DataError("a mixture source has no training windows (more data or a shorter train.seq_len)")
        self.sizes = [int(n) for n in sizes]
        self.weights = [float(w) for w in weights]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        total = float(sum(self.weights))
        self.cum = np.cumsum(np.asarray(self.weights) / total)
        self.cum[-1] = 1.0
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 0
        self.consumed = 0
        self.counts = np.zeros(len(sizes), dtype=np.int64)
        self.sampler = _EpochHook(self)  # type: ignore[arg-type]  # duck-typed: set_epoch, samples_per_epoch
        self._perms: Dict[Tuple[int, int], np.ndarray] = {}
        if self.batches_per_epoch == 0:
            raise DataError(
                f"train split too small: {sum(self.sizes)} windows cannot give each of {self.world_size} "
                f"rank(s) one batch of {self.batch_size}"
            )

    @property
    def batches_per_epoch(self) -> int:
        return sum(self.sizes) // self.world_size // self.batch_size

    @property
    def samples_per_epoch(self) -> int:
        return self.batches_per_epoch * self.batch_size

    def __len__(self) -> int:
        return self.batches_per_epoch

    def remaining_batches(self) -> int:
        return self.batches_per_epoch - self.consumed // (self.batch_size * self.world_size)

    @property
    def position(self) -> int:
        """``k``: samples drawn by all ranks since the start."""
        return self.epoch * self.batches_per_epoch * self.batch_size * self.world_size + self.consumed

    def draws(self, start: int, stop: int) -> np.ndarray:
        """int64 [stop - start]: the source of each global position in ``[start, stop)``."""
        u = unit_hashes(self.seed, MIXTURE_SALT, np.arange(start, stop, dtype=np.int64))
        return np.minimum(np.searchsorted(self.cum, u, side="right"), len(self.sizes) - 1).astype(np.int64)

    def counts_at(self, position: int, chunk: int = 1 << 20) -> np.ndarray:
        """Samples of each source among the first ``position`` draws."""
        counts = np.zeros(len(self.sizes), dtype=np.int64)
        for a in range(0, position, chunk):
            counts += np.bincount(self.draws(a, min(position, a + chunk)), minlength=len(self.sizes))
        return counts

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            # a new epoch of the mixture: positions continue from the first sample of that epoch
            self.epoch = int(epoch)
            self.consumed = 0
            self.counts = self.counts_at(self.position)

    def state_dict(self) -> Dict[str, Any]:
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seed": self.seed,
            "sizes": list(self.sizes),
            "weights": list(self.weights),
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "counts": self.counts.tolist(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if "sizes" not in state:
            raise DataError("cannot resume: the checkpoint's data order is not a mixture's (data.sources changed)")
        for key, now in (("sizes", self.sizes), ("weights", self.weights)):
            if [float(x) for x in state[key]] != [float(x) for x in now]:
                raise DataError(
                    f"cannot resume the mixture's data order: the checkpoint's sources have {key} {state[key]}, "
                    f"this run {now} (different data.sources, data directory or seq_len)"
                )
        for key in ("world_size", "batch_size"):
            if int(state[key]) != getattr(self, key):
                raise DataError(
                    f"data.sources: the checkpoint's mixture was drawn with {key} {state[key]}, this run has "
                    f"{getattr(self, key)}; resume a mixture with the same number of ranks and train.micro_batch_size"
                )
        if int(state["seed"]) != self.seed:
            warnings.warn(f"resuming the mixture of seed {state['seed']} (configured seed {self.seed})", stacklevel=2)
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.consumed = int(state["consumed"])
        self.counts = self.counts_at(self.position)

    def _window(self, source: int, c: int) -> int:
        n = self.sizes[source]
        epoch, pos = divmod(int(c), n)
        key = (source, epoch)
        perm = self._perms.get(key)
        if perm is None:
            self._perms = {k: v for k, v in self._perms.items() if k[0] != source}  # one epoch per source
            perm = epoch_permutation(n, epoch_seed(self.seed, 1_000_003 + source), epoch).numpy()
            self._perms[key] = perm
        return int(self.offsets[source]) + int(perm[pos])

    def __iter__(self) -> Iterator[List[int]]:
        step = self.batch_size * self.world_size
        while self.remaining_batches() > 0:
            k0 = self.position
            src = self.draws(k0, k0 + step)
            # c of each position: earlier draws of its source (before k0, then within this batch)
            within = np.zeros(step, dtype=np.int64)
            seen = self.counts.copy()
            for j, s in enumerate(src.tolist()):
                within[j] = seen[s]
                seen[s] += 1
            mine = range(self.rank, step, self.world_size)
            batch = [self._window(int(src[j]), int(within[j])) for j in mine]
            self.consumed += step
            self.counts = seen
            yield batch
        self.epoch += 1
        self.consumed = 0


class SourceStridedBatchSampler(Sampler[List[int]]):
    """Evaluation batches of a mixture: every batch holds windows of one source only.

    Each source gives the batches of its own :class:`StridedBatchSampler` (indices shifted by the
    source's offset), at most ``max(1, max_batches // S)`` of them for ``S`` sources: ``max_batches``
    (``train.val_batches``, which Lightning also applies to the whole loader) counts all sources'
    batches together. The sources take turns (round-robin), so a cut after any number of batches
    leaves them evenly represented."""

    def __init__(
        self,
        sizes: List[int],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        max_batches: Optional[int] = None,
    ):
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        per_source = None if max_batches is None else max(1, max_batches // max(1, len(sizes)))
        queues = [
            [
                [int(offsets[s]) + i for i in batch]
                for batch in StridedBatchSampler(n, batch_size, rank, world_size, per_source)
            ]
            for s, n in enumerate(sizes)
        ]
        self.batches = [q[j] for j in range(max(map(len, queues), default=0)) for q in queues if j < len(q)]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[List[int]]:
        yield from self.batches
