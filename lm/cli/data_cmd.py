"""``lm data prepare <data-config> [key=value ...] [--force]`` and ``lm data inspect <dir>``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from lm.cli.app import app
from lm.config.loader import load_data_config

data_app = typer.Typer(help="Prepare and inspect tokenized corpora.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("prepare")
def prepare(
    config: str = typer.Argument(..., help="name under configs/data/ or a YAML path"),
    overrides: Optional[List[str]] = typer.Argument(
        None, help="key=value overrides of the data section, e.g. tokenizer.vocab_size=4096"
    ),
    force: bool = typer.Option(False, "--force", help="rebuild even if the output is up to date"),
    shard: Optional[str] = typer.Option(
        None, "--shard", help="i/n: prepare part i of n only (data.parts=n), e.g. $SLURM_ARRAY_TASK_ID/16"
    ),
    max_bytes: Optional[int] = typer.Option(
        None, "--max-bytes", help="byte budget: only the first source files within it (data.budget_bytes)"
    ),
) -> None:
    """Tokenize a corpus into packed shards (skips when the output is up to date).

    In parts (data.parts=n or --shard i/n) the files are prepared n parts at a time, num_proc
    processes in parallel; a killed run redoes only unfinished parts (docs/data.md)."""
    from data.parts import parse_shard
    from data.prepare import prepare as run_prepare

    extra: List[str] = []
    part: Optional[int] = None
    if shard is not None:
        part, n = parse_shard(shard)
        extra.append(f"parts={n}")
    if max_bytes is not None:
        extra.append(f"budget_bytes={max_bytes}")
    cfg = load_data_config(config, [*(overrides or []), *extra])
    run_prepare(cfg, force=force, echo=typer.echo, shard=part)


@data_app.command("inspect")
def inspect(
    data_dir: Path = typer.Argument(
        ..., help="a directory written by `lm data prepare`, a Megatron .bin/.idx prefix or an HF dataset of ids"
    ),
    tokens: int = typer.Option(200, "--tokens", help="how many tokens of sample text to decode"),
    split: Optional[str] = typer.Option(None, "--split", help="split to sample (default validation)"),
    tokenizer: Optional[str] = typer.Option(
        None, "--tokenizer", help="pretokenized corpora: a tokenizer.json (or HF name) to decode the sample with"
    ),
) -> None:
    """Show counts per split, bytes/token, dtype, tokenizer hash and a decoded sample; for a Megatron
    .bin/.idx prefix or an HF dataset of token ids: format, counts, document lengths and a sample."""
    from data.inspect import describe

    typer.echo(describe(data_dir, sample_tokens=tokens, split=split, tokenizer=tokenizer))
