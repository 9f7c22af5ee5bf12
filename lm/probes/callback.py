"""The probes as a Lightning callback: every ``probes.every_n_steps`` optimizer steps, on a fixed
probe batch, scalars go to every logger and one PNG per probe run is written to
``<run_dir>/probes/step-<step, 8 digits>.png`` (and logged as an image to TensorBoard / wandb).

Distributed runs: every rank runs the same probes on the same batch (under ZeRO-3 inside one
collective parameter gather), so no rank waits for another; only rank 0 logs and writes files.
The training RNG stream is unaffected (the checkpoint manager restores it before the next batch,
and the probe batch has its own generator).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from lm.probes.runner import plot_probes, probe_batch, run_probes
from lm.training.steps import ends_optimizer_step

log = logging.getLogger(__name__)


class ProbeCallback(Callback):
    def __init__(self, cfg: Any, run_dir: Path):
        self.every = int(cfg.every_n_steps)
        self.batch_size = int(cfg.batch_size)
        self.seq_len = int(cfg.seq_len)
        self.probes = list(cfg.probes)
        self.lsa_rank = int(cfg.lsa_rank)
        self.seed = int(cfg.seed)
        self.out_dir = Path(run_dir) / "probes"
        self._batch = None

    def _gather(self, trainer: pl.Trainer, module: pl.LightningModule):
        from pytorch_lightning.strategies import DeepSpeedStrategy

        strategy = trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(module.model.parameters()), modifier_rank=None)
        return nullcontext()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every <= 0 or not ends_optimizer_step(trainer, batch_idx) or step % self.every != 0:
            return
        if self._batch is None:
            # the module holds the typed config; probe_batch reads a plain dict (as in a checkpoint)
            self._batch = probe_batch(pl_module.hparams["config"], self.batch_size, self.seq_len, self.seed)
        inputs = self._batch["inputs"].to(pl_module.device)
        with self._gather(trainer, pl_module):
            result = run_probes(pl_module.model, inputs, self.probes, self._batch["period"], self.lsa_rank)
        if trainer.is_global_zero:
            # straight to the loggers, once: ``LightningModule.log`` would repeat the last probe
            # values in every later logged row until the next probe run
            for logger in trainer.loggers:
                logger.log_metrics(result.scalars, step=step)
            png = plot_probes(result, self.out_dir / f"step-{step:08d}.png", title=f"probes at step {step}")
            self._log_image(trainer, png, step)

    def _log_image(self, trainer: pl.Trainer, png: Path, step: int) -> None:
        for logger in trainer.loggers:
            name = type(logger).__name__
            try:
                if name == "TensorBoardLogger":
                    import numpy as np
                    from PIL import Image

                    image = np.asarray(Image.open(png).convert("RGB"))
                    logger.experiment.add_image("probes", image, global_step=step, dataformats="HWC")
                elif name == "WandbLogger":
                    logger.log_image(key="probes", images=[str(png)], step=step)
            except Exception as e:  # an image that cannot be logged must not stop training
                log.warning("could not log the probe image to %s: %s", name, e)
