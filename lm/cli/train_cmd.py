"""``lm train <experiment> [key=value ...]``: train (or resume) a model."""

from __future__ import annotations

import logging
import sys
import warnings
from typing import List, Optional

import typer

from lm.cli.app import app
from lm.config import load_experiment


def quiet_libraries() -> None:
    """Keep the console readable: library chatter below warnings, known-noisy warnings off."""
    for name in (
        "pytorch_lightning",
        "lightning_fabric",
        "lightning.pytorch",
        "DeepSpeed",
        "deepspeed",
        "pytorch_lightning.utilities.rank_zero",
        "pytorch_lightning.accelerators.cuda",
        "pytorch_lightning.trainer.connectors.checkpoint_connector",
        "lightning_fabric.utilities.seed",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*set_vital.*")
    warnings.filterwarnings("ignore", message=".*`srun` command is available on your system.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*treespec.*")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@app.command("train", context_settings={"allow_extra_args": False})
def train_command(
    experiment: str = typer.Argument(..., help="name under configs/experiment/ or a YAML path"),
    overrides: Optional[List[str]] = typer.Argument(
        None, help="key=value overrides (e.g. train.max_steps=100 resume=auto)"
    ),
) -> None:
    """Train a model: prepares the data if needed, checkpoints, resumes (resume=auto|<path>).

    Exit status: 0 when done; 2 with a one-line error; after a stop by a signal (checkpoint
    saved), 128 + the signal's number (SIGINT 130, SIGTERM 143, SIGUSR1 138), or 0 when the stop
    requeued the SLURM job."""
    cfg = load_experiment(experiment, overrides or [])
    quiet_libraries()
    from lm.training.trainer import train

    result = train(cfg, echo=typer.echo)
    if result.exit_code:
        raise typer.Exit(result.exit_code)
