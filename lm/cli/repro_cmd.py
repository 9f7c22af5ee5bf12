"""``lm repro``: the reproductions of "Gated recurrent neural networks discover attention" (construction,
icl-regression, mechanism, icl-gd) and of Irie et al. (2023)'s formal-language table (formal-table)."""

from __future__ import annotations

from typing import List

import typer

from lm.cli.app import app

repro_app = typer.Typer(help="Reproduce the paper's results (see docs/reproductions.md).", no_args_is_help=True)
app.add_typer(repro_app, name="repro")


@repro_app.command("construction")
def construction_command(out: str = typer.Option("docs/repro", "--out", help="output directory")) -> None:
    """(a) Gated RNNs set by the explicit constructions (x_gated and the paper's state_gated layer)
    equal linear self-attention layers."""
    from lm.probes.repro import construction

    rows = construction(out)
    for r in rows:
        typer.echo(
            f"H={r['heads']} dk={r['dk']} dv={r['dv']} units={r['units']}: max relative error "
            f"{r['error']:.2e} (whole sequence), {r['error_stepped']:.2e} (stepped)"
        )
    from lm.probes.repro_gated import construction_state_gated

    for r in construction_state_gated(out):
        typer.echo(
            f"state_gated H={r['heads']} dk={r['dk']} dv={r['dv']} neurons={r['neurons']}: max relative error "
            f"{r['error']:.2e} (whole sequence), {r['error_stepped']:.2e} (stepped)"
        )
    typer.echo(f"written to {out}/construction.md, construction.png and construction_state_gated.md")


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


@repro_app.command("mechanism")
def mechanism_command(
    out: str = typer.Option("docs/repro", "--out", help="output directory"),
    neurons: str = typer.Option("4,6,8,10,12,14,16,20,28", "--neurons", help="student widths N, comma-separated"),
    steps: int = typer.Option(4000, "--steps", help="Adam steps per student"),
    seed: int = typer.Option(0, "--seed", help="teacher and student seed"),
) -> None:
    """(b') The paper's gated RNN (gated_rnn/state_gated) taught by a linear self-attention layer:
    loss against the number of neurons, the learned decays and the output gate's pairing."""
    from lm.errors import LMError
    from lm.probes.repro_gated import teacher_student_study

    try:
        counts = tuple(int(n) for n in neurons.split(","))
    except ValueError:
        raise LMError(f"--neurons: '{neurons}' is not a comma-separated list of integers") from None
    if not counts or min(counts) < 1 or steps < 1:
        raise LMError(f"--neurons/--steps: need neuron counts >= 1 and steps >= 1, got '{neurons}', {steps}")
    teacher_student_study(out, neuron_counts=counts, steps=steps, seed=seed)
    typer.echo(open(f"{out}/mechanism.md").read())
    typer.echo(f"written to {out}/mechanism.md, mechanism.json and mechanism.png")


@repro_app.command("icl-gd")
def icl_gd_command(
    out: str = typer.Option("docs/repro", "--out", help="output directory"),
    steps: int = typer.Option(6000, "--steps", help="Adam steps per model"),
    batch: int = typer.Option(256, "--batch", help="fresh sequences per step"),
    seed: int = typer.Option(1, "--seed", help="seed of the models and data"),
) -> None:
    """(c') In-context regression: each model's predictions against one GD step whose rate is fitted
    on held-out sequences (R²), for LSA, the paper's gated RNN, the x_gated RNN and the ungated RNN."""
    from lm.errors import LMError
    from lm.probes.repro_gated import icl_gd_study

    if steps < 1 or batch < 1:
        raise LMError(f"--steps/--batch: must be >= 1, got {steps}, {batch}")
    icl_gd_study(out, steps=steps, batch=batch, seed=seed)
    typer.echo(open(f"{out}/icl_gd.md").read())


@repro_app.command("formal-table")
def formal_table_command(
    out: str = typer.Option("docs/repro", "--out", help="output directory"),
    models: str = typer.Option(
        "",
        "--models",
        help="family/variant names, comma-separated (default: every model of lm.probes.repro_formal.MODELS)",
    ),
    languages: str = typer.Option("", "--languages", help="languages, comma-separated (default: all eight)"),
    seeds: int = typer.Option(3, "--seeds", help="seeds 0..n-1 per cell"),
    bins: str = typer.Option("small", "--bins", help="length bins: small (CPU size) or paper"),
    steps: int = typer.Option(1000, "--steps", help="training steps per cell"),
    d_model: int = typer.Option(64, "--d-model", help="model width (2 layers, 2 heads)"),
    examples: int = typer.Option(256, "--examples", help="test strings per bin"),
    render_only: bool = typer.Option(
        False, "--render-only", help="write the table from formal_table.json without training (missing cells: -)"
    ),
) -> None:
    """Seed 001: models x languages x seeds on character prediction; writes formal_table.md/.json/.png."""
    from lm.errors import LMError
    from lm.probes.repro_formal import formal_table

    if seeds < 1 or steps < 1 or examples < 1 or d_model < 2:
        raise LMError(
            f"--seeds/--steps/--examples/--d-model: must be positive, got {seeds}, {steps}, {examples}, {d_model}"
        )
    formal_table(
        out,
        models=[m for m in models.split(",") if m] or None,
        languages=[lang for lang in languages.split(",") if lang] or None,
        seeds=tuple(range(seeds)),
        bins=bins,
        steps=steps,
        n_test=examples,
        log=typer.echo,
        render_only=render_only,
        d_model=d_model,
    )
    typer.echo(open(f"{out}/formal_table.md").read())
