"""Per-source metrics of a mixture (``data.sources``), as a Lightning callback.

Training: ``data/<name>/tokens``, the tokens drawn from each source so far by all ranks together
(``counts_s * seq_len`` from the sampler's position, so they continue exactly across a resume),
and ``data/<name>/share``, their fraction of all tokens drawn.

Validation: every evaluation batch of a mixture holds windows of one source
(:class:`data.sampler.SourceStridedBatchSampler`). The module adds each batch's summed loss and
scored-target count to its ``val_sums`` (which give the pooled ``val/loss``); this callback reads
how much each batch added and keeps the sums per source, then logs ``val/<name>/loss``,
``val/<name>/ppl`` and ``val/<name>/bpb`` (with that source's bytes per token) at the epoch's end,
summed over ranks. Nothing is computed twice.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import pytorch_lightning as pl


class MixtureMetrics(pl.Callback):
    """See the module docstring; ``datamodule``: the mixture's :class:`~data.datamodule.TokenDataModule`."""

    def __init__(self, datamodule: Any):
        from data.shards import read_metadata

        self.datamodule = datamodule
        self.names: List[str] = [str(m["name"]) for m in datamodule.mixture]
        self.bytes_per_token: List[float] = []
        for m in datamodule.mixture:
            split = read_metadata(datamodule.data_dir / m["dir"])["splits"].get("validation") or {}
            tokens = int(split.get("tokens") or 0)
            self.bytes_per_token.append(float(split.get("bytes") or 0) / tokens if tokens else 0.0)
        self._sums: Dict[int, Any] = {}
        self._before: Optional[Tuple[float, int]] = None

    # ----------------------------------------------------------------------------- training
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        if trainer.global_step % max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1)) != 0:
            return  # the logger keeps only its cadence's steps: skip the work in between
        state = self.datamodule.state_dict()
        counts = state.get("counts")
        if not counts:
            return
        tokens = [int(c) * int(self.datamodule.seq_len) for c in counts]
        total = max(1, sum(tokens))
        for name, t in zip(self.names, tokens):
            pl_module.log(f"data/{name}/tokens", float(t), on_step=True, on_epoch=False)
            pl_module.log(f"data/{name}/share", t / total, on_step=True, on_epoch=False)

    # --------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sums = {}

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        sums = getattr(pl_module, "val_sums", None)
        self._before = (sums.loss_sum, sums.count) if sums is not None else None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        from lm.training.losses import LossSums

        sums = getattr(pl_module, "val_sums", None)
        if self._before is None or sums is None or "source" not in batch:
            return
        source = int(batch["source"][0])
        mine = self._sums.setdefault(source, LossSums())
        mine.add(sums.loss_sum - self._before[0], sums.count - self._before[1])
        self._before = None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lm.training.losses import LossSums

        for s, name in enumerate(self.names):
            sums = self._sums.get(s, LossSums()).all_reduced(pl_module.device)
            if sums.count == 0:
                continue
            for key, value in sums.metrics(self.bytes_per_token[s]).items():
                pl_module.log(key.replace("val/", f"val/{name}/", 1), value)
        self._sums = {}
