"""Helpers shared by the test packages: a small prepared corpus, experiment files, and running
``lm`` in a subprocess. The ``tiny_data`` fixture (tests/conftest.py) prepares the corpus once.

Every process a helper starts runs in its own process group (session), and the whole group is
killed when the helper gives up (timeout, failure, interruption): rank processes that Lightning
or DeepSpeed start never outlive a test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List

import yaml

from lm.process_group import kill_group, run_group  # noqa: F401  (re-exported for the tests)

REPO = Path(__file__).resolve().parents[1]


def prepare_tiny_data(out: Path) -> Path:
    """Token shards of ~400 KB of standard-library source with a 512-token BPE, in ``out``."""
    from omegaconf import OmegaConf

    from data.prepare import prepare
    from lm.config.schema import DataConfig

    cfg = OmegaConf.merge(
        OmegaConf.structured(DataConfig),
        {
            "name": "stdlib-tiny",
            "out_dir": str(out),
            "validation_fraction": 0.1,
            "num_proc": 1,
            "source": {"kind": "stdlib", "max_bytes": 400_000},
            "tokenizer": {"vocab_size": 512, "train_max_bytes": 400_000},
        },
    )
    prepare(cfg, echo=lambda s: None, progress=False)
    return out


def experiment(tmp_path: Path, data_dir: Path, name: str = "exp", **sections) -> Path:
    """An experiment YAML: tiny GLA on ``data_dir``, overridable per section."""
    body: Dict = {
        "defaults": {"model": "gla/tiny", "train": "cpu-test"},
        "name": name,
        "run_dir": str(tmp_path / name),
        "data": {
            "name": "stdlib-tiny",
            "out_dir": str(data_dir),
            "source": {"kind": "stdlib", "max_bytes": 400_000},
            "tokenizer": {"vocab_size": 512, "train_max_bytes": 400_000},
            "validation_fraction": 0.1,
            "num_proc": 1,
        },
        "model": {"d_model": 32, "n_heads": 2, "n_layers": 2},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def lm_env() -> Dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "WANDB_MODE": env.get("WANDB_MODE", "disabled"),
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    return env


def lm_command(*args: str) -> List[str]:
    return [sys.executable, "-m", "lm.cli.main", *args]


def run_lm(*args: str, timeout: float = 600, check: bool = True, env=None) -> subprocess.CompletedProcess:
    proc = run_group(lm_command(*args), timeout, env=env or lm_env(), cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"lm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def read_samples(run_dir: Path, rank: int = 0) -> Dict[int, List[List[int]]]:
    """step -> the sample indices of its micro-batches (the last attempt of each step wins)."""
    by_step: Dict[int, Dict[int, List[int]]] = {}
    path = run_dir / "samples" / f"rank{rank:05d}.jsonl"
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        by_step.setdefault(rec["step"], {})[rec["batch_idx"]] = rec["index"]
    return {s: [v for _, v in sorted(b.items())] for s, b in by_step.items()}


def write_mc_task(tasks: Path, data: Path, name: str = "tiny_mc") -> Path:
    """An lm-evaluation-harness multiple-choice task ``name`` over the JSONL file ``data``
    (fields question, choices, answer), written into the task directory ``tasks``."""
    path = tasks / f"{name}.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        task: {name}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{answer}}}}"
        metric_list:
          - metric: acc
        """)
    )
    return path
