"""Small training callbacks: a per-step record of the samples each rank consumed, and the loss-curve
plot written at the end of training."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, TextIO

from pytorch_lightning.callbacks import Callback

from lm.training.steps import ends_optimizer_step


class SampleRecorder(Callback):
    """Append ``{"step", "batch_idx", "index"}`` per micro-batch to ``samples/rank<r>.jsonl``.

    ``step`` is the optimizer step the micro-batch contributes to (1-based). After a resume the
    re-done steps appear again; the last record of a step is the one that counted.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._file: Optional[TextIO] = None

    def on_train_start(self, trainer, pl_module) -> None:
        path = self.run_dir / "samples" / f"rank{trainer.global_rank:05d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", buffering=1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step if ends_optimizer_step(trainer, batch_idx) else trainer.global_step + 1
        record = {"step": step, "batch_idx": batch_idx, "index": [int(i) for i in batch["index"].tolist()]}
        assert self._file is not None  # opened by on_train_start
        self._file.write(json.dumps(record) + "\n")

    def on_train_end(self, trainer, pl_module) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics_csv(path: Path) -> List[Dict[str, float]]:
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows.append({k: float(v) for k, v in row.items() if v not in ("", None)})
    return rows


def plot_loss_curves(metrics_csv: Path, out_png: Path) -> Path:
    """Training loss per step and validation loss (and bits/byte when present) as a PNG."""
    from lm.plotting import pyplot, save_figure

    plt = pyplot()
    rows = read_metrics_csv(metrics_csv)
    train = {int(r["step"]): r["train/loss"] for r in rows if "train/loss" in r and math.isfinite(r["train/loss"])}
    val = {int(r["step"]): r["val/loss"] for r in rows if "val/loss" in r}
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        steps = sorted(train)
        ax.plot(steps, [train[s] for s in steps], lw=1, label="train loss")
    if val:
        steps = sorted(val)
        ax.plot(steps, [val[s] for s in steps], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        return save_figure(fig, out_png, dpi=110)
    finally:
        plt.close(fig)
