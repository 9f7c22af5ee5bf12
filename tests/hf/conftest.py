"""Fixtures for the Hugging Face tests: a tiny BPE tokenizer and this project's export directories
of random tiny models (no training), one per model config."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict

import pytest
import torch
import yaml
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
TEXTS = [
    "def add(a, b):\n    return a + b\n" * 8,
    "import os\nprint(os.getcwd())\n" * 8,
    "class Foo:\n    x = [1, 2, 3]\n" * 8,
]
VOCAB = 320


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory) -> Path:
    from data.tokenizer import train_tokenizer

    tok = train_tokenizer(TEXTS, 300, 1, ["<|endoftext|>", "<|pad|>"])
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def tiny_config(name: str, **overrides: Any) -> Dict[str, Any]:
    """configs/model/<name>/tiny.yaml shrunk to d_model 32, 2 layers (a hybrid keeps its tiny depth, the
    pattern's period), 2 heads, vocab 320."""
    cfg = yaml.safe_load((REPO / "configs" / "model" / name / "tiny.yaml").read_text())
    n_layers = cfg["n_layers"] if cfg.get("layers") else 2
    cfg.update(
        {
            "d_model": 32,
            "n_layers": n_layers,
            "n_heads": 2,
            "vocab_size": VOCAB,
            "max_seq_len": 64,
            "kernel_backend": "torch",
        }
    )
    cfg.update(overrides)
    return cfg


def write_source(out: Path, model_cfg: Dict[str, Any], tokenizer_file: Path, seed: int = 0) -> Path:
    """This project's export directory (lm export's format) of a random model."""
    from lm.models import build_model

    torch.manual_seed(seed)
    model = build_model(model_cfg)
    with torch.no_grad():  # random, not the init (zero-initialised low-rank maps would hide bugs)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    config = {"model": model_cfg, "data": {"tokenizer": {"eod_token": "<|endoftext|>", "pad_token": "<|pad|>"}}}
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    (out / "tokenizer.json").write_text(tokenizer_file.read_text())
    (out / "export.json").write_text(json.dumps({"step": 7}))
    return out


@pytest.fixture(scope="module")
def fla_interpreter():
    """fla's kernel modules patched for the Triton interpreter (see tests/kernels/test_fla_backend.py);
    skips without fla's models, or without CUDA and TRITON_INTERPRET=1."""
    from kernels._dispatch import triton_interpret

    pytest.importorskip("transformers", reason="the optional extra 'hf' (transformers) is not installed")
    pytest.importorskip("fla.models", reason="flash-linear-attention (fla.models) is not installed")
    if not (torch.cuda.is_available() or triton_interpret()):
        pytest.skip("fla's models run Triton kernels: needs CUDA or TRITON_INTERPRET=1")
    import fla.models  # noqa: F401  (imports the kernel modules the models use)
    import triton.language as tl
    import triton.runtime.autotuner as autotuner

    from tests.kernels.test_fla_backend import _interpreter_range, _late_gather

    if not triton_interpret():
        yield
        return
    mp = pytest.MonkeyPatch()
    mp.setattr(autotuner.Autotuner, "_bench", lambda self, *a, config, **kw: [0.0, 0.0, 0.0])
    for name, module in list(sys.modules.items()):
        if name.startswith(("fla.ops", "fla.modules")) and module is not None:
            mp.setattr(module, "range", _interpreter_range, raising=False)
            if getattr(module, "gather", None) is tl.gather:
                mp.setattr(module, "gather", _late_gather)
    yield
    mp.undo()
