"""Fixed-length training windows over one split of packed tokens.

Window ``i`` is ``tokens[i * seq_len : i * seq_len + seq_len + 1]`` (inputs ``[:-1]``, targets
``[1:]``); consecutive windows share one token, and a split of ``T`` tokens has
``(T - 1) // seq_len`` windows. Documents run across windows; the end-of-document id separates
them, and the optional ``doc_start_mask`` marks the first token of each document.
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate

from data.shards import TokenShards


class WindowDataset(Dataset):
    """Windows of ``seq_len + 1`` tokens; ``dataset[i]`` or batched ``__getitems__``.

    A batch is ``{"tokens": LongTensor[B, seq_len + 1], "index": LongTensor[B]}`` plus, with
    ``doc_start_mask=True``, ``"doc_start_mask": BoolTensor[B, seq_len + 1]`` (True where a
    document starts: split position 0 and every position right after an end-of-document id).
    """

    def __init__(self, shards: TokenShards, seq_len: int, doc_start_mask: bool = False):
        if seq_len <= 0:
            raise ValueError(f"seq_len must be > 0, got {seq_len}")
        self.shards = shards
        self.seq_len = int(seq_len)
        self.doc_start_mask = doc_start_mask

    def __len__(self) -> int:
        return max(0, (len(self.shards) - 1) // self.seq_len)

    @property
    def doc_starts(self) -> np.ndarray:
        """int64 [documents]: the split offset of each document's first token."""
        return self.shards.doc_starts

    def window(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} outside 0..{len(self) - 1}")
        return self.shards.window(i * self.seq_len, self.seq_len + 1)

    def starts_mask(self, i: int) -> np.ndarray:
        """bool [seq_len + 1]: True at positions of window ``i`` where a document starts."""
        start = i * self.seq_len
        stop = start + self.seq_len + 1
        ds = self.shards.doc_starts
        lo, hi = np.searchsorted(ds, [start, stop], side="left")
        mask = np.zeros(self.seq_len + 1, dtype=bool)
        mask[np.asarray(ds[lo:hi]) - start] = True
        return mask

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        i = int(i)
        item = {"tokens": torch.from_numpy(self.window(i).astype(np.int64)), "index": torch.tensor(i, dtype=torch.long)}
        if self.doc_start_mask:
            item["doc_start_mask"] = torch.from_numpy(self.starts_mask(i))
        return item

    def __getitems__(self, indices: Sequence[int]) -> Dict[str, torch.Tensor]:
        """A whole batch at once (the DataLoader calls this with a batch sampler's indices)."""
        idx = [int(i) for i in indices]
        tokens = np.stack([self.window(i) for i in idx]).astype(np.int64)
        batch = {"tokens": torch.from_numpy(tokens), "index": torch.tensor(idx, dtype=torch.long)}
        if self.doc_start_mask:
            batch["doc_start_mask"] = torch.from_numpy(np.stack([self.starts_mask(i) for i in idx]))
        return batch


def collate_windows(batch):
    """Collate for :class:`WindowDataset`: batches from ``__getitems__`` are already stacked."""
    if isinstance(batch, dict):
        return batch
    return default_collate(batch)


class MixtureWindows(Dataset):
    """The windows of several sources' :class:`WindowDataset` one after the other (a mixture).

    Global index ``offset_s + i`` is window ``i`` of source ``s``; batches also carry ``"source"``
    (LongTensor[B], the source of each row), which the mixture's metrics read.
    """

    def __init__(self, parts: Sequence[WindowDataset]):
        self.parts = list(parts)
        self.sizes = [len(p) for p in self.parts]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.doc_start_mask = bool(self.parts and self.parts[0].doc_start_mask)
        self.seq_len = self.parts[0].seq_len if self.parts else 0

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, i: int) -> "tuple[int, int]":
        """``(source, window within it)`` of global index ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} outside 0..{len(self) - 1}")
        s = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return s, i - int(self.offsets[s])

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        s, j = self.locate(int(i))
        item = self.parts[s][j]
        item["index"] = torch.tensor(int(i), dtype=torch.long)
        item["source"] = torch.tensor(s, dtype=torch.long)
        return item

    def __getitems__(self, indices: Sequence[int]) -> Dict[str, torch.Tensor]:
        where = [self.locate(int(i)) for i in indices]
        tokens = np.stack([self.parts[s].window(j) for s, j in where]).astype(np.int64)
        batch = {
            "tokens": torch.from_numpy(tokens),
            "index": torch.tensor([int(i) for i in indices], dtype=torch.long),
            "source": torch.tensor([s for s, _ in where], dtype=torch.long),
        }
        if self.doc_start_mask:
            batch["doc_start_mask"] = torch.from_numpy(np.stack([self.parts[s].starts_mask(j) for s, j in where]))
        return batch
