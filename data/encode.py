"""Encode documents into packed token arrays, in parallel.

A task is ``(split, texts, nbytes)``: up to ``batch_size`` documents of one split (and at most
:data:`TASK_BYTES` of text, so a corpus of a few huge files still spreads over the workers).
Encoding a task gives ``tokens(d0) + [eod] + tokens(d1) + [eod] + ...`` as one array of the shard
dtype plus each document's length (eod included). Results come back in task order.

Backends for ``workers > 1``:

- ``processes`` (default): a pool of worker processes, each with its own copy of the tokenizer and
  the Rust thread pool off; the Python-side id conversion runs in the workers too.
- ``threads``: this process only, ``Tokenizer.encode_batch_fast`` with the Rust thread pool.

``python -m data.bench`` measures both against plain single-process ``encode_batch``.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import deque
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterable, Iterator, List, Optional, Tuple

import numpy as np
from tokenizers import Tokenizer

from data.sources import Document

if TYPE_CHECKING:
    from multiprocessing.pool import Pool

#: a task holds at most this much text (bytes), besides the ``batch_size`` document cap
TASK_BYTES = 1 << 20
BACKENDS = ("processes", "threads")
Task = Tuple[int, List[str], int]
Result = Tuple[int, np.ndarray, np.ndarray, int]


def encode_texts(tok: Tokenizer, texts: List[str], eod_id: int, dtype: str) -> Tuple[np.ndarray, np.ndarray]:
    """Packed ids of ``texts`` with ``eod_id`` after each document, and per-document lengths.

    Special-token strings inside the text (e.g. a literal ``<|endoftext|>``) are encoded as plain
    text (``tok.encode_special_tokens`` is set by the callers), so the only end-of-document ids
    are the ones appended here.
    """
    return pack_encodings(tok.encode_batch_fast(texts, add_special_tokens=False), eod_id, dtype)


def pack_encodings(encodings: list, eod_id: int, dtype: str) -> Tuple[np.ndarray, np.ndarray]:
    """``ids(e0) + [eod] + ids(e1) + [eod] + ...`` as one ``dtype`` array, and the lengths."""
    flat: List[int] = []
    lengths = np.empty(len(encodings), dtype=np.int64)
    for i, enc in enumerate(encodings):
        ids = enc.ids
        flat.extend(ids)
        flat.append(eod_id)
        lengths[i] = len(ids) + 1
    return np.array(flat, dtype=dtype), lengths


def make_tasks(docs: Iterable[Tuple[int, Document]], batch_size: int, task_bytes: int = TASK_BYTES) -> Iterator[Task]:
    """Group ``(split, document)`` pairs into per-split tasks, keeping each split's order."""
    texts: dict = {}
    sizes: dict = {}
    for label, doc in docs:
        buf = texts.setdefault(label, [])
        buf.append(doc.text)
        sizes[label] = sizes.get(label, 0) + doc.nbytes
        if len(buf) >= batch_size or sizes[label] >= task_bytes:
            yield label, buf, sizes[label]
            texts[label], sizes[label] = [], 0
    for label in sorted(texts):
        if texts[label]:
            yield label, texts[label], sizes[label]


# ----------------------------------------------------------------------------- worker processes

_WORKER: dict = {}


def _load_tokenizer(tokenizer_json: str) -> Tokenizer:
    """The tokenizer to encode with: special tokens in the text stay plain text."""
    tok = Tokenizer.from_str(tokenizer_json)
    tok.encode_special_tokens = True
    return tok


def _init_worker(tokenizer_json: str, eod_id: int, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and terminates us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's cleanup handler (data.atomic)
    _WORKER.update(tok=_load_tokenizer(tokenizer_json), eod_id=eod_id, dtype=dtype)


def _encode_task(task: Task) -> Result:
    label, texts, nbytes = task
    tokens, lengths = encode_texts(_WORKER["tok"], texts, _WORKER["eod_id"], _WORKER["dtype"])
    return label, tokens, lengths, nbytes


@contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class ParallelEncoder:
    """Encodes tasks with ``workers`` processes (or Rust threads); a context manager.

    Usage::

        with ParallelEncoder(tok.to_str(), eod_id, "uint16", workers=2) as enc:
            for split, tokens, lengths, nbytes in enc.map(tasks): ...
    """

    def __init__(self, tokenizer_json: str, eod_id: int, dtype: str, workers: int = 0, backend: str = "processes"):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.tokenizer_json = tokenizer_json
        self.eod_id = int(eod_id)
        self.dtype = dtype
        self.workers = workers if workers > 0 else default_workers()
        self.backend = backend
        self._pool: Optional[Pool] = None
        self._tok: Optional[Tokenizer] = None

    def __enter__(self) -> "ParallelEncoder":
        if self.workers > 1 and self.backend == "processes":
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            # children inherit the variable: the Rust thread pool stays off in them, and
            # tokenizers does not warn about forking after the parent used its threads
            with _env("TOKENIZERS_PARALLELISM", "false"):
                self._pool = ctx.Pool(
                    self.workers, initializer=_init_worker, initargs=(self.tokenizer_json, self.eod_id, self.dtype)
                )
        else:
            self._tok = _load_tokenizer(self.tokenizer_json)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._pool is not None:
            if exc_type is None:
                self._pool.close()
            else:
                self._pool.terminate()
            self._pool.join()
            self._pool = None

    def map(self, tasks: Iterable[Task]) -> Iterator[Result]:
        """Encode ``tasks``; results in task order, at most ``2 * workers`` tasks in flight."""
        if self._pool is None:
            threads = "true" if (self.workers > 1 and self.backend == "threads") else "false"
            assert self._tok is not None  # loaded by __enter__ when there is no pool
            with _env("TOKENIZERS_PARALLELISM", threads):
                for label, texts, nbytes in tasks:
                    tokens, lengths = encode_texts(self._tok, texts, self.eod_id, self.dtype)
                    yield label, tokens, lengths, nbytes
            return
        pending: deque = deque()
        for task in tasks:
            pending.append(self._pool.apply_async(_encode_task, (task,)))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
