"""Corpora that are already token ids: GPT-NeoX / Megatron ``.bin`` + ``.idx`` pairs and Hugging Face
datasets with an ``input_ids`` column. They are read as documents of ids, never re-tokenized.

Megatron "MMIDIDX" indexed dataset (version 1), as GPT-NeoX, Megatron-LM and RWKV-LM write it. A
dataset is a path prefix ``P`` with two files:

``P.bin``: the token ids of every sequence, back to back, in the dtype named by the index; nothing
else (no header).

``P.idx``: little-endian, packed, in this order::

    offset  size       field
    0       9          magic  b"MMIDIDX\\x00\\x00"
    9       8          version, uint64 (= 1)
    17      1          dtype code, uint8: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
                       6 float64, 7 float32, 8 uint16 (only the integer codes hold token ids)
    18      8          S = number of sequences, uint64
    26      8          D = number of entries of doc_idx, uint64 (documents + 1)
    34      4 S        sizes: int32 [S], tokens in each sequence
    34+4S   8 S        pointers: int64 [S], byte offset of each sequence in P.bin
    34+12S  8 D        doc_idx: int64 [D], doc_idx[0] = 0, doc_idx[-1] = S, non-decreasing;
                       document d is made of sequences doc_idx[d] .. doc_idx[d+1] - 1
    (34+12S+8D  S      optional: int8 [S] sequence modes of multimodal datasets; ignored)

A document (the unit of the train/validation split and of the end-of-document id) is the
concatenation of its sequences; a "sequence" is a sentence when the corpus was prepared with
sentence splitting, otherwise the whole document.

Hugging Face token datasets: a directory written by ``Dataset.save_to_disk`` (or a
``DatasetDict``'s, of which ``source.hf_split`` is read), or parquet / json / jsonl files; every
row is one document whose ids are in the column ``source.ids_field`` (default ``input_ids``).

Both yield ``numpy`` int64 arrays, one per document, in the source's order
(:meth:`TokenSource.token_documents`); :mod:`data.prepare` packs them into the project's shards
(the ids are copied as they are, an end-of-document id appended unless the document already ends
with it) and ``lm data inspect`` describes them (:func:`describe_pretokenized`).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np

from lm.errors import DataError

from data.sources import DATASETS_BUILDERS, _first_line, _quiet_datasets, expand_paths

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = 34
#: the dtype codes of the index header
DTYPE_CODES: Dict[int, Any] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}


# ------------------------------------------------------------------------------- Megatron .bin/.idx


def megatron_prefix(path: Union[str, Path]) -> Path:
    """The dataset prefix named by ``path``: ``x``, ``x.bin`` and ``x.idx`` all mean ``x``."""
    p = Path(path).expanduser()
    return p.with_suffix("") if p.suffix in (".bin", ".idx") else p


class IndexedTokens:
    """One Megatron indexed dataset, memory-mapped (see the module docstring for the layout).

    ``sizes`` int32 [S], ``pointers`` int64 [S], ``doc_idx`` int64 [documents + 1], ``dtype``;
    ``document(d)`` is the ids of document ``d`` (a view when its sequences are contiguous).
    """

    def __init__(self, prefix: Union[str, Path]):
        self.prefix = megatron_prefix(prefix)
        self.idx_path = self.prefix.with_name(self.prefix.name + ".idx")
        self.bin_path = self.prefix.with_name(self.prefix.name + ".bin")
        for p in (self.idx_path, self.bin_path):
            if not p.is_file():
                raise DataError(f"source.paths: {p} not found (a Megatron dataset is a .bin and .idx pair)")
        raw = self.idx_path.read_bytes()
        where = str(self.idx_path)
        if len(raw) < HEADER_BYTES or raw[:9] != MAGIC:
            raise DataError(f"{where}: not a Megatron MMIDIDX index (magic {raw[:9]!r}, expected {MAGIC!r})")
        version, code, s, d = struct.unpack("<QBQQ", raw[9:HEADER_BYTES])
        if version != VERSION:
            raise DataError(f"{where}: index version {version}, only version {VERSION} is known")
        if code not in DTYPE_CODES or not np.issubdtype(DTYPE_CODES[code], np.integer):
            raise DataError(f"{where}: dtype code {code} does not hold token ids (integer codes: 1-5, 8)")
        self.dtype = np.dtype(DTYPE_CODES[code])
        need = HEADER_BYTES + 12 * s + 8 * d
        if len(raw) not in (need, need + s):
            raise DataError(
                f"{where}: {len(raw)} bytes, but {s} sequences and {d} document entries need {need} "
                f"(or {need + s} with sequence modes); the index is truncated or damaged"
            )
        self.sizes = np.frombuffer(raw, np.int32, s, HEADER_BYTES)
        self.pointers = np.frombuffer(raw, np.int64, s, HEADER_BYTES + 4 * s)
        self.doc_idx = np.frombuffer(raw, np.int64, d, HEADER_BYTES + 12 * s)
        if d < 1 or self.doc_idx[0] != 0 or self.doc_idx[-1] != s or np.any(np.diff(self.doc_idx) < 0):
            raise DataError(f"{where}: doc_idx must start at 0, end at {s} and never decrease")
        nbytes = self.bin_path.stat().st_size
        ends = self.pointers + self.sizes.astype(np.int64) * self.dtype.itemsize
        if s and (self.sizes.min() < 0 or self.pointers.min() < 0 or int(ends.max()) > nbytes):
            raise DataError(f"{self.bin_path}: {nbytes} bytes, but the index points past its end (truncated?)")
        self._bin = np.memmap(self.bin_path, dtype=np.uint8, mode="r") if nbytes else np.zeros(0, np.uint8)

    @property
    def num_documents(self) -> int:
        return len(self.doc_idx) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))

    def _sequence(self, i: int) -> np.ndarray:
        start = int(self.pointers[i])
        return self._bin[start : start + int(self.sizes[i]) * self.dtype.itemsize].view(self.dtype)

    def document(self, d: int) -> np.ndarray:
        """The ids of document ``d`` (its sequences concatenated), in the file's dtype."""
        lo, hi = int(self.doc_idx[d]), int(self.doc_idx[d + 1])
        if hi - lo == 1:
            return self._sequence(lo)
        if hi == lo:
            return np.zeros(0, self.dtype)
        first, last = int(self.pointers[lo]), int(self.pointers[hi - 1]) + int(self.sizes[hi - 1]) * self.dtype.itemsize
        total = int(self.sizes[lo:hi].sum(dtype=np.int64)) * self.dtype.itemsize
        if last - first == total:  # contiguous sequences: one view
            return self._bin[first:last].view(self.dtype)
        return np.concatenate([self._sequence(i) for i in range(lo, hi)])

    def documents(self) -> Iterator[np.ndarray]:
        for d in range(self.num_documents):
            yield self.document(d)


# ------------------------------------------------------------------------------- HF token datasets


def _is_saved_dataset(path: Path) -> bool:
    """A directory written by ``save_to_disk`` (a Dataset's or a DatasetDict's)."""
    return path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_info.json", "dataset_dict.json"))


def open_hf_tokens(paths: List[str], split: str = "train"):
    """The ``datasets.Dataset`` of ``paths``: one ``save_to_disk`` directory, or parquet/json files."""
    with _quiet_datasets() as datasets:
        if len(paths) == 1 and _is_saved_dataset(Path(paths[0]).expanduser()):
            where = str(Path(paths[0]).expanduser())
            try:
                ds = datasets.load_from_disk(where)
            except Exception as e:
                raise DataError(f"{where}: cannot load the saved dataset ({_first_line(e)})") from None
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{where}: no split '{split}' (source.hf_split); splits: {', '.join(ds)}")
                ds = ds[split]
            return ds
        files = expand_paths(paths)
        suffixes = {f.suffix.lstrip(".") for f in files}
        builders = {DATASETS_BUILDERS.get(s) for s in suffixes}
        if len(builders) != 1 or None in builders:
            raise DataError(
                f"source.paths: kind hf_tokens reads a save_to_disk directory or parquet/json/jsonl files "
                f"of one kind, got suffixes {sorted(suffixes)}"
            )
        builder = builders.pop()
        try:
            return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
        except Exception as e:
            raise DataError(f"source.paths: cannot read {files[0]}: {_first_line(e)}") from None


# ------------------------------------------------------------------------------------- the source


class TokenSource:
    """A ``data.source`` whose documents are token ids (``kind: megatron`` or ``hf_tokens``).

    Same surface as :class:`data.sources.Source` where prepare needs it (``files``, ``describe``,
    ``max_documents``), plus :meth:`token_documents`. ``max_bytes`` has no meaning without text
    and is refused.
    """

    def __init__(self, cfg: Mapping[str, Any]):
        self.cfg = dict(cfg)
        self.kind = str(self.cfg.get("kind"))
        self.max_documents: Optional[int] = self.cfg.get("max_documents")
        self.max_bytes = None
        if self.cfg.get("max_bytes") is not None:
            raise DataError(
                f"source.max_bytes: kind {self.kind} holds token ids, not text; cap it with source.max_documents"
            )
        if self.max_documents is not None and self.max_documents <= 0:
            raise DataError(f"source.max_documents: must be > 0 (or null for no cap), got {self.max_documents}")
        self.paths = [str(p) for p in self.cfg.get("paths") or []]
        if not self.paths:
            raise DataError(f"source.paths: kind {self.kind} needs the dataset's path(s)")
        self.field = str(self.cfg.get("ids_field") or "input_ids")
        self._files: Optional[List[Path]] = None

    def files(self) -> List[Path]:
        if self._files is None:
            if self.kind == "megatron":
                files: List[Path] = []
                for p in self.paths:
                    x = IndexedTokens(p)  # checks both files exist and the index is sound
                    files += [x.idx_path, x.bin_path]
                self._files = files
            else:
                self._files = expand_paths(self.paths)
        return self._files

    def describe(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"kind": self.kind, "paths": self.paths, "files": len(self.files())}
        if self.kind == "hf_tokens":
            out["ids_field"] = self.field
        return out

    def _raw(self) -> Iterator[Tuple[str, np.ndarray]]:
        if self.kind == "megatron":
            for p in self.paths:
                x = IndexedTokens(p)
                for doc in x.documents():
                    yield str(x.prefix), doc
            return
        ds = open_hf_tokens(self.paths, str(self.cfg.get("hf_split") or "train"))
        if self.field not in ds.column_names:
            raise DataError(
                f"{self.paths[0]}: no column '{self.field}' (source.ids_field); columns: {', '.join(ds.column_names)}"
            )
        where = self.paths[0]
        for batch in ds.select_columns([self.field]).with_format("numpy").iter(batch_size=1024):
            for ids in batch[self.field]:
                arr = np.asarray(ids)
                if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
                    raise DataError(f"{where}: column '{self.field}' must hold lists of integer ids, got {arr.dtype}")
                yield where, arr

    def token_documents(self, stats=None) -> Iterator[np.ndarray]:
        """Documents as int64 id arrays in source order (empty ones dropped, ``max_documents`` applied).

        ``stats`` (a :class:`data.sources.ReadStats`) counts documents; a negative id is an error
        naming the file.
        """
        n = 0
        for where, ids in self._raw():
            if len(ids) == 0:
                if stats is not None:
                    stats.empty_skipped += 1
                continue
            if self.max_documents is not None and n >= self.max_documents:
                return
            ids = np.asarray(ids, dtype=np.int64)
            if int(ids.min()) < 0:
                raise DataError(f"{where}: document {n} holds a negative token id ({int(ids.min())})")
            n += 1
            if stats is not None:
                stats.documents += 1
            yield ids


# -------------------------------------------------------------------------------------- inspect


def describe_pretokenized(
    path: Union[str, Path], tokenizer: Optional[str] = None, sample_tokens: int = 200, ids_field: str = "input_ids"
) -> str:
    """``lm data inspect`` of a Megatron dataset (prefix, .bin or .idx) or an HF token dataset:
    format, dtype, counts, document lengths and the first document's ids (decoded with
    ``tokenizer`` when given)."""
    p = Path(path).expanduser()
    prefix = megatron_prefix(p)
    lines: List[str]
    if prefix.with_name(prefix.name + ".idx").is_file():
        x = IndexedTokens(prefix)
        lengths = np.array([len(x.document(d)) for d in range(x.num_documents)], dtype=np.int64)
        first = x.document(0) if x.num_documents else np.zeros(0, np.int64)
        lines = [
            f"dataset:    {x.prefix} (.bin {x.bin_path.stat().st_size:,} bytes, .idx {x.idx_path.stat().st_size:,})",
            f"format:     Megatron MMIDIDX v{VERSION}, dtype {x.dtype.name}",
            f"sequences:  {len(x.sizes):,}",
        ]
        max_id = int(max((int(d.max()) for d in x.documents() if len(d)), default=-1))
    elif p.exists():
        source = TokenSource({"kind": "hf_tokens", "paths": [str(p)], "ids_field": ids_field})
        docs = list(source._raw())
        lengths = np.array([len(d) for _, d in docs], dtype=np.int64)
        first = docs[0][1] if docs else np.zeros(0, np.int64)
        lines = [f"dataset:    {p}", f"format:     Hugging Face dataset of token ids (column '{ids_field}')"]
        max_id = int(max((int(d.max()) for _, d in docs if len(d)), default=-1))
    else:
        raise DataError(f"{p}: not found (expected a prepared directory, a Megatron .bin/.idx prefix or a dataset)")
    lines += [
        f"documents:  {len(lengths):,}",
        f"tokens:     {int(lengths.sum()):,} (largest id {max_id})",
    ]
    if len(lengths):
        lines.append(
            f"doc length: min {int(lengths.min()):,}, mean {float(lengths.mean()):,.1f}, max {int(lengths.max()):,}"
        )
    if sample_tokens > 0 and len(first):
        ids = [int(i) for i in first[:sample_tokens]]
        lines += ["", f"sample: first {len(ids)} ids of document 0", "-" * 72]
        if tokenizer:
            from data.tokenizer import resolve_tokenizer

            tok, _ = resolve_tokenizer(tokenizer)
            lines.append(tok.decode(ids, skip_special_tokens=False))
        else:
            lines.append(" ".join(map(str, ids)))
        lines.append("-" * 72)
    return "\n".join(lines)
