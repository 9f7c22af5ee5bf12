"""``lm generate <checkpoint> --prompt ... [--prompt ...]``: streamed text generation."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from lm.cli.app import app
from lm.errors import LMError


@app.command("generate")
def generate_command(
    checkpoint: str = typer.Argument(..., help="an export directory, a checkpoint directory or a run directory"),
    prompt: Optional[List[str]] = typer.Option(
        None, "--prompt", "-p", help="a prompt (repeat for several; they decode together where the model allows)"
    ),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.8, "--temperature", help="0: greedy"),
    top_k: int = typer.Option(50, "--top-k", help="0: no top-k filter"),
    top_p: float = typer.Option(1.0, "--top-p", help="nucleus sampling mass (1: off)"),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(8, "--batch-size", help="prompts decoded together"),
    out: Optional[Path] = typer.Option(None, "--out", help="also write the completions as JSON"),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """Continue prompts token by token, printing the text as it is generated (one prompt inline;
    several line by line, each line prefixed with its prompt's number). Recurrent families decode
    in constant memory per token."""
    from lm.cli.train_cmd import quiet_libraries
    from lm.evaluation.common import open_checkpoint, write_json
    from lm.evaluation.generate import StreamPrinter, generate

    quiet_libraries()
    if not prompt:
        raise LMError("--prompt: give at least one prompt")
    ckpt = open_checkpoint(checkpoint, device)
    printer = StreamPrinter(ckpt.tokenizer(), [f"[{i + 1}]" for i in range(len(prompt))])
    result = generate(ckpt, prompt, max_new_tokens, temperature, top_k, top_p, seed, batch_size, printer)
    typer.echo(
        f"{result['new_tokens']} new tokens in {result['wall_s']:.2f} s ({result['tokens_per_s']:.1f} tokens/s, "
        f"{result['model']})",
        err=True,
    )
    if out is not None:
        write_json(out, result)
        typer.echo(f"wrote {out}", err=True)
    sys.stdout.flush()
