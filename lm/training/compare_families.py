"""Families side by side at one budget: ``lm train <experiment>`` per model (and seed), one table, one plot.

    python -m lm.training.compare_families --models transformer/small gla/small gated_deltanet/small \\
        rwkv7/small mamba2/small hybrid-gla/small --out docs/compare

Each model trains in its own ``lm train`` process (its own process group, killed on any exit), on the
same data, seed, schedule and token budget: by default the README's main job
(``configs/experiment/main.yaml``; ``--experiment`` picks another, ``--seeds`` runs each model once per
seed, ``--steps`` shortens every run alike, ``--set key=value`` adds overrides for all). Runs go to
``<out>/runs/<model>[-s<seed>]`` (``resume=auto``: an interrupted comparison continues, finished runs
are read back, not retrained). The table (``<out>/compare.md``) has, per model: parameters, validation
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
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from data.atomic import write_atomic
from lm.process_group import kill_group

#: the wall time of a comparison's run, kept in its run directory so that a read-back table shows it
WALL_FILE = "compare_wall.json"

DEFAULT_MODELS = [
    "transformer/small",
    "gla/small",
    "gated_deltanet/small",
    "rwkv7/small",
    "mamba2/small",
]


def run_name(model: str, seed: Optional[int] = None) -> str:
    """``gla/small`` -> ``gla-small`` (``gla-small-s1`` with a seed): the run directory's name."""
    return model.replace("/", "-") + ("" if seed is None else f"-s{seed}")


def train_command(
    model: str,
    run_dir: Path,
    steps: Optional[int],
    overrides: List[str],
    experiment: str = "main",
    seed: Optional[int] = None,
) -> List[str]:
    """The ``lm train <experiment>`` command line of one model (and seed) of the comparison."""
    cmd = [sys.executable, "-m", "lm.cli.main", "train", experiment, f"model={model}", f"name={run_dir.name}"]
    cmd += [f"run_dir={run_dir}", "resume=auto", "train.sample_tokens=0", "train.progress_bar=false"]
    if seed is not None:
        cmd.append(f"seed={seed}")
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
                kill_group(proc)
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


def summarize(model: str, run_dir: Path, wall_s: Optional[float], seed: Optional[int] = None) -> Dict[str, Any]:
    """One table row from a finished run directory."""
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = read_metrics(run_dir)
    speed = metrics.get("perf/tokens_per_s", [])
    last_step = max((p["step"] for p in speed), default=0.0)
    steady = [p["value"] for p in speed if p["step"] > 0.1 * last_step] or [p["value"] for p in speed]
    return {
        "model": model,
        "seed": seed,
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


def table(rows: List[Dict[str, Any]], header: str) -> str:
    """Markdown: one line per run; with several seeds, then one line per model (mean ± std over seeds)."""

    def fmt(x, spec):
        return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    lines = [header, "", "| model | seed | parameters | steps | val loss | val bits/byte | train tokens/s | wall |"]
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in rows:
        wall = "—" if r["wall_s"] is None else f"{r['wall_s'] / 60:.1f} min"
        lines.append(
            f"| {r['model']} | {fmt(r['seed'], 'd')} | {fmt((r['parameters'] or 0) / 1e6, '.3f')}M | "
            f"{fmt(r['step'], 'd')} | {fmt(r['val_loss'], '.4f')} | {fmt(r['val_bpb'], '.3f')} | "
            f"{fmt(r['tokens_per_s'], ',.0f')} | {wall} |"
        )
    models = list(dict.fromkeys(r["model"] for r in rows))
    if any(sum(r["model"] == m for r in rows) > 1 for m in models):
        lines += ["", "| model | runs | val loss (mean ± std) | best | worst | train tokens/s (median) |"]
        lines.append("|---|---|---|---|---|---|")
        for m in models:
            losses = [r["val_loss"] for r in rows if r["model"] == m and r["val_loss"] is not None]
            speeds = [r["tokens_per_s"] for r in rows if r["model"] == m and r["tokens_per_s"]]
            if not losses:
                continue
            std = statistics.stdev(losses) if len(losses) > 1 else 0.0
            lines.append(
                f"| {m} | {len(losses)} | {statistics.mean(losses):.4f} ± {std:.4f} | {min(losses):.4f} | "
                f"{max(losses):.4f} | {fmt(statistics.median(speeds) if speeds else None, ',.0f')} |"
            )
    return "\n".join(lines) + "\n"


def plot(runs: Dict[str, List[Path]], path: Path, ylabel: str = "loss") -> None:
    """Training loss (left) and validation loss (right) against step: one colour per model, one
    line per run (seed)."""
    from lm.plotting import pyplot, save_figure

    plt = pyplot()
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (model, run_dirs) in enumerate(runs.items()):
        colour = f"C{i % 10}"
        for j, run_dir in enumerate(run_dirs):
            m = read_metrics(run_dir)
            final = json.loads((run_dir / "summary.json").read_text())
            if final.get("val_loss") is not None and final["step"] not in [p["step"] for p in m.get("val/loss", [])]:
                m.setdefault("val/loss", []).append({"step": float(final["step"]), "value": float(final["val_loss"])})
            for ax, key in ((ax_t, "train/loss"), (ax_v, "val/loss")):
                pts = m.get(key, [])
                if pts:
                    ax.plot(
                        [p["step"] for p in pts],
                        [p["value"] for p in pts],
                        color=colour,
                        alpha=0.8 if ax is ax_v else 0.5,
                        marker="." if ax is ax_v else None,
                        label=model if j == 0 else None,
                    )
    for ax, title in ((ax_t, "training loss"), (ax_v, "validation loss")):
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    if ax_v.get_legend_handles_labels()[0]:
        ax_v.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def main(argv=None) -> List[Dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="model configs (configs/model/<name>.yaml)")
    p.add_argument("--experiment", default="main", help="the experiment every model trains (configs/experiment)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="one run per seed (default: the config's)")
    p.add_argument("--out", default="runs/compare", help="runs, table and plot go here")
    p.add_argument("--steps", type=int, default=None, help="train.max_steps for every model (default: the config's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="key=value for every run")
    p.add_argument("--ylabel", default="loss (nats/token)", help="the plot's loss axis label")
    args = p.parse_args(argv)
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    rows: List[Dict[str, Any]] = []
    runs: Dict[str, List[Path]] = {}
    for model in args.models:
        for seed in args.seeds or [None]:
            name = run_name(model, seed)
            run_dir = out / "runs" / name
            wall: Optional[float] = None
            if not finished(run_dir, args.steps):
                cmd = train_command(model, run_dir, args.steps, args.overrides, args.experiment, seed)
                print(f"[{name}] {' '.join(cmd[2:])}", flush=True)
                begin = time.perf_counter()
                code = run_one(cmd, out / f"{name}.log")
                if code != 0:
                    print(f"[{name}] failed (exit {code}); see {out / (name + '.log')}", flush=True)
                    continue
                wall = time.perf_counter() - begin
                write_atomic(run_dir / WALL_FILE, json.dumps({"wall_s": wall}))
            elif (run_dir / WALL_FILE).is_file():  # read back: the wall time of the run that trained it
                wall = json.loads((run_dir / WALL_FILE).read_text())["wall_s"]
            runs.setdefault(model, []).append(run_dir)
            row = summarize(model, run_dir, wall, seed)
            rows.append(row)
            print(f"[{name}] val loss {row['val_loss']:.4f}, {row['tokens_per_s'] or 0:,.0f} tokens/s", flush=True)
    header = (
        f"`lm train {args.experiment}` ({args.steps or 'its'} steps; overrides: {' '.join(args.overrides) or 'none'}), "
        f"{os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}"
    )
    text = table(rows, header)
    write_atomic(out / "compare.md", text)
    write_atomic(out / "compare.json", json.dumps({"args": vars(args), "rows": rows}, indent=1))
    if runs:
        plot(runs, out / "compare.png", args.ylabel)
    print(text)
    return rows


if __name__ == "__main__":
    main()
