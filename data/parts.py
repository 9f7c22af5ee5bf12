"""``lm data prepare`` in parts: a corpus of many files prepared by several processes or machines.

With ``data.parts: n`` (or ``lm data prepare <cfg> --shard i/n``) the source's files are cut into
``n`` parts, each prepared on its own and resumable; a run reads them together through one index.

Layout of ``out_dir``::

    parts/tokenizer.json              the shared tokenizer (trained once, or tokenizer.path)
    parts/tokenizer.meta.json         its fingerprint and special-token ids (written last: "done")
    parts/part-00000-of-00008/        one part: <split>/tokens-*.npy, <split>/doc_starts.npy, part.json
    ...
    index/<split>_doc_starts.npy      the merged document offsets of each split
    metadata.json                     the merged metadata (written last): every part's shards in order

Deterministic assignment. The files (in source order, cut to ``data.budget_bytes`` if set) are
assigned to parts by size: file ``k`` starting at byte offset ``c_k`` of the ``C`` bytes in all goes
to part ``min(n - 1, floor(c_k * n / C))``, so every part is a contiguous run of files holding about
``C / n`` bytes, and the merged stream is the files in source order.

Split assignment by document: document ``j`` of file ``k`` draws ``u = unit_hash(split_seed,
SPLIT_SALT, k * 2**32 + j)`` (:mod:`data.split`), so its split depends neither on ``n`` nor on which
process reads it (the single-directory layout, ``parts: 0``, numbers documents across the whole
corpus instead). The tokenizer's training sample uses the same keys.

Resumability. Each part is written in a temporary sibling and renamed into place with its
``part.json`` (:mod:`data.atomic`): a part directory exists complete or not at all, and a part whose
``part.json`` holds the current fingerprint is not redone. A killed run leaves only temporary
directories, removed by the next run; ``metadata.json`` is written only when every part is there
(any process that finds all ``n`` parts done writes the same merged index; the merge copies no
tokens). ``--shard i/n`` prepares part ``i`` only (a SLURM array task); without it, every missing
part is prepared, ``num_proc`` at a time (one process each, the tokenizer's own threads off).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple


from lm.errors import DataError

from data.atomic import atomic_directory, pid_alive, write_atomic
from data.shards import merge_splits
from data.sources import Document, ReadStats, Source
from data.split import SPLIT_SALT, TEST, TRAIN, VALIDATION, label_of, unit_hash

PARTS_DIR = "parts"
PART_FILE = "part.json"
TOKENIZER_META = "tokenizer.meta.json"
#: sources whose files can be read one at a time (one document stream per file)
PART_KINDS = ("stdlib", "text", "json", "jsonl", "parquet", "csv")


def part_name(i: int, n: int) -> str:
    return f"part-{i:05d}-of-{n:05d}"


def parse_shard(spec: str) -> Tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n`` (one-line ConfigError otherwise)."""
    from lm.errors import ConfigError

    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ConfigError(f"--shard: expected i/n (e.g. 3/16), got '{spec}'") from None
    if not 0 <= i < n:
        raise ConfigError(f"--shard: need 0 <= i < n, got {spec}")
    return i, n


def budget_files(files: List[Path], budget: Optional[int]) -> List[Path]:
    """The first ``files`` whose sizes add up to at most ``budget`` bytes (always the first file)."""
    if budget is None:
        return files
    if budget <= 0:
        raise DataError(f"budget_bytes: must be > 0 (or null for no budget), got {budget}")
    out: List[Path] = []
    total = 0
    for f in files:
        size = f.stat().st_size
        if out and total + size > budget:
            break
        out.append(f)
        total += size
    return out


def assign_parts(sizes: List[int], n: int) -> List[int]:
    """The part of each file: ``min(n - 1, c_k * n // C)`` with ``c_k`` its start offset (docstring)."""
    total = max(1, sum(sizes))
    parts, offset = [], 0
    for size in sizes:
        parts.append(min(n - 1, offset * n // total))
        offset += size
    return parts


def unit_key(file_index: int, doc_index: int) -> int:
    return (file_index << 32) | doc_index


def file_documents(source: Source, path: Path, stats: ReadStats) -> Iterator[Document]:
    """The documents of one file of ``source`` (a copy of the source restricted to that file)."""
    sub = type(source)(source.cfg)
    sub._files = [path]
    yield from sub.documents(stats)


def check_source(source: Any) -> None:
    """Parts need a source of local files read one by one and no document/byte caps."""
    if source.kind not in PART_KINDS:
        raise DataError(
            f"data.parts: source.kind={source.kind} is prepared in one piece (parts: 0); "
            f"parts work with: {', '.join(PART_KINDS)}"
        )
    for key in ("max_documents", "max_bytes"):
        if getattr(source, key) is not None:
            raise DataError(
                f"source.{key}: not available with data.parts (a part cannot know what the others read); "
                f"cap the corpus with data.budget_bytes (whole files, in order)"
            )


# ------------------------------------------------------------------------------------ tokenizer


def _hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class _Lock:
    """An exclusive lock file ``host pid``; a lock of a dead process on this host is taken over."""

    def __init__(self, path: Path):
        self.path = path
        self.me = f"{socket.gethostname()} {os.getpid()}"

    def try_acquire(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                host, pid = self.path.read_text().split()
            except (OSError, ValueError):
                return False
            if host == socket.gethostname() and not pid_alive(int(pid)):
                self.path.unlink(missing_ok=True)  # its holder died: the next attempt takes it
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self.me)
        return True

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


def shared_tokenizer(
    out: Path,
    conf: Dict[str, Any],
    source: Source,
    files: List[Path],
    tok_fp: str,
    progress: bool,
    echo: Callable[[str], None],
) -> Dict[str, Any]:
    """The parts' tokenizer: ``parts/tokenizer.json`` if its meta has ``tok_fp``, else built once
    (by the first process to take the lock; the others wait for it). Returns the meta."""
    from data.prepare import _bar
    from data.tokenizer import (
        TrainingSample,
        ensure_special_tokens,
        resolve_tokenizer,
        sha256_text,
        train_tokenizer,
    )

    root = out / PARTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    meta_path = root / TOKENIZER_META
    lock = _Lock(root / ".tokenizer.lock")

    def done() -> Optional[Dict[str, Any]]:
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return None
        return meta if meta.get("fingerprint") == tok_fp else None

    waited = False
    while (meta := done()) is None:
        if not lock.try_acquire():
            if not waited:
                echo(f"{root}: waiting for another process to build the tokenizer ({lock.path})")
                waited = True
            time.sleep(0.5)
            continue
        try:
            if (meta := done()) is not None:
                return meta
            tok_cfg = conf["tokenizer"]
            specials = [str(tok_cfg["eod_token"]), str(tok_cfg["pad_token"])]
            t = time.perf_counter()
            if tok_cfg.get("path"):
                tok, where = resolve_tokenizer(str(tok_cfg["path"]))
                origin: Dict[str, Any] = {"trained": False, "from": where}
            else:
                seed = int(conf["split_seed"])
                vf, tf = float(conf["validation_fraction"]), float(conf["test_fraction"])
                sample = TrainingSample(int(tok_cfg["train_max_bytes"]), seed)
                stats = ReadStats()
                with _bar(progress, desc="tokenizer sample", unit="B", unit_scale=True) as bar:
                    for k, path in enumerate(files):
                        for j, doc in enumerate(file_documents(source, path, stats)):
                            key = unit_key(k, j)
                            if label_of(unit_hash(seed, SPLIT_SALT, key), vf, tf) == TRAIN:
                                sample.offer(key, doc.text, doc.nbytes)
                            bar.update(doc.nbytes)
                texts = sample.texts()
                if not texts:
                    raise DataError("empty corpus: no training documents to train the tokenizer on")
                tok = train_tokenizer(
                    texts, int(tok_cfg["vocab_size"]), int(tok_cfg["min_frequency"]), specials, progress, len(texts)
                )
                origin = {"trained": True, "train_documents": len(texts), "train_bytes": sample.bytes}
            (eod_id, pad_id), added = ensure_special_tokens(tok, specials)
            if added:
                origin["added_special_tokens"] = added
            text = tok.to_str()
            write_atomic(root / "tokenizer.json", text)
            meta = {
                "fingerprint": tok_fp,
                "sha256": sha256_text(text),
                "vocab_size": int(tok.get_vocab_size()),
                "eod_token": specials[0],
                "eod_id": eod_id,
                "pad_token": specials[1],
                "pad_id": pad_id,
                "seconds": round(time.perf_counter() - t, 3),
                **origin,
            }
            write_atomic(meta_path, json.dumps(meta, indent=2) + "\n")
            return meta
        finally:
            lock.release()
    return meta


# ------------------------------------------------------------------------------------ one part


def _part_documents(
    source: Source, files: List[Tuple[int, Path]], conf: Dict[str, Any], stats: ReadStats
) -> Iterator[Tuple[int, Document]]:
    seed = int(conf["split_seed"])
    vf, tf = float(conf["validation_fraction"]), float(conf["test_fraction"])
    for k, path in files:
        for j, doc in enumerate(file_documents(source, path, stats)):
            yield label_of(unit_hash(seed, SPLIT_SALT, unit_key(k, j)), vf, tf), doc


def prepare_part(
    out: Path,
    conf: Dict[str, Any],
    i: int,
    n: int,
    files: List[Tuple[int, Path]],
    part_fp: str,
    tokenizer_json: str,
    tok_meta: Dict[str, Any],
    workers: int,
) -> Tuple[Dict[str, Any], bool]:
    """Prepare part ``i`` of ``n`` (``files``: (global index, path)) unless it is done; returns its
    ``part.json`` content and whether it was (re)built."""
    from data.prepare import encode_to_shards
    from data.sources import open_source

    target = out / PARTS_DIR / part_name(i, n)
    done = _read_part(target)
    if done is not None and done.get("fingerprint") == part_fp:
        return done, False
    source = open_source(conf["source"])
    t = time.perf_counter()
    stats = ReadStats()
    labels = [TRAIN, VALIDATION] + ([TEST] if float(conf["test_fraction"]) > 0 else [])
    with atomic_directory(target) as tmp:
        splits = encode_to_shards(
            tmp,
            _part_documents(source, files, conf, stats),
            tokenizer_json,
            int(tok_meta["eod_id"]),
            _dtype(tok_meta),
            int(conf["shard_tokens"]),
            labels,
            workers,
            int(conf["batch_size"]),
        )
        part = {
            "fingerprint": part_fp,
            "part": i,
            "parts": n,
            "files": [str(p) for _, p in files],
            "splits": splits,
            "stats": {
                "files": stats.files,
                "documents": stats.documents,
                "bytes": stats.bytes,
                "replaced": stats.replaced,
                "empty_skipped": stats.empty_skipped,
            },
            "seconds": round(time.perf_counter() - t, 3),
        }
        (tmp / PART_FILE).write_text(json.dumps(part, indent=2) + "\n", encoding="utf-8")
    return part, True


def _dtype(tok_meta: Dict[str, Any]) -> str:
    from data.tokenizer import token_dtype

    return token_dtype(int(tok_meta["vocab_size"]))


def _read_part(target: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads((target / PART_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _run_part(args: tuple) -> Tuple[Dict[str, Any], bool]:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return prepare_part(*args)


# --------------------------------------------------------------------------------------- driver


def prepare_parts(
    out: Path,
    conf: Dict[str, Any],
    source: Source,
    files: List[Path],
    fp: str,
    tok_fp: str,
    only: Optional[int],
    progress: bool,
    echo: Callable[[str], None],
    t_start: float,
) -> Optional[Dict[str, Any]]:
    """Prepare the missing parts (all, or part ``only``) and merge when all are there.

    Returns the merged metadata, or None when parts are still missing (``--shard`` runs).
    """
    from data.prepare import _bar, _metadata
    from data.encode import default_workers

    n = int(conf["parts"])
    check_source(source)
    t = time.perf_counter()
    tok_meta = shared_tokenizer(out, conf, source, files, tok_fp, progress, echo)
    tokenizer_s = time.perf_counter() - t
    tokenizer_json = (out / PARTS_DIR / "tokenizer.json").read_text(encoding="utf-8")
    sizes = [f.stat().st_size for f in files]
    owner = assign_parts(sizes, n)
    members: List[List[Tuple[int, Path]]] = [[] for _ in range(n)]
    for k, (f, p) in enumerate(zip(files, owner)):
        members[p].append((k, f))

    def part_fp(i: int) -> str:
        return _hash({"fingerprint": fp, "tokenizer": tok_meta["sha256"], "part": [i, n]})

    todo = [i for i in range(n) if only is None or i == only]
    workers = int(conf.get("num_proc") or 0) or default_workers()
    t = time.perf_counter()
    built = 0
    part_bytes = [sum(sizes[k] for k, _ in members[i]) for i in range(n)]

    def report(i: int, part: Dict[str, Any], fresh: bool) -> None:
        nonlocal built
        st = part["stats"]
        if fresh:
            built += 1
            rate = st["bytes"] / max(part["seconds"], 1e-9) / 1e6
            echo(
                f"part {i + 1}/{n}: {st['files']} files, {st['documents']:,} documents, "
                f"{st['bytes'] / 1e6:.1f} MB in {part['seconds']:.1f} s ({rate:.1f} MB/s)"
            )
        else:
            echo(f"part {i + 1}/{n}: done already (kept)")

    with _bar(progress, desc="parts", unit="B", unit_scale=True, total=sum(part_bytes[i] for i in todo)) as bar:
        args = [(out, conf, i, n, members[i], part_fp(i), tokenizer_json, tok_meta) for i in todo]
        if len(todo) == 1 or workers == 1:
            for a in args:  # one part at a time here, encoded by `workers` processes
                part, fresh = prepare_part(*a, workers if len(todo) == 1 else 1)
                report(a[2], part, fresh)
                bar.update(part_bytes[a[2]])
        else:
            import multiprocessing

            ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            with ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx) as pool:
                for a, (part, fresh) in zip(args, pool.map(_run_part, [(*a, 1) for a in args])):
                    report(a[2], part, fresh)
                    bar.update(part_bytes[a[2]])
    encode_s = time.perf_counter() - t

    parts = [_read_part(out / PARTS_DIR / part_name(i, n)) for i in range(n)]
    missing = [i for i, p in enumerate(parts) if p is None or p.get("fingerprint") != part_fp(i)]
    if missing:
        echo(f"{out}: {n - len(missing)} of {n} parts done; missing: {', '.join(map(str, missing[:20]))}")
        return None
    full = [p for p in parts if p is not None]
    splits = merge_splits(out, [(f"{PARTS_DIR}/{part_name(i, n)}/", p["splits"]) for i, p in enumerate(full)])
    vf, tf = float(conf["validation_fraction"]), float(conf["test_fraction"])
    for name, fraction in (("validation", vf), ("test", tf)):
        if fraction > 0 and not splits[name]["documents"]:
            raise DataError(
                f"the {name} split is empty: the corpus has too few documents for {name}_fraction={fraction} "
                f"(more data, or data.parts: 0)"
            )
    stats = ReadStats()
    for entry in full:
        stats.files += entry["stats"]["files"]
        stats.documents += entry["stats"]["documents"]
        stats.bytes += entry["stats"]["bytes"]
        stats.replaced += entry["stats"]["replaced"]
        stats.empty_skipped += entry["stats"]["empty_skipped"]
    tok_origin = {
        k: v
        for k, v in tok_meta.items()
        if k not in ("fingerprint", "sha256", "vocab_size", "eod_token", "eod_id", "pad_token", "pad_id", "seconds")
    }
    timings = {
        "read_s": 0.0,
        "tokenizer_s": tokenizer_s,
        "encode_s": encode_s,
        "total_s": time.perf_counter() - t_start,
    }
    meta = _metadata(
        conf,
        int(tok_meta["vocab_size"]),
        int(tok_meta["eod_id"]),
        int(tok_meta["pad_id"]),
        _dtype(tok_meta),
        str(tok_meta["sha256"]),
        [str(tok_meta["eod_token"]), str(tok_meta["pad_token"])],
        tok_origin,
        splits,
        {**source.describe(), "files": len(files), "files_read": stats.files},
        stats,
        fp,
        workers,
        timings,
    )
    meta["tokenizer"]["file"] = f"{PARTS_DIR}/tokenizer.json"
    meta["layout"] = {"parts": n, "built_now": built}
    for stale in (out / PARTS_DIR).glob("part-*-of-*"):
        if not stale.name.endswith(f"-of-{n:05d}"):
            shutil.rmtree(stale, ignore_errors=True)
    write_atomic(out / "metadata.json", json.dumps(meta, indent=2) + "\n")
    return meta
