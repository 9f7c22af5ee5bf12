"""Smoke runs of the benchmark scripts on tiny shapes, so that they keep working (their numbers are
recorded in docs/benchmarks.md, never asserted)."""

import json
import subprocess
import sys

from tests.helpers import REPO


def run(*args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_kernels_bench_runs():
    out = run(
        "kernels.bench",
        "--ops",
        "linear_scan,gla",
        "--backends",
        "reference,torch",
        "--T",
        "64",
        "--H",
        "2",
        "--K",
        "16",
        "--V",
        "16",
        "--repeats",
        "1",
        "--threads",
        "1",
        "--markdown",
        "--no-extras",
    )
    assert "| gla" in out and "linear_scan" in out


def test_training_bench_runs(tmp_path):
    out_file = tmp_path / "train.json"
    out = run(
        "lm.training.bench",
        "--names",
        "gla",
        "transformer",
        "--size",
        "tiny",
        "--T",
        "32",
        "64",
        "--tokens",
        "64",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--vocab",
        "128",
        "--out",
        str(out_file),
    )
    assert "| gla |" in out and "| transformer |" in out
    results = json.loads(out_file.read_text())["results"]
    assert results["gla"]["64"]["tokens_per_s"] > 0


def test_packing_bench_runs(tmp_path):
    out_file = tmp_path / "packing.json"
    out = run(
        "lm.training.bench_packing",
        "--names",
        "gla",
        "transformer",
        "--size",
        "tiny",
        "--T",
        "64",
        "--docs",
        "4",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--vocab",
        "128",
        "--out",
        str(out_file),
    )
    assert "| gla |" in out and "| transformer |" in out
    results = json.loads(out_file.read_text())["results"]
    assert results["gla"]["reset_tokens_per_s"] > 0 and results["gla"]["documents_per_window"] > 1


def test_probe_bench_runs():
    out = run(
        "lm.probes.bench",
        "--names",
        "gla",
        "--size",
        "tiny",
        "--seq-len",
        "32",
        "--batch",
        "2",
        "--probe-len",
        "16",
        "--probe-batch",
        "4",
        "--repeats",
        "1",
    )
    assert "| gla |" in out
