"""Families side by side at one budget: ``lm train main`` once per model, then one table and one plot.

    python -m lm.training.compare_families --models transformer/small gla/small gated_deltanet/small \\
        rwkv7/small mamba2/small hybrid-gla/small --out docs/compare

Each model trains in its own ``lm train`` process (its own process group, killed on any exit), on the
same data, seed, schedule and token budget as the README's main job (``configs/experiment/main.yaml``:
``--steps`` shortens it for every model alike; ``--set key=value`` adds overrides for all). Runs go to
``<out>/runs/<model>`` (``resume=auto``: an interrupted comparison continues, finished runs are
read back, not retrained). The table (``<out>/compare.md``) has, per model: parameters, validation
loss and bits/byte at the end (the trainer's own ``summary.json``), the median training tokens/s
after the first tenth of the steps (``perf/tokens_per_s`` in the run's ``metrics.csv``) and the
wall time; ``<out>/compare.png`` plots the training and validation loss curves.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from data.atomic import write_atomic

DEFAULT_MODELS = [
    "transformer/small",
    "gla/small",
    "gated_deltanet/small",
    "rwkv7/small",
    "mamba2/small",
]


def run_name(model: str) -> str:
    """``gla/small`` -> ``gla-small``: the run directory's name."""
    return model.replace("/", "-")


def train_command(model: str, run_dir: Path, steps: Optional[int], overrides: List[str]) -> List[str]:
    """The ``lm train main`` command line of one model of the comparison."""
    cmd = [sys.executable, "-m", "lm.cli.main", "train", "main", f"model={model}", f"name={run_name(model)}"]
    cmd += [f"run_dir={run_dir}", "resume=auto", "train.sample_tokens=0", "train.progress_bar=false"]
    if steps is not None:
        cmd.append(f"train.max_steps={steps}")
    return cmd + list(overrides)


def run_one(cmd: List[str], log_path: Path) -> int:
    """Run ``cmd`` in its own process group with its output in ``log_path``; the whole group is
    killed if this process is interrupted. Returns the exit status."""
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def finished(run_dir: Path, steps: Optional[int]) -> bool:
    """True when ``run_dir`` holds a finished run of ``steps`` steps (any number when None)."""
    path = run_dir / "summary.json"
    return path.is_file() and (steps is None or json.loads(path.read_text()).get("step") == steps)


def read_metrics(run_dir: Path) -> Dict[str, List[Dict[str, float]]]:
    """The run's ``logs/metrics.csv`` as {metric: [{step, value}, ...]} (empty cells skipped)."""
    out: Dict[str, List[Dict[str, float]]] = {}
    path = run_dir / "logs" / "metrics.csv"
    if not path.is_file():
        return out
    with open(path) as f:
        for row in csv.DictReader(f):
            if not row.get("step"):
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                out.setdefault(key, []).append({"step": float(row["step"]), "value": float(value)})
    return out


def summarize(model: str, run_dir: Path, wall_s: Optional[float]) -> Dict[str, Optional[float]]:
    """One table row from a finished run directory."""
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = read_metrics(run_dir)
    speed = metrics.get("perf/tokens_per_s", [])
    last_step = max((p["step"] for p in speed), default=0.0)
    steady = [p["value"] for p in speed if p["step"] > 0.1 * last_step] or [p["value"] for p in speed]
    return {
        "model": model,  # type: ignore[dict-item]
        "parameters": count_parameters(run_dir),
        "step": summary.get("step"),
        "val_loss": summary.get("val_loss"),
        "val_bpb": summary.get("val_bpb"),
        "tokens_per_s": statistics.median(steady) if steady else None,
        "wall_s": wall_s,
    }


def count_parameters(run_dir: Path) -> int:
    """Parameters of the model a run trained (its resolved ``config.yaml``, built on the CPU)."""
    import yaml

    from lm.models import build_model

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    return sum(p.numel() for p in build_model(config["model"]).parameters())


def table(rows: List[Dict[str, Optional[float]]], header: str) -> str:
    def fmt(x, spec):
        return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    lines = [header, "", "| model | parameters | steps | val loss | val bits/byte | train tokens/s | wall |"]
    lines.append("|---|---|---|---|---|---|---|")
    for r in rows:
        wall = "—" if r["wall_s"] is None else f"{r['wall_s'] / 60:.1f} min"
        lines.append(
            f"| {r['model']} | {fmt((r['parameters'] or 0) / 1e6, '.2f')}M | {fmt(r['step'], 'd')} | "
            f"{fmt(r['val_loss'], '.4f')} | {fmt(r['val_bpb'], '.3f')} | {fmt(r['tokens_per_s'], ',.0f')} | {wall} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: Dict[str, Path], path: Path) -> None:
    """Training loss (left) and validation loss (right) against step, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(11, 4))
    for model, run_dir in runs.items():
        m = read_metrics(run_dir)
        final = json.loads((run_dir / "summary.json").read_text())
        if final.get("val_loss") is not None and final["step"] not in [p["step"] for p in m.get("val/loss", [])]:
            m.setdefault("val/loss", []).append({"step": float(final["step"]), "value": float(final["val_loss"])})
        for ax, key in ((ax_t, "train/loss"), (ax_v, "val/loss")):
            pts = m.get(key, [])
            if pts:
                ax.plot(
                    [p["step"] for p in pts], [p["value"] for p in pts], marker="." if ax is ax_v else None, label=model
                )
    for ax, title in ((ax_t, "training loss"), (ax_v, "validation loss")):
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_v.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None) -> List[Dict[str, Optional[float]]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="model configs (configs/model/<name>.yaml)")
    p.add_argument("--out", default="runs/compare", help="runs, table and plot go here")
    p.add_argument("--steps", type=int, default=None, help="train.max_steps for every model (default: the main job's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="key=value for every run")
    args = p.parse_args(argv)
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    rows, runs = [], {}
    for model in args.models:
        run_dir = out / "runs" / run_name(model)
        runs[model] = run_dir
        wall: Optional[float] = None
        if not finished(run_dir, args.steps):
            cmd = train_command(model, run_dir, args.steps, args.overrides)
            print(f"[{model}] {' '.join(cmd[2:])}", flush=True)
            begin = time.perf_counter()
            code = run_one(cmd, out / f"{run_name(model)}.log")
            if code != 0:
                print(f"[{model}] failed (exit {code}); see {out / (run_name(model) + '.log')}", flush=True)
                continue
            wall = time.perf_counter() - begin
        row = summarize(model, run_dir, wall)
        rows.append(row)
        print(f"[{model}] val loss {row['val_loss']:.4f}, {row['tokens_per_s'] or 0:,.0f} tokens/s", flush=True)
    header = (
        f"Main-job budget ({args.steps or 'default'} steps; overrides: {' '.join(args.overrides) or 'none'}), "
        f"{os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}"
    )
    text = table(rows, header)
    write_atomic(out / "compare.md", text)
    if runs:
        plot({m: d for m, d in runs.items() if (d / "summary.json").is_file()}, out / "compare.png")
    print(text)
    return rows


if __name__ == "__main__":
    main()
