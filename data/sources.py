"""Corpus readers: every source yields :class:`Document` objects in a fixed, repeatable order.

Kinds (``data.source.kind``):

- ``stdlib``   the ``*.py`` files of the running Python's standard library (no ``site-packages`` /
  ``dist-packages``), sorted by relative path, one document per file;
- ``text``     local files, globs or directories in ``paths``; one document per file, per
  blank-line separated block with ``split_by: blank_line``, or per piece between matches of
  ``split_regex`` with ``split_by: regex`` (default: WikiText-style article headings);
- ``json`` / ``jsonl`` / ``parquet`` / ``csv``  local files read with HF ``datasets``' builders,
  the text in ``text_field``, one document per row;
- ``megatron`` / ``hf_tokens``  token ids already (:mod:`data.pretokenized`: GPT-NeoX/Megatron
  ``.bin``/``.idx`` pairs, HF datasets with an ``input_ids`` column); not text, never re-tokenized;
- ``hf``       a dataset on the HF hub (``hf_name``, ``hf_config``, ``hf_split``, ``streaming``), or,
  with ``paths``, local files read by the ``datasets`` builder ``hf_name`` (``data_files=paths``).

Reading the same source twice yields the same documents (the pipeline reads twice: once to plan
the split and sample the tokenizer's training text, once to encode). Whitespace-only documents are
dropped; ``max_documents`` / ``max_bytes`` keep the first documents in source order.
"""

from __future__ import annotations

import abc
import codecs
import glob
import os
import re
import sysconfig
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Type

from lm.errors import DataError

#: directories of the standard library that hold third-party packages, not the stdlib itself
STDLIB_EXCLUDE = ("site-packages", "dist-packages")
#: ``kind`` -> the HF ``datasets`` builder that reads it
DATASETS_BUILDERS = {"json": "json", "jsonl": "json", "parquet": "parquet", "csv": "csv"}
_GLOB_CHARS = re.compile(r"[*?\[]")
_BLANK_LINES = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")


@dataclass
class Document:
    """One document: its text and the number of UTF-8 bytes of that text."""

    text: str
    nbytes: int


@dataclass
class ReadStats:
    """What one pass over a source saw (documents and bytes after filtering and caps)."""

    files: int = 0
    documents: int = 0
    bytes: int = 0
    replaced: int = 0  # invalid UTF-8 sequences replaced by U+FFFD
    empty_skipped: int = 0


# ------------------------------------------------------------------------------- UTF-8 decoding

_REPLACED = [0, 0]  # invalid sequences, invalid bytes


def _count_and_replace(exc: UnicodeError) -> Tuple[str, int]:
    assert isinstance(exc, UnicodeDecodeError)  # the handler of decode_utf8's raw.decode only
    _REPLACED[0] += 1
    _REPLACED[1] += exc.end - exc.start
    return "\ufffd", exc.end


codecs.register_error("data.count_replace", _count_and_replace)


def decode_utf8(raw: bytes, path: Path, errors: str, stats: ReadStats, max_invalid: float = 1.0) -> str:
    """Decode ``raw``; ``errors='replace'`` counts replaced sequences, ``'fail'`` raises a DataError.

    With ``replace``, a file whose share of invalid bytes is above ``max_invalid`` (a binary file,
    not text) is a DataError naming the share and ``source.max_invalid_utf8``.
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if errors == "fail":
            raise DataError(
                f"{path}: invalid UTF-8 at byte {e.start} (source.encoding_errors=fail; "
                f"use 'replace' to substitute U+FFFD)"
            ) from None
    before, before_bytes = _REPLACED
    text = raw.decode("utf-8", "data.count_replace")
    stats.replaced += _REPLACED[0] - before
    share = (_REPLACED[1] - before_bytes) / max(1, len(raw))
    if share > max_invalid:
        raise DataError(
            f"{path}: {share:.1%} of its bytes are invalid UTF-8 (limit source.max_invalid_utf8={max_invalid:g}): "
            f"not a text file? remove it from source.paths, or raise source.max_invalid_utf8 (1.0 accepts anything)"
        )
    return text


def utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


# ---------------------------------------------------------------------------------- local paths


def expand_paths(patterns: List[str]) -> List[Path]:
    """Files named by ``patterns`` (files, globs, directories), in the order given, each once.

    Globs and directories expand to their files in sorted order; hidden files inside directories
    are skipped. A missing file or a glob matching nothing is a one-line DataError.
    """
    if not patterns:
        raise DataError("source.paths: no files given; set e.g. source.paths=[corpus.txt]")
    seen: Dict[Path, None] = {}
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        if _GLOB_CHARS.search(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"source.paths: '{pattern}' matches no files")
            found = [Path(p) for p in matches]
        else:
            path = Path(pattern)
            if path.is_dir():
                found = sorted(
                    p
                    for p in path.rglob("*")
                    if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
                )
                if not found:
                    raise DataError(f"source.paths: directory '{pattern}' contains no files")
            elif path.is_file():
                found = [path]
            else:
                raise DataError(f"source.paths: file not found: {pattern}")
        for p in found:
            seen.setdefault(p, None)
    return list(seen)


def stdlib_files() -> List[Path]:
    """The standard library's ``*.py`` files, without site-/dist-packages, sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files: List[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDE and d != "__pycache__"]
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


# -------------------------------------------------------------------------------------- sources


class Source(abc.ABC):
    """A corpus described by a ``data.source`` config section (a plain mapping)."""

    def __init__(self, cfg: Mapping[str, Any]):
        self.cfg = dict(cfg)
        self.kind = str(self.cfg.get("kind", "stdlib"))
        self.max_documents: Optional[int] = self.cfg.get("max_documents")
        self.max_bytes: Optional[int] = self.cfg.get("max_bytes")
        for key in ("max_documents", "max_bytes"):
            value = self.cfg.get(key)
            if value is not None and value <= 0:
                raise DataError(f"source.{key}: must be > 0 (or null for no cap), got {value}")
        self._files: Optional[List[Path]] = None

    # -- what the source is made of
    def files(self) -> List[Path]:
        """Local files this source reads, in reading order (empty for the HF hub)."""
        if self._files is None:
            self._files = self._list_files()
        return self._files

    def _list_files(self) -> List[Path]:
        return []

    def describe(self) -> Dict[str, Any]:
        """A JSON-able description for ``metadata.json``."""
        return {"kind": self.kind, "files": len(self.files())}

    # -- reading
    @abc.abstractmethod
    def _raw_documents(self, stats: ReadStats) -> Iterator[str]:
        """The source's documents as raw text, in source order (read problems counted in ``stats``)."""

    def documents(self, stats: Optional[ReadStats] = None) -> Iterator[Document]:
        """Yield documents in source order; whitespace-only ones dropped, caps applied."""
        stats = stats if stats is not None else ReadStats()
        for text in self._raw_documents(stats):
            if not text or text.isspace():
                stats.empty_skipped += 1
                continue
            if self.max_documents is not None and stats.documents >= self.max_documents:
                return
            nbytes = utf8_len(text)
            if self.max_bytes is not None and stats.bytes + nbytes > self.max_bytes:
                return
            stats.documents += 1
            stats.bytes += nbytes
            yield Document(text, nbytes)


class _FileSource(Source):
    """Sources made of local files, read one after the other."""

    def _read_text(self, path: Path, stats: ReadStats) -> str:
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
        stats.files += 1
        return decode_utf8(
            raw,
            path,
            str(self.cfg.get("encoding_errors", "replace")),
            stats,
            float(self.cfg.get("max_invalid_utf8", 1.0)),
        )


class StdlibSource(_FileSource):
    """The Python standard library's own source files: ~30 MB of real text, no network needed."""

    def _list_files(self) -> List[Path]:
        files = stdlib_files()
        if not files:
            raise DataError(f"source.kind=stdlib: no *.py files under {sysconfig.get_paths()['stdlib']}")
        return files

    def describe(self) -> Dict[str, Any]:
        return {
            "kind": "stdlib",
            "root": sysconfig.get_paths()["stdlib"],
            "exclude": list(STDLIB_EXCLUDE),
            "files": len(self.files()),
        }

    def _raw_documents(self, stats: ReadStats) -> Iterator[str]:
        for path in self.files():
            yield self._read_text(path, stats)


class TextSource(_FileSource):
    """Local text files: a document per file, or per blank-line separated block."""

    def _list_files(self) -> List[Path]:
        return expand_paths(list(self.cfg.get("paths") or []))

    def describe(self) -> Dict[str, Any]:
        out = {
            "kind": "text",
            "paths": list(self.cfg.get("paths") or []),
            "split_by": self.cfg.get("split_by", "file"),
            "files": len(self.files()),
        }
        if out["split_by"] == "regex":
            out["split_regex"] = self._regex().pattern
        return out

    def _regex(self) -> "re.Pattern":
        pattern = str(self.cfg.get("split_regex") or "")
        try:
            return re.compile(pattern)
        except re.error as e:
            raise DataError(f"source.split_regex: invalid regular expression {pattern!r} ({e})") from None

    def _raw_documents(self, stats: ReadStats) -> Iterator[str]:
        split_by = self.cfg.get("split_by", "file")
        splitter = _BLANK_LINES if split_by == "blank_line" else self._regex() if split_by == "regex" else None
        for path in self.files():
            text = self._read_text(path, stats)
            if splitter is not None:
                yield from splitter.split(text)
            else:
                yield text


@contextmanager
def _quiet_datasets():
    """Silence HF ``datasets``' progress bars and info logs while reading, then restore them."""
    import datasets
    from datasets.utils import logging as ds_logging

    bars_were_off = datasets.is_progress_bar_enabled() is False
    level = ds_logging.get_verbosity()
    datasets.disable_progress_bars()
    ds_logging.set_verbosity_error()
    try:
        yield datasets
    finally:
        ds_logging.set_verbosity(level)
        if not bars_were_off:
            datasets.enable_progress_bars()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _rows_text(rows: Iterator[Mapping[str, Any]], field: str, where: str) -> Iterator[str]:
    for i, row in enumerate(rows):
        if field not in row:
            raise DataError(
                f"{where}: row {i} has no field '{field}' (source.text_field); "
                f"columns: {', '.join(map(str, row.keys()))}"
            )
        value = row[field]
        if value is None:
            yield ""
        elif isinstance(value, str):
            yield value
        else:
            raise DataError(f"{where}: row {i}: field '{field}' holds {type(value).__name__}, expected text")


class DatasetsFileSource(Source):
    """Local json / jsonl / parquet / csv files, read file by file with HF ``datasets``."""

    def _list_files(self) -> List[Path]:
        return expand_paths(list(self.cfg.get("paths") or []))

    def describe(self) -> Dict[str, Any]:
        return {
            "kind": self.kind,
            "paths": list(self.cfg.get("paths") or []),
            "text_field": self.cfg.get("text_field", "text"),
            "files": len(self.files()),
        }

    def _raw_documents(self, stats: ReadStats) -> Iterator[str]:
        field = str(self.cfg.get("text_field", "text"))
        builder = DATASETS_BUILDERS[self.kind]
        for path in self.files():
            with _quiet_datasets() as datasets:
                try:
                    ds = datasets.load_dataset(builder, data_files=str(path), split="train")
                except Exception as e:  # the builders raise many types; report the first line
                    raise DataError(f"{path}: cannot read as {self.kind}: {_first_line(e)}") from None
            stats.files += 1
            if field not in ds.column_names:
                raise DataError(
                    f"{path}: no field '{field}' (source.text_field); columns: {', '.join(ds.column_names) or '(none)'}"
                )
            batches = ds.select_columns([field]).iter(batch_size=1024)
            # one row stream per file, so an error names the row's index in the file
            yield from _rows_text(({field: v} for batch in batches for v in batch[field]), field, str(path))


class HubSource(Source):
    """A dataset on the HF hub; fails with one line when it cannot be reached (offline).

    With ``paths``, ``hf_name`` is a ``datasets`` builder (``parquet``, ``json``, ``csv``, ``text``, ...)
    reading exactly those local files (``load_dataset(hf_name, data_files=paths)``), never the
    current directory.
    """

    def _list_files(self) -> List[Path]:
        return expand_paths(list(self.cfg.get("paths") or [])) if self.cfg.get("paths") else []

    def describe(self) -> Dict[str, Any]:
        out = {
            "kind": "hf",
            "name": self.cfg.get("hf_name"),
            "config": self.cfg.get("hf_config"),
            "split": self.cfg.get("hf_split", "train"),
            "streaming": bool(self.cfg.get("streaming", False)),
            "files": len(self.files()),
        }
        if self.files():
            out["paths"] = list(self.cfg.get("paths") or [])
        return out

    def _raw_documents(self, stats: ReadStats) -> Iterator[str]:
        name = self.cfg.get("hf_name")
        if not name:
            raise DataError("source.hf_name: required for source.kind=hf (e.g. source.hf_name=wikitext)")
        config = self.cfg.get("hf_config")
        split = self.cfg.get("hf_split", "train")
        field = str(self.cfg.get("text_field", "text"))
        files = [str(p) for p in self.files()]
        where = (
            f"HF dataset '{name}'"
            + (f" ({config})" if config else "")
            + f" split '{split}'"
            + (f" of {len(files)} local file(s) ({files[0]}{', ...' if len(files) > 1 else ''})" if files else "")
        )
        with _quiet_datasets() as datasets:
            try:
                ds = datasets.load_dataset(
                    name,
                    config,
                    split=split,
                    data_files=files or None,
                    streaming=bool(self.cfg.get("streaming", False)),
                )
            except Exception as e:
                offline = any(
                    os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                    for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
                )
                hint = " [offline: HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set]" if offline else ""
                raise DataError(f"source.hf_name: cannot load {where}: {_first_line(e)}{hint}") from None
        columns = getattr(ds, "column_names", None)
        if columns is not None and field not in columns:
            raise DataError(f"{where}: no field '{field}' (source.text_field); columns: {', '.join(columns)}")
        stats.files = len(files)
        yield from _rows_text(iter(ds), field, where)


#: kinds whose documents are token ids already (data.pretokenized), prepared without a tokenizer pass
TOKEN_KINDS = ("megatron", "hf_tokens")

_KINDS: Dict[str, Type[Source]] = {
    "stdlib": StdlibSource,
    "text": TextSource,
    "json": DatasetsFileSource,
    "jsonl": DatasetsFileSource,
    "parquet": DatasetsFileSource,
    "csv": DatasetsFileSource,
    "hf": HubSource,
}


def open_source(cfg: Mapping[str, Any]) -> Source:
    """The :class:`Source` for a ``data.source`` section."""
    kind = str(cfg.get("kind", "stdlib"))
    if kind == "task":
        raise DataError(
            "source.kind=task: synthetic tasks are generated during training (data.tasks); there is nothing to prepare"
        )
    if kind in TOKEN_KINDS:
        from data.pretokenized import TokenSource

        return TokenSource(cfg)  # type: ignore[return-value]  # prepare tells the two apart
    if kind not in _KINDS:
        raise DataError(f"source.kind: unknown kind '{kind}'; choose one of: {', '.join([*_KINDS, *TOKEN_KINDS])}")
    return _KINDS[kind](cfg)
