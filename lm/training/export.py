"""Consolidated weights for use without DeepSpeed or Lightning, and loading models for evaluation.

``lm export <checkpoint> <dir>`` writes ``<dir>/model.safetensors`` (fp32, keys of
:class:`~lm.models.lm.LanguageModel`), ``config.yaml`` (the resolved experiment config),
``tokenizer.json`` and ``export.json`` (step, parameter count, tokenizer hash, source).
:func:`load_model` opens an export, a checkpoint directory, or a run directory; :func:`warm_start`
copies their weights into a new run's model (``init_from``).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import yaml
from safetensors.torch import load_file, save_file

from data.atomic import atomic_directory
from lm.errors import LMError
from lm.models import build_model
from lm.models.lm import LanguageModel
from lm.training.checkpoint import RUN_TOKENIZER, STATE, read_manifest, resolve_checkpoint

WEIGHTS = "model.safetensors"


@dataclass
class LoadedModel:
    model: LanguageModel
    config: Dict[str, Any]
    tokenizer_path: Optional[Path]
    tokenizer_sha256: Optional[str]
    step: int
    source: Path
    data_dir: Optional[Path] = None  # the prepared corpus a checkpoint was trained on (absolute), if recorded


def _strip(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Lightning module keys ``model.*`` -> LanguageModel keys; drop metric buffers."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("_forward_module.").removeprefix("module.")
        if key.startswith("model."):
            out[key[len("model.") :]] = value
    return out


def checkpoint_state_dict(ckpt_dir: Path) -> Dict[str, torch.Tensor]:
    """fp32 model weights from a checkpoint (consolidating DeepSpeed ZeRO shards when needed)."""
    state_path = ckpt_dir / STATE
    if state_path.is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(state_path), tag="checkpoint")
    else:
        state = torch.load(state_path, map_location="cpu", weights_only=False)["state_dict"]
    return {k: v.float().contiguous() for k, v in _strip(state).items()}


def ordinary_modes(directory: Path) -> None:
    """Give ``directory`` and the files in it the modes a plain ``mkdir``/``open`` would (0755 / 0644
    under umask 022): a temporary directory is 0700 and copied files keep their source's mode."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def check_out_dir(out: Path) -> None:
    """A new directory or an empty one (one-line error otherwise)."""
    if out.exists() and not out.is_dir():
        raise LMError(f"export directory {out} is an existing file; name a new directory")
    if out.exists() and any(out.iterdir()):
        raise LMError(f"export directory {out} exists and is not empty; name a new directory")


def write_export_dir(out: Path, fill: Callable[[Path], None]) -> Path:
    """``fill(tmp_dir)`` into a temporary sibling directory, give it ordinary modes and rename it to ``out``
    (a new or empty directory: :func:`check_out_dir`); nothing is left behind on failure."""
    check_out_dir(out)
    with atomic_directory(out) as tmp:
        fill(tmp)
        ordinary_modes(tmp)
    return out


def export_checkpoint(checkpoint: str, out_dir: str) -> Path:
    """Write an export directory atomically (temporary directory, then rename)."""
    out = Path(out_dir)
    check_out_dir(out)
    ckpt_dir = resolve_checkpoint(checkpoint)
    manifest = read_manifest(ckpt_dir)
    state = checkpoint_state_dict(ckpt_dir)

    def fill(tmp: Path) -> None:
        save_file(state, str(tmp / WEIGHTS), metadata={"step": str(manifest["step"])})
        (tmp / "config.yaml").write_text(yaml.safe_dump(manifest["config"], sort_keys=False))
        tok = manifest.get("tokenizer", {})
        tok_path = Path(tok.get("path", "")) if tok.get("path") else None
        if tok_path is not None and tok_path.is_file():
            shutil.copyfile(tok_path, tmp / "tokenizer.json")
        info = {
            "step": manifest["step"],
            "source": str(ckpt_dir),
            "parameters": sum(v.numel() for v in state.values()),
            "tokenizer_sha256": tok.get("sha256"),
        }
        (tmp / "export.json").write_text(json.dumps(info, indent=1))

    return write_export_dir(out, fill)


def load_weights(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], Dict[str, Any]]:
    """fp32 model weights, the experiment config and source facts (tokenizer path and sha256, step,
    source) from an export directory, a checkpoint directory or a run directory."""
    p = Path(path)
    if (p / WEIGHTS).is_file():
        config = yaml.safe_load((p / "config.yaml").read_text())
        info = json.loads((p / "export.json").read_text()) if (p / "export.json").is_file() else {}
        state = load_file(str(p / WEIGHTS))
        tokenizer = p / "tokenizer.json" if (p / "tokenizer.json").is_file() else None
        facts = {"tokenizer": tokenizer, "sha256": info.get("tokenizer_sha256"), "step": int(info.get("step", 0))}
        facts["source"] = p
    else:
        ckpt_dir = resolve_checkpoint(path)
        manifest = read_manifest(ckpt_dir)
        config = manifest["config"]
        state = checkpoint_state_dict(ckpt_dir)
        tok = manifest.get("tokenizer", {})
        facts = {
            "tokenizer": _checkpoint_tokenizer(tok, ckpt_dir),
            "sha256": tok.get("sha256"),
            "step": int(manifest["step"]),
            "source": ckpt_dir,
            "data_dir": Path(manifest["data_dir"]) if manifest.get("data_dir") else None,
        }
    return state, config, facts


def _checkpoint_tokenizer(tok: Dict[str, Any], ckpt_dir: Path) -> Optional[Path]:
    """The checkpoint's tokenizer file: the recorded path when it still holds the recorded tokenizer,
    else the run's own copy (``<run_dir>/tokenizer.json``) when its sha256 matches; None when neither."""
    from data.tokenizer import tokenizer_sha256

    run_copy = ckpt_dir.parent.parent / RUN_TOKENIZER
    for candidate in ([Path(tok["path"])] if tok.get("path") else []) + [run_copy]:
        if candidate.is_file() and (not tok.get("sha256") or tokenizer_sha256(candidate) == tok["sha256"]):
            return candidate
    return Path(tok["path"]) if tok.get("path") else None


def load_model(path: str, device: str = "cpu") -> LoadedModel:
    """A model in eval mode from an export directory, a checkpoint directory or a run directory."""
    state, config, facts = load_weights(path)
    model = build_model(config["model"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise LMError(
            f"{path}: weights do not match the model config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.to(device).eval()
    return LoadedModel(
        model, config, facts["tokenizer"], facts["sha256"], facts["step"], facts["source"], facts.get("data_dir")
    )


def warm_start(model: torch.nn.Module, path: str) -> int:
    """``init_from``: copy the weights of a run, checkpoint or export directory into ``model`` (weights
    only); returns the step they were trained to. Any missing, unexpected or differently shaped
    parameter is a one-line :class:`ConfigError` naming it."""
    from lm.errors import ConfigError

    if not Path(path).exists():
        raise ConfigError(f"init_from={path}: no such run, checkpoint or export directory")
    try:
        state, _, facts = load_weights(path)
    except LMError as e:
        raise ConfigError(f"init_from={path}: {e}") from None
    own = model.state_dict()
    for name, value in own.items():
        if name not in state:
            raise ConfigError(
                f"init_from={path}: parameter {name} (shape {tuple(value.shape)}) is missing from those weights; "
                f"the model configs differ"
            )
        if tuple(state[name].shape) != tuple(value.shape):
            raise ConfigError(
                f"init_from={path}: parameter {name} has shape {tuple(state[name].shape)} there and "
                f"{tuple(value.shape)} in this model; the model configs differ"
            )
    extra = [name for name in state if name not in own]
    if extra:
        raise ConfigError(
            f"init_from={path}: parameter {extra[0]} (shape {tuple(state[extra[0]].shape)}) is not in this model"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            + "; the model configs differ"
        )
    with torch.no_grad():
        for name, value in own.items():
            value.copy_(state[name].to(dtype=value.dtype))
    return int(facts["step"])
