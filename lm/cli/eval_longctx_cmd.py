"""``lm eval longctx|recall-vs-state|extrapolation``: long-context retrieval (passkey, needle in a
haystack), MQAR recall against state size, and loss by position for several models on one figure.
Registered on the ``lm eval`` group of :mod:`lm.cli.eval_cmd`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from lm.cli.eval_cmd import CHECKPOINT_HELP, _quiet, eval_app
from lm.errors import LMError


@eval_app.command("longctx")
def longctx_command(
    checkpoint: str = typer.Argument(..., help=CHECKPOINT_HELP),
    task: str = typer.Option(
        "passkey", "--task", help="passkey | needle (a named key: 'the special magic number for <city>')"
    ),
    lengths: Optional[str] = typer.Option(
        None,
        "--lengths",
        help="context lengths in tokens, e.g. 512,2k,32k "
        "(default 512..32k; the Transformer's beyond max_seq_len are skipped)",
    ),
    depths: Optional[str] = typer.Option(None, "--depths", help="needle depths in [0, 1] (default 0,0.25,0.5,0.75,1)"),
    trials: int = typer.Option(10, "--trials", help="prompts per (depth, length) cell"),
    seed: int = typer.Option(0, "--seed", help="seed of every draw (filler start, key, answer)"),
    data: Optional[str] = typer.Option(
        None,
        "--data",
        help="filler: a prepared data directory or a UTF-8 text file (default: the checkpoint's training data)",
    ),
    split: str = typer.Option("validation", "--split", help="split of a data directory"),
    needle: Optional[str] = typer.Option(None, "--needle", help="needle template with {value} (and optionally {key})"),
    question: Optional[str] = typer.Option(
        None, "--question", help="question template (optionally {key}); the answer is generated after it"
    ),
    digits: Optional[int] = typer.Option(None, "--digits", help="digits of the answer (passkey 5, needle 7)"),
    likelihood: bool = typer.Option(
        True,
        "--likelihood/--no-likelihood",
        help="also score the answer's log-likelihood against a control prompt with another value (twice the reading)",
    ),
    out: Optional[Path] = typer.Option(None, "--out", help="output directory (longctx.json, .md, .png)"),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """Passkey / needle-in-a-haystack retrieval: exact-match accuracy by depth and context length."""
    _quiet()
    from lm.evaluation.common import open_checkpoint
    from lm.evaluation.longctx import (
        filler_from_checkpoint,
        make_template,
        markdown,
        parse_depths,
        parse_lengths,
        run_longctx,
        write_longctx_outputs,
    )

    template = make_template(task, needle, question, digits)
    length_list, depth_list = parse_lengths(lengths), parse_depths(depths)
    ckpt = open_checkpoint(checkpoint, device)
    if ckpt.task_trained:
        raise LMError(f"{checkpoint}: trained on a synthetic task; longctx needs a language model with a tokenizer")
    filler = filler_from_checkpoint(ckpt, data, split)
    target = out or ckpt.default_out_dir(f"longctx-{task}")
    result = run_longctx(
        ckpt, filler, task, length_list, depth_list, trials, seed, template, likelihood, progress=sys.stderr.isatty()
    )
    paths = write_longctx_outputs(result, target)
    typer.echo(markdown(result), nl=False)
    typer.echo(f"wrote {paths['json']}, {paths['md'].name}, {paths['png'].name}")


def _pairs(value: Optional[str]) -> Optional[List[int]]:
    from lm.evaluation.common import parse_list

    if value is None:
        return None
    try:
        return [int(v) for v in parse_list(value, "--pairs")]
    except ValueError:
        raise LMError(f"--pairs: expected comma-separated pair counts, got {value!r}") from None


@eval_app.command("recall-vs-state")
def recall_vs_state_command(
    checkpoints: List[str] = typer.Argument(
        ..., help="MQAR checkpoints (run, checkpoint or export directories), or a directory of runs"
    ),
    pairs: Optional[str] = typer.Option(
        None,
        "--pairs",
        help="key-value pair counts, e.g. 4,8,16 (default: each task's eval_pairs that fit its seq_len)",
    ),
    seq_len: Optional[int] = typer.Option(
        None,
        "--seq-len",
        help="example length (default: each task's seq_len; the Transformer's KV cache is measured at it)",
    ),
    examples: int = typer.Option(256, "--examples", help="examples per pair count"),
    batch_size: int = typer.Option(32, "--batch-size"),
    seed: int = typer.Option(0, "--seed", help="seed of the test examples"),
    out: Path = typer.Option(
        Path("eval/recall-vs-state"),
        "--out",
        help="output directory (recall_state.json, .md, .csv, recall_vs_state.png)",
    ),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """MQAR accuracy against the token mixer's state bytes per layer (the Transformer's KV cache as reference)."""
    _quiet()
    from lm.evaluation.recall_state import describe, markdown, run_recall_vs_state, write_recall_outputs

    result = run_recall_vs_state(
        checkpoints, _pairs(pairs), seq_len, examples, batch_size, seed, device, progress=sys.stderr.isatty()
    )
    paths = write_recall_outputs(result, out)
    typer.echo(markdown(result), nl=False)
    for m in result["models"]:
        typer.echo(f"  {describe(m)}")
    typer.echo(f"wrote {paths['json']}, {paths['md'].name}, {paths['csv'].name}, {paths['png'].name}")


@eval_app.command("extrapolation")
def extrapolation_command(
    checkpoints: List[str] = typer.Argument(
        ..., help="checkpoints (run, checkpoint or export directories), or a directory of runs"
    ),
    data: Optional[str] = typer.Option(
        None, "--data", help="a prepared data directory or a UTF-8 text file (default: each checkpoint's training data)"
    ),
    split: str = typer.Option("validation", "--split", help="split of a data directory"),
    context: str = typer.Option(
        "full",
        "--context",
        help="'full' (default: recurrent state carried through each "
        "document, Transformer windows of max_seq_len) or N tokens for every family",
    ),
    stream: bool = typer.Option(
        False, "--stream/--per-document", help="score the documents as one stream (longer positions) or each separately"
    ),
    seq_len: Optional[int] = typer.Option(
        None,
        "--seq-len",
        help="--context full: recurrent tokens per piece (default 512), the Transformer's window (default max_seq_len)",
    ),
    stride: Optional[int] = typer.Option(None, "--stride", help="sliding windows: tokens between window starts"),
    batch_size: int = typer.Option(4, "--batch-size"),
    max_docs: Optional[int] = typer.Option(None, "--max-docs", help="score only the first N documents"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="score at most N tokens"),
    labels: Optional[str] = typer.Option(None, "--labels", help="comma-separated legend labels, one per checkpoint"),
    out: Path = typer.Option(
        Path("eval/extrapolation"), "--out", help="output directory (extrapolation.json, .csv, .md, .png)"
    ),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """Loss by position beyond the training length for several checkpoints, on one figure."""
    _quiet()
    from lm.evaluation.extrapolation import labels_list, markdown, run_extrapolation, write_extrapolation_outputs

    result = run_extrapolation(
        checkpoints,
        data,
        split,
        context,
        seq_len,
        stride,
        batch_size,
        max_docs,
        max_tokens,
        stream,
        labels_list(labels),
        device,
        progress=sys.stderr.isatty(),
    )
    paths = write_extrapolation_outputs(result, out)
    typer.echo(markdown(result), nl=False)
    typer.echo(f"wrote {paths['json']}, {paths['csv'].name}, {paths['md'].name}, {paths['png'].name}")
