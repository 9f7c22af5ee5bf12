"""Loggers from the config: CSV and TensorBoard always (unless switched off), wandb online or
offline. A resumed run appends to the same CSV file and continues the same wandb run (its id is
kept in ``<run_dir>/wandb_run_id``)."""

from __future__ import annotations

import csv
import os
import uuid
from pathlib import Path
from typing import Any, List, cast

from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; this one appends to it (the header
    grows when new metric names appear)."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(header)

    def _check_log_dir_exists(self) -> None:
        pass


class AppendingCSVLogger(CSVLogger):
    """``<run_dir>/logs/metrics.csv``, continued across resumes (rows keep their step numbers)."""

    @property
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return cast(_AppendingWriter, self._experiment)  # only this property sets it


def wandb_run_id(run_dir: Path) -> str:
    """The run's wandb id, created once and reused by every resume of the run."""
    path = run_dir / "wandb_run_id"
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


def build_loggers(cfg: Any, run_dir: Path, config_dict: dict) -> List[Any]:
    logging_cfg = cfg.logging
    loggers: List[Any] = []
    if logging_cfg.csv:
        loggers.append(
            AppendingCSVLogger(
                save_dir=str(run_dir),
                name="logs",
                version="",
                flush_logs_every_n_steps=max(1, cfg.train.log_every_n_steps),
            )
        )
    if logging_cfg.tensorboard:
        loggers.append(
            TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False)
        )
    mode = logging_cfg.wandb.mode
    if mode != "disabled":
        from pytorch_lightning.loggers import WandbLogger

        os.environ.setdefault("WANDB_SILENT", "true")
        loggers.append(
            WandbLogger(
                project=logging_cfg.wandb.project,
                entity=logging_cfg.wandb.entity,
                name=cfg.name,
                save_dir=str(run_dir),
                id=wandb_run_id(run_dir),
                resume="allow",
                offline=(mode == "offline"),
                tags=list(logging_cfg.wandb.tags),
                config=config_dict,
            )
        )
    return loggers
