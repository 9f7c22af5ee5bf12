"""What every evaluation command shares: opening a checkpoint with its tokenizer, model facts
(recurrent or KV cache, training length), state surgery for batching, and atomic result files."""

from __future__ import annotations

import json
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from lm.models.mixer import state_bytes  # noqa: F401  (re-exported for evaluation code)

from data.atomic import write_atomic  # noqa: F401  (re-exported: evaluation writers import it from here)
from lm.errors import LMError
from lm.training.export import LoadedModel, load_model


@dataclass
class Checkpoint:
    """A loaded model and what evaluation needs around it."""

    loaded: LoadedModel
    path: str
    _tokenizer: Any = field(default=None, init=False, repr=False)

    @property
    def model(self):
        return self.loaded.model

    @property
    def config(self) -> Dict[str, Any]:
        return self.loaded.config

    @property
    def family(self) -> str:
        return str(self.config["model"]["family"])

    @property
    def variant(self) -> str:
        return str(self.loaded.model.cfg.variant)

    @property
    def recurrent(self) -> bool:
        """True when the state has a constant size (every family but the Transformer's KV cache)."""
        return all(block.mixer.constant_state for block in self.loaded.model.blocks)

    @property
    def max_seq_len(self) -> int:
        return int(self.loaded.model.cfg.max_seq_len)

    @property
    def train_seq_len(self) -> int:
        return int(self.config.get("train", {}).get("seq_len", 0) or 0)

    @property
    def task_trained(self) -> bool:
        return self.config.get("data", {}).get("source", {}).get("kind") == "task"

    @property
    def name(self) -> str:
        """``family/variant``, or ``hybrid[family/variant:count,...]`` (``LanguageModel.name``)."""
        name = getattr(self.loaded.model, "name", None)
        return str(name) if isinstance(name, str) else f"{self.family}/{self.variant}"

    def tokenizer(self):
        """The checkpoint's tokenizer, loaded once (one-line error when it has none)."""
        from data.tokenizer import load_tokenizer

        if self._tokenizer is None:
            path = self.loaded.tokenizer_path
            if path is None or not Path(path).is_file():
                why = "it was trained on a synthetic task" if self.task_trained else f"{path} is missing"
                raise LMError(f"{self.path}: the checkpoint has no tokenizer ({why})")
            self._tokenizer = load_tokenizer(path)
        return self._tokenizer

    def task(self, name: str):
        """The suite task ``name`` for this checkpoint: the task it was trained on (with its
        parameters) for task-trained checkpoints, else ``name`` with default parameters."""
        from data.tasks import build_task, task_from_config

        return task_from_config(self.config["data"]) if self.task_trained else build_task(name, {})

    def eod_id(self, tokenizer) -> int:
        """The end-of-document id: the data config's ``eod_token`` in the tokenizer."""
        token = self.config.get("data", {}).get("tokenizer", {}).get("eod_token", "<|endoftext|>")
        eod = tokenizer.token_to_id(token)
        if eod is None:
            raise LMError(f"{self.path}: the tokenizer has no end-of-document token {token!r}")
        return int(eod)

    def data_dir(self) -> Optional[Path]:
        """The training data directory, if it still exists: the config's ``data.out_dir`` (relative
        to the working directory), else the absolute path the checkpoint recorded."""
        from data.shards import METADATA_FILE

        out = self.config.get("data", {}).get("out_dir")
        for candidate in (Path(out) if out else None, self.loaded.data_dir):
            if candidate is not None and (candidate / METADATA_FILE).is_file():
                return candidate
        return None

    def default_out_dir(self, name: str) -> Path:
        """``<run dir>/eval/<name>`` for checkpoints (never inside a checkpoint), ``<export>/eval/<name>``.

        One-line error naming ``--out`` when that run is live (being trained) or not writable.
        """
        from lm.training.run_lock import check_output_dir

        source = Path(self.loaded.source)
        if (source / "manifest.json").is_file() and source.parent.name == "checkpoints":
            target = source.parent.parent / "eval" / name
        else:
            target = source / "eval" / name
        check_output_dir(target)
        return target


def open_checkpoint(path: str, device: str = "cpu") -> Checkpoint:
    """A checkpoint, export or run directory, loaded in eval mode (one-line error if unusable)."""
    if not Path(path).exists():
        raise LMError(f"checkpoint not found: {path}")
    try:
        loaded = load_model(path, device)
    except LMError:
        raise
    except (OSError, KeyError, ValueError) as e:
        raise LMError(
            f"{path}: cannot load a model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    return Checkpoint(loaded, str(path))


# ------------------------------------------------------------------------------------- states


def map_state(state: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor of a model state (nested lists, tuples and dicts)."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, dict):
        return {k: map_state(v, fn) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(map_state(v, fn) for v in state)
    return state


def select_state(state: Any, index: torch.Tensor) -> Any:
    """The rows ``index`` [N] of a batch-first state (repeats allowed: branching a prefix)."""
    return map_state(state, lambda t: t.index_select(0, index.to(t.device)))


# ----------------------------------------------------------------------------------- results


def write_json(path: Path, obj: Any) -> Path:
    return write_atomic(path, json.dumps(obj, indent=1, default=float) + "\n")


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def parse_list(value: Optional[str], what: str) -> List[str]:
    """``"a,b, c"`` -> ``["a", "b", "c"]`` (empty entries dropped)."""
    if value is None:
        return []
    items = [v.strip() for v in str(value).split(",") if v.strip()]
    if not items:
        raise LMError(f"{what}: expected a comma-separated list, got {value!r}")
    return items
