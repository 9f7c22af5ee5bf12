"""Generation cost against context length: ``python -m lm.evaluation.bench_generate``.

For each model (``configs/model/<name>/<size>.yaml``, random weights, vocab 8192) and each
context length L: read L random tokens once (``prefill`` in pieces of ``--chunk`` tokens, the
state carried), then time ``--steps`` single-token decode steps (``model.step``, greedy). Each
(model, L) runs in a fresh process so that its peak RSS is its own. Reported per run:

* decode latency per token (median and 90th percentile, ms) and tokens/s;
* the state's tensor bytes after the context (the recurrent state, or the KV cache);
* RSS after the context, peak RSS of the process, and the prefill time.

The goal: the recurrent family's latency and memory flat in L, the Transformer's growing.

    python -m lm.evaluation.bench_generate --models gla transformer --contexts 1024 8192 32768
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

ROOT = Path(__file__).resolve().parents[2]


def current_rss_mb() -> float:
    """Resident set size now (Linux /proc), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def build(name: str, size: str, vocab: int, max_len: int):
    from lm.models import build_model
    from lm.training.bench import model_config

    torch.manual_seed(0)
    return build_model(model_config(name, size, vocab, max_len)).eval()


@torch.no_grad()
def measure(name: str, size: str, context: int, steps: int, chunk: int, vocab: int, warmup: int = 2) -> Dict:
    """One (model, context) measurement in this process."""
    from lm.evaluation.common import peak_rss_mb, state_bytes
    from lm.evaluation.sampling import prefill

    model = build(name, size, vocab, context + steps + warmup + 1)
    rss_model = current_rss_mb()
    tokens = torch.randint(0, vocab, (1, context), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    logits, state = prefill(model, tokens, chunk)
    prefill_s = time.perf_counter() - t0
    rss_context = current_rss_mb()
    bytes_context = state_bytes(state)
    token = logits.argmax(-1)
    times: List[float] = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        logits, state = model.step(token, state)
        token = logits.argmax(-1)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    times.sort()
    return {
        "model": name,
        "size": size,
        "parameters": model.num_parameters(),
        "context": context,
        "steps": steps,
        "prefill_s": prefill_s,
        "ms_per_token": 1000 * statistics.median(times),
        "p90_ms": 1000 * times[min(len(times) - 1, int(0.9 * len(times)))],
        "tokens_per_s": 1.0 / statistics.median(times),
        "state_mb_after_context": bytes_context / 2**20,
        "state_mb_after_decode": state_bytes(state) / 2**20,
        "rss_model_mb": rss_model,
        "rss_after_context_mb": rss_context,
        "peak_rss_mb": peak_rss_mb(),
        "threads": torch.get_num_threads(),
    }


def table(rows: List[Dict]) -> str:
    lines = [
        "| model | context | ms/token (median) | p90 ms | tokens/s | state MiB | RSS after context MiB | "
        "peak RSS MiB | prefill s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} ({r['size']}, {r['parameters'] / 1e6:.1f}M) | {r['context']:,} | "
            f"{r['ms_per_token']:.1f} | {r['p90_ms']:.1f} | {r['tokens_per_s']:.1f} | "
            f"{r['state_mb_after_context']:.2f} | {r['rss_after_context_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{r['prefill_s']:.1f} |"
        )
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, Python {platform.python_version()}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["gla", "transformer"])
    ap.add_argument("--size", default="small")
    ap.add_argument("--contexts", nargs="+", type=int, default=[1024, 8192, 32768])
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per run")
    ap.add_argument("--chunk", type=int, default=1024, help="prefill piece length")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    ap.add_argument(
        "--in-process",
        action="store_true",
        help="measure every run in this process (quick; peak RSS is then the maximum so far)",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        row = measure(args.models[0], args.size, args.contexts[0], args.steps, args.chunk, args.vocab)
        print("RESULT " + json.dumps(row), flush=True)
        return
    print(f"# generation vs context length; {machine()}; {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    rows = []
    for name in args.models:
        for context in args.contexts:
            if args.in_process:
                row = measure(name, args.size, context, args.steps, args.chunk, args.vocab)
            else:
                cmd = [
                    sys.executable,
                    "-m",
                    "lm.evaluation.bench_generate",
                    "--worker",
                    "--models",
                    name,
                    "--size",
                    args.size,
                    "--contexts",
                    str(context),
                    "--steps",
                    str(args.steps),
                    "--chunk",
                    str(args.chunk),
                    "--vocab",
                    str(args.vocab),
                    "--threads",
                    str(args.threads),
                ]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                if proc.returncode != 0 or not found:
                    print(
                        f"{name} at {context}: failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}",
                        file=sys.stderr,
                    )
                    continue
                row = json.loads(found[0][len("RESULT ") :])
            rows.append(row)
            print(
                f"{name} {context}: {row['ms_per_token']:.1f} ms/token, state {row['state_mb_after_context']:.2f} "
                f"MiB, peak RSS {row['peak_rss_mb']:.0f} MiB",
                flush=True,
            )
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
