"""``lm import <source> <out>``: a published checkpoint as this project's export directory."""

from __future__ import annotations

from typing import Optional

import typer

from lm.cli.app import app


@app.command("import")
def import_command(
    source: str = typer.Argument(
        ..., help="an fla-hub Hugging Face model directory (config.json + weights) or BlinkDL's RWKV-7 .pth file"
    ),
    out_dir: str = typer.Argument(..., help="the export directory to create"),
    tokenizer: Optional[str] = typer.Option(
        None, "--tokenizer", help="a tokenizer.json to ship with a .pth (BlinkDL's files come without one)"
    ),
    eod_token: Optional[str] = typer.Option(
        None, "--eod-token", help="with --tokenizer: the token that starts a document"
    ),
) -> None:
    """Convert a published model (fla's GLA, DeltaNet, Gated DeltaNet or RWKV-7; BlinkDL's RWKV-7
    .pth) into an export for lm eval/generate/probe."""
    from pathlib import Path

    from lm.cli.train_cmd import quiet_libraries
    from lm.errors import LMError
    from lm.training.export import load_model

    quiet_libraries()
    if Path(source).is_file():
        from lm.hf.import_rwkv7 import import_blink

        out = import_blink(source, out_dir, tokenizer, eod_token)
    else:
        from lm.hf.import_fla import import_fla

        if tokenizer or eod_token:
            raise LMError(
                f"{source}: --tokenizer/--eod-token are for a .pth file; a Hugging Face directory "
                "brings its own tokenizer.json"
            )
        out = import_fla(source, out_dir)
    loaded = load_model(str(out))
    typer.echo(
        f"imported {source} ({loaded.model.num_parameters() / 1e6:.2f}M parameters, "
        f"{loaded.config['model']['family']}/{loaded.config['model']['variant']}) to {out}"
    )
