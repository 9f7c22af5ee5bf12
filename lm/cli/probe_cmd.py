"""``lm probe <checkpoint>``: attention-equivalence probes on a trained model, as a report."""

from __future__ import annotations

from typing import Optional

import typer

from lm.cli.app import app


@app.command("probe")
def probe_command(
    checkpoint: str = typer.Argument(..., help="an export, a checkpoint directory or a run directory"),
    out: Optional[str] = typer.Option(
        None,
        "--out",
        help="report directory (default: <run>/probes/<checkpoint "
        "name>/ for a run's checkpoint, <export>/probe-report for an export)",
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="probe sequences (>= 4 for the LSA fit)"),
    seq_len: int = typer.Option(64, "--seq-len", help="probe length"),
    lsa_rank: int = typer.Option(6, "--lsa-rank", help="random projection rank of the LSA fit"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Form equivalence, implicit attention and LSA fit per layer: report.md + probes.json + probes.png."""
    from pathlib import Path

    from lm.probes.report import default_report_dir, write_report
    from lm.training.checkpoint import resolve_checkpoint
    from lm.training.export import WEIGHTS
    from lm.training.run_lock import check_output_dir

    if out is None:  # the default report directory: never inside a live or read-only run
        source = Path(checkpoint) if (Path(checkpoint) / WEIGHTS).is_file() else resolve_checkpoint(checkpoint)
        check_output_dir(default_report_dir(source))
    path = write_report(checkpoint, out, batch_size, seq_len, lsa_rank, seed)
    typer.echo((path / "report.md").read_text())
    typer.echo(f"report written to {path}")
