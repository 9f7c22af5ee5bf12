"""GPU acceptance, one command: ``python -m lm.gpu_acceptance [--out docs/gpu-acceptance.md] [--quick]``.

Runs on one CUDA GPU (H100/H200: under 10 minutes) and writes a Markdown report with:

1. every Triton kernel, forward and backward, against the chunked PyTorch path at realistic shapes
   (bf16 and fp32): max absolute and relative errors of outputs, final states and gradients;
2. milliseconds (forward, forward+backward) of our Triton kernels, fla's (when installed) and
   ``scaled_dot_product_attention`` at B=8, T=4096, H=16, K=V=128, bf16;
3. ``linear_scan`` GB/s against the measured device-to-device copy;
4. the fused-recurrent Triton kernels against the Python step loop (the reference backend);
5. ``lm train`` of gla/125m, gated_rnn/125m and rwkv7/125m for ~30 bf16 steps (tokens/s, MFU, peak
   memory), single GPU and DeepSpeed ZeRO-2 on one GPU (``configs/train/gpu-acceptance.yaml``);
6. generation ms/token (125M models, bf16, after a 4k-token prompt).

Each section is guarded: a failure is reported (with its last error line) and the rest still runs.
The report is rewritten after every section, so a run stopped from outside keeps what it measured;
``--budget-s`` bounds the whole run (a section that would start after it is skipped and the training
runs' timeouts shrink to what is left). Without CUDA it says so and exits 0. ``--cpu-smoke`` runs the same code paths at tiny shapes on the
CPU (Triton on the interpreter, timings on CPU tensors, fla skipped) so a test can prove the
script works; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
TRAIN_TIMEOUT_S = 900.0  # one ``lm train`` run (compiles every kernel on a fresh machine)
TRAIN_MODELS = ("gla", "gated_rnn", "rwkv7")
#: op -> (label, kernels.bench input variant); gla with a per-key and a per-head gate
KERNEL_CASES = (
    ("linear_scan", ""),
    ("gla", ""),
    ("gla", "head"),
    ("delta_rule", ""),
    ("dplr", ""),
    ("softmax_scan", ""),
    ("recurrent_delta", ""),
    ("srwm", ""),
)
FLA_OPS = ("linear_scan", "gla", "delta_rule", "dplr")  # linear_scan: fla's fused-recurrent HGRN


@dataclass
class Plan:
    """Shapes and sizes of one run: the GPU plan, ``--quick``, or the CPU smoke test's."""

    device: str
    check_shapes: Dict[str, List[dict]]  # op -> Shape fields for the Triton-vs-PyTorch check
    check_dtypes: Sequence[str]
    time_shape: dict  # the timing shape (B, T, H, K, V)
    recurrent_T: Dict[str, int]  # op -> T for fused-recurrent vs step loop
    repeats: int
    model_size: str
    train_models: Sequence[str]
    strategies: Sequence[str]
    train_overrides: List[str] = field(default_factory=list)
    gen_context: int = 4096
    gen_steps: int = 32


def gpu_plan(quick: bool) -> Plan:
    big = dict(B=4, T=2048, H=8, K=128, V=128)
    fused = dict(B=4, T=1024, H=8, K=64, V=64)
    # recurrent_delta / srwm at K = 128 take row-blocked kernels (scratch ordered by barriers)
    fused_wide = dict(B=2, T=512, H=4, K=128, V=128)
    return Plan(
        device="cuda",
        check_shapes={
            op: ([fused, fused_wide] if op in ("recurrent_delta", "srwm") else [big]) for op, _ in KERNEL_CASES
        },
        check_dtypes=("bf16",) if quick else ("bf16", "fp32"),
        time_shape=dict(B=8, T=4096, H=16, K=128, V=128),
        recurrent_T={"gla": 16, "delta_rule": 16, "dplr": 16, "recurrent_delta": 256, "srwm": 256},
        repeats=5 if quick else 20,
        model_size="125m",
        train_models=TRAIN_MODELS[:1] if quick else TRAIN_MODELS,
        strategies=("single", "zero2"),
        train_overrides=["train.max_steps=15"] if quick else [],
    )


def cpu_smoke_plan() -> Plan:
    tiny = dict(B=1, T=18, H=1, K=16, V=16)  # T > 16: the chunked kernels
    return Plan(
        device="cpu",
        check_shapes={op: [tiny] for op, _ in KERNEL_CASES},
        check_dtypes=("fp32",),
        time_shape=dict(B=1, T=64, H=2, K=16, V=16),
        recurrent_T={"gla": 2, "delta_rule": 2, "dplr": 2, "recurrent_delta": 2, "srwm": 2},
        repeats=1,
        model_size="tiny",
        train_models=TRAIN_MODELS[:1],
        strategies=("single",),
        train_overrides=["train.max_steps=3", "train.seq_len=32", "train.micro_batch_size=2"],
        gen_context=32,
        gen_steps=4,
    )


# ---- report ------------------------------------------------------------------------------------


class Report:
    """Markdown sections, written to ``out`` after each one; progress goes to stdout. ``budget_s``: the
    seconds the whole run may take (None: unbounded)."""

    def __init__(self, out: Optional[Path] = None, budget_s: Optional[float] = None) -> None:
        self.lines: List[str] = []
        self.failures: List[str] = []
        self.skipped: List[str] = []
        self.out = out
        self.deadline = None if budget_s is None else time.monotonic() + budget_s

    def remaining_s(self) -> Optional[float]:
        """Seconds left of the budget (None: unbounded)."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def write(self) -> None:
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(self.text())

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def table(self, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        self.add("| " + " | ".join(header) + " |", "|" + "---|" * len(header))
        for row in rows:
            self.add("| " + " | ".join(str(c) for c in row) + " |")
        self.add("")

    def section(self, title: str, fn: Callable[["Report"], None]) -> None:
        """Run one section; an exception is recorded in the report and does not stop the run."""
        self.add(f"## {title}", "")
        left = self.remaining_s()
        if left is not None and left <= 0:
            self.add("_skipped: the time budget (--budget-s) was spent_", "")
            self.skipped.append(title)
            print(f"[gpu-acceptance] {title}: skipped (time budget spent)", flush=True)
            self.write()
            return
        print(f"[gpu-acceptance] {title} ...", flush=True)
        t0 = time.perf_counter()
        try:
            fn(self)
        except Exception as e:  # noqa: BLE001 -- every section must be reported, whatever failed
            last = f"{type(e).__name__}: {e}".strip().splitlines()[0][:300]
            self.failures.append(f"{title}: {last}")
            self.add(f"**FAILED**: `{last}`", "", "```", traceback.format_exc(limit=4).rstrip()[-2000:], "```", "")
            print(f"[gpu-acceptance] {title} FAILED: {last}", flush=True)
        self.add(f"_{time.perf_counter() - t0:.0f} s_", "")
        print(f"[gpu-acceptance] {title} done in {time.perf_counter() - t0:.0f} s", flush=True)
        self.write()

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _fmt(x: Optional[float], spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


# ---- sections -----------------------------------------------------------------------------------


def environment(plan: Plan, report: Report) -> None:
    import torch

    from kernels._dispatch import fla_available, triton_available

    rows = [
        ("date", datetime.datetime.now().isoformat(timespec="seconds")),
        ("device", torch.cuda.get_device_name(0) if plan.device == "cuda" else f"CPU ({platform.machine()})"),
        ("torch", torch.__version__),
        ("CUDA", torch.version.cuda or "-"),
        ("Python", platform.python_version()),
    ]
    if triton_available():
        import triton

        rows.append(("triton", triton.__version__))
    if fla_available():
        from importlib.metadata import version

        rows.append(("fla-core", version("fla-core")))
    else:
        rows.append(("fla", "not installed (fla rows skipped)"))
    report.table(("", ""), rows)


def _shape(fields: dict, dtype: str, device: str):
    import torch

    from kernels.bench import Shape

    dt = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[dtype]
    return Shape(dtype=dt, device=torch.device(device), **fields)


def _forward_backward(op: str, args: dict, backend: str, seed: int = 0):
    """Output, final state and input gradients under a fixed cotangent (``kernels.<op>``)."""
    import torch

    import kernels

    leaves = {n: x.detach().clone().requires_grad_() for n, x in args.items()}
    out, state = getattr(kernels, op)(**leaves, output_final_state=True, backend=backend)
    states = list(state) if isinstance(state, (tuple, list)) else [state]
    gen = torch.Generator(device=out.device).manual_seed(seed)
    loss = (out.float() * torch.randn(out.shape, device=out.device, generator=gen)).sum()
    for s in states:
        loss = loss + (s.float() * torch.randn(s.shape, device=s.device, generator=gen)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    named = {"output": out, **{f"state[{i}]": s for i, s in enumerate(states)}}
    named.update({f"grad {n}": g for n, g in zip(leaves, grads)})
    return named


def triton_vs_torch(plan: Plan, report: Report) -> None:
    import torch

    from kernels.bench import make_inputs

    rows = []
    for dtype in plan.check_dtypes:
        for op, variant in KERNEL_CASES:
            for fields in plan.check_shapes[op]:
                args = make_inputs(op, _shape(fields, dtype, plan.device), variant)
                ours, theirs = _forward_backward(op, args, "triton"), _forward_backward(op, args, "torch")
                again = _forward_backward(op, args, "triton")
                worst_name, worst_rel, worst_abs = "", 0.0, 0.0
                for name, x in ours.items():
                    ref = theirs[name].detach().double()
                    err = float((x.detach().double() - ref).abs().max())
                    rel = err / max(float(ref.abs().max()), 1e-12)
                    if rel >= worst_rel:
                        worst_name, worst_rel, worst_abs = name, rel, err
                same = all(torch.equal(x, again[name]) for name, x in ours.items())
                label = f"{op} (per-head g)" if variant == "head" else op
                shape = "B{B} T{T} H{H} K{K} V{V}".format(**fields)
                rows.append(
                    (label, dtype, shape, f"{worst_abs:.3g}", f"{worst_rel:.3g}", worst_name, "yes" if same else "NO")
                )
                print(
                    f"  {label} {dtype} {shape}: max rel {worst_rel:.3g} ({worst_name}), repeat equal {same}",
                    flush=True,
                )
    report.add(
        "Triton (fwd + bwd) against the chunked PyTorch path on the same inputs; the worst tensor "
        "of outputs, final states and every input gradient. The kernels use no atomics, so a second "
        "Triton run must be bit-identical: 'NO' in the last column points at a race (the barrier-ordered "
        "scratch of the row-blocked and key-blocked kernels), which the interpreter cannot show.",
        "",
    )
    report.table(("op", "dtype", "shape", "max abs err", "max rel err", "worst tensor", "repeat bit-identical"), rows)
    racy = [f"{r[0]} {r[1]} {r[2]}" for r in rows if r[-1] == "NO"]
    if racy:
        raise RuntimeError(f"Triton results differ between two identical runs: {'; '.join(racy)}")


def kernel_timings(plan: Plan, report: Report) -> None:
    from kernels._dispatch import fla_available
    from kernels.bench import time_op, time_sdpa

    s = _shape(plan.time_shape, "bf16" if plan.device == "cuda" else "fp32", plan.device)
    backends = ["triton", "torch"] if plan.device == "cuda" else ["torch"]
    use_fla = plan.device == "cuda" and fla_available()
    rows = []
    for op, variant in KERNEL_CASES[:5]:  # linear_scan, gla (both gates), delta_rule, dplr
        label = f"{op} (per-head g)" if variant == "head" else op
        times = {b: time_op(op, b, s, plan.repeats, variant) for b in backends}
        if use_fla and op in FLA_OPS:
            times["fla"] = time_op(op, "fla", s, plan.repeats, variant)
        for b, (t_f, t_fb) in times.items():
            ratio = ""
            if b == "triton" and "fla" in times:
                ratio = f"{times['fla'][1] / t_fb:.2f}x"
            rows.append((label, b, f"{1e3 * t_f:.2f}", f"{1e3 * t_fb:.2f}", ratio))
            print(f"  {label} {b}: fwd {1e3 * t_f:.2f} ms, fwd+bwd {1e3 * t_fb:.2f} ms", flush=True)
    t_f, t_fb = time_sdpa(s, plan.repeats)
    rows.append(("scaled_dot_product_attention (causal)", "torch", f"{1e3 * t_f:.2f}", f"{1e3 * t_fb:.2f}", ""))
    shape = "B={B}, T={T}, H={H}, K=V={K}".format(**plan.time_shape)
    report.add(
        f"{shape}, {str(s.dtype).replace('torch.', '')}; median of {plan.repeats}. "
        '"fla / triton": fla\'s forward+backward time over ours (goal >= 0.8).'
        + ("" if use_fla else " fla: not run (not installed, or no CUDA)."),
        "",
    )
    report.table(("op", "backend", "fwd ms", "fwd+bwd ms", "fla / triton"), rows)


def scan_bandwidth(plan: Plan, report: Report) -> None:
    from kernels.bench import copy_bandwidth, time_op, work_model

    s = _shape(plan.time_shape, "bf16" if plan.device == "cuda" else "fp32", plan.device)
    backend = "triton" if plan.device == "cuda" else "torch"
    t_f, t_fb = time_op("linear_scan", backend, s, plan.repeats)
    w_f, w_fb, _ = work_model("linear_scan", s)
    copy = copy_bandwidth(s.device, int(w_f), plan.repeats)
    rows = [
        ("forward", f"{1e3 * t_f:.2f}", f"{w_f / t_f / 1e9:.3g}", f"{w_f / t_f / 1e9 / copy:.0%}"),
        ("forward+backward", f"{1e3 * t_fb:.2f}", f"{w_fb / t_fb / 1e9:.3g}", f"{w_fb / t_fb / 1e9 / copy:.0%}"),
    ]
    D = s.H * s.K
    report.add(
        f"`linear_scan` ({backend}), B={s.B}, T={s.T}, D={D}; device-to-device copy of the same bytes: "
        f"{copy:.3g} GB/s (goal: >= 70% of it).",
        "",
    )
    report.table(("pass", "ms", "GB/s", "share of copy"), rows)


def fused_vs_loop(plan: Plan, report: Report) -> None:
    from kernels.bench import time_op

    rows = []
    backend = "triton"
    for op in ("gla", "delta_rule", "dplr", "recurrent_delta", "srwm"):
        fields = dict(plan.time_shape, T=plan.recurrent_T[op])
        if op in ("recurrent_delta", "srwm"):
            fields.update(K=min(fields["K"], 64), V=min(fields["V"], 64))
        s = _shape(fields, "bf16" if plan.device == "cuda" else "fp32", plan.device)
        t_fused = time_op(op, backend, s, plan.repeats)[1]
        t_loop = time_op(op, "reference", s, 1)[1]
        rows.append(
            (op, f"T={s.T}, K={s.K}", f"{1e3 * t_fused:.2f}", f"{1e3 * t_loop:.1f}", f"{t_loop / t_fused:.0f}x")
        )
        print(f"  {op}: fused {1e3 * t_fused:.2f} ms, loop {1e3 * t_loop:.1f} ms", flush=True)
    report.add(
        f"Forward+backward, B={plan.time_shape['B']}, H={plan.time_shape['H']}: the fused-recurrent Triton "
        "kernels (gla/delta_rule/dplr take them for T <= 16) against the reference step loop (goal: >= 20x).",
        "",
    )
    report.table(("op", "shape", "fused ms", "step loop ms", "speed-up"), rows)


def _data_overrides(plan: Plan, workdir: Path) -> List[str]:
    """The 4 MB stdlib-small corpus (400 KB and a 512-token BPE in the smoke), prepared by the first run."""
    out = ["data=stdlib-small", f"data.out_dir={workdir / 'data'}"]
    if plan.device == "cpu":
        out += [
            "data.source.max_bytes=400000",
            "data.tokenizer.vocab_size=512",
            "data.tokenizer.train_max_bytes=400000",
        ]
    return out


def _strategy_overrides(strategy: str) -> List[str]:
    return ["train.strategy=deepspeed", "train.zero_stage=2"] if strategy == "zero2" else ["train.strategy=auto"]


def train_runs(plan: Plan, workdir: Path) -> list:
    """[(model, strategy, run_dir, overrides of ``lm train main``)], each validated as a config."""
    from lm.config import load_experiment

    data = _data_overrides(plan, workdir)
    runs = []
    for name in plan.train_models:
        for strategy in plan.strategies:
            run_dir = workdir / f"{name}-{strategy}"
            train = ["train=cpu-test"] if plan.device == "cpu" else ["train=gpu-acceptance"]
            overrides = (
                train
                + [
                    f"model={name}/{plan.model_size}",
                    f"run_dir={run_dir}",
                    f"name=acceptance-{name}-{strategy}",
                    "checkpoint.every_n_steps=100000",
                    "probes.every_n_steps=0",
                ]
                + data
                + _strategy_overrides(strategy)
                + plan.train_overrides
            )
            load_experiment("main", overrides)  # a bad override fails here, with the key named
            runs.append((name, strategy, run_dir, overrides))
    return runs


def training(plan: Plan, report: Report) -> None:
    from lm.process_group import run_group
    from lm.training.callbacks import read_metrics_csv

    runs = train_runs(plan, Path(tempfile.mkdtemp(prefix="gpu-acceptance-")))
    rows = []
    for name, strategy, run_dir, overrides in runs:
        left = report.remaining_s()
        timeout = TRAIN_TIMEOUT_S if left is None else min(TRAIN_TIMEOUT_S, left)
        if timeout < 30:
            rows.append((name, strategy, "skipped", "", "", "", "", "time budget (--budget-s) spent"))
            continue
        print(f"  lm train {name}/{plan.model_size} ({strategy}) ...", flush=True)
        t0 = time.perf_counter()
        try:  # its own process group: DeepSpeed's or Lightning's children die with it
            proc = run_group([sys.executable, "-m", "lm.cli.main", "train", "main", *overrides], timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            rows.append((name, strategy, "TIMEOUT", "", "", "", f"{timeout:.0f}", f"killed after {timeout:.0f} s"))
            report.failures.append(f"lm train {name} ({strategy}): timed out after {timeout:.0f} s")
            continue
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
            rows.append((name, strategy, "FAILED", "", "", "", f"{wall:.0f}", f"`{tail[0][:200]}`"))
            report.failures.append(f"lm train {name} ({strategy}): {tail[0][:200]}")
            continue
        metrics = [r for r in read_metrics_csv(run_dir / "logs" / "metrics.csv") if "perf/tokens_per_s" in r]
        steady = metrics[len(metrics) // 3 :] or metrics  # skip warm-up (compilation, autotuning)
        tps = sorted(r["perf/tokens_per_s"] for r in steady)[len(steady) // 2]
        mfu = [r["perf/mfu"] for r in steady if "perf/mfu" in r]
        mem = max((r.get("perf/peak_mem_gb", 0.0) for r in metrics), default=0.0)
        rows.append(
            (
                name,
                strategy,
                f"{tps:,.0f}",
                f"{sorted(mfu)[len(mfu) // 2]:.0%}" if mfu else "-",
                f"{mem:.1f}" if mem else "-",
                f"{len(metrics)}",
                f"{wall:.0f}",
                "",
            )
        )
        print(f"  {name} ({strategy}): {tps:,.0f} tokens/s", flush=True)
    report.add(
        f"`lm train main model=<name>/{plan.model_size} train=gpu-acceptance` (+ strategy overrides): "
        "median over the steps after the first third. Goal: MFU >= 40% for gla and gated_rnn.",
        "",
    )
    report.table(("model", "strategy", "tokens/s", "MFU", "peak GiB", "steps logged", "wall s", "error"), rows)


def generation(plan: Plan, report: Report) -> None:
    import torch

    from lm.evaluation.bench_generate import build
    from lm.evaluation.sampling import prefill

    rows = []
    device = torch.device(plan.device)
    dtype = torch.bfloat16 if plan.device == "cuda" else torch.float32
    for name in ("gla", "gated_rnn", "rwkv7", "transformer")[: 4 if plan.device == "cuda" else 1]:
        model = build(name, plan.model_size, 8192, plan.gen_context + plan.gen_steps + 8).to(device, dtype)
        tokens = torch.randint(0, 8192, (1, plan.gen_context), device=device)
        with torch.no_grad():
            logits, state = prefill(model, tokens, 1024)
            token = logits.argmax(-1)
            times = []
            for i in range(plan.gen_steps + 2):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                logits, state = model.step(token, state)
                token = logits.argmax(-1)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= 2:
                    times.append(time.perf_counter() - t0)
        times.sort()
        rows.append((f"{name}/{plan.model_size}", plan.gen_context, f"{1e3 * times[len(times) // 2]:.2f}"))
        print(f"  {name}: {1e3 * times[len(times) // 2]:.2f} ms/token", flush=True)
        del model, state
    report.add(
        f"Batch 1, {str(dtype).replace('torch.', '')}, greedy, after a {plan.gen_context}-token prompt "
        "(prefilled in 1024-token pieces); median of the decode steps.",
        "",
    )
    report.table(("model", "context", "ms/token"), rows)


SECTIONS = (
    ("Environment", environment),
    ("Triton kernels against the chunked PyTorch path", triton_vs_torch),
    ("Kernel timings against fla and SDPA", kernel_timings),
    ("linear_scan bandwidth", scan_bandwidth),
    ("Fused-recurrent kernels against the step loop", fused_vs_loop),
    ("Training (lm train)", training),
    ("Generation", generation),
)


def run(plan: Plan, out: Path, skip: Sequence[str] = (), budget_s: Optional[float] = None) -> Report:
    report = Report(out, budget_s)
    title = "CPU smoke run (figures meaningless)" if plan.device == "cpu" else "GPU acceptance"
    report.add(f"# {title}", "", "Written by `python -m lm.gpu_acceptance`.", "")
    t0 = time.perf_counter()
    for i, (name, fn) in enumerate(SECTIONS):
        if str(i + 1) in skip or name.split()[0].lower() in skip:
            continue
        report.section(name, lambda r, fn=fn: fn(plan, r))
    report.add(
        "## Summary",
        "",
        f"Total {time.perf_counter() - t0:.0f} s; "
        + (f"{len(report.failures)} failure(s):" if report.failures else "no failures.")
        + (f" Skipped for the time budget: {', '.join(report.skipped)}." if report.skipped else ""),
        "",
    )
    report.add(*[f"- {f}" for f in report.failures])
    report.write()
    print(f"[gpu-acceptance] report written to {out}", flush=True)
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lm.gpu_acceptance", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "gpu-acceptance.md")
    p.add_argument("--quick", action="store_true", help="bf16 checks only, fewer repeats, one training model")
    p.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="the same code paths at tiny shapes on the CPU (Triton on the interpreter)",
    )
    p.add_argument("--skip", default="", help="comma-separated section numbers or first words to skip")
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="seconds the whole run may take: later sections are skipped, training timeouts shrink",
    )
    args = p.parse_args(argv)
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel module is imported
        plan = cpu_smoke_plan()
    else:
        import torch

        if not torch.cuda.is_available():
            print(
                "gpu-acceptance: no CUDA device here; nothing to measure (use --cpu-smoke to check the script "
                "on the CPU)"
            )
            return 0
        plan = gpu_plan(args.quick)
    skip = [s.strip().lower() for s in args.skip.split(",") if s.strip()]
    report = run(plan, args.out, skip, args.budget_s)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
