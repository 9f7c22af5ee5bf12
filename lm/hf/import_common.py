"""What every importer shares: reading a source's weights, refusing features with no
equivalent here, and writing this project's export directory (``model.safetensors``,
``config.yaml``, ``tokenizer.json``, ``export.json``) that ``lm eval``, ``lm generate``,
``lm probe`` and ``init_from=`` open like any export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import yaml
from safetensors.torch import load_file, save_file

from lm.errors import LMError


class Unsupported(LMError):
    """The source uses an architecture detail this project's models do not have."""

    def __init__(self, source: Any, feature: str):
        super().__init__(f"{source}: cannot import: {feature} has no equivalent in this project's models")


def read_weights(path: Path) -> Dict[str, torch.Tensor]:
    """fp32 tensors from a safetensors file, a sharded safetensors index, or a torch ``.bin``/``.pth``."""
    if path.is_dir():
        for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
            if (path / name).is_file():
                return read_weights(path / name)
        raise LMError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    if path.name.endswith(".index.json"):
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        state: Dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(read_weights(path.parent / shard))
        return state
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    return {k: v.float().contiguous() for k, v in state.items()}


def take(state: Dict[str, torch.Tensor], key: str, source: Any) -> torch.Tensor:
    """``state.pop(key)``, with a one-line error naming the missing key."""
    if key not in state:
        raise LMError(f"{source}: missing weight '{key}'")
    return state.pop(key)


def write_export(
    out: Path,
    model_cfg: Dict[str, Any],
    state: Dict[str, torch.Tensor],
    source: Any,
    tokenizer: Optional[Path] = None,
    eod_token: Optional[str] = None,
    pad_token: Optional[str] = None,
) -> Path:
    """Build the model from ``model_cfg``, load ``state`` strictly (every key used, none missing),
    and write the export directory atomically."""
    from lm.training.export import check_out_dir, write_export_dir
    from lm.models import build_model

    check_out_dir(out)
    model = build_model(model_cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise LMError(
            f"{source}: converted weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    tok_cfg = {k: v for k, v in {"eod_token": eod_token, "pad_token": pad_token}.items() if v}
    config = {"model": model_cfg, "data": {"tokenizer": tok_cfg}}

    def fill(tmp: Path) -> None:
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()},
            str(tmp / "model.safetensors"),
            metadata={"step": "0"},
        )
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / "tokenizer.json")
        info = {
            "step": 0,
            "source": str(source),
            "imported": True,
            "parameters": model.num_parameters(),
            "tokenizer_sha256": None,
        }
        (tmp / "export.json").write_text(json.dumps(info, indent=1))

    return write_export_dir(out, fill)


def swiglu_ratio(intermediate: int, d_model: int, source: Any) -> float:
    """``model.mlp_ratio`` whose SwiGLU hidden width (``64 * ceil(int(r * d * 2/3) / 64)``) is
    ``intermediate``; refuses widths that are not a multiple of 64."""
    if intermediate % 64:
        raise Unsupported(source, f"an MLP intermediate_size of {intermediate} (not a multiple of 64)")
    return intermediate * 3 / (2 * d_model)
