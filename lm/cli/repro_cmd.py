"""``lm repro``: the reproductions of "Gated recurrent neural networks discover attention"."""

from __future__ import annotations

from typing import List

import typer

from lm.cli.app import app

repro_app = typer.Typer(help="Reproduce the paper's results (see docs/reproductions.md).", no_args_is_help=True)
app.add_typer(repro_app, name="repro")


@repro_app.command("construction")
def construction_command(out: str = typer.Option("docs/repro", "--out", help="output directory")) -> None:
    """(a) Gated RNNs set by the explicit construction equal linear self-attention layers."""
    from lm.probes.repro import construction

    rows = construction(out)
    for r in rows:
        typer.echo(
            f"H={r['heads']} dk={r['dk']} dv={r['dv']} units={r['units']}: max relative error "
            f"{r['error']:.2e} (whole sequence), {r['error_stepped']:.2e} (stepped)"
        )
    typer.echo(f"written to {out}/construction.md and construction.png")


@repro_app.command("icl-regression")
def icl_regression_command(
    runs: List[str] = typer.Argument(
        ..., help="run directories trained with configs/experiment/repro-icl-regression-*"
    ),
    out: str = typer.Option("docs/repro", "--out", help="output directory"),
    examples: int = typer.Option(4096, "--examples", help="test sequences"),
) -> None:
    """(c) Test losses next to one step of gradient descent, and the LSA-fit R² of each model."""
    from lm.probes.repro import icl_regression

    icl_regression(runs, out, n_examples=examples)
    typer.echo(open(f"{out}/icl_regression.md").read())
