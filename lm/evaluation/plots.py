"""PNG figures of evaluation results (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from lm.plotting import pyplot, save_figure


def plot_loss_by_position(result: Dict[str, Any], path: Path) -> Path:
    """Mean loss per position bucket within documents (log-scaled position axis), with the
    training length marked."""
    plt = pyplot()
    buckets = result["loss_by_position"]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [max(0.5, (b["start"] + b["end"] - 1) / 2) for b in buckets]
    ax.plot(xs, [b["loss"] for b in buckets], "o-", label=result["model"])
    if result.get("train_seq_len"):
        ax.axvline(
            result["train_seq_len"], color="gray", ls="--", lw=1, label=f"training length {result['train_seq_len']}"
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in document (bucket centre)")
    ax.set_ylabel("mean loss (nats)")
    bpb = result.get("bits_per_byte")
    ax.set_title(
        f"{result['model']} step {result['step']}: ppl {result['ppl']:.2f}"
        + (f", {bpb:.3f} bits/byte" if bpb is not None else ""),
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def plot_sweep(
    task: str, key: str, rows: List[Dict[str, Any]], path: Path, model: str = "", chance: Optional[float] = None
) -> Path:
    """Accuracy (per position and per sequence) or loss against the swept parameter of one task;
    ``chance``: the per-position accuracy of a uniform guess, drawn as a dotted line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [str(r["value"]) for r in rows]
    xs = list(range(len(rows)))
    if any(r.get("acc") is not None for r in rows):
        for metric, style in (("acc", "o-"), ("seq_acc", "s--")):
            ys = [r.get(metric) for r in rows]
            if any(y is not None for y in ys):
                ax.plot(xs, [float("nan") if y is None else y for y in ys], style, label=metric)
        if chance is not None:
            ax.axhline(chance, color="gray", ls=":", lw=1.2, label=f"chance ({chance:.3g})")
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("accuracy")
    else:
        ax.plot(xs, [r["loss"] for r in rows], "o-", label="model loss")
        if any(r.get("baseline_loss") is not None for r in rows):
            ax.plot(xs, [r.get("baseline_loss") for r in rows], "s--", label="one-step GD")
        ax.set_ylabel("loss")
    ax.set_xticks(xs, labels)
    ax.set_xlabel(key)
    ax.set_title(f"{model}: {task}" if model else task, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out
