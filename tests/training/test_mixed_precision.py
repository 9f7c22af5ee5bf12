"""``train.precision: bf16-mixed`` (what the GPU configs run): fp32 weights, bf16 autocast around the
forward. Each family whose mixer used to mix dtypes at its kernel calls (rwkv7: fp32 keys beside bf16
receptances; recurrent_delta: fp32 state products inside the kernel under autocast) trains a few
steps on the CPU with finite, falling loss, packed documents included."""

import csv
import math
from pathlib import Path

import pytest

from lm.config import load_experiment
from lm.training.trainer import train
from tests.helpers import experiment


@pytest.mark.parametrize("model", ["rwkv7/tiny", "recurrent_delta/tiny", "gla/tiny"])
def test_bf16_mixed_training_runs(tmp_path, tiny_data, model):
    path = experiment(
        tmp_path,
        tiny_data,
        defaults={"model": model, "train": "cpu-test"},
        train={"max_steps": 8, "precision": "bf16-mixed", "lr": 1e-2, "val_every_n_steps": 8},
        data={"packing": "reset"},
        checkpoint={"every_n_steps": 1000},
    )
    cfg = load_experiment(str(path))
    result = train(cfg, echo=lambda msg: None)
    assert result.global_step == 8 and math.isfinite(result.val_loss)
    rows = csv.DictReader(open(Path(cfg.run_dir) / "logs" / "metrics.csv"))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
