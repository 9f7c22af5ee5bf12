"""Training throughput by family: ``python -m lm.training.bench``.

For each model name (``configs/model/<name>/<size>.yaml``, same size for all, so parameter counts
match) and each sequence length, times full training steps (forward, backward, AdamW step) at a
fixed number of tokens per step, and prints tokens/s, the ratio to the Transformer at the same
length, and the change from the shortest to the longest length. ``--device cuda --precision bf16``
measures GPUs (with MFU from :mod:`lm.models.flops`). Results are also written as JSON.

    python -m lm.training.bench --size small --T 512 2048 8192 --tokens 8192
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Dict, List

import torch
import yaml

from lm.models import build_model
from lm.training.cpu_allocator import keep_freed_memory
from lm.models.flops import peak_flops, training_flops_per_token

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_NAMES = [
    "transformer",
    "gated_rnn",
    "rglru",
    "rwkv7",
    "linear_transformer",
    "retnet",
    "gla",
    "deltanet",
    "gated_deltanet",
    "recurrent_delta",
    "srwm",
    "aaren",
]


def model_config(name: str, size: str, vocab: int, max_len: int = 65536) -> dict:
    """``configs/model/<name>/<size>.yaml`` with ``vocab_size`` set and ``max_seq_len`` >= ``max_len``."""
    cfg = yaml.safe_load((ROOT / "configs" / "model" / name / f"{size}.yaml").read_text())
    cfg["vocab_size"] = vocab
    cfg["max_seq_len"] = max(cfg.get("max_seq_len", 0), max_len)
    return cfg


def timed_step(model, opt, tokens: torch.Tensor, device, dtype, **model_kwargs) -> float:
    """Seconds of one training step (forward, next-token cross-entropy, backward, optimizer step) on
    ``tokens`` [B, T + 1]; the GPU is synchronised on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        logits, _ = model(tokens[:, :-1], **model_kwargs)
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)
        )
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_steps(model, T: int, batch: int, vocab: int, steps: int, warmup: int, device, dtype) -> List[float]:
    """Seconds of each of ``steps`` training steps after ``warmup`` untimed ones, random tokens [batch, T]."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, vocab, (batch, T + 1), device=device)
    times = [timed_step(model, opt, tokens, device, dtype) for _ in range(warmup + steps)]
    return times[warmup:]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--names", nargs="+", default=DEFAULT_NAMES)
    p.add_argument("--size", default="small")
    p.add_argument("--T", nargs="+", type=int, default=[512, 2048, 8192])
    p.add_argument("--tokens", type=int, default=8192, help="tokens per step (batch = tokens // T, at least 1)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.device == "cpu":
        keep_freed_memory()  # large per-step temporaries are not page-faulted in anew (see its docstring)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    results: Dict[str, Dict[int, dict]] = {}
    for name in args.names:
        torch.manual_seed(0)
        model = build_model(model_config(name, args.size, args.vocab)).to(device)
        n_params = model.num_parameters()
        results[name] = {}
        for T in args.T:
            batch = max(1, args.tokens // T)
            try:
                times = time_steps(model, T, batch, args.vocab, args.steps, args.warmup, device, dtype)
            except torch.OutOfMemoryError:
                results[name][T] = {"error": "out of memory"}
                continue
            step = statistics.median(times)
            tps = batch * T / step
            row = {"params": n_params, "batch": batch, "step_s": step, "tokens_per_s": tps}
            if device.type == "cuda":
                peak = peak_flops(torch.cuda.get_device_name(device))
                if peak:
                    row["mfu"] = training_flops_per_token(model, T) * tps / peak
                row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                torch.cuda.reset_peak_memory_stats(device)
            results[name][T] = row
            print(f"{name:18s} T={T:6d} batch={batch:3d} {step * 1e3:9.1f} ms/step {tps:10.0f} tok/s", flush=True)
        del model
    print_table(results, args.T)
    if args.out:
        meta = {
            "machine": platform.processor() or platform.machine(),
            "device": args.device,
            "precision": args.precision,
            "size": args.size,
            "tokens_per_step": args.tokens,
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
        }
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))


def print_table(results: Dict[str, Dict[int, dict]], lengths: List[int]) -> None:
    base = results.get("transformer", {})
    header = (
        "| model | params | "
        + " | ".join(f"tok/s T={T} (×Transformer)" for T in lengths)
        + f" | T={lengths[0]}→{lengths[-1]} |"
    )
    print()
    print(header)
    print("|" + "---|" * (len(lengths) + 3))
    for name, rows in results.items():
        cells = []
        for T in lengths:
            row = rows.get(T, {})
            if "tokens_per_s" not in row:
                cells.append(row.get("error", "-"))
                continue
            ratio = row["tokens_per_s"] / base[T]["tokens_per_s"] if "tokens_per_s" in base.get(T, {}) else float("nan")
            mfu = f", MFU {row['mfu']:.0%}" if "mfu" in row else ""
            cells.append(f"{row['tokens_per_s']:.0f} ({ratio:.2f}×{mfu})")
        first, last = rows.get(lengths[0], {}), rows.get(lengths[-1], {})
        change = (
            f"{last['tokens_per_s'] / first['tokens_per_s'] - 1:+.0%}"
            if "tokens_per_s" in first and "tokens_per_s" in last
            else "-"
        )
        params = next((r["params"] for r in rows.values() if "params" in r), 0)
        print(f"| {name} | {params / 1e6:.1f}M | " + " | ".join(cells) + f" | {change} |")


if __name__ == "__main__":
    main()
