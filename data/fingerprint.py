"""The fingerprint that decides whether a prepared directory is up to date.

``sha256`` over the resolved data config (minus keys that do not change the output: ``out_dir``,
``num_proc``, ``batch_size``, ``task``, ``task_output``, ``source.max_invalid_utf8``, ``source.split_regex``
unless ``split_by: regex``; keys newer than the format while they hold their defaults:
:data:`NEUTRAL_DEFAULTS`), every source file's path, size and modification time, and the
content hash of a local ``tokenizer.path``. Same fingerprint -> ``lm data prepare`` skips.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

#: data-config keys that do not change what is written (where, how fast; ``task`` is only used
#: by ``source.kind: task``, which is never prepared)
NOT_IN_FINGERPRINT = ("out_dir", "num_proc", "batch_size", "task", "task_output")
#: source keys that only decide whether preparation fails (a prepared directory stays valid)
SOURCE_NOT_IN_FINGERPRINT = ("max_invalid_utf8",)
#: keys added after directories were prepared: left out while they hold these defaults, so an existing
#: directory keeps its fingerprint (and is not rebuilt) until one of them is set
NEUTRAL_DEFAULTS: Dict[str, Any] = {"parts": 0, "budget_bytes": None, "sources": [], "streaming": False}
SOURCE_NEUTRAL_DEFAULTS: Dict[str, Any] = {"ids_field": "input_ids"}


def file_signature(files: List[Path]) -> List[List[Any]]:
    """``[path, size, mtime_ns]`` for each file, in order."""
    out = []
    for p in files:
        st = p.stat()
        out.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return out


def fingerprint(config: Mapping[str, Any], files: List[Path], tokenizer_sha: Optional[str] = None) -> str:
    """The hash of what determines a prepared directory's content (see module docstring)."""
    relevant: Dict[str, Any] = {
        k: v
        for k, v in config.items()
        if k not in NOT_IN_FINGERPRINT and not (k in NEUTRAL_DEFAULTS and v == NEUTRAL_DEFAULTS[k])
    }
    if isinstance(relevant.get("source"), Mapping):
        source = {
            k: v
            for k, v in relevant["source"].items()
            if k not in SOURCE_NOT_IN_FINGERPRINT
            and not (k in SOURCE_NEUTRAL_DEFAULTS and v == SOURCE_NEUTRAL_DEFAULTS[k])
        }
        if source.get("split_by") != "regex":  # the regex only matters when it splits
            source.pop("split_regex", None)
        relevant["source"] = source
    payload = {"config": relevant, "files": file_signature(files), "tokenizer_sha256": tokenizer_sha}
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
