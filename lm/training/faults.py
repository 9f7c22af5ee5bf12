"""Fault injection: kill training runs with SIGKILL at random steps, resume them, and count the
bit-exact resumes.

    python -m lm.training.faults --kills 20 --modes single,zero2 --steps 12

For each mode (``single``: one process; ``zero2``: DeepSpeed ZeRO-2 on two CPU ranks) one
uninterrupted run is the reference; then each trial starts the same run, kills its whole process
group at a random optimizer step, resumes it with ``resume=auto`` and compares the final
checkpoint with the reference: every tensor of every file of the checkpoint (weights, optimizer
state, scheduler; the DeepSpeed shards under ZeRO) and the training loss of every step. A trial
is bit-exact when all are equal. Prints a markdown table (docs/benchmarks.md, "Fault injection").
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import yaml

from lm.process_group import kill_group

MODES = {
    "single": [],
    "zero2": ["train.devices=2", "train.accelerator=cpu", "train.strategy=deepspeed", "train.zero_stage=2"],
}


def _env() -> Dict[str, str]:
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
    return env


def _lm(*args: str) -> List[str]:
    return [sys.executable, "-m", "lm.cli.main", *args]


def _run(args: List[str], log: Path, timeout: float = 900) -> None:
    """Run ``lm`` in its own process group (killed whole on timeout); raise on failure."""
    with open(log, "a") as out:
        proc = subprocess.Popen(_lm(*args), stdout=out, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
        try:
            code = proc.wait(timeout)
        finally:
            _kill_group(proc)
    if code != 0:
        raise RuntimeError(f"lm {' '.join(args)} exited {code}; see {log}")


def _kill_group(proc: subprocess.Popen) -> None:
    kill_group(proc)
    proc.wait()


def prepare_data(out: Path) -> Path:
    """A tiny corpus: ~300 KB of standard-library source, 512-token BPE."""
    from omegaconf import OmegaConf

    from data.prepare import prepare
    from lm.config.schema import DataConfig

    cfg = OmegaConf.merge(
        OmegaConf.structured(DataConfig),
        {
            "name": "faults",
            "out_dir": str(out),
            "validation_fraction": 0.1,
            "num_proc": 1,
            "source": {"kind": "stdlib", "max_bytes": 300_000},
            "tokenizer": {"vocab_size": 512, "train_max_bytes": 300_000},
        },
    )
    prepare(cfg, echo=lambda s: None, progress=False)
    return out


def write_experiment(root: Path, data_dir: Path, name: str, steps: int) -> Path:
    body = {
        "defaults": {"model": "gla/tiny", "train": "cpu-test"},
        "name": name,
        "run_dir": str(root / name),
        "data": {
            "name": "faults",
            "out_dir": str(data_dir),
            "source": {"kind": "stdlib", "max_bytes": 300_000},
            "tokenizer": {"vocab_size": 512, "train_max_bytes": 300_000},
            "validation_fraction": 0.1,
            "num_proc": 1,
        },
        "model": {"d_model": 32, "n_heads": 2, "n_layers": 2, "dropout": 0.1},
        "train": {
            "max_steps": steps,
            "record_samples": True,
            "val_every_n_steps": 4,
            "sample_tokens": 0,
            "log_every_n_steps": 1,
        },
        "checkpoint": {"every_n_steps": 2, "keep_last": 2},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _last_step(run: Path) -> int:
    import json

    path = run / "samples" / "rank00000.jsonl"
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    try:
        return int(json.loads(lines[-1])["step"]) if lines else 0
    except ValueError:  # a line being written
        return int(json.loads(lines[-2])["step"]) if len(lines) > 1 else 0


def kill_at(args: List[str], run: Path, step: int, log: Path, timeout: float = 900) -> bool:
    """Start ``lm train``, SIGKILL its process group once ``step`` was reached; False if it finished first."""
    with open(log, "a") as out:
        proc = subprocess.Popen(_lm(*args), stdout=out, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
        deadline = time.time() + timeout
        try:
            while time.time() < deadline:
                if _last_step(run) >= step:
                    os.killpg(proc.pid, signal.SIGKILL)
                    return True
                if proc.poll() is not None:
                    return False
                time.sleep(0.02)
            raise RuntimeError(f"step {step} not reached in {timeout} s; see {log}")
        finally:
            _kill_group(proc)


def _tensors(obj: Any, prefix: str, out: Dict[str, torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _tensors(v, f"{prefix}/{k}", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _tensors(v, f"{prefix}/{i}", out)


def checkpoint_tensors(ckpt: Path) -> Dict[str, torch.Tensor]:
    """Every tensor in every file of a checkpoint's model state (weights, optimizer, ZeRO shards)."""
    state = ckpt / "model.ckpt"
    files = [state] if state.is_file() else sorted(p for p in state.rglob("*.pt") if p.is_file())
    out: Dict[str, torch.Tensor] = {}
    for f in files:
        _tensors(torch.load(f, map_location="cpu", weights_only=False), str(f.relative_to(ckpt)), out)
    return out


def losses(run: Path) -> Dict[int, str]:
    """step -> the logged training loss (the last attempt of a step wins), exactly as written."""
    by_step: Dict[int, str] = {}
    with open(run / "logs" / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                by_step[int(float(row["step"]))] = row["train/loss"]
    return by_step


def compare(reference: Path, resumed: Path) -> Optional[str]:
    """None when the two runs' final checkpoints and losses are identical, else what differs."""
    from lm.training.checkpoint import latest_complete

    ckpt_a, ckpt_b = latest_complete(reference / "checkpoints"), latest_complete(resumed / "checkpoints")
    assert ckpt_a is not None and ckpt_b is not None  # both runs trained to the end (_run checks)
    a = checkpoint_tensors(ckpt_a)
    b = checkpoint_tensors(ckpt_b)
    if a.keys() != b.keys():
        return f"tensor names differ ({sorted(a.keys() ^ b.keys())[:3]})"
    for key in a:
        if a[key].shape != b[key].shape or not torch.equal(a[key], b[key]):
            return f"{key} differs"
    la, lb = losses(reference), losses(resumed)
    if la != lb:
        steps = sorted(s for s in la.keys() | lb.keys() if la.get(s) != lb.get(s))
        return f"losses differ at steps {steps[:5]}"
    return None


def run_mode(
    mode: str, kills: int, steps: int, root: Path, data_dir: Path, rng: random.Random, echo=print
) -> Dict[str, Any]:
    extra = MODES[mode]
    reference = write_experiment(root, data_dir, f"{mode}-reference", steps)
    _run(["train", str(reference), *extra], root / f"{mode}-reference.log")
    trials: List[Dict[str, Any]] = []
    for i in range(kills):
        name = f"{mode}-kill{i:02d}"
        path = write_experiment(root, data_dir, name, steps)
        step = rng.randint(1, steps - 1)
        log = root / f"{name}.log"
        killed = kill_at(["train", str(path), *extra], root / name, step, log)
        _run(["train", str(path), "resume=auto", *extra], log)
        diff = compare(root / f"{mode}-reference", root / name)
        trials.append({"step": step, "killed": killed, "exact": diff is None, "diff": diff})
        echo(
            f"{mode}: kill {i + 1}/{kills} at step {step}: "
            + ("not killed (finished first)" if not killed else "bit-exact" if diff is None else f"DIFFERS: {diff}")
        )
        shutil.rmtree(root / name, ignore_errors=True)
    return {"mode": mode, "trials": trials}


def table(results: List[Dict[str, Any]]) -> str:
    lines = ["| mode | kills | bit-exact resumes | share | kill steps |", "|---|---:|---:|---:|---|"]
    total = exact = 0
    for r in results:
        done = [t for t in r["trials"] if t["killed"]]
        ok = sum(t["exact"] for t in done)
        total, exact = total + len(done), exact + ok
        share = f"{100 * ok / len(done):.0f}%" if done else "-"
        lines.append(f"| {r['mode']} | {len(done)} | {ok} | {share} | {', '.join(str(t['step']) for t in done)} |")
    lines.append(f"| all | {total} | {exact} | {100 * exact / max(1, total):.0f}% | |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10, help="kills per mode")
    parser.add_argument("--modes", default="single,zero2", help=f"comma-separated: {', '.join(MODES)}")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--seed", type=int, default=None, help="seed of the kill steps (default: random)")
    parser.add_argument("--workdir", default=None, help="keep runs and logs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    if args.steps < 3:
        parser.error("--steps: at least 3")
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="lm-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    rng = random.Random(seed)
    started = time.time()
    try:
        data_dir = prepare_data(root / "data")
        results = [run_mode(m, args.kills, args.steps, root, data_dir, rng) for m in modes]
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    print(
        f"\nfault injection: {args.steps}-step runs, SIGKILL of the process group at a random step, resume=auto "
        f"(seed {seed}); {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {time.time() - started:.0f} s"
    )
    print(table(results))
    return results


if __name__ == "__main__":
    main()
