"""``python -m data.bench [--text FILE] [--mb N]``: tokenization throughput of ``lm data prepare``.

One run measures, over the same documents with the same tokenizer (best wall time of
``--repeat`` round-robin runs each, CPU time of this process and its children alongside):

- the baselines: plain single-process ``Tokenizer.encode_batch`` with the Rust thread pool on
  (its default) and off (``TOKENIZERS_PARALLELISM=false``), and ``encode_batch_fast`` off;
- prepare's encoding path (:class:`data.encode.ParallelEncoder`, both backends): encoding only
  (ids converted to arrays, then dropped) and encode + pack + write shards
  (:func:`data.prepare.encode_to_shards` into a temporary directory);
- the packing (ids -> one array with end-of-document ids) and writing steps alone, one thread,
  from encodings made beforehand: their cost does not depend on how busy the machine is.

Prints a table with MB/s, the speed-up over each baseline and the packing/writing overhead.
Documents: ``--text`` split at blank lines, else the standard-library corpus (file per document);
the first ``--mb`` MB of them. The tokenizer is a byte-level BPE trained on those documents
(``--vocab``, on at most 4 MB) unless ``--tokenizer`` names a tokenizer.json.
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
from typing import Callable, List, Tuple

from data.encode import BACKENDS, ParallelEncoder, default_workers, make_tasks, pack_encodings
from data.shards import SplitWriter
from data.sources import Document, open_source
from data.split import TRAIN
from data.tokenizer import load_tokenizer, token_dtype, train_tokenizer

SPECIALS = ["<|endoftext|>", "<|pad|>"]


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure(fns: List[Callable[[], None]], repeat: int) -> List[Tuple[float, float]]:
    """(best wall seconds, CPU seconds of that run) of each function.

    The functions run round-robin ``repeat`` times, so a change in machine load during the
    benchmark affects all of them alike.
    """
    best = [(float("inf"), 0.0)] * len(fns)
    for _ in range(repeat):
        for k, fn in enumerate(fns):
            c0, t0 = _cpu_seconds(), time.perf_counter()
            fn()
            wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
            if wall < best[k][0]:
                best[k] = (wall, cpu)
    return best


def load_documents(text: str, mb: float) -> Tuple[List[Document], str]:
    cap = int(mb * 1e6)
    if text:
        cfg = {"kind": "text", "paths": [text], "split_by": "blank_line", "max_bytes": cap}
        what = f"{text} (blank-line blocks)"
    else:
        cfg = {"kind": "stdlib", "max_bytes": cap}
        what = "Python stdlib *.py (file per document)"
    return list(open_source(cfg).documents()), what


def _batches(texts: List[str], size: int) -> List[List[str]]:
    return [texts[i : i + size] for i in range(0, len(texts), size)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m data.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--text", default="", help="a text file (default: the stdlib corpus)")
    ap.add_argument("--mb", type=float, default=8.0, help="MB of text to encode (default 8)")
    ap.add_argument("--vocab", type=int, default=8192, help="vocab size of the trained BPE")
    ap.add_argument("--tokenizer", default="", help="use this tokenizer.json instead of training")
    ap.add_argument("--workers", type=int, default=0, help="prepare's workers (0: CPU count)")
    ap.add_argument("--batch-size", type=int, default=256, help="documents per batch")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement (best is kept)")
    args = ap.parse_args(argv)
    load_start = os.getloadavg()

    docs, what = load_documents(args.text, args.mb)
    if not docs:
        raise SystemExit("no documents")
    texts = [d.text for d in docs]
    total_mb = sum(d.nbytes for d in docs) / 1e6
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer)
    else:
        sample, size = [], 0
        for t in texts:
            if size > 4e6:
                break
            sample.append(t)
            size += len(t)
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        tok = train_tokenizer(sample, args.vocab, 2, SPECIALS)
    tok.encode_special_tokens = True
    tokenizer_json = tok.to_str()
    eod = tok.token_to_id(SPECIALS[0]) or 0
    dtype = token_dtype(tok.get_vocab_size())
    workers = args.workers or default_workers()
    batches = _batches(texts, args.batch_size)

    def baseline(method: str, parallel: str):
        def run():
            os.environ["TOKENIZERS_PARALLELISM"] = parallel
            encode = getattr(tok, method)
            for b in batches:
                encode(b, add_special_tokens=False)

        return run

    def labelled():
        return ((TRAIN, d) for d in docs)

    def encode_only(backend: str):
        def run():
            with ParallelEncoder(tokenizer_json, eod, dtype, workers, backend) as enc:
                for _ in enc.map(make_tasks(labelled(), args.batch_size)):
                    pass

        return run

    def encode_pack_write(backend: str):
        from data.prepare import encode_to_shards

        def run():
            tmp = Path(tempfile.mkdtemp(prefix="lm-bench-"))
            try:
                encode_to_shards(
                    tmp,
                    labelled(),
                    tokenizer_json,
                    eod,
                    dtype,
                    64 * 1024 * 1024,
                    [TRAIN],
                    workers,
                    args.batch_size,
                    backend=backend,
                )
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

        return run

    rows = [
        ("baseline: encode_batch, 1 process, Rust threads on", baseline("encode_batch", "true")),
        ("baseline: encode_batch, 1 process, 1 thread", baseline("encode_batch", "false")),
        ("encode_batch_fast, 1 process, 1 thread", baseline("encode_batch_fast", "false")),
    ]
    for backend in BACKENDS:
        label = f"{workers} processes" if backend == "processes" else f"Rust threads ({workers} CPUs)"
        rows.append((f"prepare path, {label}: encode", encode_only(backend)))
        rows.append((f"prepare path, {label}: encode+pack+write", encode_pack_write(backend)))

    # the packing and writing steps alone, one thread, from encodings made beforehand
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    encoded = [tok.encode_batch_fast(b, add_special_tokens=False) for b in batches]
    packed = [pack_encodings(e, eod, dtype) for e in encoded]

    def pack_only():
        for e in encoded:
            pack_encodings(e, eod, dtype)

    def write_only():
        tmp = Path(tempfile.mkdtemp(prefix="lm-bench-"))
        try:
            writer = SplitWriter(tmp, "train", dtype, 64 * 1024 * 1024)
            for tokens, lengths in packed:
                writer.add(tokens, lengths)
            writer.close()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    rows.append(("pack only (ids -> array + eod), 1 thread", pack_only))
    rows.append(("write only (shards + doc_starts), 1 thread", write_only))

    timings = measure([fn for _, fn in rows], args.repeat)
    results = [(name, wall, cpu) for (name, _), (wall, cpu) in zip(rows, timings)]
    os.environ["TOKENIZERS_PARALLELISM"] = "false"

    base_threads, base_single = results[0][1], results[1][1]
    cpu_name = _cpu_model()
    print(f"tokenization benchmark: {total_mb:.2f} MB, {len(docs)} documents of {what}")
    print(
        f"tokenizer: byte-level BPE, vocab {tok.get_vocab_size()}; {workers} workers; "
        f"{default_workers()} CPUs ({cpu_name}); best of {args.repeat}"
    )
    print(
        f"1-min load average: {load_start[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
        f"(other processes compete for the {default_workers()} CPUs when it exceeds that)"
    )
    print()
    header = f"{'method':<62}{'wall s':>8}{'MB/s':>8}{'x base(thr)':>13}{'x base(1t)':>12}{'cpu s':>8}"
    print(header)
    print("-" * len(header))
    for name, wall, cpu in results:
        print(
            f"{name:<62}{wall:>8.2f}{total_mb / wall:>8.2f}{base_threads / wall:>13.2f}"
            f"{base_single / wall:>12.2f}{cpu:>8.2f}"
        )
    print()
    by_name = {name: wall for name, wall, _ in results}
    single = by_name["encode_batch_fast, 1 process, 1 thread"]
    pack, write = (
        by_name["pack only (ids -> array + eod), 1 thread"],
        by_name["write only (shards + doc_starts), 1 thread"],
    )
    print(
        f"packing + writing alone, 1 thread: {pack:.2f} + {write:.2f} s = "
        f"{100 * (pack + write) / single:.1f}% of single-thread encode_batch_fast ({single:.2f} s); "
        f"in prepare, packing runs in the workers and writing overlaps with encoding"
    )
    for backend in BACKENDS:
        label = f"{workers} processes" if backend == "processes" else f"Rust threads ({workers} CPUs)"
        enc = by_name[f"prepare path, {label}: encode"]
        full = by_name[f"prepare path, {label}: encode+pack+write"]
        print(
            f"packing/writing overhead, {label}: {100 * (full - enc) / enc:+.1f}% "
            f"({full:.2f} s vs {enc:.2f} s encoding only)"
        )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
