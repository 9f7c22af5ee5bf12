"""The Lightning module that trains any registered model on next-token prediction.

* loss: mean token cross-entropy of ``model(tokens[:, :-1])`` against ``tokens[:, 1:]``, the LM
  head optionally applied in chunks (``train.loss_chunk_size``); with ``data.packing: reset`` the
  model resets at every document of the window (``doc_start_mask``); with ``train.state_passing``
  each row starts from its carried state (:mod:`lm.training.state_passing`, saved in checkpoints);
* AdamW (``train.optimizer``: as is, foreach or fused) on the parameter groups the model's family
  recipes declare (``LanguageModel.weight_decay_groups``; :meth:`LMModule.param_groups`): weight decay
  where the token mixer does not exempt a parameter (``train.weight_decay_groups: family``; ``matrices``:
  every parameter with 2+ dimensions), a per-group learning-rate multiplier (``train.lr_multipliers``,
  RWKV-7: ``w0`` at 2x); linear warmup then cosine decay or warmup-stable-decay (``train.schedule``) of
  each group's own base lr, stepped per optimizer step; gradient clipping and accumulation by the
  Trainer (or DeepSpeed);
* gradient norm: the total 2-norm of all gradients before clipping (``train/grad_norm``) and the share
  of optimizer steps so far whose norm exceeded ``train.grad_clip`` (``train/clipped_share``), every
  optimizer step; not under DeepSpeed, whose engine holds the gradients (partitioned) and clips them itself;
* metrics: loss, perplexity, bits per byte (``loss / ln 2 / bytes_per_token``), tokens/s, step
  time, estimated MFU (:mod:`lm.models.flops`), peak GPU memory;
* guard: a non-finite loss (agreed across ranks) skips the step and is counted; ``K`` in a row
  abort training with :class:`NonFiniteLossError`.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Dict, List, Optional

import pytorch_lightning as pl
import torch
import torch.distributed as dist

from lm.config.resolve import to_dict
from lm.config.schema import ExperimentConfig
from lm.errors import ConfigError
from lm.models import build_model
from lm.models.flops import peak_flops, training_flops_per_token
from lm.training.losses import VAL_PROG_BAR, LossSums, batch_loss, token_loss
from lm.training.schedule import lr_multiplier
from lm.training.state_passing import CarriedState
from lm.training.steps import ends_optimizer_step

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised after ``train.max_nonfinite_steps`` consecutive non-finite losses."""


class LMModule(pl.LightningModule):
    def __init__(self, config: ExperimentConfig, bytes_per_token: float = 0.0):
        """config: the run's typed, frozen config (:func:`lm.config.resolve`: model.vocab_size set)."""
        super().__init__()
        # Lightning's hyperparameters (and the logged config) stay a plain dict
        self.save_hyperparameters({"config": to_dict(config), "bytes_per_token": bytes_per_token})
        self.config = config
        self.train_cfg = config.train
        self.bytes_per_token = float(bytes_per_token)
        self.model = build_model(to_dict(config.model))  # the model resolves its own copy (variant)
        self.model.gradient_checkpointing = self.train_cfg.activation_checkpointing
        if self.train_cfg.compile:
            # in place, block by block: keeps parameter names and every entry point (hidden_states,
            # logits, step) going through the compiled blocks
            for block in self.model.blocks:
                block.compile()
        self.carried = CarriedState()  # train.state_passing
        self._pending_carried: Optional[Dict[str, Any]] = None
        self.val_sums = LossSums()
        self.nonfinite_total = 0
        self.nonfinite_streak = 0
        self._step_started: Optional[float] = None
        self._flops_per_token: Optional[float] = None
        self._zero_lr_this_step = False
        self.grad_steps = 0  # optimizer steps whose gradient norm was measured, and how many were clipped
        self.clipped_steps = 0
        #: set by the trainer when a resume changes optimizer settings (lm.training.resume_policy)
        self.apply_optimizer_settings_on_start = False

    def setup(self, stage: str) -> None:
        """Under ZeRO-3 the tied head uses the (partitioned) embedding weight: register it."""
        from pytorch_lightning.strategies import DeepSpeedStrategy

        strategy = self.trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3 and self.model.tied_head is not None:
            import deepspeed

            deepspeed.zero.register_external_parameter(self.model.tied_head, self.model.embed.weight)

    # ------------------------------------------------------------------------------- forward
    def forward(self, tokens: torch.Tensor, state=None):
        return self.model(tokens, state)

    @property
    def loss_chunk_size(self) -> int:
        return self.train_cfg.loss_chunk_size

    @property
    def loss_across_boundary(self) -> bool:
        return self.config.data.loss_across_boundary

    @property
    def state_passing(self) -> bool:
        return self.train_cfg.state_passing

    def loss_sum(self, tokens: torch.Tensor, doc_start_mask: Optional[torch.Tensor] = None) -> tuple:
        """(summed cross-entropy, number of scored targets) for tokens [B, T+1] (and the windows'
        document starts [B, T+1] with ``data.packing: reset``)."""
        return token_loss(self.model, tokens, self.loss_chunk_size, doc_start_mask, self.loss_across_boundary)

    def batch_loss(self, batch: Dict[str, torch.Tensor]) -> tuple:
        """:func:`batch_loss` of this module's model; corpus batches go through :meth:`loss_sum`."""
        if "tokens" in batch:
            total, count = self.loss_sum(batch["tokens"], batch.get("doc_start_mask"))
            return total, count, {}
        return batch_loss(self.model, batch, self.task_output)

    def carried_loss(self, batch: Dict[str, torch.Tensor]) -> tuple:
        """:meth:`loss_sum` from the rows' carried states (``train.state_passing``); keeps the new ones."""
        if self._pending_carried is not None:
            self.carried.load(self._pending_carried["record"], self.global_rank, self.device)
            self._pending_carried = None
        index = batch["index"]
        tokens = batch["tokens"]
        state = self.carried.start(index, lambda n: self.model.init_state(n, tokens.device))
        total, count, new_state = token_loss(
            self.model,
            tokens,
            self.loss_chunk_size,
            batch.get("doc_start_mask"),
            self.loss_across_boundary,
            state=state,
            return_state=True,
        )
        self.carried.update(new_state, index)
        return total, count

    @property
    def task_output(self) -> str:
        """The task's output kind (``classes`` for corpus runs, where it is unused)."""
        return self.config.data.task_output or "classes"

    # ------------------------------------------------------------------------------ training
    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _uses_deepspeed(self) -> bool:
        from pytorch_lightning.strategies import DeepSpeedStrategy

        return self._trainer is not None and isinstance(self.trainer.strategy, DeepSpeedStrategy)

    def training_step(self, batch: Dict[str, torch.Tensor], batch_idx: int):
        if self.state_passing:
            total, count = self.carried_loss(batch)
        else:
            total, count, _ = self.batch_loss(batch)
        loss = total / count
        finite = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
        if self._distributed():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() < 1.0:
            return self._handle_nonfinite(loss)
        self.nonfinite_streak = 0
        # loss, perplexity and bits/byte of the same step, logged together every step: the logger writes
        # whichever step falls on its cadence, so all three in one metrics.csv row come from that step
        loss_value = loss.detach().float()
        self.log("train/loss", loss_value, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/ppl", torch.exp(loss_value.clamp(max=30.0)), on_step=True, on_epoch=False)
        if self.bytes_per_token > 0:
            self.log("train/bpb", loss_value / math.log(2) / self.bytes_per_token, on_step=True, on_epoch=False)
        return loss

    def _handle_nonfinite(self, loss: torch.Tensor):
        self.carried.reset()  # a non-finite step's state is not carried on
        self.nonfinite_total += 1
        self.nonfinite_streak += 1
        limit = self.train_cfg.max_nonfinite_steps
        step = self.global_step
        self.log("train/nonfinite_steps", float(self.nonfinite_total), on_step=True, on_epoch=False)
        # a skipped step logs NaN as its loss, never the previous step's value
        self.log("train/loss", float("nan"), prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/ppl", float("nan"), on_step=True, on_epoch=False)
        if self.bytes_per_token > 0:
            self.log("train/bpb", float("nan"), on_step=True, on_epoch=False)
        if self.nonfinite_streak >= limit:
            raise NonFiniteLossError(
                f"the loss was non-finite for {self.nonfinite_streak} consecutive steps (last at step {step}); "
                f"aborting: lower train.lr, check the data, or raise train.max_nonfinite_steps"
            )
        log.warning(
            "non-finite loss at step %d: step skipped (%d in a row, %d total)",
            step,
            self.nonfinite_streak,
            self.nonfinite_total,
        )
        if not self._uses_deepspeed():
            return None  # Lightning skips backward and the optimizer leaves every weight untouched
        # DeepSpeed cannot skip a backward: back-propagate exact zeros and run this step at lr 0
        self._zero_lr_this_step = True
        return sum((p * 0.0).sum() for p in self.parameters() if p.requires_grad) + loss.detach().nan_to_num(0.0) * 0

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._zero_lr_this_step:
            for group in optimizer.param_groups:
                group["lr"] = 0.0
            self._zero_lr_this_step = False
        if not self._uses_deepspeed():
            self._log_grad_norm()

    def _log_grad_norm(self) -> None:
        """Lightning calls on_before_optimizer_step after backward (and AMP's unscaling), before it clips."""
        grads = [p.grad.detach() for p in self.parameters() if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]))
        value = float(norm)
        self.grad_steps += 1
        clip = self.train_cfg.grad_clip
        # a non-finite norm counts as clipped (the clipped update is non-finite too)
        self.clipped_steps += int(bool(clip) and not value <= clip)
        self.log("train/grad_norm", value, on_step=True, on_epoch=False)
        self.log("train/clipped_share", self.clipped_steps / self.grad_steps, on_step=True, on_epoch=False)

    # --------------------------------------------------------------------------- validation
    def validation_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> None:
        self.val_sums.add(*self.batch_loss(batch))

    def on_validation_epoch_end(self) -> None:
        sums, self.val_sums = self.val_sums.all_reduced(self.device), LossSums()
        for name, value in sums.metrics(self.bytes_per_token).items():
            self.log(name, value, prog_bar=name in VAL_PROG_BAR, sync_dist=True)

    # ------------------------------------------------------------------------- throughput
    def on_train_batch_start(self, batch, batch_idx) -> None:
        if self._step_started is None:
            self._step_started = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if not ends_optimizer_step(self.trainer, batch_idx) or self._step_started is None:
            return
        elapsed = time.perf_counter() - self._step_started
        self._step_started = None
        seq = batch["tokens"][:, 1:] if "tokens" in batch else batch["mask"]
        tokens = seq.numel() * max(1, int(self.trainer.accumulate_grad_batches)) * self.trainer.world_size
        if self._flops_per_token is None:
            self._flops_per_token = training_flops_per_token(self.model, seq.shape[1])
        tps = tokens / max(elapsed, 1e-9)
        metrics = {"perf/step_time_s": elapsed, "perf/tokens_per_s": tps}
        if torch.cuda.is_available() and self.device.type == "cuda":
            peak = peak_flops(torch.cuda.get_device_name(self.device))
            if peak > 0:
                metrics["perf/mfu"] = self._flops_per_token * tps / (peak * self.trainer.world_size)
            metrics["perf/peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False)

    # ---------------------------------------------------------------------------- optimizer
    def configure_optimizers(self):
        cfg = self.train_cfg
        optimizer_groups = self.param_groups()
        kwargs: Dict[str, Any] = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
        if cfg.offload_optimizer and cfg.strategy == "deepspeed":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(optimizer_groups, adamw_mode=True, **kwargs)
        else:
            optimizer = build_optimizer(cfg.optimizer, optimizer_groups, **kwargs)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_multiplier(
                step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio, cfg.schedule, cfg.decay_fraction
            ),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step", "frequency": 1}}

    def param_groups(self) -> List[Dict[str, Any]]:
        """The optimizer's parameter groups from the model's recipe (``LanguageModel.weight_decay_groups``
        with ``train.weight_decay_groups`` and ``train.lr_multipliers``): ``weight_decay`` is
        ``train.weight_decay`` for decayed groups, else 0; ``lr`` is ``train.lr`` times the group's
        multiplier (the schedule scales each group's own base). Each group also records ``name``,
        ``decays`` and ``lr_multiplier``, which a resume that changes the optimizer settings reads."""
        cfg = self.train_cfg
        groups = self.model.weight_decay_groups(
            family=cfg.weight_decay_groups == "family", lr_multipliers=cfg.lr_multipliers
        )
        return [
            {
                "params": g.params,
                "weight_decay": cfg.weight_decay if g.decay else 0.0,
                "lr": cfg.lr * g.lr_multiplier,
                "name": g.name,
                "decays": g.decay,
                "lr_multiplier": g.lr_multiplier,
            }
            for g in groups
        ]

    def on_train_start(self) -> None:
        if self.apply_optimizer_settings_on_start:
            self._apply_optimizer_settings()

    def _apply_optimizer_settings(self) -> None:
        """After a resume: this config's lr (the schedule's base), betas, eps and weight decay replace
        the values restored from the checkpoint's optimizer and scheduler states."""
        cfg = self.train_cfg
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            groups = scheduler.optimizer.param_groups
            scheduler.base_lrs = [cfg.lr * group.get("lr_multiplier", 1.0) for group in groups]
        for optimizer in self.trainer.optimizers:
            for i, group in enumerate(optimizer.param_groups):
                group["initial_lr"] = cfg.lr * group.get("lr_multiplier", 1.0)
                group["betas"] = (cfg.beta1, cfg.beta2)
                group["eps"] = cfg.eps
                # a decayed group (see param_groups); checkpoints from before it: the first group
                if group.get("decays", i == 0):
                    group["weight_decay"] = cfg.weight_decay
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_lr()):
                group["lr"] = lr

    # ---------------------------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint["nonfinite"] = {"total": self.nonfinite_total, "streak": self.nonfinite_streak}
        checkpoint["grad_clipping"] = {"steps": self.grad_steps, "clipped": self.clipped_steps}
        if self.state_passing:
            if self._pending_carried is not None:  # restored but not used yet: keep it as it was
                checkpoint["state_passing"] = self._pending_carried
            else:
                world = self.trainer.world_size if self._trainer is not None else 1
                checkpoint["state_passing"] = {"record": self.carried.gathered(self.all_gather, world)}

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        state = checkpoint.get("nonfinite", {})
        self.nonfinite_total = int(state.get("total", 0))
        self.nonfinite_streak = int(state.get("streak", 0))
        clipping = checkpoint.get("grad_clipping", {})
        self.grad_steps = int(clipping.get("steps", 0))
        self.clipped_steps = int(clipping.get("clipped", 0))
        if self.state_passing:
            self._pending_carried = checkpoint.get("state_passing", {"record": None})


def build_optimizer(name: str, groups: List[Dict[str, Any]], **kwargs: Any) -> torch.optim.Optimizer:
    """``train.optimizer``: ``adamw`` is ``torch.optim.AdamW`` with its defaults; ``adamw_foreach`` and
    ``adamw_fused`` pass ``foreach=True`` / ``fused=True`` (the same update, other kernels)."""
    if name == "adamw":
        return torch.optim.AdamW(groups, **kwargs)
    if name == "adamw_foreach":
        return torch.optim.AdamW(groups, foreach=True, **kwargs)
    if name == "adamw_fused":
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(
                f"train.optimizer=adamw_fused: this torch ({torch.__version__}) cannot fuse AdamW for these "
                f"parameters ({first}); use adamw_foreach or adamw"
            ) from None
    raise ConfigError(f"train.optimizer: unknown optimizer {name!r} (adamw, adamw_foreach, adamw_fused)")
