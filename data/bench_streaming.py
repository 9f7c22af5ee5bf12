"""``python -m data.bench_streaming [--steps N] [--warmup W] [--repeat R] [--workers K]``: training
tokens/s of the demo model (``configs/experiment/main.yaml``: GLA small, seq_len 256, batch 8) on
prepared shards against the same corpus streamed (``data.streaming``).

The standard-library corpus is written as 16 JSON-lines files (one document per file of the
library, as ``kind: stdlib`` reads them) and streamed with the prepared directory's tokenizer
(``artifacts/data/stdlib``, prepared first if missing), so both runs see the same tokenizer and
model. Each run is ``lm train main`` for ``--steps`` steps without validation, probes or samples; its
``perf/tokens_per_s`` (logged every step) is averaged over the steps after ``--warmup``. Runs
alternate (prepared, streamed, prepared, ...), ``--repeat`` times each, and the best mean of each
is kept. The loaders alone (no model, same batch shape and workers) are timed too: what the data
path could deliver. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]


def _run(args: List[str], run_dir: Path) -> None:
    env = {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "lm.cli.main", "train", "main", f"run_dir={run_dir}", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"lm train failed:\n{proc.stderr[-3000:]}")


def _tokens_per_s(run_dir: Path, warmup: int) -> float:
    values = []
    for row in csv.DictReader(open(run_dir / "logs" / "metrics.csv")):
        v = row.get("perf/tokens_per_s")
        if v and int(float(row["step"])) > warmup:
            values.append(float(v))
    if not values:
        raise SystemExit(f"{run_dir}: no perf/tokens_per_s after step {warmup}")
    return statistics.fmean(values)


def _loader_rates(prepared: Path, corpus: Path, out: Path, workers: int, batches: int = 150) -> Dict[str, float]:
    """Tokens/s the training loader delivers alone (no model): batch 8 x 256, after 10 batches."""
    from omegaconf import OmegaConf

    from data.datamodule import TokenDataModule
    from data.prepare import prepare
    from lm.config.schema import DataConfig

    settings = {
        "name": "stdlib-stream",
        "out_dir": str(out),
        "streaming": True,
        "source": {"kind": "jsonl", "paths": [str(corpus)]},
        "tokenizer": {"path": str(prepared / "tokenizer.json")},
    }
    prepare(OmegaConf.merge(OmegaConf.structured(DataConfig), settings), echo=lambda s: None, progress=False)
    rates = {}
    for name, d in (("prepared shards", prepared), ("streaming", out)):
        dm = TokenDataModule(d, 256, 8, seed=1, num_workers=workers, doc_start_mask=True)
        it = iter(dm.train_dataloader())
        for _ in range(10):
            next(it)
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        rates[name] = batches * 8 * 256 / (time.perf_counter() - t0)
        del it
    return rates


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers of both runs")
    args = p.parse_args(argv)

    from data.sources import open_source

    prepared = REPO / "artifacts" / "data" / "stdlib"
    if not (prepared / "metadata.json").is_file():
        subprocess.run([sys.executable, "-m", "lm.cli.main", "data", "prepare", "stdlib"], cwd=REPO, check=True)
    work = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    try:
        corpus = work / "corpus"
        corpus.mkdir()
        files = [open(corpus / f"part-{i:02d}.jsonl", "w", encoding="utf-8") for i in range(16)]
        source = open_source({"kind": "stdlib", "max_invalid_utf8": 1.0})
        for i, doc in enumerate(source.documents()):
            files[i % 16].write(json.dumps({"text": doc.text}) + "\n")
        for f in files:
            f.close()
        common = [
            f"train.max_steps={args.steps}",
            "train.val_every_n_steps=0",
            "train.sample_tokens=0",
            f"train.num_workers={args.workers}",
            "train.log_every_n_steps=1",
            "train.progress_bar=false",
            "checkpoint.every_n_steps=100000",
            "probes.every_n_steps=0",
        ]
        stream = [
            "data.streaming=true",
            "data.name=stdlib-stream",
            f"data.out_dir={work / 'stream'}",
            "data.source.kind=jsonl",
            f"data.source.paths=[{corpus}]",
            f"data.tokenizer.path={prepared / 'tokenizer.json'}",
        ]
        loader_rates = _loader_rates(prepared, corpus, work / "stream", args.workers)
        results: Dict[str, List[float]] = {"prepared shards": [], "streaming": []}
        for r in range(args.repeat):
            for name, extra in (("prepared shards", []), ("streaming", stream)):
                run_dir = work / f"run-{name.split()[0]}-{r}"
                _run([*common, *extra], run_dir)
                results[name].append(_tokens_per_s(run_dir, args.warmup))
                shutil.rmtree(run_dir)
        base = max(results["prepared shards"])
        print(
            f"demo model (configs/experiment/main.yaml), {args.steps} steps, mean tokens/s after step {args.warmup}, "
        )
        print(
            f"best of {args.repeat}, DataLoader workers {args.workers}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"load {os.getloadavg()[0]:.1f}\n"
        )
        print("| data | training tokens/s (best) | all runs | vs prepared | loader alone, tokens/s |")
        print("|---|---|---|---|---|")
        for name, values in results.items():
            runs = ", ".join(f"{v:.0f}" for v in values)
            print(
                f"| {name} | {max(values):.0f} | {runs} | {max(values) / base - 1:+.1%} | {loader_rates[name]:,.0f} |"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
