"""The compile gate (``python -m kernels.compile_check``): its launch recording on meta tensors,
ptxas log parsing and verdicts (fast), and the CI subset itself (compiles for sm_90, no GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from kernels import compile_check as cc  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _gate(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """The gate in a fresh interpreter without TRITON_INTERPRET (under it ``triton.jit`` makes
    interpreter functions, and the launchers pick CPU tile sizes)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "kernels.compile_check", "--no-progress", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _launches(*args: str):
    proc = _gate("--list", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    return [r for r in rows if "kernel" in r], [r for r in rows if "falls_back" in r]


def test_recording_runs_the_real_launchers():
    """delta_rule at K = V = 128 takes 32-step chunks and the launchers' block sizes; the
    backward adds its kernels; a 256-wide head falls back to PyTorch (and launches nothing)."""
    jobs, fallbacks = _launches(
        "--op", "delta_rule", "--head-dim", "128", "--head-dim", "256", "--dtype", "bf16", "--subset", "ci"
    )
    names = [(j["kernel"], j["constexprs"]["IS_VARLEN"]) for j in jobs if "K=128" in j["calls"][0]]
    chunked = ["_prep_fwd", "_state_fwd", "_output_fwd", "_state_bwd", "_grads_output_state", "_grads_solve"]
    recurrent = ["_recurrent_fwd", "_recurrent_bwd"]
    # one launch per kernel, packing and head dim: plain, then packed sequences (the ``varlen`` case)
    assert names == [(n, v) for kernels in (chunked, recurrent) for v in (False, True) for n in kernels]
    # at 256 only the fused-recurrent kernels launch (T <= 16); the chunked path falls back
    wide = {j["kernel"] for j in jobs if "K=256" in j["calls"][0]}
    assert wide == set(recurrent)
    prep = jobs[0]
    assert prep["constexprs"] == {"GATED": True, "IS_VARLEN": False, "BT": 32, "BKC": 64, "BVC": 64, "PREC": "tf32"}
    assert prep["signature"]["k_ptr"] == "*bf16" and prep["signature"]["ainv_ptr"] == "*fp32"
    assert prep["options"]["num_stages"] == 1
    assert [(f["head"], f["call"]) for f in fallbacks] == [
        (256, "T=4096 fwd+bwd"),
        (256, "T=4096 fwd+bwd no g"),
        (256, "T=4096 fwd+bwd varlen"),
    ]
    assert all("exceed 128" in f["falls_back"] for f in fallbacks)


def test_every_op_runs_on_meta_tensors():
    """Each op's Triton launchers accept meta tensors: training (fwd+bwd), carried state, decoding;
    a decoding step (T = 1) is its own specialisation of the fused kernels."""
    jobs, fallbacks = _launches("--dtype", "fp32", "--head-dim", "64")
    assert not fallbacks
    assert {j["module"].split(".")[2] for j in jobs} == set(cc.OPS)
    decode = [j for j in jobs if any(" T=1 fwd" in c for c in j["calls"])]
    assert decode and all(j["signature"]["T"] == "constexpr" for j in decode if "T" in j["signature"])


def test_ci_subset_has_one_launch_per_kernel():
    cases = cc.cases_for(list(cc.OPS), ["bf16"], [64], subset=True)
    assert all(c.dtype == "bf16" and c.head == 64 for c in cases)
    assert {c.op for c in cases} == set(cc.OPS)
    wide = [c for c in cc.ci_cases(list(cc.OPS), ["bf16"]) if c.head != 64]
    assert {(c.op, c.head) for c in wide} == set(cc.CI_WIDE_HEADS.items())


def test_ci_subset_compiles_the_wide_head_kernels():
    """srwm's row-blocked kernels exist only at K = 128 and recurrent_delta's backward tiles differently
    there: the CI subset records them (plain and packed) beside the K = 64 launches."""
    jobs, _ = _launches("--subset", "ci", "--op", "srwm", "--op", "recurrent_delta")
    seen = {
        (j["kernel"], j["constexprs"].get("BD", j["constexprs"].get("BK")), j["constexprs"]["IS_VARLEN"]) for j in jobs
    }
    for kernel in ("_srwm_fwd_rows_kernel", "_srwm_bwd_rows_kernel", "_rdn_fwd_kernel", "_rdn_bwd_kernel"):
        assert (kernel, 128, False) in seen and (kernel, 128, True) in seen, kernel


def test_parse_ptxas_log_and_verdicts():
    log = (
        "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
        "ptxas info    : Function properties for k\n"
        "    64 bytes stack frame, 40 bytes spill stores, 300 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 16 bytes smem, 400 bytes cmem[0]\n"
    )
    info = cc.parse_ptxas_log(log)
    assert info == {"regs": 255, "spill": 300, "static_smem": 16, "ptxas": "ptxas", "ptxas_s": None}
    log_39 = log.replace("ptxas ", "ptxas-blackwell ") + "ptxas-blackwell info    : Compile time = 1794.5 ms\n"
    timed = cc.parse_ptxas_log(log_39)
    assert timed["ptxas"] == "ptxas-blackwell" and timed["ptxas_s"] == pytest.approx(1.7945)
    ok = {"status": "ok", "shared": 1000, "spill": 0}
    assert cc.verdict(ok, 90) == "ok"
    assert cc.verdict(dict(ok, shared=cc.SMEM_LIMIT[80] + 1), 80) == "FAIL: shared memory"
    assert cc.verdict(dict(ok, shared=cc.SMEM_LIMIT[80] + 1), 90) == "ok"
    assert cc.verdict(dict(ok, spill=cc.SPILL_LIMIT_BYTES + 1), 90) == "FAIL: spills"
    assert cc.verdict({"status": "timeout"}, 90) == "timeout"


def test_unknown_op_is_a_one_line_error():
    with pytest.raises(SystemExit, match="--op: unknown op 'glaa'"):
        cc._select_ops(["glaa"])
    assert "dplr" not in cc._select_ops(["-dplr"])


@pytest.mark.slow
@pytest.mark.triton
def test_ci_subset_compiles_for_sm90():
    """The gate's CI subset: every Triton kernel (one launch configuration each) compiles for sm_90
    within the shared-memory and spill limits. Replaces the per-op compile scripts."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this Triton install has no bundled ptxas")
    proc = _gate("--subset", "ci", "--timeout", "300")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "0 failed" in proc.stdout and "Triton " in proc.stdout
