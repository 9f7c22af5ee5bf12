"""Compile gate: every Triton kernel, built for sm_80 / sm_90 at the launch configurations that its
launcher picks for realistic shapes, with no GPU (``python -m kernels.compile_check``).

How: each op's ``"triton"`` backend runs forward and backward (autograd) on ``device="meta"``
tensors while ``JITFunction.run`` is replaced by a recorder, so the real host launchers choose the
kernels, block sizes, constexprs and ``num_warps``/``num_stages``, and nothing is launched. Triton's
own argument binder turns each launch into what ``run`` would compile (signature, constexprs,
divisibility attributes); every distinct launch is then compiled with ``triton.compile`` for each
architecture in worker processes (``TRITON_INTERPRET`` unset, a fresh Triton cache, the ptxas that
the wheel ships). ptxas's ``-v`` log gives registers and spills; Triton's metadata the shared memory.

A row fails on a compile error, a timeout, shared memory over the per-block limit
(:data:`SMEM_LIMIT`) or spills over :data:`SPILL_LIMIT_BYTES`; the exit status is then 1.
``--subset ci`` compiles one configuration per kernel (sm_90, bf16, head dim 64; srwm and recurrent_delta
also at 128, where their launchers take other kernels or tiling), and per kernel with a
packed-sequence specialisation (``IS_VARLEN``) one of those too: the ``varlen`` cases pack documents into
one row, with the host offsets passed as ``offsets=`` (meta tensors carry no values).
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

#: opt-in shared memory per thread block (bytes): sm_80 (A100) and sm_90 (H100/H200)
SMEM_LIMIT = {80: 166_912, 90: 232_448}
#: spilled bytes (per thread, the larger of ptxas's spill stores and spill loads) above which a
#: kernel fails the gate: a few spilled words outside the hot loop cost nothing measurable, a
#: state tile that does not fit in registers spills kilobytes
SPILL_LIMIT_BYTES = 256
ARCHS = (90, 80)
DTYPES = ("bf16", "fp32")
HEAD_DIMS = (64, 128, 256)
#: the training shape of the sweep: batch, sequence length, heads
B, T_TRAIN, H = 8, 4096, 16
_B = B  # (inside ``_call`` the name B is the batch of the case)
#: documents per packed row of the ``varlen`` cases: at training length the whole batch packed into one
#: row (B = 1, T = B T); at the fused-recurrent lengths one row of T steps
PACKED_DOCS, PACKED_DOCS_SHORT = 80, 4
#: the fused-recurrent kernels' shapes: one decoding step, and the longest sequence they take
T_DECODE, T_SHORT = 1, 16
#: the fast-weight ops (recurrent_delta, srwm) at the head sizes of their model configs
FWP_HEAD_DIMS = (64, 128)
#: ops whose launchers switch kernels or tiling at a wider head (srwm's row-blocked kernels and
#: recurrent_delta's row-blocked backward at K = 128): the CI subset compiles that head dim too
CI_WIDE_HEADS = {"recurrent_delta": 128, "srwm": 128}
OPS = ("linear_scan", "gla", "delta_rule", "dplr", "softmax_scan", "recurrent_delta", "srwm")
#: default per-compile limit (seconds); a compile that takes longer is a failure ("timeout")
TIMEOUT = 300


@dataclass(frozen=True)
class Case:
    """One call of an op's Triton backend: shapes, dtype, and which optional inputs are present."""

    op: str
    head: int
    dtype: str
    T: int
    grad: bool = True
    state: bool = False
    flags: Tuple[str, ...] = ()

    @property
    def label(self) -> str:
        parts = [f"T={self.T}", "fwd+bwd" if self.grad else "fwd"] + (["state"] if self.state else [])
        return " ".join(parts + list(self.flags))


@dataclass
class Job:
    """One distinct kernel specialisation (what ``JITFunction.run`` would compile)."""

    module: str
    name: str
    signature: Dict[str, str]
    constexprs: List[list]
    attrs: List[list]
    options: Dict[str, object]
    cases: List[Case] = field(default_factory=list)

    def key(self) -> str:
        return json.dumps(
            [self.module, self.name, self.signature, self.constexprs, self.attrs, self.options],
            sort_keys=True,
            default=str,
        )

    def describe(self) -> dict:
        """The launch as plain data: kernel, named constexprs, argument types, launch options, calls."""
        names = list(self.signature)
        return {
            "kernel": self.name,
            "module": self.module,
            "signature": self.signature,
            "constexprs": {names[path[0]]: v for path, v in self.constexprs},
            "options": self.options,
            "calls": [f"{c.op} K={c.head} {c.dtype} {c.label}" for c in self.cases],
        }

    def varlen(self) -> bool:
        """Whether this is the packed-sequence (``IS_VARLEN``) specialisation of its kernel."""
        names = list(self.signature)
        return any(names[path[0]] == "IS_VARLEN" and bool(v) for path, v in self.constexprs)

    def constexpr_text(self) -> str:
        names = list(self.signature)
        return " ".join(f"{names[path[0]]}={_short(v)}" for path, v in self.constexprs if v is not None)


def _short(v) -> str:
    return str(int(v)) if isinstance(v, bool) else str(v)


# ----------------------------------------------------------------------------------- cases


def cases_for(ops: Sequence[str], dtypes: Sequence[str], heads: Sequence[int], subset: bool) -> List[Case]:
    """The realistic calls of every op: training length (with and without a carried state) and,
    for the ops with fused-recurrent kernels, decoding (T=1) and the longest short sequence."""
    out: List[Case] = []
    for op in ops:
        op_heads = [h for h in heads if h in FWP_HEAD_DIMS] if op in ("recurrent_delta", "srwm") else heads
        for dtype in dtypes:
            for head in op_heads:
                out += _op_cases(op, head, dtype, subset)
    return out


def ci_cases(ops: Sequence[str], dtypes: Sequence[str]) -> List[Case]:
    """The CI subset's calls: head dim 64 for every op, plus :data:`CI_WIDE_HEADS`."""
    out = cases_for(ops, dtypes, [64], subset=True)
    for op in ops:
        if op in CI_WIDE_HEADS:
            out += [c for dtype in dtypes for c in _op_cases(op, CI_WIDE_HEADS[op], dtype, True)]
    return out


def _op_cases(op: str, head: int, dtype: str, subset: bool) -> List[Case]:
    c = lambda T, **kw: Case(op, head, dtype, T, **kw)  # noqa: E731
    train = {
        "linear_scan": [c(T_TRAIN)],
        "gla": [
            c(T_TRAIN),
            c(T_TRAIN, flags=("per-head g",)),
            c(T_TRAIN, flags=("V=K+1",)),
            c(T_TRAIN, flags=("varlen",)),
        ],
        "delta_rule": [c(T_TRAIN), c(T_TRAIN, flags=("no g",)), c(T_TRAIN, flags=("varlen",))],
        "dplr": [c(T_TRAIN), c(T_TRAIN, flags=("varlen",))],
        "softmax_scan": [c(T_TRAIN), c(T_TRAIN, flags=("varlen",))],
        "recurrent_delta": [c(T_TRAIN), c(T_TRAIN, flags=("varlen",))],
        "srwm": [c(T_TRAIN), c(T_TRAIN, flags=("varlen",))],
    }[op]
    short = []
    if op in ("gla", "delta_rule", "dplr"):  # fused-recurrent kernels (T <= 16)
        short = [c(T_SHORT, state=True, flags=case.flags) for case in train]
    if subset:
        return train + short
    stateful = [c(T_TRAIN, state=True, flags=case.flags) for case in train]
    decode = [c(T_DECODE, grad=False, state=True, flags=case.flags) for case in train]
    if op not in ("gla", "delta_rule", "dplr"):
        decode = decode[:1]
    return train + stateful + short + decode


def packed_offsets(T: int, n_docs: int = PACKED_DOCS) -> List[int]:
    """Offsets of ``n_docs`` documents of uneven lengths packed into T steps (boundaries inside chunks)."""
    cuts = sorted({min(T, round(T * (i / n_docs) ** 1.3) + 3 * i) for i in range(1, n_docs)})
    return [0] + cuts + [T]


def _call(case: Case):
    """Run ``case`` through the op's Triton backend on meta tensors (forward, then backward). A
    ``varlen`` case packs documents into one row (:data:`PACKED_DOCS`): meta tensors carry no values, so
    the host offsets are passed as ``offsets=`` (the launchers' host copy) with a meta ``cu_seqlens``."""
    import torch

    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[case.dtype]
    K, T = case.head, case.T
    V = K + 1 if "V=K+1" in case.flags else K
    B, packed = _B, {}
    if "varlen" in case.flags:
        B, T = 1, (_B * T if T > T_SHORT else T)
        offsets = packed_offsets(T, PACKED_DOCS if T > T_SHORT else PACKED_DOCS_SHORT)
        packed = dict(cu_seqlens=torch.empty(len(offsets), device="meta", dtype=torch.int32), offsets=offsets)
    N = len(packed["offsets"]) - 1 if packed else B  # leading dim of the states

    def x(*shape, dtype=dt):
        return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=case.grad)

    def st(*shape):
        return x(*shape, dtype=torch.float32) if case.state else None

    device_only = {k: v for k, v in packed.items() if k != "offsets"}  # backends that read no host offsets
    fn = importlib.import_module(f"kernels.ops.{case.op}").BACKENDS["triton"]()
    scale = K**-0.5
    if case.op == "linear_scan":
        D = H * K
        out = fn(x(B, T, D), x(B, T, D), st(B, D), case.state)
    elif case.op == "gla":
        g = x(B, T, H) if "per-head g" in case.flags else x(B, T, H, K)
        out = fn(x(B, T, H, K), x(B, T, H, K), x(B, T, H, V), g, scale, st(N, H, K, V), case.state, **packed)
    elif case.op == "delta_rule":
        g = None if "no g" in case.flags else x(B, T, H)
        args = (x(B, T, H, K), x(B, T, H, K), x(B, T, H, V), x(B, T, H), g, scale, st(N, H, K, V), case.state)
        out = fn(*args, **packed)
    elif case.op == "dplr":
        out = fn(
            *(x(B, T, H, K) for _ in range(2)),
            x(B, T, H, V),
            *(x(B, T, H, K) for _ in range(3)),
            scale,
            st(N, H, K, V),
            case.state,
            **packed,
        )
    elif case.op == "softmax_scan":
        state = (st(N, H), st(N, H), st(N, H, V)) if case.state else None
        out = fn(x(B, T, H), x(B, T, H, V), state, case.state, **device_only)
    elif case.op == "recurrent_delta":
        state = (st(N, H, K, V), st(N, H, V)) if case.state else None
        out = fn(
            x(B, T, H, K),
            x(B, T, H, K),
            x(B, T, H, V),
            x(B, T, H),
            x(H, K, V),
            x(H, K, V),
            x(H, V, V),
            x(H, V),
            state,
            case.state,
            **device_only,
        )
    elif case.op == "srwm":
        state = (st(N, H, V, K), st(N, H, K, K), st(N, H, K, K), st(N, H, 4, K)) if case.state else None
        out = fn(x(B, T, H, K), x(H, V, K), x(H, K, K), x(H, K, K), x(H, 4, K), state, case.state, **device_only)
    else:
        raise ValueError(f"--op: unknown op '{case.op}'; choose from {', '.join(OPS)}")
    if case.grad:
        o, final = out
        finals = [] if final is None else (list(final) if isinstance(final, (tuple, list)) else [final])
        loss = o.float().sum() + sum(s.float().sum() for s in finals)
        loss.backward()


@contextmanager
def recording(launches: List[Job]):
    """Replace ``JITFunction.run`` (what ``kernel[grid](...)`` calls) by a recorder that appends
    the compile inputs of each launch to ``launches`` and launches nothing."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 32))  # divisibility attributes: the same on sm_80
    binders: Dict[int, object] = {}
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        if id(self) not in binders:
            binders[id(self)] = create_function_from_signature(self.signature, self.params, backend)
        bound, spec, opts = binders[id(self)](*args, **kwargs)
        _, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, spec, opts)
        options = {k: v for k, v in kwargs.items() if k not in signature}
        launches.append(
            Job(
                self.fn.__module__,
                self.fn.__name__,
                dict(signature),
                [[list(k), v] for k, v in sorted(constexprs.items())],
                [[list(k), v] for k, v in sorted(attrs.items())],
                options,
            )
        )
        return None

    JITFunction.run = record
    try:
        yield
    finally:
        JITFunction.run = original


def collect(cases: Sequence[Case]) -> Tuple[List[Job], List[Tuple[Case, str]]]:
    """Distinct launches over all cases (in first-seen order) and the cases that launched no
    Triton kernel (with the launcher's warning: e.g. heads too wide, PyTorch fallback)."""
    jobs: Dict[str, Job] = {}
    fallbacks: List[Tuple[Case, str]] = []
    for case in cases:
        launches: List[Job] = []
        with warnings.catch_warnings(record=True) as caught, recording(launches):
            warnings.simplefilter("always")
            try:
                _call(case)
            except Exception as exc:  # a launcher that cannot run on meta tensors
                if launches or not caught:
                    raise RuntimeError(
                        f"{case.op} ({case.label}, K={case.head}, {case.dtype}): the launcher "
                        f"failed on meta tensors: {type(exc).__name__}: {exc}"
                    ) from exc
        if not launches:
            fallbacks.append((case, str(caught[0].message) if caught else "no Triton launch"))
        for job in launches:
            jobs.setdefault(job.key(), job).cases.append(case)
    return list(jobs.values()), fallbacks


# ----------------------------------------------------------------------------------- compiling

_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")
_PTXAS = re.compile(r"^(ptxas[\w-]*) info", re.M)
_PTXAS_TIME = re.compile(r"Compile time = ([\d.]+) ms")


def parse_ptxas_log(log: str) -> Dict[str, Optional[int]]:
    """Registers, spilled bytes (max of stores and loads), static shared memory and ptxas's own
    seconds (newer ptxas print them; else None) from ``ptxas -v``."""
    regs = _REGS.search(log)
    spills = [max(int(a), int(b)) for a, b in _SPILL.findall(log)]
    smem = _SMEM.search(log)
    tool = _PTXAS.search(log)
    times = [float(ms) / 1000 for ms in _PTXAS_TIME.findall(log)]
    return {
        "regs": int(regs.group(1)) if regs else None,
        "spill": max(spills) if spills else None,
        "static_smem": int(smem.group(1)) if smem else 0,
        "ptxas": tool.group(1) if tool else None,
        "ptxas_s": sum(times) if times else None,
    }


def compile_job(job: dict) -> dict:
    """Compile one recorded launch for ``job["arch"]`` (in a worker process); a JSON-able result."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(job["module"]), job["name"])
    src = ASTSource(
        fn, job["signature"], {tuple(k): v for k, v in job["constexprs"]}, {tuple(k): v for k, v in job["attrs"]}
    )
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v here
            compiled = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32), options=job["options"])
    except Exception as exc:
        lines = [ln.strip() for ln in f"{type(exc).__name__}: {exc}".splitlines() if ln.strip()]
        return {"status": "error", "error": " | ".join(lines[:4])[:400], "seconds": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    md = compiled.metadata
    info = parse_ptxas_log(log.getvalue())
    return {
        "status": "ok",
        "seconds": seconds,
        "shared": int(md.shared) + info["static_smem"],
        "regs": info["regs"],
        "spill": info["spill"],
        "num_warps": md.num_warps,
        "num_stages": md.num_stages,
        "ptxas": info["ptxas"],
        "ptxas_s": info["ptxas_s"],
    }


def _worker_main() -> None:
    """``--worker``: compile the JSON jobs read from stdin, one JSON result per line on stdout."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed goes to stderr, not into the protocol
    import triton  # noqa: F401  (import time is not counted against the first job)

    proto.write("ready\n")
    for line in sys.stdin:
        proto.write(json.dumps(compile_job(json.loads(line))) + "\n")


class _Worker:
    """A ``--worker`` subprocess (its own process group, killed with its ptxas on a timeout)."""

    def __init__(self, env: dict):
        self.env = env
        self.proc: Optional[subprocess.Popen] = None

    def _start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kernels.compile_check", "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=self.env,
            start_new_session=True,
        )
        self.lines: "queue.Queue[str]" = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc, self.lines), daemon=True).start()
        if self.lines.get(timeout=300) != "ready":
            raise RuntimeError("compile worker failed to start")

    @staticmethod
    def _read(proc, lines) -> None:
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put("")

    def run(self, job: dict, timeout: float) -> dict:
        if self.proc is None:
            self._start()
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            self.close()
            return {"status": "timeout", "error": f"compile took longer than {timeout:g} s", "seconds": timeout}
        if not line:
            self.close()
            return {"status": "error", "error": "compile worker died", "seconds": 0.0}
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


def compile_all(items: List[Tuple[Job, int]], jobs: int, timeout: float, progress: bool) -> List[dict]:
    """Compile every (job, arch) in ``jobs`` worker processes; results in the order of ``items``."""
    from tqdm import tqdm

    cache = tempfile.mkdtemp(prefix="compile_check_cache_")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=cache, TRITON_DUMP_PTXAS_LOG="1", PYTHONPATH=_repo_path(env))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's launch default (3.9 warns when unset)
    todo: "queue.Queue[int]" = queue.Queue()
    for i in range(len(items)):
        todo.put(i)
    results: List[Optional[dict]] = [None] * len(items)
    bar = tqdm(total=len(items), desc="compiling", unit="kernel", disable=not progress, file=sys.stderr)
    lock = threading.Lock()

    def drain() -> None:
        worker = _Worker(env)
        try:
            while True:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                job, arch = items[i]
                payload = {
                    "module": job.module,
                    "name": job.name,
                    "signature": job.signature,
                    "constexprs": job.constexprs,
                    "attrs": job.attrs,
                    "options": job.options,
                    "arch": arch,
                }
                results[i] = worker.run(payload, timeout)
                with lock:
                    bar.update(1)
                    bar.set_postfix_str(f"{job.name} sm_{arch}", refresh=False)
        finally:
            worker.close()

    threads = [threading.Thread(target=drain) for _ in range(max(1, jobs))]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        bar.close()
        shutil.rmtree(cache, ignore_errors=True)
    return results  # type: ignore[return-value]


def _repo_path(env: dict) -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))


# ----------------------------------------------------------------------------------- report


def verdict(result: dict, arch: int) -> str:
    """ "ok" or why the row fails the gate."""
    if result["status"] != "ok":
        return result["status"]
    if result["shared"] > SMEM_LIMIT[arch]:
        return "FAIL: shared memory"
    if result.get("spill") is not None and result["spill"] > SPILL_LIMIT_BYTES:
        return "FAIL: spills"
    return "ok"


def table(items: List[Tuple[Job, int]], results: List[dict], fallbacks) -> List[str]:
    """Markdown table rows, one per compiled (launch, arch), then the PyTorch fallbacks."""
    head = (
        "| op | kernel | arch | dtype | head dim | call | constexprs | warps/stages | shared mem (limit) "
        "| regs | spill B | compile s | ptxas s | result |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for (job, arch), res in zip(items, results):
        case = job.cases[0]
        heads = ",".join(str(h) for h in sorted({c.head for c in job.cases if c.dtype == case.dtype}))
        ok = res["status"] == "ok"
        cells = [
            case.op,
            job.name,
            f"sm_{arch}",
            case.dtype,
            heads,
            case.label,
            job.constexpr_text(),
            f"{res['num_warps']}/{res['num_stages']}" if ok else "",
            f"{res['shared']:,} ({SMEM_LIMIT[arch]:,})" if ok else "",
            _opt(res.get("regs")),
            _opt(res.get("spill")),
            f"{res['seconds']:.1f}",
            "" if res.get("ptxas_s") is None else f"{res['ptxas_s']:.1f}",
            verdict(res, arch) + ("" if ok else f": {res.get('error', '')}"),
        ]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    for case, why in fallbacks:
        lines.append(
            f"| {case.op} | (none) | | {case.dtype} | {case.head} | {case.label} | | | | | | | | "
            f"falls back: {why.replace('|', '/')} |"
        )
    return lines


def _opt(x) -> str:
    return "?" if x is None else str(x)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kernels.compile_check", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--subset",
        choices=["ci", "full"],
        default="full",
        help="ci: one configuration per kernel (sm_90, bf16, head dim 64; srwm, recurrent_delta also 128); full: the sweep",
    )
    p.add_argument(
        "--arch",
        type=int,
        action="append",
        choices=sorted(SMEM_LIMIT),
        help="compute capability (repeatable; default: 90 and 80, ci: 90)",
    )
    p.add_argument("--dtype", action="append", choices=DTYPES, help="input dtype (repeatable)")
    p.add_argument("--head-dim", type=int, action="append", help="K = V (repeatable; default 64, 128, 256)")
    p.add_argument("--op", action="append", help="op to check (repeatable); '-dplr' excludes one")
    p.add_argument("--jobs", type=int, default=2, help="compile worker processes (default 2)")
    p.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds per compile (default %(default)s)")
    p.add_argument("--markdown", help="also write the table (with versions and timing) to this file")
    p.add_argument(
        "--list",
        action="store_true",
        help="print the recorded launches (JSON lines) and the PyTorch fallbacks; compile nothing",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _select_ops(spec: Optional[List[str]]) -> List[str]:
    spec = spec or []
    keep = [s for s in spec if not s.startswith("-")]
    drop = {s[1:] for s in spec if s.startswith("-")}
    for name in keep + sorted(drop):
        if name not in OPS:
            raise SystemExit(f"compile_check: --op: unknown op '{name}'; choose from {', '.join(OPS)}")
    return [op for op in (keep or OPS) if op not in drop]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        _worker_main()
        return 0
    os.environ.pop("TRITON_INTERPRET", None)  # the launchers' tile sizes must be the GPU ones
    import triton

    ci = args.subset == "ci"
    ops = _select_ops(args.op)
    archs = args.arch or ([90] if ci else list(ARCHS))
    dtypes = args.dtype or (["bf16"] if ci else list(DTYPES))
    heads = args.head_dim or ([64] if ci else list(HEAD_DIMS))
    for h in heads:
        if h < 1:
            raise SystemExit(f"compile_check: --head-dim: expected a positive size, got {h}")
    start = time.perf_counter()
    cases = ci_cases(ops, dtypes) if ci and not args.head_dim else cases_for(ops, dtypes, heads, subset=ci)
    jobs, fallbacks = collect(cases)
    if ci:  # one configuration per kernel, packing (IS_VARLEN) and head dim: its first launch
        first: Dict[Tuple[str, str, bool, int], Job] = {}
        for job in jobs:
            first.setdefault((job.module, job.name, job.varlen(), job.cases[0].head), job)
        jobs = list(first.values())
    if args.list:
        for job in jobs:
            print(json.dumps(job.describe()))
        for case, why in fallbacks:
            print(
                json.dumps(
                    {"op": case.op, "head": case.head, "dtype": case.dtype, "call": case.label, "falls_back": why}
                )
            )
        return 0
    items = [(job, arch) for arch in archs for job in jobs]
    results = compile_all(items, args.jobs, args.timeout, progress=not args.no_progress)
    wall = time.perf_counter() - start
    rows = table(items, results, fallbacks)
    verdicts = [verdict(r, arch) for (_, arch), r in zip(items, results)]
    failed = sum(v != "ok" for v in verdicts)
    tools = sorted({r["ptxas"] for r in results if r.get("ptxas")})
    summary = (
        f"Triton {triton.__version__} ({', '.join(tools) or 'ptxas'}), "
        f"{'ci subset' if ci else 'full sweep'}: {len(items)} compiles "
        f"({len(jobs)} distinct launches x {', '.join(f'sm_{a}' for a in archs)}), dtypes "
        f"{', '.join(dtypes)}, head dims {', '.join(map(str, sorted({c.head for c in cases})))}, B={B} H={H} T={T_TRAIN} "
        f"(recurrent: T={T_DECODE}, {T_SHORT}); {failed} failed; {len(fallbacks)} PyTorch fallbacks; "
        f"wall {wall:.0f} s with {args.jobs} workers; limits: shared memory "
        f"{', '.join(f'sm_{a} {SMEM_LIMIT[a]:,} B' for a in archs)}, spills {SPILL_LIMIT_BYTES} B"
    )
    print("\n".join(rows))
    print(summary)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(summary + "\n\n" + "\n".join(rows) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
