"""Weighted mixtures of corpora (``data.sources``): preparing them and their combined directory.

A mixture lists sources ``{name, weight, source}``. Each is prepared exactly like a single
``data.source`` (same keys: split fractions and seed, shard size, ``parts``, ...) into
``<out_dir>/<name>/``. The tokenizer is shared: ``tokenizer.path`` if set, else the one trained on
the first source, given to the others as their ``tokenizer.path``. Layout::

    <out_dir>/<name>/...                 every source: an ordinary prepared directory
    <out_dir>/index/<split>_doc_starts.npy
    <out_dir>/metadata.json              the sources' splits one after the other (a valid prepared
                                         directory: evaluation tools read it as one corpus) plus
                                         "mixture": [{name, weight, dir, windows...}] (written last)

Training draws windows from the sources in proportion to their weights
(:class:`data.sampler.MixtureBatchSampler`); validation reports each source and the pooled
windows of all (:class:`data.mixture_metrics.MixtureMetrics`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from lm.errors import DataError

from data.atomic import write_atomic
from data.shards import INDEX_DIR, METADATA_FILE, merge_splits

MIXTURE_FORMAT = "lm-token-mixture/1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: names a source cannot take (they are files or directories of the combined layout)
RESERVED = (INDEX_DIR, METADATA_FILE, "train", "validation", "test")


def check_sources(sources: List[Dict[str, Any]]) -> None:
    """One-line DataErrors for names (unique, plain) and weights (> 0)."""
    seen = set()
    for i, entry in enumerate(sources):
        name = str(entry.get("name") or "")
        if not _NAME.match(name) or name in RESERVED:
            raise DataError(
                f"data.sources[{i}].name: '{name}' must be a plain directory name (letters, digits, _ . -), "
                f"not one of {', '.join(RESERVED)}"
            )
        if name in seen:
            raise DataError(f"data.sources[{i}].name: '{name}' is used twice")
        seen.add(name)
        weight = float(entry.get("weight", 1.0))
        if not weight > 0:
            raise DataError(f"data.sources[{i}].weight: must be > 0, got {weight}")
    if not sources:
        raise DataError("data.sources: empty")


def source_config(conf: Dict[str, Any], entry: Dict[str, Any], tokenizer_path: Optional[str]) -> Dict[str, Any]:
    """The single-source data config that prepares one mixture entry."""
    sub = copy.deepcopy({k: v for k, v in conf.items() if k != "sources"})
    sub["name"] = str(entry["name"])
    sub["source"] = copy.deepcopy(entry["source"])
    sub["out_dir"] = str(Path(conf["out_dir"]) / str(entry["name"]))
    if tokenizer_path is not None:
        sub["tokenizer"] = {**sub["tokenizer"], "path": tokenizer_path}
    return sub


def prepare_mixture(
    conf: Dict[str, Any], force: bool, echo: Callable[[str], None], progress: bool, t_start: float
) -> Any:
    """Prepare every source, then write the combined ``metadata.json`` (see the module docstring)."""
    from data.prepare import PrepareResult, prepare

    sources = [dict(s) for s in conf["sources"]]
    check_sources(sources)
    out = Path(conf["out_dir"])
    if (out / METADATA_FILE).is_file():
        try:
            old = json.loads((out / METADATA_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        if "mixture" not in old:
            if not force:
                raise DataError(
                    f"out_dir: {out} holds a single prepared corpus; remove it, choose another out_dir, "
                    f"or rebuild it as a mixture with --force"
                )
            shutil.rmtree(out)
    elif out.is_dir():
        ours = {str(s["name"]) for s in sources} | {INDEX_DIR}
        strangers = [p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith(".")]
        if strangers:
            raise DataError(
                f"out_dir: {out} exists and is not a prepared mixture (it holds {strangers[0]}); remove it or "
                f"choose another out_dir"
            )
    tokenizer_path: Optional[str] = conf["tokenizer"].get("path")
    metas = []
    for i, entry in enumerate(sources):
        echo(f"source {i + 1}/{len(sources)}: {entry['name']} (weight {float(entry.get('weight', 1.0)):g})")
        result = prepare(source_config(conf, entry, tokenizer_path), force=force, echo=echo, progress=progress)
        meta = result.metadata
        if tokenizer_path is None:  # the first source trained it: the others encode with it
            tokenizer_path = str(out / str(entry["name"]) / meta["tokenizer"]["file"])
        metas.append(meta)
    shas = {m["tokenizer_sha256"] for m in metas}
    if len(shas) != 1:
        raise DataError(f"data.sources: the sources were tokenized differently ({len(shas)} tokenizers)")
    weights = [float(s.get("weight", 1.0)) for s in sources]
    fp = hashlib.sha256(
        json.dumps([[s["name"], w, m["fingerprint"]] for s, w, m in zip(sources, weights, metas)]).encode()
    ).hexdigest()
    if (out / METADATA_FILE).is_file() and not force:
        old = json.loads((out / METADATA_FILE).read_text(encoding="utf-8"))
        if old.get("fingerprint") == fp:
            echo(f"{out}: mixture up to date (fingerprint {fp[:12]})")
            return PrepareResult(out, True, old, time.perf_counter() - t_start)
    (out / METADATA_FILE).unlink(missing_ok=True)
    splits = merge_splits(out, [(f"{s['name']}/", m["splits"]) for s, m in zip(sources, metas)])
    first = metas[0]
    tokenizer = {**first["tokenizer"], "file": f"{sources[0]['name']}/{first['tokenizer']['file']}"}
    meta = {
        **{k: first[k] for k in ("format", "vocab_size", "eod_id", "pad_id", "dtype", "tokenizer_sha256")},
        "name": conf.get("name"),
        "tokenizer": tokenizer,
        "splits": splits,
        "source": {"kind": "mixture", "sources": [s["name"] for s in sources], "files": 0, "files_read": 0},
        "documents": sum(int(m["documents"]) for m in metas),
        "bytes": sum(int(m["bytes"]) for m in metas),
        "empty_documents_skipped": sum(int(m.get("empty_documents_skipped", 0)) for m in metas),
        "invalid_utf8_replaced": sum(int(m.get("invalid_utf8_replaced", 0)) for m in metas),
        "mixture": [
            {"name": s["name"], "weight": w, "share": w / sum(weights), "dir": s["name"]}
            for s, w in zip(sources, weights)
        ],
        "fingerprint": fp,
        "config": conf,
        "version": first.get("version"),
        "created": first.get("created"),
        "timings": {"total_s": round(time.perf_counter() - t_start, 3)},
    }
    write_atomic(out / METADATA_FILE, json.dumps(meta, indent=2) + "\n")
    wall = time.perf_counter() - t_start
    shares = ", ".join(f"{m['name']} {m['share']:.1%}" for m in meta["mixture"])
    echo(f"prepared mixture {out} in {wall:.1f} s: {shares}")
    return PrepareResult(out, False, meta, wall)
