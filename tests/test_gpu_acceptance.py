"""``python -m lm.gpu_acceptance``: without CUDA it says so and exits 0; ``--cpu-smoke`` runs every
section's code path at tiny shapes on the CPU and writes a report with no failure."""

import sys
from pathlib import Path

import pytest
import torch

from lm.process_group import run_group

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_without_cuda_says_so_and_exits_cleanly(tmp_path):
    out = tmp_path / "report.md"
    proc = run_group([sys.executable, "-m", "lm.gpu_acceptance", "--out", str(out)], 300, cwd=ROOT)
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
    proc = run_group([sys.executable, "-m", "lm.gpu_acceptance", "--cpu-smoke", "--out", str(out)], 900, cwd=ROOT)
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


def test_report_is_written_after_each_section_and_the_budget_skips(tmp_path):
    """A run stopped from outside keeps every finished section; sections past ``--budget-s`` are
    skipped and named in the summary; a failing section is reported and the next one still runs."""
    from lm.gpu_acceptance import Report

    out = tmp_path / "report.md"
    report = Report(out, budget_s=3600)
    report.section("First", lambda r: r.add("first body"))
    assert "## First" in out.read_text() and "first body" in out.read_text()

    def boom(r):
        raise RuntimeError("kernel exploded\nsecond line")

    report.section("Second", boom)
    assert report.failures == ["Second: RuntimeError: kernel exploded"]
    assert "**FAILED**" in out.read_text()
    report.deadline = 0.0  # the budget is spent
    ran = []
    report.section("Third", lambda r: ran.append(1))
    assert not ran and report.skipped == ["Third"] and "_skipped: the time budget" in out.read_text()


def test_budget_zero_skips_every_section(tmp_path):
    from lm.gpu_acceptance import cpu_smoke_plan, run

    out = tmp_path / "report.md"
    report = run(cpu_smoke_plan(), out, budget_s=0)
    text = out.read_text()
    assert not report.failures and len(report.skipped) == 7
    assert "Skipped for the time budget: Environment" in text
