"""``lm config show <experiment> [key=value ...]``: print the resolved, validated config."""

from __future__ import annotations

from typing import List, Optional

import typer

from lm.cli.app import app
from lm.config import load_experiment, to_yaml
from lm.config.loader import available

config_app = typer.Typer(help="Inspect experiment configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
def show(
    experiment: str = typer.Argument(..., help="name under configs/experiment/ or a YAML path"),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides"),
) -> None:
    """Print the resolved config of an experiment (after overrides and validation)."""
    cfg = load_experiment(experiment, overrides or [])
    typer.echo(to_yaml(cfg), nl=False)


@config_app.command("list")
def list_configs() -> None:
    """List the configs of every group."""
    for group in ("experiment", "data", "model", "train"):
        names = available(group)
        typer.echo(f"{group}: {', '.join(names) if names else '(none)'}")
