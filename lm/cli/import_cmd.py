"""``lm import <source> <out>``: a published checkpoint as this project's export directory."""

from __future__ import annotations

import typer

from lm.cli.app import app


@app.command("import")
def import_command(
    source: str = typer.Argument(..., help="an fla-hub Hugging Face model directory (config.json + weights)"),
    out_dir: str = typer.Argument(..., help="the export directory to create"),
) -> None:
    """Convert a published model (fla's GLA or DeltaNet) into an export for lm eval/generate/probe."""
    from lm.cli.train_cmd import quiet_libraries
    from lm.hf.import_fla import import_fla
    from lm.training.export import load_model

    quiet_libraries()
    out = import_fla(source, out_dir)
    loaded = load_model(str(out))
    typer.echo(f"imported {source} ({loaded.model.num_parameters() / 1e6:.2f}M parameters, "
               f"{loaded.config['model']['family']}/{loaded.config['model']['variant']}) to {out}")
