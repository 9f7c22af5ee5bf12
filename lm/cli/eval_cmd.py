"""``lm eval ppl|icl|harness <checkpoint> ...``: perplexity, the in-context-learning suite, and
lm-evaluation-harness tasks. Results go to ``--out`` (default ``<run dir>/eval/<name>``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from lm.cli.app import app
from lm.errors import LMError

eval_app = typer.Typer(
    help="Evaluate checkpoints: perplexity, in-context learning, lm-eval harness.", no_args_is_help=True
)
app.add_typer(eval_app, name="eval")

CHECKPOINT_HELP = "an export directory, a checkpoint directory (step-*) or a run directory (its latest checkpoint)"


def _quiet() -> None:
    from lm.cli.train_cmd import quiet_libraries

    quiet_libraries()


@eval_app.command("ppl")
def ppl_command(
    checkpoint: str = typer.Argument(..., help=CHECKPOINT_HELP),
    data: Optional[str] = typer.Option(
        None,
        "--data",
        help="a prepared data directory (token shards) or a UTF-8 text "
        "file (cut into documents like the training text: --split-by); default: the "
        "checkpoint's training data",
    ),
    split: str = typer.Option("validation", "--split", help="split of a data directory"),
    stream: Optional[bool] = typer.Option(
        None,
        "--stream/--per-document",
        help="score the documents concatenated "
        "into one stream, or each document separately (default: the semantics the "
        "checkpoint trained with: per-document for data.packing=reset, else stream)",
    ),
    context: str = typer.Option(
        "train",
        "--context",
        help="tokens of context for every family: N (sliding windows, "
        "state reset per window), 'train' (default: the training seq_len) or 'full' "
        "(recurrent: the whole document; Transformer: max_seq_len windows)",
    ),
    split_by: Optional[str] = typer.Option(
        None,
        "--split-by",
        help="a text file's documents: file | blank_line | regex (default: the checkpoint's data.source.split_by)",
    ),
    split_regex: Optional[str] = typer.Option(
        None, "--split-regex", help="with --split-by regex (default: the checkpoint's data.source.split_regex)"
    ),
    seq_len: Optional[int] = typer.Option(
        None,
        "--seq-len",
        help="--context full: recurrent families' tokens per piece "
        "(state carried; default 512), the Transformer's window (default max_seq_len)",
    ),
    stride: Optional[int] = typer.Option(
        None, "--stride", help="sliding windows: tokens between window starts (default half the window)"
    ),
    batch_size: int = typer.Option(4, "--batch-size", help="documents (or windows) per forward pass"),
    max_docs: Optional[int] = typer.Option(None, "--max-docs", help="score only the first N documents"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="score at most N tokens"),
    out: Optional[Path] = typer.Option(None, "--out", help="output directory (ppl.json, loss_by_position.csv/.png)"),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """Perplexity and bits per byte of documents with a stated protocol, loss by position (length extrapolation)."""
    _quiet()
    import sys

    from lm.evaluation.common import open_checkpoint
    from lm.evaluation.ppl import (
        format_summary,
        perplexity,
        shard_documents,
        text_file_documents,
        training_protocol,
        write_ppl_outputs,
    )

    ckpt = open_checkpoint(checkpoint, device)
    tokenizer = ckpt.tokenizer()
    eod = ckpt.eod_id(tokenizer)
    source = Path(data) if data else ckpt.data_dir()
    if source is None:
        raise LMError("--data: the checkpoint's training data directory is gone; pass a data directory or a text file")
    if not source.exists():
        raise LMError(f"--data: {source} does not exist")
    tokens_of_context = _context(context, ckpt)
    if source.is_dir():
        text = shard_documents(source, split, ckpt.loaded.tokenizer_sha256, max_docs, max_tokens)
    else:
        src = ckpt.config.get("data", {}).get("source", {})
        how = split_by or str(src.get("split_by") or "file")
        regex = split_regex if split_regex is not None else str(src.get("split_regex") or "")
        if how == "regex" and not regex:
            from lm.config.schema import SourceConfig

            regex = SourceConfig().split_regex
        text = text_file_documents(source, tokenizer, eod, max_tokens, how, regex, max_docs)
    if ckpt.recurrent and stride is not None and tokens_of_context is None:
        typer.echo(
            "note: --stride applies to sliding windows; with --context full recurrent families carry the state",
            err=True,
        )
        stride = None
    result = perplexity(
        ckpt,
        text,
        eod,
        seq_len,
        stride,
        batch_size,
        context=tokens_of_context,
        protocol=training_protocol(ckpt) if stream is None else ("stream" if stream else "per-document"),
        progress=sys.stderr.isatty(),
    )
    paths = write_ppl_outputs(result, out or ckpt.default_out_dir(f"ppl-{text.name}"))
    typer.echo(format_summary(result))
    typer.echo(f"wrote {paths['json']}, {paths['csv'].name}, {paths['png'].name}")


def _context(value: str, ckpt) -> Optional[int]:
    """--context: 'train' -> the training seq_len (the Transformer's max_seq_len when unknown), 'full' -> None, N."""
    if value == "full":
        return None
    if value == "train":
        return ckpt.train_seq_len or ckpt.max_seq_len
    try:
        return int(value)
    except ValueError:
        raise LMError(f"--context: expected a number of tokens, 'train' or 'full', got {value!r}") from None


@eval_app.command("icl")
def icl_command(
    checkpoint: str = typer.Argument(..., help=CHECKPOINT_HELP),
    tasks: Optional[str] = typer.Option(
        None,
        "--tasks",
        help="comma-separated suite tasks (default: the checkpoint's "
        "own task; for a language model associative_recall,induction,lm_icl_score)",
    ),
    sweep: Optional[List[str]] = typer.Option(
        None,
        "--sweep",
        help="key=v1,v2,... replaces a task's sweep; a value "
        "lo-hi draws the parameter per example (e.g. length=2-20,21-40)",
    ),
    examples: int = typer.Option(256, "--examples", help="examples per sweep value"),
    batch_size: int = typer.Option(32, "--batch-size"),
    seed: int = typer.Option(0, "--seed", help="seed of the test examples"),
    data: Optional[str] = typer.Option(
        None, "--data", help="lm_icl_score: a prepared data directory (default: the checkpoint's training data)"
    ),
    split: str = typer.Option("validation", "--split", help="lm_icl_score: split of the data directory"),
    early: int = typer.Option(50, "--early", help="lm_icl_score: early context position"),
    late: int = typer.Option(500, "--late", help="lm_icl_score: late context position"),
    max_docs: int = typer.Option(64, "--max-docs", help="lm_icl_score: at most this many documents"),
    out: Optional[Path] = typer.Option(None, "--out", help="output directory (icl.json, icl.md, icl-*.png)"),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """The synthetic in-context-learning suite: accuracy against number of pairs / length."""
    _quiet()
    from lm.evaluation.common import open_checkpoint, parse_list
    from lm.evaluation.icl import markdown, parse_sweeps, resolve_tasks, run_suite, write_icl_outputs

    names = parse_list(tasks, "--tasks") if tasks is not None else []
    sweeps = parse_sweeps(sweep or [])
    ckpt = open_checkpoint(checkpoint, device)
    resolve_tasks(ckpt, names)  # fail on bad names before any work
    import sys

    result = run_suite(
        ckpt,
        names,
        sweeps,
        examples,
        batch_size,
        seed,
        data,
        split,
        early,
        late,
        max_docs,
        progress=sys.stderr.isatty(),
    )
    paths = write_icl_outputs(result, out or ckpt.default_out_dir("icl"))
    typer.echo(markdown(result), nl=False)
    typer.echo(f"wrote {paths['json']}, {paths['md'].name} and {sum(k.startswith('png') for k in paths)} plot(s)")


@eval_app.command("icl-compare")
def icl_compare_command(
    results: List[Path] = typer.Argument(..., help="icl.json files, or directories holding eval/icl/icl.json"),
    metric: str = typer.Option("seq_acc", "--metric", help="seq_acc | acc | loss"),
) -> None:
    """One markdown table comparing several `lm eval icl` results (e.g. models on one language)."""
    from lm.evaluation.icl import comparison_table

    loaded, labels = [], []
    for path in results:
        p = path / "eval" / "icl" / "icl.json" if path.is_dir() else path
        if not p.is_file():
            raise LMError(f"{path}: no icl.json (run `lm eval icl` first)")
        loaded.append(json.loads(p.read_text()))
        labels.append(path.name if path.is_dir() else str(path))
    if metric not in ("seq_acc", "acc", "loss"):
        raise LMError(f"--metric: expected seq_acc, acc or loss, got {metric!r}")
    typer.echo(comparison_table(loaded, metric, labels), nl=False)


@eval_app.command("harness")
def harness_command(
    checkpoint: str = typer.Argument(..., help=CHECKPOINT_HELP),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="comma-separated lm-eval task names"),
    include_path: Optional[str] = typer.Option(None, "--include-path", help="a directory of extra task YAML files"),
    limit: Optional[float] = typer.Option(None, "--limit", help="at most N examples per task (< 1: a fraction)"),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot"),
    batch_size: int = typer.Option(8, "--batch-size"),
    bootstrap_iters: int = typer.Option(0, "--bootstrap-iters", help="bootstrap resamples for standard errors"),
    list_tasks: bool = typer.Option(False, "--list-tasks", help="print the known task names and exit"),
    out: Optional[Path] = typer.Option(None, "--out", help="output directory (harness.json)"),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """Run lm-evaluation-harness tasks with this checkpoint (model type ``rnn-lm``)."""
    import logging

    _quiet()
    for name in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise LMError("lm eval harness needs lm-evaluation-harness: pip install -e '.[eval]'") from None
    from lm.evaluation.common import parse_list, write_json
    from lm.evaluation.harness import list_task_names, run_harness

    if list_tasks:
        typer.echo("\n".join(list_task_names(include_path)))
        return
    if not tasks:
        raise LMError("--tasks: give at least one lm-eval task (see --list-tasks)")
    if include_path is not None and not Path(include_path).is_dir():
        raise LMError(f"--include-path: {include_path} is not a directory")
    result = run_harness(
        checkpoint, parse_list(tasks, "--tasks"), include_path, limit, num_fewshot, batch_size, device, bootstrap_iters
    )
    from lm_eval.utils import make_table

    path = write_json((out or result["out_dir"]) / "harness.json", result["summary"])
    typer.echo(make_table(result["raw"]))
    typer.echo(f"wrote {path}")
