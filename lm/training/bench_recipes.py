"""RWKV-7 before and after its reference recipe, trained the same way at the demo budget.

    OMP_NUM_THREADS=1 nice -n 5 python -m lm.training.bench_recipes                 # docs/recipes.md's runs
    python -m lm.training.bench_recipes --steps 20 --out /tmp/recipes --runs /tmp/recipes-runs   # a quick look

Trains ``--model`` (default ``rwkv7/small``) with the ``--experiment`` (default ``main``: the stdlib
corpus, ``configs/train/cpu-demo``) twice through the real trainer, from the same seed and data order:

* ``before``: ``model.mixer.init=simple train.weight_decay_groups=matrices train.lr_multipliers=false``
  (the initialisation and the optimizer groups this project used before issue 16's recipes);
* ``after``: the defaults (``init: reference``, the family's weight-decay groups, ``w0`` at 2x lr).

Diagnostics, trained only with ``--only <name>`` and reported when their runs exist: ``init_only`` (the
reference init with the groups of before), ``before_untied`` / ``after_untied`` (both recipes with the
head untied from the embedding, as the reference has it).

``--only before`` / ``--only after`` train one run (two processes can train both at once), and
``--report`` only reads the runs already there. Prints, per run, the final validation loss and bits/byte and the median training tokens/s, and writes
``<out>/results.json`` and ``<out>/loss.png`` (training loss, smoothed, and validation loss against the
step). ``--steps`` shortens the budget (``train.max_steps``; validation every ``steps // 3``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from data.atomic import write_atomic

#: the two recipes compared, as config overrides
RECIPES: Dict[str, List[str]] = {
    "before": ["model.mixer.init=simple", "train.weight_decay_groups=matrices", "train.lr_multipliers=false"],
    "after": [],
}
#: diagnostics (``--only <name>``; reported when their runs exist): the reference init alone, with the
#: groups of before; both recipes with the head untied from the embedding, as the reference has it
DIAGNOSTICS: Dict[str, List[str]] = {
    "init_only": ["train.weight_decay_groups=matrices", "train.lr_multipliers=false"],
    "before_untied": [*RECIPES["before"], "model.tie_embeddings=false"],
    "after_untied": ["model.tie_embeddings=false"],
}


ALL = {**RECIPES, **DIAGNOSTICS}


def overrides(model: str, steps: Optional[int], runs: Path, label: str, extra: Sequence[str]) -> List[str]:
    """The command-line overrides of one run (a fresh run directory, no probes, CSV metrics only)."""
    out = [
        f"model={model}",
        f"run_dir={runs / label}",
        "overwrite=true",
        "probes.every_n_steps=0",
        "logging.tensorboard=false",
        "train.progress_bar=false",
        "train.log_every_n_steps=1",
    ]
    if steps is not None:
        out += [f"train.max_steps={steps}", f"train.val_every_n_steps={max(1, steps // 3)}"]
    return out + ALL[label] + list(extra)


def read_metrics(run_dir: Path) -> Dict[str, Any]:
    """Training loss by step, validation loss/bpb by step and tokens/s from ``logs/metrics.csv``."""
    rows = list(csv.DictReader(open(run_dir / "logs" / "metrics.csv")))
    train, val, tps = [], [], []
    for r in rows:
        step = int(float(r["step"])) if r.get("step") else None
        if r.get("train/loss"):
            train.append((step, float(r["train/loss"])))
        if r.get("val/loss"):
            val.append((step, float(r["val/loss"]), float(r["val/bpb"]) if r.get("val/bpb") else math.nan))
        if r.get("perf/tokens_per_s"):
            tps.append(float(r["perf/tokens_per_s"]))
    return {"train": train, "val": val, "tokens_per_s": statistics.median(tps[1:] or tps) if tps else math.nan}


def train_run(experiment: str, args: List[str]) -> None:
    """One training run through the real trainer (``lm train``)."""
    from lm.config import load_experiment
    from lm.training.trainer import train

    train(load_experiment(experiment, args), echo=lambda msg: None)


def collect(label: str, run_dir: Path) -> Dict[str, Any]:
    """A run's figures from its ``metrics.csv``: the last validation's loss and bits/byte."""
    metrics = read_metrics(run_dir)
    last = metrics["val"][-1] if metrics["val"] else (None, math.nan, math.nan)
    steps = metrics["train"][-1][0] + 1 if metrics["train"] else 0
    return {
        "label": label,
        "overrides": ALL[label],
        "steps": steps,
        "val_loss": last[1],
        "val_bpb": last[2],
        **metrics,
    }


def parameters(run_dir: Path) -> int:
    """The trained model's parameter count (from the run's ``config.yaml``, built on the meta device)."""
    import yaml

    from lm.models.counting import count_parameters

    return count_parameters(yaml.safe_load(open(run_dir / "config.yaml"))["model"])


def markdown(results: List[Dict[str, Any]]) -> str:
    """The results as a Markdown table."""
    lines = [
        "| run | overrides | parameters | val loss | bits/byte | tokens/s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['label']} | {' '.join(f'`{o}`' for o in r['overrides']) or '(defaults)'} | "
            f"{r['parameters'] / 1e6:.2f}M | {r['val_loss']:.3f} | {r['val_bpb']:.3f} | {r['tokens_per_s']:.0f} |"
        )
    return "\n".join(lines)


def smooth(values: List[float], width: int = 10) -> List[float]:
    """Running mean over the last ``width`` values."""
    out: List[float] = []
    window: List[float] = []
    for v in values:
        window = (window + [v])[-width:]
        out.append(sum(window) / len(window))
    return out


def plot(results: List[Dict[str, Any]], path: Path, title: str) -> Path:
    from lm.plotting import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for res, color in zip(results, ("tab:gray", "tab:red", "tab:blue", "black", "tab:orange")):
        steps = [s for s, _ in res["train"]]
        ax.plot(
            steps,
            smooth([v for _, v in res["train"]]),
            color=color,
            lw=1.2,
            label=f"{res['label']}: train (mean of 10)",
        )
        if res["val"]:
            ax.plot(
                [s for s, *_ in res["val"]],
                [v for _, v, _ in res["val"]],
                "o--",
                color=color,
                label=f"{res['label']}: val",
            )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    saved = save_figure(fig, path)
    plt.close(fig)
    return saved


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="rwkv7/small", help="configs/model/<name> (default rwkv7/small)")
    p.add_argument("--experiment", default="main", help="configs/experiment/<name> (default main: the demo)")
    p.add_argument("--steps", type=int, default=None, help="train.max_steps (default: the experiment's)")
    p.add_argument("--runs", default="runs/bench-recipes", help="where the two run directories go")
    p.add_argument("--out", default="docs/recipes", help="results.json and loss.png go here")
    p.add_argument("--only", choices=sorted(ALL), default=None, help="train only this recipe (no report)")
    p.add_argument("--report", action="store_true", help="no training: report the runs already in --runs")
    p.add_argument("overrides", nargs="*", help="more key=value overrides for both runs")
    args = p.parse_args(argv)
    out, runs = Path(args.out), Path(args.runs)
    labels = [args.only] if args.only else list(RECIPES)
    if not args.report:
        for label in labels:
            train_run(args.experiment, overrides(args.model, args.steps, runs, label, args.overrides))
    if args.only:
        return 0
    present = [label for label in DIAGNOSTICS if (runs / label / "logs" / "metrics.csv").is_file()]
    results = [collect(label, runs / label) for label in [*RECIPES, *present]]
    for res in results:
        res["parameters"] = parameters(runs / res["label"])
    for res in results:
        print(
            f"{res['label']:7s} steps {res['steps']}  val loss {res['val_loss']:.4f}  val bpb {res['val_bpb']:.4f}  "
            f"tokens/s {res['tokens_per_s']:.0f}",
            flush=True,
        )
    meta = {
        "model": args.model,
        "experiment": args.experiment,
        "extra_overrides": args.overrides,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    print(markdown(results))
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "results.json", json.dumps({**meta, "runs": results}, indent=1) + "\n")
    if len(results) > 1:
        png = plot(results, out / "loss.png", f"{args.model}, {args.experiment}: before / after the reference recipe")
        print(f"wrote {out / 'results.json'} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
