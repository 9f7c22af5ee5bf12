"""Fixtures for the evaluation tests: a small prepared corpus and tiny checkpoints trained for a few
steps through the real training path (``lm.training.trainer.train``), shared by the session.

Tests that use them are marked ``xdist_group("evaluation")`` so that pytest-xdist
(``--dist loadgroup``) runs them on one worker and the checkpoints are trained once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def quiet(*_):
    pass


@pytest.fixture(scope="session")
def eval_data(tmp_path_factory) -> Path:
    """Token shards of ~150 KB of standard-library source with a 384-token BPE."""
    from omegaconf import OmegaConf

    from data.prepare import prepare
    from lm.config.schema import DataConfig

    out = tmp_path_factory.mktemp("eval-data") / "stdlib-eval"
    cfg = OmegaConf.merge(
        OmegaConf.structured(DataConfig),
        {
            "name": "stdlib-eval",
            "out_dir": str(out),
            "validation_fraction": 0.3,
            "num_proc": 1,
            "source": {"kind": "stdlib", "max_bytes": 150_000},
            "tokenizer": {"vocab_size": 384, "train_max_bytes": 150_000},
        },
    )
    prepare(cfg, echo=quiet, progress=False)
    return out


def write_experiment(root: Path, name: str, body: Dict) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "run_dir": str(root / name), **body}))
    return path


def train_run(path: Path) -> Path:
    from lm.config import load_experiment
    from lm.training.trainer import train

    cfg = load_experiment(str(path))
    train(cfg, echo=quiet)
    return Path(cfg.run_dir)


@pytest.fixture(scope="session")
def lm_runs(tmp_path_factory, eval_data) -> Dict[str, Path]:
    """Run directories of a tiny GLA and a tiny Transformer (max_seq_len 64) trained 6 steps."""
    root = tmp_path_factory.mktemp("eval-runs")
    data = {
        "name": "stdlib-eval",
        "out_dir": str(eval_data),
        "source": {"kind": "stdlib", "max_bytes": 150_000},
        "tokenizer": {"vocab_size": 384, "train_max_bytes": 150_000},
        "validation_fraction": 0.3,
        "num_proc": 1,
    }
    train = {"max_steps": 6, "seq_len": 32, "val_every_n_steps": 0, "sample_tokens": 0, "lr": 1e-2}
    runs = {}
    for name, model in (("gla", "gla/tiny"), ("transformer", "transformer/tiny")):
        runs[name] = train_run(
            write_experiment(
                root,
                name,
                {
                    "defaults": {"model": model, "train": "cpu-test"},
                    "data": data,
                    "model": {"d_model": 32, "n_heads": 2, "n_layers": 2, "max_seq_len": 64},
                    "train": train,
                    "checkpoint": {"every_n_steps": 6},
                    "logging": {"tensorboard": False},
                },
            )
        )
    return runs


@pytest.fixture(scope="session")
def parity_run(tmp_path_factory) -> Path:
    """A tiny recurrent-delta model trained 6 steps on parity (a synthetic-task checkpoint)."""
    root = tmp_path_factory.mktemp("eval-task")
    return train_run(
        write_experiment(
            root,
            "parity",
            {
                "defaults": {"model": "recurrent_delta/tiny", "train": "cpu-test"},
                "data": {
                    "source": {"kind": "task"},
                    "task": {
                        "name": "formal",
                        "params": {"language": "parity", "min_length": 2, "max_length": 8},
                        "val_examples": 16,
                    },
                },
                "model": {"d_model": 32, "n_heads": 2, "n_layers": 1},
                "train": {"max_steps": 6, "val_every_n_steps": 0, "micro_batch_size": 8},
                "checkpoint": {"every_n_steps": 6},
                "logging": {"tensorboard": False},
            },
        )
    )


def lm_env(**extra: str) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "WANDB_MODE": "disabled",
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_OFFLINE": "1",
        }
    )
    env.update(extra)
    return env


def run_lm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``lm <args>`` in this process (``lm.cli.main.main``: the same parsing, errors and exit
    status as the console command, without a new interpreter's start-up per call)."""
    import contextlib
    import io

    from lm.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as e:
            code = int(e.code or 0)
    proc = subprocess.CompletedProcess(["lm", *args], code, out.getvalue(), err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(
            f"lm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def run_lm_subprocess(*args: str, check: bool = True, env=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``lm <args>`` in a subprocess (as a user runs it)."""
    proc = subprocess.run(
        [sys.executable, "-m", "lm.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or lm_env(),
        cwd=REPO,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"lm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one-line ``error: ...`` message of a failed command (asserting there is exactly one)."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1, f"rc {proc.returncode}, stderr:\n{proc.stderr[-3000:]}"
    return lines[0]


def random_model(name: str, vocab: int = 64, **overrides):
    """A randomly initialised tiny model of ``configs/model/<name>/tiny.yaml``."""
    from lm.models import build_model

    cfg = yaml.safe_load((REPO / "configs" / "model" / name / "tiny.yaml").read_text())
    cfg.update({"vocab_size": vocab, "d_model": 32, "n_heads": 2, "n_layers": 2, **overrides})
    return build_model(cfg).eval(), cfg


def in_memory_checkpoint(model, config: Dict, tokenizer_path=None):
    """A :class:`~lm.evaluation.common.Checkpoint` around a model built in the test."""
    from lm.evaluation.common import Checkpoint
    from lm.training.export import LoadedModel

    return Checkpoint(LoadedModel(model, config, tokenizer_path, None, 0, Path("/nonexistent")), "<memory>")
