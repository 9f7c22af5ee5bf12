"""What per-document resets cost: training tokens/s with ``data.packing: reset`` against ``stream``.

    python -m lm.training.bench_packing --names gla deltanet rwkv7 gated_rnn transformer --T 2048 --docs 10

For each model (``configs/model/<name>/<size>.yaml``) times full training steps (forward, backward,
AdamW) on windows of ``T`` tokens holding ``--docs`` documents each (boundaries placed uniformly at
random, seeded), once as one stream (no document starts) and once with the
document starts handed to the model (``doc_starts``: every state, convolution, token shift and the
attention reset at each document). The two modes alternate step by step so that machine noise
hits both alike; the table shows the median tokens/s of each and ``reset / stream``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path
from typing import Dict, List, Optional

import torch

from lm.models import build_model
from lm.training.bench import model_config, timed_step
from lm.training.cpu_allocator import keep_freed_memory

DEFAULT_NAMES = ["gla", "deltanet", "rwkv7", "gated_rnn", "transformer"]


def document_starts(batch: int, T: int, docs: int, seed: int) -> torch.Tensor:
    """bool [batch, T]: True at ``docs - 1`` seeded, uniformly placed document starts per window
    (so ``docs`` documents, with roughly exponential lengths of mean ``T / docs``)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.zeros(batch, T, dtype=torch.bool)
    for b in range(batch):
        starts[b, 1 + torch.randperm(T - 1, generator=g)[: max(0, docs - 1)]] = True
    return starts


def _step(model, opt, tokens: torch.Tensor, starts: Optional[torch.Tensor], device, dtype) -> float:
    return timed_step(model, opt, tokens, device, dtype, **({} if starts is None else {"doc_starts": starts}))


def measure(
    name: str, size: str, T: int, batch: int, docs: int, steps: int, warmup: int, vocab: int, device, dtype
) -> Dict[str, float]:
    torch.manual_seed(0)
    model = build_model(model_config(name, size, vocab, T)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    tokens = torch.randint(0, vocab, (batch, T + 1), device=device)
    starts = document_starts(batch, T, docs, seed=1).to(device)
    times: Dict[str, List[float]] = {"stream": [], "reset": []}
    for i in range(warmup + steps):
        for mode in ("stream", "reset") if i % 2 == 0 else ("reset", "stream"):
            dt = _step(model, opt, tokens, starts if mode == "reset" else None, device, dtype)
            if i >= warmup:
                times[mode].append(dt)
    tokens_per_step = batch * T
    out = {f"{m}_tokens_per_s": tokens_per_step / statistics.median(v) for m, v in times.items()}
    out["ratio"] = out["reset_tokens_per_s"] / out["stream_tokens_per_s"]
    out["documents_per_window"] = float(starts.sum(1).float().mean()) + 1
    return out


def main(argv=None) -> Dict[str, Dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--names", nargs="+", default=DEFAULT_NAMES)
    p.add_argument("--size", default="small")
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--docs", type=int, default=10, help="documents per window")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    if device.type == "cpu":
        keep_freed_memory()
    results = {}
    print(
        f"# data.packing reset vs stream: {args.size} models, T={args.T}, batch {args.batch}, {args.docs} "
        f"documents per window, {args.precision}, {args.device} ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads)"
    )
    print("| model | docs/window | stream tokens/s | reset tokens/s | reset / stream |")
    print("|---|---|---|---|---|")
    for name in args.names:
        r = measure(name, args.size, args.T, args.batch, args.docs, args.steps, args.warmup, args.vocab, device, dtype)
        results[name] = r
        print(
            f"| {name} | {r['documents_per_window']:.1f} | {r['stream_tokens_per_s']:,.0f} | "
            f"{r['reset_tokens_per_s']:,.0f} | {r['ratio']:.3f} |",
            flush=True,
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
