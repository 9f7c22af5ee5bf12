"""Packed token shards on disk: writing them, reading them back memory-mapped, checking them.

Layout of a prepared directory::

    metadata.json                 counts, tokenizer hash and ids, dtype, source, fingerprint
    tokenizer.json                the tokenizer the shards were encoded with
    <split>/tokens-00000.npy      1-D uint16 (vocab < 65536) or uint32 array, ``shard_tokens`` long
    <split>/tokens-00001.npy      ... (the last shard holds the rest)
    <split>/doc_starts.npy        int64 [documents]: offset of each document in the split

A split is one long token stream (all its shards concatenated); every document is followed by the
end-of-document id. ``np.load(path, mmap_mode="r")`` opens any shard without reading it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, BinaryIO, Dict, List, Optional, Tuple, Union

import numpy as np

from lm.errors import DataError

METADATA_FILE = "metadata.json"
FORMAT = "lm-token-shards/1"
#: bytes reserved for a shard's .npy header (magic, version, length, padded dict); see write_npy_header
NPY_HEADER_BYTES = 128
#: where merged indexes (data.parts, mixtures) keep their document offsets
INDEX_DIR = "index"


# -------------------------------------------------------------------------------------- writing


def npy_header(dtype: np.dtype, length: int) -> bytes:
    """A version-1.0 ``.npy`` header for a 1-D little-endian array, exactly 128 bytes long.

    Format: ``\\x93NUMPY`` + ``\\x01\\x00`` + uint16 header length + a Python-literal dict padded
    with spaces and ended by ``\\n`` (total a multiple of 64, as numpy writes it).
    """
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype).newbyteorder("<"))
    text = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': ({int(length)},), }}"
    pad = NPY_HEADER_BYTES - 10 - len(text) - 1
    if pad < 0:  # pragma: no cover - a 1-D shape never needs more than 128 bytes
        raise ValueError(f"npy header too long: {text}")
    body = (text + " " * pad + "\n").encode("latin1")
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body


class SplitWriter:
    """Streams one split's tokens into ``<root>/<split>/tokens-NNNNN.npy`` shards.

    Shards are written sequentially: 128 header bytes are reserved, the raw ids appended, and the
    header (which needs the final length) written last.
    """

    def __init__(self, root: Path, split: str, dtype: str, shard_tokens: int):
        if shard_tokens <= 0:
            raise DataError(f"shard_tokens: must be > 0, got {shard_tokens}")
        self.root = Path(root)
        self.split = split
        self.dtype = np.dtype(dtype)
        self.shard_tokens = int(shard_tokens)
        (self.root / split).mkdir(parents=True, exist_ok=True)
        self.shards: List[Dict[str, Any]] = []
        self.tokens = 0
        self.documents = 0
        self.bytes = 0
        self._doc_lengths: List[np.ndarray] = []
        self._file: Optional[BinaryIO] = None
        self._in_shard = 0

    def _open_shard(self) -> None:
        rel = f"{self.split}/tokens-{len(self.shards):05d}.npy"
        self._file = open(self.root / rel, "wb")
        self._file.write(b"\0" * NPY_HEADER_BYTES)
        self._in_shard = 0
        self.shards.append({"file": rel, "tokens": 0})

    def _close_shard(self) -> None:
        if self._file is None:
            return
        self._file.seek(0)
        self._file.write(npy_header(self.dtype, self._in_shard))
        self._file.close()
        self._file = None
        self.shards[-1]["tokens"] = self._in_shard

    def add(self, tokens: np.ndarray, doc_lengths: np.ndarray, nbytes: int = 0) -> None:
        """Append packed ``tokens`` holding ``len(doc_lengths)`` documents of ``nbytes`` text."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        if int(doc_lengths.sum()) != len(tokens):
            raise ValueError("doc_lengths do not add up to the number of tokens")
        pos = 0
        while pos < len(tokens):
            if self._file is None or self._in_shard >= self.shard_tokens:
                self._close_shard()
                self._open_shard()
            take = min(len(tokens) - pos, self.shard_tokens - self._in_shard)
            assert self._file is not None  # open: _open_shard ran above if it was not
            self._file.write(tokens[pos : pos + take].tobytes())
            self._in_shard += take
            pos += take
        self.tokens += len(tokens)
        self.documents += len(doc_lengths)
        self.bytes += int(nbytes)
        self._doc_lengths.append(np.asarray(doc_lengths, dtype=np.int64))

    def close(self) -> Dict[str, Any]:
        """Finish the last shard, write ``doc_starts.npy``; returns this split's metadata entry."""
        self._close_shard()
        lengths = np.concatenate(self._doc_lengths) if self._doc_lengths else np.zeros(0, np.int64)
        starts = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1], out=starts[1:])
        doc_rel = f"{self.split}/doc_starts.npy"
        np.save(self.root / doc_rel, starts)
        return {
            "tokens": self.tokens,
            "documents": self.documents,
            "bytes": self.bytes,
            "bytes_per_token": (self.bytes / self.tokens) if self.tokens else None,
            "shards": self.shards,
            "doc_starts": doc_rel,
        }

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def merge_splits(out: Path, pieces: List[Tuple[str, Dict[str, Any]]]) -> Dict[str, Dict[str, Any]]:
    """One index over several prepared pieces (parts of a corpus, sources of a mixture) under ``out``.

    ``pieces``: ``(prefix, splits)`` in order, ``prefix`` the piece's directory relative to ``out``
    (ending in ``/``) and ``splits`` its metadata's split entries. Each split's stream is the
    pieces' streams one after the other: shards are listed with the prefix (no token is copied) and
    ``index/<split>_doc_starts.npy`` holds the shifted document offsets (written atomically).
    Returns the merged split entries.
    """
    import io

    from data.atomic import write_atomic

    merged: Dict[str, Dict[str, Any]] = {}
    names = list(dict.fromkeys(name for _, splits in pieces for name in splits))
    for name in names:
        shards: List[Dict[str, Any]] = []
        starts: List[np.ndarray] = []
        tokens = documents = nbytes = 0
        for prefix, splits in pieces:
            entry = splits.get(name)
            if not entry:
                continue
            shards += [{"file": prefix + s["file"], "tokens": s["tokens"]} for s in entry["shards"]]
            starts.append(np.load(Path(out) / (prefix + entry["doc_starts"])).astype(np.int64) + tokens)
            tokens += int(entry["tokens"])
            documents += int(entry["documents"])
            nbytes += int(entry["bytes"])
        buf = io.BytesIO()
        np.save(buf, np.concatenate(starts) if starts else np.zeros(0, np.int64))
        rel = f"{INDEX_DIR}/{name}_doc_starts.npy"
        write_atomic(Path(out) / rel, buf.getvalue())
        merged[name] = {
            "tokens": tokens,
            "documents": documents,
            "bytes": nbytes,
            "bytes_per_token": (nbytes / tokens) if tokens else None,
            "shards": shards,
            "doc_starts": rel,
        }
    return merged


# -------------------------------------------------------------------------------------- reading


def read_metadata(data_dir: Union[str, Path]) -> Dict[str, Any]:
    """``metadata.json`` of a prepared directory (one-line DataError if absent or unreadable)."""
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"data directory not found: {d} (create it with `lm data prepare`)")
    path = d / METADATA_FILE
    if not path.is_file():
        raise DataError(f"{d}: not a prepared data directory (no {METADATA_FILE}; run `lm data prepare`)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(
            f"{path}: unknown format {meta.get('format') if isinstance(meta, dict) else '?'}; expected {FORMAT}"
        )
    return meta


class FlatTokens:
    """Several 1-D memmaps seen as one array: ``len``, ``[i]``, ``[a:b]`` and ``window``.

    Slices that cross shard boundaries are copied into a fresh array; others are views.
    """

    def __init__(self, arrays: List[np.ndarray]):
        self.shards = [a for a in arrays if len(a)]
        self.offsets = np.zeros(len(self.shards) + 1, dtype=np.int64)
        if self.shards:
            np.cumsum([len(a) for a in self.shards], out=self.offsets[1:])
        self.dtype = self.shards[0].dtype if self.shards else np.dtype("uint16")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        """``tokens[start : start + length]`` as an array (a copy only across shard boundaries)."""
        n = len(self)
        if start < 0 or length < 0 or start + length > n:
            raise IndexError(f"window [{start}, {start + length}) outside 0..{n}")
        if length == 0:
            return np.zeros(0, dtype=self.dtype)
        k = int(np.searchsorted(self.offsets, start, side="right")) - 1
        local = start - int(self.offsets[k])
        if local + length <= len(self.shards[k]):
            return self.shards[k][local : local + length]
        out = np.empty(length, dtype=self.dtype)
        filled = 0
        while filled < length:
            take = min(length - filled, len(self.shards[k]) - local)
            out[filled : filled + take] = self.shards[k][local : local + take]
            filled += take
            k += 1
            local = 0
        return out

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return (
                    self.window(start, max(0, stop - start))[::step] if stop > start else np.zeros(0, dtype=self.dtype)
                )
            return self.window(start, max(0, stop - start))
        i = int(key)
        if i < 0:
            i += len(self)
        return self.window(i, 1)[0]


class TokenShards:
    """One split of a prepared directory, memory-mapped.

    ``tokens``: :class:`FlatTokens` over the split's shards; ``doc_starts``: int64 [documents];
    ``metadata``: the directory's metadata dict. ``len(shards)`` is the split's token count and
    ``window(start, length)`` reads a global token range. Pickles without the maps (workers reopen).
    """

    # set by _open, in __init__ and again in __setstate__ (only the pickled state holds None)
    _tokens: FlatTokens
    _doc_starts: np.ndarray

    def __init__(self, data_dir: Union[str, Path], split: str):
        self.dir = Path(data_dir)
        self.split = split
        self.metadata = read_metadata(self.dir)
        splits = self.metadata.get("splits", {})
        if split not in splits:
            raise DataError(f"{self.dir}: no split '{split}'; splits: {', '.join(splits)}")
        self.info = splits[split]
        self.dtype = np.dtype(self.metadata["dtype"])
        self._open()

    def _open(self) -> None:
        arrays = []
        for shard in self.info["shards"]:
            path = self.dir / shard["file"]
            try:
                arr = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise DataError(
                    f"{path}: cannot open shard ({str(e).splitlines()[0]}); re-run lm data prepare --force"
                ) from None
            if arr.ndim != 1 or arr.dtype != self.dtype or len(arr) != shard["tokens"]:
                raise DataError(
                    f"{path}: shard is {arr.dtype}[{len(arr)}], metadata says "
                    f"{self.dtype}[{shard['tokens']}] (re-run lm data prepare --force)"
                )
            arrays.append(arr)
        self._tokens = FlatTokens(arrays)
        path = self.dir / self.info["doc_starts"]
        try:
            self._doc_starts = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DataError(
                f"{path}: cannot read the document offsets ({str(e).splitlines()[0]}); the directory is "
                f"damaged: re-run lm data prepare --force"
            ) from None
        if self._doc_starts.ndim != 1 or len(self._doc_starts) != int(
            self.info.get("documents", len(self._doc_starts))
        ):
            raise DataError(
                f"{path}: holds {self._doc_starts.shape} offsets, metadata says "
                f"{self.info.get('documents')} documents; re-run lm data prepare --force"
            )

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tokens"] = None
        state["_doc_starts"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    @property
    def tokens(self) -> FlatTokens:
        return self._tokens

    @property
    def doc_starts(self) -> np.ndarray:
        return self._doc_starts

    def __len__(self) -> int:
        return len(self._tokens)

    def window(self, start: int, length: int) -> np.ndarray:
        return self._tokens.window(start, length)

    @property
    def num_documents(self) -> int:
        return len(self._doc_starts)


def check_compatible(
    data_dir: Union[str, Path],
    tokenizer_path_or_hash: Union[str, Path],
    vocab_size: Optional[int] = None,
) -> Dict[str, Any]:
    """Raise a one-line DataError unless the shards were made with this tokenizer (and vocab size).

    ``tokenizer_path_or_hash``: a ``tokenizer.json`` path (or its directory) or its sha256.
    Returns the metadata on success.
    """
    from data.tokenizer import tokenizer_sha256

    meta = read_metadata(data_dir)
    expected = tokenizer_sha256(tokenizer_path_or_hash)
    have = meta["tokenizer"]["sha256"]
    if have != expected:
        raise DataError(
            f"{data_dir}: shards were tokenized with tokenizer sha256 {have[:16]}..., but the "
            f"configured tokenizer ({tokenizer_path_or_hash}) is {expected[:16]}...; "
            f"re-run `lm data prepare` with that tokenizer"
        )
    if vocab_size is not None and int(vocab_size) != int(meta["vocab_size"]):
        raise DataError(f"{data_dir}: shards have vocab size {meta['vocab_size']}, expected {vocab_size}")
    return meta
