"""``lm submit <experiment> [key=value ...]`` and ``lm status <run_dir>``: training as SLURM jobs."""

from __future__ import annotations

from typing import List, Optional

import typer

from lm.cli.app import app


@app.command("submit")
def submit_command(
    experiment: str = typer.Argument(..., help="name under configs/experiment/ or a YAML path"),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, as for lm train"),
    nodes: Optional[int] = typer.Option(None, "--nodes", help="nodes (slurm.nodes)"),
    gpus_per_node: Optional[int] = typer.Option(
        None, "--gpus-per-node", help="GPUs per node, one rank each; 0: CPU ranks (slurm.gpus_per_node)"
    ),
    cpus_per_task: Optional[int] = typer.Option(None, "--cpus-per-task", help="CPUs per rank (slurm.cpus_per_task)"),
    time: Optional[str] = typer.Option(
        None, "--time", help="time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS (slurm.time)"
    ),
    partition: Optional[str] = typer.Option(None, "--partition", help="partition (slurm.partition)"),
    account: Optional[str] = typer.Option(None, "--account", help="account (slurm.account)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the job script; write and submit nothing"),
) -> None:
    """Submit training as a SLURM job that checkpoints and requeues itself on USR1 (resume=auto)."""
    from lm.slurm.submit import submit

    flags = {
        "nodes": nodes,
        "gpus_per_node": gpus_per_node,
        "cpus_per_task": cpus_per_task,
        "time": time,
        "partition": partition,
        "account": account,
    }
    submit(experiment, overrides or [], flags, dry_run=dry_run, echo=typer.echo)


@app.command("status")
def status_command(run_dir: str = typer.Argument(..., help="the run directory of a submitted experiment")) -> None:
    """The last SLURM job of a run (state, restarts), its last logged step and last checkpoint."""
    from lm.slurm.status import status_lines

    for line in status_lines(run_dir):
        typer.echo(line)
