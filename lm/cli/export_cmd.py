"""``lm export <checkpoint> <dir>``: consolidated safetensors weights + config + tokenizer."""

from __future__ import annotations

import typer

from lm.cli.app import app


@app.command("export")
def export_command(
    checkpoint: str = typer.Argument(..., help="a checkpoint directory (step-*), its model.ckpt, or a run directory"),
    out_dir: str = typer.Argument(..., help="the export directory to create"),
    format: str = typer.Option("lm", "--format", help="lm (this project's) or hf (a transformers model directory)"),
) -> None:
    """Export weights for evaluation and generation without DeepSpeed or Lightning."""
    from lm.cli.train_cmd import quiet_libraries
    from lm.errors import LMError
    from lm.training.export import export_checkpoint, load_model

    quiet_libraries()
    if format not in ("lm", "hf"):
        raise LMError(f"--format: '{format}' is not one of lm, hf")
    if format == "hf":
        from lm.hf.tokenizer import require_transformers

        require_transformers()
        from lm.hf.export import export_hf

        out = export_hf(checkpoint, out_dir)
        typer.echo(
            f"exported {checkpoint} as a transformers model to {out} "
            "(AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True))"
        )
        return
    out = export_checkpoint(checkpoint, out_dir)
    loaded = load_model(str(out))
    typer.echo(f"exported step {loaded.step} ({loaded.model.num_parameters() / 1e6:.2f}M parameters) to {out}")
