"""Probe cost against training time: ``python -m lm.probes.bench``.

For each model name (``configs/model/<name>/<size>.yaml``), times one probe run (form equivalence,
implicit attention and LSA fit on the default probe batch) and one training step at the given
shape, and reports the probes' share of training time at the probe interval::

    share = probe_time / (every_n_steps * step_time + probe_time)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lm.models import build_model
from lm.training.cpu_allocator import keep_freed_memory
from lm.probes.runner import probe_batch, run_probes
from lm.training.bench import model_config, time_steps


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--names", nargs="+", default=["gla", "gated_rnn", "deltanet", "rwkv7", "aaren", "transformer"])
    p.add_argument("--size", default="small")
    p.add_argument("--every", type=int, default=100, help="probes.every_n_steps (the main experiment's)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--probe-batch", type=int, default=8)
    p.add_argument("--probe-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    keep_freed_memory()  # as `lm train` does on CPU
    rows = []
    for name in args.names:
        torch.manual_seed(0)
        cfg = model_config(name, args.size, 8192)
        model = build_model(cfg)
        step = statistics.median(
            time_steps(model, args.seq_len, args.batch, 8192, args.repeats, 1, torch.device("cpu"), torch.float32)
        )
        batch = probe_batch({"model": cfg}, args.probe_batch, args.probe_len)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run_probes(model, batch["inputs"], period=batch["period"])
            times.append(time.perf_counter() - start)
        probe = statistics.median(times)
        share = probe / (args.every * step + probe)
        rows.append((name, step, probe, share))
        print(f"{name:16s} step {step * 1e3:8.1f} ms  probes {probe * 1e3:8.1f} ms  share {share:.2%}", flush=True)
    print()
    print(
        f"| model | train step (ms, {args.batch}x{args.seq_len}) | probe run (ms, {args.probe_batch}x{args.probe_len}) "
        f"| share of training time at every {args.every} steps |"
    )
    print("|---|---|---|---|")
    for name, step, probe, share in rows:
        print(f"| {name} | {step * 1e3:.1f} | {probe * 1e3:.1f} | {share:.2%} |")


if __name__ == "__main__":
    main()
