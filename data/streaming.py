"""Streaming: training windows tokenized on the fly from local files, resumable exactly.

``data.streaming: true`` with a source of local ``jsonl`` / ``json`` / ``parquet`` / ``csv`` files
(or ``kind: hf`` with ``paths`` and ``hf_name`` a ``datasets`` builder) prepares nothing but the
tokenizer (``tokenizer.path``, copied into ``out_dir``) and a ``metadata.json`` describing the
stream. Training reads the files through HF ``datasets`` with ``streaming=True``; each DataLoader
worker (and rank) reads its own files (``IterableDataset.shard``: worker ``w`` of ``n`` on rank ``r``
of ``W`` takes shard ``r n + w`` of ``W n``), encodes documents in batches of
:data:`ENCODE_BATCH` and cuts the token stream into windows exactly like prepared shards:
``doc + [eod] + doc + [eod] ...``, window ``i`` = tokens ``[i L, i L + L + 1)`` of the stream.

Splits: a document's split is drawn from its content, ``unit_hash(split_seed, SPLIT_SALT,
blake2b_64(text))`` against ``validation_fraction`` / ``test_fraction`` (:func:`data.split.label_of`),
so training skips the validation documents wherever they are. Validation reads the files from the
start and keeps the first ``train.val_batches`` batches of validation windows.

Exact resume. :class:`StreamWindows` is a stateful iterator (``state_dict`` / ``load_state_dict``,
the torchdata ``Stateful`` protocol): ``{"epoch", "hf": the datasets iterator's own state_dict after
the last document pulled, "buf": the tokens not yet cut into windows, "starts": their
document-start flags}``. ``StatefulDataLoader`` collects it from every worker after each batch and
Lightning stores it in the checkpoint (``loops.fit_loop.state_dict.combined_loader``), so a resumed
run continues with the very next window -- no "skip N samples from the start" (the stream reports a
nominal length, so that Lightning does not read a batch ahead of the checkpoint). The stream is endless
(each worker starts its files over, ``epoch + 1``); ``train.max_steps`` ends training. The number of
DataLoader workers and ranks cannot change on resume (the shards depend on them).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from lm.errors import DataError

from data.split import SPLIT_SALT, TEST, TRAIN, VALIDATION, label_of, unit_hash

STREAM_KINDS = ("json", "jsonl", "parquet", "csv", "hf")
#: documents pulled and encoded together (the iterator state is taken after each pull)
ENCODE_BATCH = 32
SPLIT_LABELS = {"train": TRAIN, "validation": VALIDATION, "test": TEST}
#: the length a training stream reports (it never ends; see StreamWindows.__len__)
NOMINAL_WINDOWS = 1 << 40


def builder_of(source: Dict[str, Any]) -> str:
    """The ``datasets`` builder that reads a streaming source's files (one-line error otherwise)."""
    from data.sources import DATASETS_BUILDERS

    kind = str(source.get("kind"))
    if kind == "hf":
        if not source.get("paths") or not source.get("hf_name"):
            raise DataError("data.streaming: kind hf streams local files: set source.paths and source.hf_name")
        return str(source["hf_name"])
    if kind not in DATASETS_BUILDERS:
        raise DataError(
            f"data.streaming: source.kind={kind} cannot be streamed; use local {', '.join(STREAM_KINDS)} files"
        )
    return DATASETS_BUILDERS[kind]


def content_key(text: str) -> int:
    """A 64-bit key of a document's text (its split depends on nothing else)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest(), "little")


class StreamWindows(IterableDataset):
    """Windows of ``seq_len + 1`` tokens of one split, tokenized on the fly (module docstring).

    Items: ``{"tokens": LongTensor[seq_len + 1], "index": LongTensor[] (window number in this
    worker's stream), "doc_start_mask": BoolTensor[seq_len + 1]}`` (the mask only when asked).
    ``max_windows``: stop after that many (validation); else the stream never ends.
    """

    def __init__(
        self,
        source: Dict[str, Any],
        files: List[str],
        tokenizer_json: str,
        eod_id: int,
        seq_len: int,
        split: str,
        split_seed: int,
        validation_fraction: float,
        test_fraction: float,
        rank: int = 0,
        world_size: int = 1,
        doc_start_mask: bool = False,
        max_windows: Optional[int] = None,
    ):
        self.source = dict(source)
        self.builder = builder_of(self.source)
        self.field = str(self.source.get("text_field") or "text")
        self.files = list(files)
        self.tokenizer_json = tokenizer_json
        self.eod_id = int(eod_id)
        self.seq_len = int(seq_len)
        self.label = SPLIT_LABELS[split]
        self.split_seed = int(split_seed)
        self.fractions = (float(validation_fraction), float(test_fraction))
        self.rank, self.world_size = int(rank), int(world_size)
        self.doc_start_mask = doc_start_mask
        self.max_windows = max_windows
        self._state: Dict[str, Any] = {}
        self._pending: Optional[Dict[str, Any]] = None

    def __len__(self) -> int:
        """A nominal length (:data:`NOMINAL_WINDOWS`, or ``max_windows``): a loader of known length is
        not read a batch ahead by Lightning, whose prefetch would otherwise put the checkpointed
        iterator state one batch past the last trained batch."""
        return self.max_windows if self.max_windows is not None else NOMINAL_WINDOWS

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        return dict(self._state)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._pending = dict(state) if state else None

    # ------------------------------------------------------------------------- iteration
    def _shard(self) -> "tuple[int, int]":
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        n = self.world_size * workers
        if len(self.files) < n:
            raise DataError(
                f"data.streaming: {len(self.files)} file(s) cannot feed {self.world_size} rank(s) x {workers} "
                f"DataLoader worker(s) (each reads its own files); use fewer train.num_workers or more files"
            )
        return self.rank * workers + worker, n

    def _documents(self, index: int, n: int, hf_state: Optional[Dict[str, Any]]):
        from data.sources import _quiet_datasets

        with _quiet_datasets() as datasets:
            ds = datasets.load_dataset(self.builder, data_files=self.files, split="train", streaming=True)
        ds = ds.shard(num_shards=n, index=index) if n > 1 else ds
        if hf_state:
            ds.load_state_dict(hf_state)
        return ds

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        from data.encode import _load_tokenizer

        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        tok = _load_tokenizer(self.tokenizer_json)
        index, n = self._shard()
        state = self._pending or {}
        self._pending = None
        epoch = int(state.get("epoch", 0))
        hf_state = state.get("hf")
        buf = np.asarray(state.get("buf", []), dtype=np.int64)
        starts = np.asarray(state.get("starts", []), dtype=bool)
        produced = int(state.get("produced", 0))
        L = self.seq_len
        vf, tf = self.fractions
        while True:
            ds = self._documents(index, n, hf_state)
            rows = iter(ds)
            exhausted = False
            pulled, full_pass = 0, hf_state is None
            while not exhausted:
                texts: List[str] = []
                while len(texts) < ENCODE_BATCH:
                    row = next(rows, None)
                    if row is None:
                        exhausted = True
                        break
                    text = row.get(self.field)
                    if not isinstance(text, str) or not text or text.isspace():
                        continue
                    u = unit_hash(self.split_seed, SPLIT_SALT, content_key(text))
                    if label_of(u, vf, tf) == self.label:
                        texts.append(text)
                # after an exhausted pass the next document is the first of the next epoch
                hf_state = None if exhausted else ds.state_dict()
                state_epoch = epoch + 1 if exhausted else epoch
                pulled += len(texts)
                if texts:
                    encs = tok.encode_batch_fast(texts, add_special_tokens=False)
                    pieces = [np.asarray(e.ids + [self.eod_id], dtype=np.int64) for e in encs]
                    flags = [np.zeros(len(p), dtype=bool) for p in pieces]
                    for f in flags:
                        f[0] = True
                    buf = np.concatenate([buf, *pieces])
                    starts = np.concatenate([starts, *flags])
                while len(buf) >= L + 1:
                    window, mask = buf[: L + 1].copy(), starts[: L + 1].copy()
                    buf, starts = buf[L:], starts[L:]
                    produced += 1
                    # the state an uninterrupted run has after this window: resuming from it yields the next
                    self._state = {
                        "epoch": state_epoch,
                        "hf": hf_state,
                        "buf": buf.tolist(),
                        "starts": starts.tolist(),
                        "produced": produced,
                        "shard": [index, n],
                    }
                    item = {"tokens": torch.from_numpy(window), "index": torch.tensor(produced - 1)}
                    if self.doc_start_mask:
                        item["doc_start_mask"] = torch.from_numpy(mask)
                    yield item
                    if self.max_windows is not None and produced >= self.max_windows:
                        return
            if self.max_windows is not None:
                return  # validation: one pass over the files
            if pulled == 0 and full_pass:
                raise DataError(
                    f"data.streaming: shard {index} of {n} holds no {list(SPLIT_LABELS)[self.label]} documents "
                    f"({len(self.files)} files)"
                )
            epoch += 1  # the files start over; the tokens left in the buffer carry on
            hf_state = None


def stream_files(source: Dict[str, Any]) -> List[Path]:
    """The streaming source's files in order (the same expansion as :mod:`data.sources`)."""
    from data.sources import expand_paths

    builder_of(source)
    return expand_paths(list(source.get("paths") or []))


def prepare_stream(conf: Dict[str, Any], force: bool, echo, t_start: float) -> Any:
    """``lm data prepare`` of a streaming config: the tokenizer and a ``metadata.json`` that describes
    the stream (files, builder, split keys, bytes per token measured on the first documents); no shards."""
    import datetime as _dt
    import json
    import time

    import lm
    from data.atomic import atomic_directory
    from data.fingerprint import fingerprint
    from data.prepare import PrepareResult, _local_tokenizer_sha, vocabulary_metadata
    from data.shards import FORMAT, METADATA_FILE
    from data.sources import _quiet_datasets
    from data.tokenizer import (
        TOKENIZER_FILE,
        ensure_special_tokens,
        resolve_tokenizer,
        sha256_text,
        token_dtype,
    )

    tok_cfg = conf["tokenizer"]
    if not tok_cfg.get("path"):
        raise DataError(
            "tokenizer.path: data.streaming tokenizes during training with an existing tokenizer; name one "
            "(e.g. the tokenizer.json of a prepared directory)"
        )
    source = dict(conf["source"])
    builder = builder_of(source)
    files = stream_files(source)
    out = Path(conf["out_dir"])
    fp = fingerprint(conf, files, _local_tokenizer_sha(tok_cfg.get("path")))
    if (out / METADATA_FILE).is_file() and not force:
        try:
            old = json.loads((out / METADATA_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        if old.get("fingerprint") == fp:
            echo(f"{out}: up to date (fingerprint {fp[:12]}); use --force to rebuild")
            return PrepareResult(out, True, old, time.perf_counter() - t_start)
    specials = [str(tok_cfg["eod_token"]), str(tok_cfg["pad_token"])]
    tok, where = resolve_tokenizer(str(tok_cfg["path"]))
    (eod_id, pad_id), added = ensure_special_tokens(tok, specials)
    tokenizer_json = tok.to_str()
    sha = sha256_text(tokenizer_json)
    field = str(source.get("text_field") or "text")
    # bytes per token of the first documents (bits per byte; the stream's text is never all read here)
    nbytes = ntokens = 0
    with _quiet_datasets() as datasets:
        try:
            ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True)
            for row in ds:
                text = row.get(field)
                if not isinstance(text, str):
                    raise DataError(f"{files[0]}: no text field '{field}' (source.text_field); columns: {list(row)}")
                if text.strip():
                    nbytes += len(text.encode("utf-8"))
                    ntokens += len(tok.encode(text, add_special_tokens=False).ids) + 1
                if nbytes >= 1_000_000:
                    break
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"source.paths: cannot stream {files[0]} as {builder}: {str(e).splitlines()[0]}") from None
    if ntokens == 0:
        raise DataError(f"empty corpus: the streamed files ({len(files)}) hold no text in '{field}'")
    vocab = int(tok.get_vocab_size())
    meta = {
        "format": FORMAT,
        "name": conf.get("name"),
        **vocabulary_metadata(
            vocab,
            eod_id,
            pad_id,
            token_dtype(vocab),
            sha,
            specials,
            {"trained": False, "from": where, **({"added_special_tokens": added} if added else {})},
        ),
        "splits": {},
        "stream": {
            "builder": builder,
            "files": [str(f.resolve()) for f in files],
            "text_field": field,
            "bytes_per_token": nbytes / ntokens,
            "sampled_bytes": nbytes,
        },
        "source": {"kind": str(source.get("kind")), "files": len(files), "files_read": 0, "streaming": True},
        "documents": 0,
        "bytes": 0,
        "invalid_utf8_replaced": 0,
        "fingerprint": fp,
        "config": conf,
        "version": lm.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "timings": {"total_s": round(time.perf_counter() - t_start, 3)},
    }
    with atomic_directory(out) as tmp:
        (tmp / TOKENIZER_FILE).write_text(tokenizer_json, encoding="utf-8")
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    echo(
        f"streaming {len(files)} files ({builder}) from {out}: tokenizer vocab {vocab}, "
        f"{nbytes / ntokens:.3f} bytes/token on the first {nbytes:,} bytes"
    )
    return PrepareResult(out, False, meta, time.perf_counter() - t_start)
