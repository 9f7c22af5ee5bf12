"""``python -m data.bench_prepare [--mb N] [--parts K] [--processes 1 2] [--repeat R] [--png PATH]``:
``lm data prepare`` throughput in parts (:mod:`data.parts`) with 1, 2, ... processes.

The standard-library corpus (cut to ``--mb`` MB of whole files with ``data.budget_bytes``) is
prepared in ``--parts`` parts with ``num_proc = P`` for each ``P`` of ``--processes``, round-robin
``--repeat`` times (best wall time kept). The tokenizer is trained once beforehand (byte-level BPE,
``--vocab``, on 4 MB) and given as ``tokenizer.path``, so only reading + encoding + writing is
timed. The tokenizer's own Rust thread pool is off (``TOKENIZERS_PARALLELISM=false``,
``RAYON_NUM_THREADS=1``): any speed-up comes from the processes. MB/s = corpus UTF-8 bytes / the
encode phase's wall seconds (``timings.encode_s`` of the metadata). Prints a Markdown table and
draws a bar chart (``--png``).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, List

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=16.0)
    p.add_argument("--parts", type=int, default=4)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--png", type=Path, default=None)
    args = p.parse_args(argv)

    from data.prepare import prepare
    from data.sources import open_source
    from data.tokenizer import ensure_special_tokens, train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    try:
        budget = int(args.mb * 1e6)
        sample, size = [], 0
        for doc in open_source({"kind": "stdlib", "max_invalid_utf8": 1.0}).documents():
            if size > 4_000_000:
                break
            sample.append(doc.text)
            size += doc.nbytes
        specials = ["<|endoftext|>", "<|pad|>"]
        tok = train_tokenizer(sample, args.vocab, 2, specials)
        ensure_special_tokens(tok, specials)
        tok.save(str(work / "tokenizer.json"))
        base: Dict[str, object] = {
            "name": "bench",
            "source": {"kind": "stdlib", "max_invalid_utf8": 1.0},
            "tokenizer": {"path": str(work / "tokenizer.json")},
            "validation_fraction": 0.02,
            "test_fraction": 0.0,
            "split_seed": 1234,
            "batch_size": 256,
            "shard_tokens": 64 * 1024 * 1024,
            "parts": args.parts,
            "budget_bytes": budget,
        }
        from omegaconf import OmegaConf

        from lm.config.schema import DataConfig

        best: Dict[int, Dict[str, float]] = {}
        for r in range(args.repeat):
            for procs in args.processes:
                out = work / f"p{procs}-{r}"
                settings: Dict[str, object] = {**base, "num_proc": procs, "out_dir": str(out)}
                cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), settings)
                c0, t0 = _cpu_seconds(), time.perf_counter()
                meta = prepare(cfg, echo=lambda s: None, progress=False).metadata
                wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
                enc = float(meta["timings"]["encode_s"])
                row = {
                    "bytes": meta["bytes"],
                    "encode_s": enc,
                    "wall_s": wall,
                    "cpu_s": cpu,
                    "load": os.getloadavg()[0],
                }
                if procs not in best or enc < best[procs]["encode_s"]:
                    best[procs] = row
                shutil.rmtree(out)
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}"
        )
        print(f"stdlib corpus cut to {args.mb:g} MB, {args.parts} parts, best of {args.repeat}\n")
        print("| processes | MB | encode s | MB/s | speed-up | wall s | CPU s | MB per CPU s | load |")
        print("|---|---|---|---|---|---|---|---|---|")
        one = best[args.processes[0]]
        rates: List[float] = []
        for procs in args.processes:
            b = best[procs]
            rate = b["bytes"] / 1e6 / b["encode_s"]
            rates.append(rate)
            speed = one["encode_s"] / b["encode_s"]
            print(
                f"| {procs} | {b['bytes'] / 1e6:.1f} | {b['encode_s']:.2f} | {rate:.2f} | {speed:.2f}x | "
                f"{b['wall_s']:.2f} | {b['cpu_s']:.2f} | {b['bytes'] / 1e6 / b['cpu_s']:.2f} | {b['load']:.1f} |"
            )
        if args.png is not None:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            per_cpu = [best[x]["bytes"] / 1e6 / best[x]["cpu_s"] for x in args.processes]
            loads = ", ".join(f"{best[x]['load']:.1f}" for x in args.processes)
            fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
            for ax, values, label in (
                (axes[0], rates, "MB/s (wall clock, encode phase)"),
                (axes[1], per_cpu, "MB per CPU-second (all processes)"),
            ):
                ax.bar([str(x) for x in args.processes], values, color="#4c72b0")
                for i, v in enumerate(values):
                    ax.text(i, v, f"{v:.2f}", ha="center", va="bottom")
                ax.set_xlabel("processes (num_proc), tokenizer threads 1")
                ax.set_ylabel(label)
            fig.suptitle(f"lm data prepare, stdlib {args.mb:g} MB in {args.parts} parts (2-CPU VM, load {loads})")
            fig.tight_layout()
            args.png.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(args.png, dpi=120)
            print(f"\nwrote {args.png}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
