"""``lm data prepare``: corpus -> tokenizer -> packed shards + ``metadata.json``, atomically.

Steps (each with a progress bar on a terminal):

1. list the source files and compute the fingerprint; an existing output with the same
   fingerprint is up to date and is kept (unless ``force``);
2. read pass: assign every document to a split (:mod:`data.split`) and collect the tokenizer's
   training sample from the training split only (:class:`~data.tokenizer.TrainingSample`);
3. train the byte-level BPE (or load ``tokenizer.path``), save ``tokenizer.json``;
4. encode pass: read again, encode in parallel (:mod:`data.encode`), append an end-of-document id
   after every document and stream the ids into per-split shards (:mod:`data.shards`);
5. write ``metadata.json``; the temporary directory is renamed to ``out_dir``
   (:mod:`data.atomic`). Any error or Ctrl-C leaves nothing behind.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import sys
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np

from lm.errors import DataError

from data.atomic import atomic_directory, sigterm_as_interrupt
from data.encode import ParallelEncoder, default_workers, make_tasks
from data.fingerprint import fingerprint
from data.parts import budget_files
from data.pretokenized import TokenSource
from data.shards import FORMAT, METADATA_FILE, SplitWriter, read_metadata
from data.sources import Document, ReadStats, Source, open_source, utf8_len
from data.split import (
    SPLIT_SALT,
    SPLITS,
    TEST,
    TRAIN,
    VALIDATION,
    assign_splits,
    label_of,
    small_split_warning,
    unit_hash,
)
from data.tokenizer import (
    TOKENIZER_FILE,
    TrainingSample,
    ensure_special_tokens,
    resolve_tokenizer,
    sha256_text,
    token_dtype,
    tokenizer_sha256,
    train_tokenizer,
)

#: encoding backend used by prepare (see data.encode and docs/bench/data.md)
ENCODE_BACKEND = "processes"


@dataclass
class PrepareResult:
    out_dir: Path
    skipped: bool  # True: an up-to-date output already existed
    metadata: Dict[str, Any]
    wall_s: float


def _plain(cfg: Any) -> Dict[str, Any]:
    from lm.config.loader import plain

    out = plain(cfg)
    if not isinstance(out, dict):
        raise DataError(f"expected a data config mapping, got {type(out).__name__}")
    return out


def _bar(progress: bool, **kw):
    from tqdm import tqdm

    return tqdm(disable=not progress, file=sys.stderr, dynamic_ncols=True, leave=False, **kw)


def _local_tokenizer_sha(spec: Optional[str]) -> Optional[str]:
    if not spec:
        return None
    p = Path(spec).expanduser()
    return tokenizer_sha256(p) if p.exists() else None


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


# ---------------------------------------------------------------------------------- the passes


def plan_pass(
    source: Source,
    seed: int,
    validation_fraction: float,
    test_fraction: float,
    sample: Optional[TrainingSample],
    progress: bool,
) -> Tuple[Any, ReadStats]:
    """Read every document once: split labels (uint8 array) and the tokenizer sample."""
    stats = ReadStats()
    keys = array("d")
    with _bar(progress, desc="reading", unit="B", unit_scale=True) as bar:
        for i, doc in enumerate(source.documents(stats)):
            u = unit_hash(seed, SPLIT_SALT, i)
            keys.append(u)
            if sample is not None and label_of(u, validation_fraction, test_fraction) == TRAIN:
                sample.offer(i, doc.text, doc.nbytes)
            bar.update(doc.nbytes)
    if stats.documents == 0 or stats.bytes == 0:
        caps = [f"{k}={getattr(source, k)}" for k in ("max_documents", "max_bytes") if getattr(source, k) is not None]
        what = ", ".join(f"{k}={v}" for k, v in source.describe().items() if k != "exclude")
        raise DataError(
            f"empty corpus: the source ({what}) gave no documents "
            f"(whitespace-only documents are dropped{'; ' + ', '.join(caps) if caps else ''})"
        )
    return assign_splits(keys, validation_fraction, test_fraction), stats


def encode_to_shards(
    root: Path,
    documents: Iterable[Tuple[int, Document]],
    tokenizer_json: str,
    eod_id: int,
    dtype: str,
    shard_tokens: int,
    splits: Iterable[int],
    workers: int,
    batch_size: int,
    backend: str = ENCODE_BACKEND,
    progress: bool = False,
    total_bytes: Optional[int] = None,
) -> Dict[str, Dict[str, Any]]:
    """Encode ``(split, document)`` pairs and write each split's shards under ``root``.

    Returns ``{split name: metadata entry}``. This is the encode+pack+write path that
    ``python -m data.bench`` times.
    """
    writers = {label: SplitWriter(root, SPLITS[label], dtype, shard_tokens) for label in splits}
    try:
        with (
            ParallelEncoder(tokenizer_json, eod_id, dtype, workers, backend) as encoder,
            _bar(progress, desc="encoding", unit="B", unit_scale=True, total=total_bytes) as bar,
        ):
            for label, tokens, lengths, nbytes in encoder.map(make_tasks(documents, batch_size)):
                writers[label].add(tokens, lengths, nbytes)
                bar.update(nbytes)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    return {SPLITS[label]: w.close() for label, w in writers.items()}


def _labelled(source: Source, labels, stats: ReadStats) -> Iterator[Tuple[int, Document]]:
    n = len(labels)
    for i, doc in enumerate(source.documents(stats)):
        if i >= n:
            raise DataError(
                "the source changed while it was being prepared (more documents on the second read); run again"
            )
        yield int(labels[i]), doc
    if stats.documents != n:
        raise DataError(
            f"the source changed while it was being prepared ({n} documents, then {stats.documents}); run again"
        )


# ------------------------------------------------------------------------------------ prepare


def prepare(
    cfg: Any,
    force: bool = False,
    echo: Callable[[str], None] = print,
    progress: Optional[bool] = None,
    shard: Optional[int] = None,
) -> PrepareResult:
    """Prepare the data directory described by a data config (DictConfig or mapping).

    ``data.parts > 0``: the parts layout (:mod:`data.parts`); ``shard``: prepare only that part
    (the merged metadata is written when every part is done; until then ``metadata`` is empty).
    """
    t_start = time.perf_counter()
    conf = _plain(cfg)
    progress = sys.stderr.isatty() if progress is None else progress
    out = Path(conf["out_dir"])
    src_cfg: Mapping[str, Any] = conf["source"]
    tok_cfg: Mapping[str, Any] = conf["tokenizer"]
    if conf.get("streaming"):
        from data.streaming import prepare_stream

        if shard is not None or conf.get("sources") or int(conf.get("parts") or 0):
            raise DataError("data.streaming: prepares no shards (no --shard, data.parts or data.sources with it)")
        return prepare_stream(conf, force, echo, t_start)
    if conf.get("sources"):
        from data.mixture import prepare_mixture

        if shard is not None:
            raise DataError("--shard: prepare the sources of a mixture one by one (data.sources), not in shards")
        return prepare_mixture(conf, force, echo, progress, t_start)

    source = open_source(src_cfg)
    files = source.files()  # a missing path / empty glob fails here, before anything is written
    if conf.get("budget_bytes") is not None:
        files = budget_files(files, int(conf["budget_bytes"]))
        source._files = files
    tok_sha = _local_tokenizer_sha(tok_cfg.get("path"))
    fp = fingerprint(conf, files, tok_sha)
    n_parts = int(conf.get("parts") or 0)
    if n_parts < 0:
        raise DataError(f"parts: must be >= 0 (0: one directory), got {n_parts}")
    if shard is not None and not 0 <= shard < max(n_parts, 1):
        raise DataError(f"--shard: part {shard} does not exist with data.parts={n_parts}")
    if n_parts > 0:
        from data.parts import check_source

        check_source(source)
        assert isinstance(source, Source)  # check_source refuses the token kinds with a DataError first
        tok_fp = fingerprint({k: v for k, v in conf.items() if k not in ("parts", "shard_tokens")}, files, tok_sha)
        return _prepare_parts(out, conf, source, files, fp, tok_fp, force, shard, progress, echo, t_start)

    if out.exists():
        if not out.is_dir():
            raise DataError(f"out_dir: {out} exists and is not a directory")
        if (out / METADATA_FILE).is_file():
            try:
                old = read_metadata(out)
            except DataError:
                old = None
            if old is not None and old.get("fingerprint") == fp and not force:
                echo(f"{out}: up to date (fingerprint {fp[:12]}); use --force to rebuild")
                return PrepareResult(out, True, old, time.perf_counter() - t_start)
        elif any(out.iterdir()):
            raise DataError(
                f"out_dir: {out} exists and is not a prepared data directory; remove it or choose another out_dir"
            )

    with atomic_directory(out) as tmp:
        meta = _build(tmp, conf, source, fp, echo, progress, t_start)
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    wall = time.perf_counter() - t_start
    _summary(out, meta, wall, echo)
    return PrepareResult(out, False, meta, wall)


def _prepare_parts(
    out: Path,
    conf: Dict[str, Any],
    source: Source,
    files: List[Path],
    fp: str,
    tok_fp: str,
    force: bool,
    shard: Optional[int],
    progress: bool,
    echo: Callable[[str], None],
    t_start: float,
) -> PrepareResult:
    """The parts layout: up-to-date check, ``--force``, then :func:`data.parts.prepare_parts`."""
    from data.parts import PARTS_DIR, check_source, part_name, prepare_parts
    from data.shards import INDEX_DIR

    check_source(source)
    n = int(conf["parts"])
    if out.exists() and not out.is_dir():
        raise DataError(f"out_dir: {out} exists and is not a directory")
    if (out / METADATA_FILE).is_file():
        try:
            old: Optional[Dict[str, Any]] = json.loads((out / METADATA_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if old is not None and old.get("fingerprint") == fp and not force:
            echo(f"{out}: up to date (fingerprint {fp[:12]}); use --force to rebuild")
            return PrepareResult(out, True, old, time.perf_counter() - t_start)
        if old is not None and "layout" not in old:
            if not force:
                raise DataError(
                    f"out_dir: {out} holds a corpus prepared in one piece (data.parts: 0); remove it, "
                    f"choose another out_dir, or rebuild it in parts with --force"
                )
            shutil.rmtree(out)
        else:  # stale merged index: never mistaken for the new one
            (out / METADATA_FILE).unlink(missing_ok=True)
    elif out.is_dir() and any(out.iterdir()) and not (out / PARTS_DIR).is_dir():
        raise DataError(
            f"out_dir: {out} exists and is not a prepared data directory; remove it or choose another out_dir"
        )
    if force and out.is_dir():
        shutil.rmtree(out / INDEX_DIR, ignore_errors=True)
        if shard is None:
            shutil.rmtree(out / PARTS_DIR, ignore_errors=True)
        else:  # a SLURM array task: only its own part
            shutil.rmtree(out / PARTS_DIR / part_name(shard, n), ignore_errors=True)
    with sigterm_as_interrupt():
        meta = prepare_parts(out, conf, source, files, fp, tok_fp, shard, progress, echo, t_start)
    wall = time.perf_counter() - t_start
    if meta is None:
        return PrepareResult(out, False, {}, wall)
    _summary(out, meta, wall, echo)
    return PrepareResult(out, False, meta, wall)


def _build(
    tmp: Path,
    conf: Dict[str, Any],
    source: Union[Source, TokenSource],
    fp: str,
    echo: Callable[[str], None],
    progress: bool,
    t_start: float,
) -> Dict[str, Any]:

    tok_cfg = conf["tokenizer"]
    vf, tf = float(conf["validation_fraction"]), float(conf["test_fraction"])
    seed = int(conf["split_seed"])
    specials = [str(tok_cfg["eod_token"]), str(tok_cfg["pad_token"])]
    if specials[0] == specials[1]:
        raise DataError("tokenizer.eod_token and tokenizer.pad_token must differ")
    for key in ("batch_size", "shard_tokens"):
        if int(conf[key]) <= 0:
            raise DataError(f"{key}: must be > 0, got {conf[key]}")
    if isinstance(source, TokenSource):
        return _build_from_ids(tmp, conf, source, fp, specials, progress, t_start)
    timings: Dict[str, float] = {}

    # 1. read pass: split plan + tokenizer sample
    t = time.perf_counter()
    sample = None if tok_cfg.get("path") else TrainingSample(int(tok_cfg["train_max_bytes"]), seed)
    labels, read_stats = plan_pass(source, seed, vf, tf, sample, progress)
    timings["read_s"] = time.perf_counter() - t

    # 2. tokenizer
    t = time.perf_counter()
    if sample is not None:
        texts = sample.texts(keep=lambda i: labels[i] == TRAIN)
        tok = train_tokenizer(
            texts,
            int(tok_cfg["vocab_size"]),
            int(tok_cfg["min_frequency"]),
            specials,
            show_progress=progress,
            length=len(texts),
        )
        tok_origin: Dict[str, Any] = {
            "trained": True,
            "train_documents": len(texts),
            "train_bytes": sum(utf8_len(x) for x in texts),
        }
    else:
        tok, where = resolve_tokenizer(str(tok_cfg["path"]))
        tok_origin = {"trained": False, "from": where}
    (eod_id, pad_id), added = ensure_special_tokens(tok, specials)
    if added:
        tok_origin["added_special_tokens"] = added
    tokenizer_json = tok.to_str()
    (tmp / TOKENIZER_FILE).write_text(tokenizer_json, encoding="utf-8")
    sha = sha256_text(tokenizer_json)
    vocab = int(tok.get_vocab_size())
    if sample is not None and vocab < int(tok_cfg["vocab_size"]):
        echo(f"note: the corpus supports only {vocab} tokens (tokenizer.vocab_size={tok_cfg['vocab_size']})")
    dtype = token_dtype(vocab)
    timings["tokenizer_s"] = time.perf_counter() - t

    # 3. encode pass
    t = time.perf_counter()
    split_labels = [TRAIN, VALIDATION] + ([TEST] if tf > 0 else [])
    workers = int(conf.get("num_proc") or 0) or default_workers()
    encode_stats = ReadStats()
    splits = encode_to_shards(
        tmp,
        _labelled(source, labels, encode_stats),
        tokenizer_json,
        eod_id,
        dtype,
        int(conf["shard_tokens"]),
        split_labels,
        workers,
        int(conf["batch_size"]),
        progress=progress,
        total_bytes=read_stats.bytes,
    )
    timings["encode_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start

    description = {**source.describe(), "files_read": read_stats.files}
    return _metadata(
        conf,
        vocab,
        eod_id,
        pad_id,
        dtype,
        sha,
        specials,
        tok_origin,
        splits,
        description,
        read_stats,
        fp,
        workers,
        timings,
    )


def vocabulary_metadata(
    vocab: int, eod_id: int, pad_id: int, dtype: str, sha: str, specials: List[str], tok_origin: Dict[str, Any]
) -> Dict[str, Any]:
    """The ``metadata.json`` fields that describe the token ids and the tokenizer (prepared and streamed
    corpora alike); ``tok_origin``: where the tokenizer came from (``trained``, ``from``, ...)."""
    return {
        "vocab_size": vocab,
        "eod_id": eod_id,
        "pad_id": pad_id,
        "dtype": dtype,
        "tokenizer_sha256": sha,
        "tokenizer": {
            "file": TOKENIZER_FILE,
            "sha256": sha,
            "vocab_size": vocab,
            "eod_token": specials[0],
            "eod_id": eod_id,
            "pad_token": specials[1],
            "pad_id": pad_id,
            **tok_origin,
        },
    }


def _metadata(
    conf: Dict[str, Any],
    vocab: int,
    eod_id: int,
    pad_id: int,
    dtype: str,
    sha: str,
    specials: List[str],
    tok_origin: Dict[str, Any],
    splits: Dict[str, Any],
    description: Dict[str, Any],
    read_stats: ReadStats,
    fp: str,
    workers: int,
    timings: Dict[str, float],
) -> Dict[str, Any]:
    import lm

    return {
        "format": FORMAT,
        "name": conf.get("name"),
        **vocabulary_metadata(vocab, eod_id, pad_id, dtype, sha, specials, tok_origin),
        "splits": splits,
        "source": description,
        "documents": read_stats.documents,
        "bytes": read_stats.bytes,
        "empty_documents_skipped": read_stats.empty_skipped,
        "invalid_utf8_replaced": read_stats.replaced,
        "fingerprint": fp,
        "config": conf,
        "version": lm.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "encode": {"backend": ENCODE_BACKEND, "workers": workers},
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }


def _build_from_ids(
    tmp: Path,
    conf: Dict[str, Any],
    source: TokenSource,
    fp: str,
    specials: List[str],
    progress: bool,
    t_start: float,
) -> Dict[str, Any]:
    """Shards of a corpus that is token ids already (:mod:`data.pretokenized`): no tokenizer pass.

    ``tokenizer.path`` names the tokenizer the ids were made with (copied in, its special tokens
    added when missing; every id must be below its vocabulary size). Documents are split exactly
    like text documents (by their index); each gets an end-of-document id unless it ends with one.
    The corpus has no text, so ``bytes`` are 0 (no bits per byte).
    """
    if not conf["tokenizer"].get("path"):
        raise DataError(
            f"tokenizer.path: source.kind={source.kind} holds token ids; name the tokenizer they were made with "
            f"(a tokenizer.json path or a HF tokenizer name)"
        )
    vf, tf = float(conf["validation_fraction"]), float(conf["test_fraction"])
    seed = int(conf["split_seed"])
    timings: Dict[str, float] = {}
    t = time.perf_counter()
    tok, where = resolve_tokenizer(str(conf["tokenizer"]["path"]))
    (eod_id, pad_id), added = ensure_special_tokens(tok, specials)
    tok_origin: Dict[str, Any] = {"trained": False, "from": where}
    if added:
        tok_origin["added_special_tokens"] = added
    tokenizer_json = tok.to_str()
    (tmp / TOKENIZER_FILE).write_text(tokenizer_json, encoding="utf-8")
    vocab = int(tok.get_vocab_size())
    dtype = token_dtype(vocab)
    timings["tokenizer_s"] = time.perf_counter() - t

    t = time.perf_counter()
    stats = ReadStats()
    n = sum(1 for _ in source.token_documents())
    if n == 0:
        raise DataError(f"empty corpus: the source ({source.kind}, {', '.join(source.paths)}) holds no documents")
    labels = assign_splits([unit_hash(seed, SPLIT_SALT, i) for i in range(n)], vf, tf)
    timings["read_s"] = time.perf_counter() - t

    t = time.perf_counter()
    split_labels = [TRAIN, VALIDATION] + ([TEST] if tf > 0 else [])
    writers = {label: SplitWriter(tmp, SPLITS[label], dtype, int(conf["shard_tokens"])) for label in split_labels}
    eod = np.array([eod_id], dtype=np.int64)
    try:
        with _bar(progress, desc="copying ids", unit="doc", total=n) as bar:
            for i, ids in enumerate(source.token_documents(stats)):
                if int(ids.max()) >= vocab:
                    raise DataError(
                        f"{', '.join(source.paths)}: document {i} holds id {int(ids.max())}, outside the "
                        f"tokenizer's vocabulary of {vocab} (tokenizer.path={conf['tokenizer']['path']})"
                    )
                if ids[-1] != eod_id:
                    ids = np.concatenate([ids, eod])
                writers[int(labels[i])].add(ids, np.array([len(ids)], dtype=np.int64))
                bar.update(1)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    splits = {SPLITS[label]: w.close() for label, w in writers.items()}
    timings["encode_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start
    description = {**source.describe(), "files_read": len(source.files())}
    return _metadata(
        conf,
        vocab,
        eod_id,
        pad_id,
        dtype,
        sha256_text(tokenizer_json),
        specials,
        tok_origin,
        splits,
        description,
        stats,
        fp,
        1,
        timings,
    )


def _summary(out: Path, meta: Dict[str, Any], wall: float, echo: Callable[[str], None]) -> None:
    src = meta["source"]
    tm = meta["timings"]
    echo(
        f"prepared {out} in {wall:.1f} s (read {tm['read_s']:.1f} s, tokenizer "
        f"{tm['tokenizer_s']:.1f} s, encode {tm['encode_s']:.1f} s)"
    )
    echo(
        f"  source: {src['kind']}, {src.get('files_read', 0)} of {src.get('files', 0)} files read, "
        f"{meta['documents']} documents, "
        f"{_fmt_bytes(meta['bytes'])}, {meta['invalid_utf8_replaced']} invalid UTF-8 sequences replaced"
    )
    echo(
        f"  tokenizer: vocab {meta['vocab_size']}, eod {meta['eod_id']}, pad {meta['pad_id']}, "
        f"{meta['dtype']}, sha256 {meta['tokenizer_sha256'][:16]}"
    )
    echo(f"  {'split':<11}{'documents':>10}{'tokens':>13}{'bytes':>13}{'bytes/token':>13}")
    for name, s in meta["splits"].items():
        bpt = f"{s['bytes_per_token']:.3f}" if s["bytes_per_token"] else "-"
        echo(f"  {name:<11}{s['documents']:>10,}{s['tokens']:>13,}{s['bytes']:>13,}{bpt:>13}")
    warning = small_split_warning(meta)
    if warning:
        echo(warning)
