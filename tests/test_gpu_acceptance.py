"""``python -m lm.gpu_acceptance``: without CUDA it says so and exits 0; ``--cpu-smoke`` runs every
section's code path at tiny shapes on the CPU and writes a report with no failure."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_without_cuda_says_so_and_exits_cleanly(tmp_path):
    out = tmp_path / "report.md"
    proc = subprocess.run(
        [sys.executable, "-m", "lm.gpu_acceptance", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device" in proc.stdout
    assert not out.exists()


def test_gpu_plan_training_configs_validate(tmp_path):
    """The GPU run's 6 ``lm train`` configs (3 models x single / ZeRO-2) load and validate."""
    from lm.gpu_acceptance import gpu_plan, train_runs

    runs = train_runs(gpu_plan(quick=False), tmp_path)
    assert [(m, s) for m, s, _, _ in runs] == [
        (m, s) for m in ("gla", "gated_rnn", "rwkv7") for s in ("single", "zero2")
    ]
    zero2 = dict(o.split("=", 1) for o in runs[1][3])
    assert zero2["train.strategy"] == "deepspeed" and zero2["train.zero_stage"] == "2"


@pytest.mark.slow
def test_cpu_smoke_runs_every_section(tmp_path):
    out = tmp_path / "report.md"
    proc = subprocess.run(
        [sys.executable, "-m", "lm.gpu_acceptance", "--cpu-smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    text = out.read_text() if out.exists() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + text[-3000:]
    for title in (
        "Environment",
        "Triton kernels against the chunked PyTorch path",
        "Kernel timings",
        "linear_scan bandwidth",
        "Fused-recurrent kernels",
        "Training (lm train)",
        "Generation",
    ):
        assert f"## {title}" in text, title
    assert "no failures." in text and "FAILED" not in text
    assert "| srwm | fp32 |" in text  # every Triton kernel was compared
    assert "| gla | single |" in text  # a real lm train run reported tokens/s
