"""Benchmark the kernels through the public API: ``python -m kernels.bench``.

For every op x backend x sequence length it prints forward ms, forward+backward ms, tokens/s
(forward+backward), the achieved work rate and the speed-up over the reference loop. Timings are
the median of repeats after warm-up (CUDA: synchronised). Work models (state-space recurrent form,
per token and head, forward; forward+backward counts 3x the forward FLOPs):

- ``gla``: 4 K V FLOPs (decay + outer product 2KV, readout 2KV);
- ``delta_rule``: 6 K V (prediction S^T k, update, readout);
- ``dplr``: 8 K V (a^T S, low-rank update, k v^T, readout);
- ``recurrent_delta``: 6 K V + 4 K V + 2 V^2 (delta rule + the recurrent projections of tanh(y));
- ``srwm``: 2 V D + 4 D^2 + 8 D (the four projections) + 4 D (V + 2 D + 4) (four rank-1 updates);
- ``linear_scan``, ``softmax_scan``: bytes moved (GB/s): linear_scan reads a, b and writes h
  (backward: reads a, h, dh, writes da, db); softmax_scan reads s, v and writes o and the fp32 log
  normaliser (backward: reads s, v, o, l, do, writes ds, dv);
- GPU extras: ``torch.nn.functional.scaled_dot_product_attention`` (causal) at the same shape,
  4 B H T^2 D / 2 FLOPs forward, and a device-to-device copy (2 x bytes / time) to compare the
  linear scan's bandwidth against.

The reference loop is slow: beyond ``--ref-max-T`` its time is estimated from the largest measured
length, scaled linearly in T (marked "est."). Triton runs only on CUDA tensors here (the CPU
interpreter is for correctness tests, not timing).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from kernels._dispatch import BACKENDS, _table

OPS = ("linear_scan", "gla", "delta_rule", "dplr", "softmax_scan", "recurrent_delta", "srwm")
#: table rows per op: (label, input variant); gla runs with a per-key and a per-head gate
CASES = {op: [(op, "")] for op in OPS}
CASES["gla"] = [("gla (g per key)", ""), ("gla (g per head)", "head")]


@dataclass
class Shape:
    B: int
    T: int
    H: int
    K: int
    V: int
    dtype: torch.dtype
    device: torch.device


@dataclass
class Row:
    op: str
    backend: str
    T: int
    fwd_ms: Optional[float]
    fb_ms: Optional[float]
    tokens: int
    work_fwd: float  # FLOPs or bytes of one forward
    unit: str  # "GFLOP/s" or "GB/s"
    work_fb: float
    estimated: bool = False
    note: str = ""
    speedup: Optional[float] = None
    estimated_ref: bool = False  # speedup relative to an estimated reference time


# ---- inputs ----------------------------------------------------------------------------------


def make_inputs(op: str, s: Shape, variant: str = "", seed: int = 0) -> Dict[str, torch.Tensor]:
    """Well-conditioned random inputs for ``op`` (``variant`` "head": gla with a per-head gate)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    B, T, H, K, V = s.B, s.T, s.H, s.K, s.V

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    def rand(*shape):
        return torch.rand(*shape, generator=gen)

    if op == "linear_scan":
        D = H * K
        args = {"a": 0.5 + 0.5 * rand(B, T, D), "b": randn(B, T, D)}
    elif op == "gla":
        g_shape = (B, T, H) if variant == "head" else (B, T, H, K)
        args = {
            "q": randn(B, T, H, K),
            "k": randn(B, T, H, K) * K**-0.5,
            "v": randn(B, T, H, V),
            "g": F.logsigmoid(randn(*g_shape) + 3.0) / 4,
        }
    elif op == "delta_rule":
        args = {
            "q": randn(B, T, H, K),
            "k": F.normalize(randn(B, T, H, K), dim=-1),
            "v": randn(B, T, H, V),
            "beta": rand(B, T, H),
            "g": F.logsigmoid(randn(B, T, H) + 3.0) / 4,
        }
    elif op == "dplr":
        kappa = F.normalize(randn(B, T, H, K), dim=-1)
        args = {
            "q": randn(B, T, H, K),
            "k": randn(B, T, H, K) * K**-0.5,
            "v": randn(B, T, H, V),
            "a": -kappa,
            "b": kappa * rand(B, T, H, K),
            "g": F.logsigmoid(randn(B, T, H, K) + 3.0) / 4,
        }
    elif op == "softmax_scan":
        args = {"s": randn(B, T, H, scale=3.0), "v": randn(B, T, H, V)}
    elif op == "recurrent_delta":
        args = {
            "q": randn(B, T, H, K),
            "k": randn(B, T, H, K),
            "v": randn(B, T, H, V),
            "beta": randn(B, T, H),
            "r_q": randn(H, K, V, scale=0.1),
            "r_k": randn(H, K, V, scale=0.1),
            "r_v": randn(H, V, V, scale=0.1),
            "r_b": randn(H, V, scale=0.1),
        }
    elif op == "srwm":
        D = K
        args = {
            "x": randn(B, T, H, D),
            "w_y": randn(H, V, D, scale=D**-0.5),
            "w_q": randn(H, D, D, scale=D**-0.5),
            "w_k": randn(H, D, D, scale=D**-0.5),
            "w_b": randn(H, 4, D, scale=D**-0.5),
        }
    else:
        raise ValueError(f"op: unknown op '{op}'; choose from {', '.join(OPS)}")
    return {n: x.to(device=s.device, dtype=s.dtype) for n, x in args.items()}


def work_model(op: str, s: Shape) -> Tuple[float, float, str]:
    """(forward work, forward+backward work, unit) following the module docstring."""
    B, T, H, K, V = s.B, s.T, s.H, s.K, s.V
    elt = torch.finfo(s.dtype).bits // 8
    tokens_heads = B * T * H
    if op == "linear_scan":
        n = B * T * H * K
        return 3 * n * elt, 8 * n * elt, "GB/s"
    if op == "softmax_scan":
        fwd = tokens_heads * ((2 * V + 1) * elt + 4)
        bwd = tokens_heads * ((4 * V + 2) * elt + 4)
        return fwd, fwd + bwd, "GB/s"
    per = {
        "gla": 4 * K * V,
        "delta_rule": 6 * K * V,
        "dplr": 8 * K * V,
        "recurrent_delta": 10 * K * V + 2 * V * V,
        "srwm": 2 * V * K + 4 * K * K + 8 * K + 4 * K * (V + 2 * K + 4),
    }[op]
    fwd = float(tokens_heads * per)
    return fwd, 3 * fwd, "GFLOP/s"


# ---- timing ----------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: "wall" (time.perf_counter) or "process" (CPU time of this process: with one thread it is immune
#: to time-slicing by other programs on a shared machine; CUDA timings always use the wall clock)
CLOCK = {"wall": time.perf_counter, "process": time.process_time}
_clock = time.perf_counter


def median_time(
    fn: Callable[[], None], device: torch.device, repeats: int, warmup: int = 1, budget_s: float = 20.0
) -> float:
    """Median time (s) of ``fn`` over up to ``repeats`` runs (fewer if one run is slow)."""
    clock = time.perf_counter if device.type == "cuda" else _clock
    for _ in range(warmup):
        fn()
    _sync(device)
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < repeats:
        _sync(device)
        t0 = clock()
        fn()
        _sync(device)
        times.append(clock() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return statistics.median(times)


def time_op(op: str, backend: str, s: Shape, repeats: int, variant: str = "") -> Tuple[float, float]:
    """(forward s, forward+backward s) of ``kernels.<op>`` through the public API."""
    import kernels

    fn = getattr(kernels, op)
    args = make_inputs(op, s, variant)
    with torch.no_grad():
        out, _ = fn(**args, backend=backend)
    cot = torch.randn(out.shape, device=s.device, dtype=torch.float32)

    def forward():
        with torch.no_grad():
            fn(**args, backend=backend)

    leaves = {n: x.detach().clone().requires_grad_() for n, x in args.items()}

    def forward_backward():
        o, _ = fn(**leaves, backend=backend)
        torch.autograd.grad((o.float() * cot).sum(), list(leaves.values()))

    # the reference loop takes seconds: one warm-up-free run is representative
    warmup = 0 if backend == "reference" else 1
    reps = 1 if backend == "reference" else repeats
    t_f = median_time(forward, s.device, reps, warmup)
    t_fb = median_time(forward_backward, s.device, reps, warmup)
    return t_f, t_fb


def time_sdpa(s: Shape, repeats: int) -> Tuple[float, float]:
    q, k, v = (torch.randn(s.B, s.H, s.T, s.K, device=s.device, dtype=s.dtype) for _ in range(3))

    def forward():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    cot = torch.randn_like(q)

    def forward_backward():
        o = F.scaled_dot_product_attention(*leaves, is_causal=True)
        torch.autograd.grad((o * cot).sum(), leaves)

    return median_time(forward, s.device, repeats), median_time(forward_backward, s.device, repeats)


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """Device-to-device copy bandwidth (GB/s, read + write)."""
    x = torch.empty(nbytes // 4, device=device, dtype=torch.float32)
    y = torch.empty_like(x)
    t = median_time(lambda: y.copy_(x), device, repeats)
    return 2 * nbytes / t / 1e9


# ---- driver ----------------------------------------------------------------------------------


def available_backends(op: str, wanted: Sequence[str], device: torch.device) -> Tuple[List[str], List[str]]:
    """Backends of ``op`` that can run here, and notes on the ones skipped."""
    table = _table(op)
    ok, notes = [], []
    for name in wanted:
        if name not in table:
            notes.append(f"{op}: no '{name}' backend yet")
            continue
        if name == "triton" and device.type != "cuda":
            notes.append(f"{op}: triton skipped on {device.type} (GPU only; the interpreter is for tests)")
            continue
        try:
            table[name]()
        except Exception as exc:  # a backend module that is not there yet, or no Triton
            notes.append(f"{op}: '{name}' unavailable ({type(exc).__name__}: {exc})")
            continue
        ok.append(name)
    return ok, notes


def _run_case(op, label, variant, backends, args, dtype, device, notes) -> List[Row]:
    rows: List[Row] = []
    ref_by_T: Dict[int, Tuple[float, float]] = {}
    for T in args.T:
        s = Shape(args.B, T, args.H, args.K, args.V, dtype, device)
        wf, wfb, unit = work_model(op, s)
        for backend in backends:
            estimated = False
            if backend == "reference" and T > args.ref_max_T:
                if not ref_by_T:
                    continue
                T0 = max(ref_by_T)
                t_f, t_fb = (x * T / T0 for x in ref_by_T[T0])
                estimated = True
            else:
                try:
                    t_f, t_fb = time_op(op, backend, s, args.repeats, variant)
                except Exception as exc:
                    notes.append(f"{label}/{backend}/T={T}: failed ({type(exc).__name__}: {exc})")
                    continue
                if backend == "reference":
                    ref_by_T[T] = (t_f, t_fb)
            rows.append(Row(label, backend, T, t_f * 1e3, t_fb * 1e3, args.B * T, wf, unit, wfb, estimated=estimated))
            print(
                f"  {label:18s} {backend:9s} T={T:6d}  fwd {t_f * 1e3:10.2f} ms  f+b {t_fb * 1e3:10.2f} ms"
                + ("  (est.)" if estimated else ""),
                file=sys.stderr,
                flush=True,
            )
    ref = {r.T: r for r in rows if r.backend == "reference"}
    for row in rows:
        if row.backend != "reference" and row.T in ref:
            row.speedup = ref[row.T].fb_ms / row.fb_ms
            row.estimated_ref = ref[row.T].estimated
    return rows


def run(args) -> Tuple[List[Row], List[str]]:
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    rows: List[Row] = []
    notes: List[str] = []
    for op in args.ops:
        backends, skipped = available_backends(op, args.backends, device)
        notes += skipped
        for label, variant in CASES[op]:
            rows += _run_case(op, label, variant, backends, args, dtype, device, notes)
    if device.type == "cuda" and not args.no_extras:
        for T in args.T:
            s = Shape(args.B, T, args.H, args.K, args.V, dtype, device)
            t_f, t_fb = time_sdpa(s, args.repeats)
            flops = 4 * s.B * s.H * s.T * s.T * s.K / 2
            rows.append(
                Row(
                    "sdpa (causal)",
                    "torch",
                    T,
                    t_f * 1e3,
                    t_fb * 1e3,
                    s.B * T,
                    flops,
                    "GFLOP/s",
                    3.5 * flops,
                    note="flash/mem-efficient attention baseline",
                )
            )
            nbytes = int(work_model("linear_scan", s)[0] * 2 / 3)  # the size of a + b
            notes.append(
                f"device copy bandwidth ({nbytes / 2**20:.0f} MiB): "
                f"{copy_bandwidth(device, nbytes, args.repeats):.0f} GB/s (read + write)"
            )
    return rows, notes


def packed_lengths(T: int, per_2048: int = 10, seed: int = 0) -> List[int]:
    """Random sequence lengths summing to T, about ``per_2048`` sequences per 2048 tokens."""
    n = max(1, round(per_2048 * T / 2048))
    gen = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randperm(T - 1, generator=gen)[: n - 1].add(1).tolist()) if n > 1 else []
    return [b - a for a, b in zip([0] + cuts, cuts + [T])]


def varlen_lines(args, dtype, device) -> List[str]:
    """``--varlen``: forward+backward tokens/s of a packed row (cu_seqlens, ~10 sequences per 2048 tokens)
    against the same tokens without boundaries, per op and fast backend; the path is "native" when the
    backend takes cu_seqlens itself, else the per-sequence fallback."""
    import kernels
    from kernels._varlen import is_varlen

    lines = [
        "| op | backend | path | T | sequences | plain tok/s | packed tok/s | packed / plain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for op in args.ops:
        backends, _ = available_backends(op, [b for b in args.backends if b not in ("reference", "fla")], device)
        for backend in backends:
            path = "native" if is_varlen(_table(op)[backend]()) else "per sequence"
            for T in args.T:
                s = Shape(1, T, args.H, args.K, args.V, dtype, device)
                leaves = {n: x.requires_grad_() for n, x in make_inputs(op, s).items()}
                lengths = packed_lengths(T)
                cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
                fn = getattr(kernels, op)
                cot = torch.randn(fn(**leaves, backend=backend)[0].shape, device=device)

                def fb(**kw):
                    o, _ = fn(**leaves, backend=backend, **kw)
                    torch.autograd.grad((o.float() * cot).sum(), list(leaves.values()))

                t_plain = median_time(fb, device, args.repeats)
                t_packed = median_time(lambda: fb(cu_seqlens=cu), device, args.repeats)
                lines.append(
                    f"| {op} | {backend} | {path} | {T} | {len(lengths)} | {T / t_plain:,.0f} | "
                    f"{T / t_packed:,.0f} | {t_plain / t_packed:.2f} |"
                )
    return lines


def _fmt_rate(work: float, ms: Optional[float], unit: str) -> str:
    if ms is None or ms <= 0:
        return "-"
    rate = work / (ms / 1e3) / 1e9
    return (f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}") + f" {unit}"


def table_lines(rows: List[Row], markdown: bool) -> List[str]:
    header = ["op", "backend", "T", "fwd ms", "fwd+bwd ms", "tokens/s (f+b)", "fwd rate", "f+b rate", "x ref (f+b)"]
    body = []
    for r in rows:
        est = " (est.)" if r.estimated else ""
        body.append(
            [
                r.op,
                r.backend,
                str(r.T),
                f"{r.fwd_ms:,.2f}{est}",
                f"{r.fb_ms:,.2f}{est}",
                f"{r.tokens / (r.fb_ms / 1e3):,.0f}",
                _fmt_rate(r.work_fwd, r.fwd_ms, r.unit),
                _fmt_rate(r.work_fb, r.fb_ms, r.unit),
                "-" if r.speedup is None else f"{r.speedup:,.1f}x" + (" (est.)" if r.estimated_ref else ""),
            ]
        )
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return lines
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]

    def fmt(cells):
        return "  ".join(c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [fmt(header), fmt(["-" * w for w in widths])] + [fmt(b) for b in body]


def per_token_ratios(rows: List[Row]) -> List[str]:
    """Cost per token (f+b) at the longest over the shortest T, per op and backend."""
    out = []
    keys = sorted({(r.op, r.backend) for r in rows}, key=lambda k: (k[0], k[1]))
    for op, backend in keys:
        mine = sorted((r for r in rows if r.op == op and r.backend == backend and not r.estimated), key=lambda r: r.T)
        if len(mine) >= 2:
            lo, hi = mine[0], mine[-1]
            ratio = (hi.fb_ms / hi.T) / (lo.fb_ms / lo.T)
            out.append(f"{op} / {backend}: cost per token at T={hi.T} is {ratio:.2f}x that at T={lo.T}")
    return out


def parse_args(argv: Optional[Sequence[str]] = None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated ops (default: all)")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated backends")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--T", default=None, help="comma-separated lengths (CPU: 512,2048,8192; GPU: 4096)")
    p.add_argument("--B", type=int, default=None, help="batch (CPU 1, GPU 8)")
    p.add_argument("--H", type=int, default=None, help="heads (CPU 4, GPU 16)")
    p.add_argument("--K", type=int, default=None, help="key dim (CPU 64, GPU 128); linear_scan D = H K")
    p.add_argument("--V", type=int, default=None, help="value dim (CPU 64, GPU 128)")
    p.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"), help="CPU fp32, GPU bf16")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median)")
    p.add_argument(
        "--ref-max-T",
        type=int,
        default=None,
        help="longest T the reference loop is run at; longer ones are estimated (CPU 2048, GPU 256)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument(
        "--clock",
        default="wall",
        choices=tuple(CLOCK),
        help="CPU timer: wall, or process CPU time (use with --threads 1 on a shared machine)",
    )
    p.add_argument("--quick", action="store_true", help="fewer lengths and repeats")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--no-extras", action="store_true", help="GPU: skip the SDPA and copy-bandwidth rows")
    p.add_argument(
        "--varlen",
        action="store_true",
        help="packed rows (cu_seqlens, ~10 sequences per 2048 tokens) vs the same tokens unpacked (B=1)",
    )
    a = p.parse_args(argv)
    gpu = a.device.startswith("cuda")
    a.ops = [o for o in a.ops.split(",") if o]
    for o in a.ops:
        if o not in OPS:
            p.error(f"--ops: unknown op '{o}'; choose from {', '.join(OPS)}")
    a.backends = [b for b in a.backends.split(",") if b]
    for b in a.backends:
        if b not in BACKENDS:
            p.error(f"--backends: unknown backend '{b}'; choose from {', '.join(BACKENDS)}")
    if a.T is None:
        a.T = ("1024" if a.quick else "4096") if gpu else ("512,2048" if a.quick else "512,2048,8192")
    a.T = [int(t) for t in str(a.T).split(",") if t]
    a.B = a.B or (8 if gpu else 1)
    a.H = a.H or (16 if gpu else 4)
    a.K = a.K or (128 if gpu else 64)
    a.V = a.V or (128 if gpu else 64)
    a.dtype = a.dtype or ("bf16" if gpu else "fp32")
    a.repeats = a.repeats or (3 if a.quick else (20 if gpu else 5))
    a.ref_max_T = a.ref_max_T or (256 if gpu else (512 if a.quick else 2048))
    return a


def main(argv: Optional[Sequence[str]] = None) -> None:
    global _clock
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    _clock = CLOCK[args.clock]
    if args.varlen:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        print(
            f"\nkernels benchmark, packed sequences (cu_seqlens) on {args.device} ({torch.get_num_threads()} "
            f"threads), B=1, H={args.H}, K={args.K}, V={args.V}, {args.dtype}; forward+backward, median of up "
            f"to {args.repeats} runs\n"
        )
        for line in varlen_lines(args, dtype, torch.device(args.device)):
            print(line)
        return
    rows, notes = run(args)
    shape = f"B={args.B}, H={args.H}, K={args.K}, V={args.V} (linear_scan D={args.H * args.K}), {args.dtype}"
    clock = "wall clock" if args.device.startswith("cuda") or args.clock == "wall" else "process CPU time"
    print(
        f"\nkernels benchmark on {args.device} ({torch.get_num_threads()} threads, {clock}), {shape}; "
        f"median of up to {args.repeats} runs after warm-up; reference beyond T={args.ref_max_T} "
        f"estimated linearly (est.)\n"
    )
    for line in table_lines(rows, args.markdown):
        print(line)
    ratios = per_token_ratios(rows)
    if ratios:
        print("\nCost per token (forward+backward):")
        for line in ratios:
            print(("- " if args.markdown else "  ") + line)
    if notes:
        print("\nNotes:")
        for line in notes:
            print(("- " if args.markdown else "  ") + line)


if __name__ == "__main__":
    main()
