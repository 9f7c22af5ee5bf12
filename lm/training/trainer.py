"""``lm train``: data, model and Trainer from one validated experiment config.

Order of work: validate the whole config (before anything heavy); the launching process (global
rank 0) takes the run-directory lock (:mod:`lm.training.run_lock`) and checks the run directory:
writable, a fresh run does not silently replace an earlier run's checkpoints. Then the steps of
:func:`_train`, each a function here: the resume decision (``resume=auto`` finds a verified
checkpoint, rejected ones are named with their reason, and the new config may resume it:
:mod:`lm.training.resume_policy`) -- all before anything is written; the data (token shards
prepared if needed, rank 0, the others wait; or a synthetic task); the typed, frozen config
(:func:`lm.config.resolve`: vocabulary and task shapes from the data); module; loggers and
callbacks; strategy and ``Trainer``; ``Trainer.fit``; then (rank 0) the report: validation
perplexity and bits per byte, and a generated sample.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, cast

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from data.atomic import write_atomic
from lm.config.loader import plain, to_yaml
from lm.config.resolve import resolve, to_dict
from lm.config.schema import ExperimentConfig
from lm.errors import ConfigError, LMError
from lm.models.registry import model_name
from lm.training.checkpoint import (
    RUN_TOKENIZER,
    STATE,
    latest_complete,
    read_manifest,
    resolve_checkpoint,
    step_dirs,
)
from lm.training.checkpoint_manager import CheckpointManager
from lm.training.loggers import build_loggers
from lm.training.losses import evaluate
from lm.training.module import LMModule, NonFiniteLossError
from lm.training.resume_policy import check_resume, legacy_overrides
from lm.training.run_lock import LOCK_FILE, RunLock
from lm.training.signals import StopRequest, requeue_slurm_job
from lm.training.strategies import build_strategy, uses_gpu


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Optional[Path]
    global_step: int
    val_loss: Optional[float] = None
    val_ppl: Optional[float] = None
    val_bpb: Optional[float] = None
    sample: Optional[str] = None
    stopped_by_signal: Optional[str] = None
    requeued: bool = False
    metrics: Dict[str, float] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """0, or 128 + the signal's number after a signal stop (0 when the stop requeued a SLURM job)."""
        if not self.stopped_by_signal or self.requeued:
            return 0
        return 128 + int(getattr(signal, self.stopped_by_signal))


def launch_rank() -> int:
    """This process's global rank before torch.distributed exists (launcher / SLURM variables)."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def world_shape(train: Any) -> tuple:
    """(devices per node, nodes): from the config, or from SLURM's allocation when set there."""
    devices, nodes = train.devices, train.num_nodes
    if "SLURM_NTASKS_PER_NODE" in os.environ and "SLURM_JOB_ID" in os.environ:
        devices = int(os.environ["SLURM_NTASKS_PER_NODE"].split("(")[0])
        nodes = int(os.environ.get("SLURM_NNODES", nodes))
    if devices <= 0:
        devices = max(1, torch.cuda.device_count()) if uses_gpu(train) else 1
    return devices, nodes


# ---------------------------------------------------------------------------------------- data


def prepare_data(cfg: DictConfig, progress: bool = True) -> Path:
    """Token shards for ``cfg.data`` (built once; other ranks wait for rank 0)."""
    from data.prepare import prepare

    out = Path(cfg.data.out_dir)
    lock = out.with_name(out.name + ".preparing")
    if launch_rank() == 0:
        lock.parent.mkdir(parents=True, exist_ok=True)
        lock.write_text(str(os.getpid()))
        try:
            prepare(cfg.data, progress=progress)
        finally:
            lock.unlink(missing_ok=True)
        return out
    deadline = time.time() + 6 * 3600
    while lock.exists() or not (out / "metadata.json").is_file():
        if time.time() > deadline:
            raise LMError(f"timed out waiting for rank 0 to prepare {out}")
        time.sleep(1.0)
    return out


@dataclass
class RunData:
    """The run's data: a prepared corpus or a synthetic task."""

    datamodule: Any
    bytes_per_token: float = 0.0  # 0: no bits per byte (a task)
    tokenizer: Dict[str, Any] = field(default_factory=dict)  # path and sha256 (empty for a task)
    data_dir: Optional[Path] = None  # the prepared corpus (None for a task)

    def describe(self, cfg: ExperimentConfig) -> str:
        return str(self.data_dir) if self.data_dir is not None else f"task {cfg.data.task.name}"


def build_data(cfg: DictConfig) -> RunData:
    """The datamodule of a corpus (token shards prepared first if needed) or of a synthetic task."""
    if cfg.data.source.kind == "task":
        from data.tasks import task_from_config
        from data.tasks.datamodule import TaskDataModule

        task = task_from_config(plain(cfg.data))
        return RunData(
            TaskDataModule(
                task,
                cfg.train.micro_batch_size,
                cfg.seed,
                val_examples=cfg.data.task.val_examples,
                num_workers=cfg.train.num_workers,
            )
        )
    from data.datamodule import TokenDataModule

    data_dir = prepare_data(cfg, progress=cfg.train.progress_bar)
    datamodule = TokenDataModule(
        data_dir,
        cfg.train.seq_len,
        cfg.train.micro_batch_size,
        cfg.seed,
        num_workers=cfg.train.num_workers,
        val_batches=cfg.train.val_batches,
        doc_start_mask=cfg.data.packing == "reset",
        state_passing=cfg.train.state_passing,
    )
    # absolute paths: a checkpoint is read from any working directory (lm eval, lm generate, lm export)
    tokenizer = {"path": str(Path(datamodule.tokenizer_path).resolve()), "sha256": datamodule.tokenizer_sha256}
    return RunData(datamodule, datamodule.bytes_per_token, tokenizer, Path(data_dir).resolve())


# ------------------------------------------------------------------------------------- resume


def _fresh(cfg: DictConfig) -> bool:
    return cfg.resume in ("none", "", "null", "None")


def checkpoint_to_resume(cfg: DictConfig, ckpt_dir: Path, echo=print) -> Optional[Path]:
    """The verified checkpoint to resume from (None: a fresh start); rejected ones are named.

    ``resume=auto`` with checkpoint directories but none usable is a one-line error: nothing is
    deleted, appended or overwritten.
    """
    if _fresh(cfg):
        return None
    if cfg.resume != "auto":
        return resolve_checkpoint(path=cfg.resume)
    rejected: List = []
    found = latest_complete(ckpt_dir, verify=True, rejected=rejected)
    if launch_rank() == 0:
        for path, reason in rejected:
            echo(f"note: checkpoint {path} rejected: {reason}")
    if found is None and step_dirs(ckpt_dir):
        path, reason = rejected[-1] if rejected else (ckpt_dir, "none is complete")
        raise LMError(
            f"resume=auto: no usable checkpoint in {ckpt_dir} (newest {path.name}: {reason}); nothing was "
            f"changed: restore a checkpoint, pass resume=<checkpoint>, or start over with a new run_dir=... "
            f"or overwrite=true"
        )
    return found


@dataclass
class ResumePlan:
    """What a run continues from: nothing (a fresh start) or a verified checkpoint."""

    checkpoint: Optional[Path] = None
    step: Optional[int] = None
    apply_optimizer_settings: bool = False  # the new config changes optimizer settings (resume_policy)
    done: bool = False  # the checkpoint is already at train.max_steps

    @property
    def state_path(self) -> Optional[str]:
        return str(self.checkpoint / STATE) if self.checkpoint is not None else None


def plan_resume(cfg: DictConfig, ckpt_dir: Path, echo) -> Tuple[DictConfig, ResumePlan]:
    """The checkpoint to resume (:func:`checkpoint_to_resume`), checked against the new config
    (:func:`lm.training.resume_policy.check_resume`, ZeRO world size), and the config to continue
    with: a run from before ``data.packing`` trained on one stream and keeps doing so."""
    found = checkpoint_to_resume(cfg, ckpt_dir, echo)
    if found is None:
        return cfg, ResumePlan()
    manifest = read_manifest(found)
    if "packing" not in manifest.get("config", {}).get("data", {"packing": None}):
        cfg = cast(DictConfig, OmegaConf.merge(cfg, {"data": {"packing": "stream"}}))
    # a run from before the family recipes keeps its optimizer's parameter groups
    cfg = cast(DictConfig, OmegaConf.merge(cfg, legacy_overrides(manifest.get("config", {}))))
    changes = check_resume(manifest.get("config", {}), plain(cfg), str(found))
    _check_world_size(cfg, manifest, found)
    step = int(manifest["step"])
    if step >= cfg.train.max_steps:
        echo(f"{Path(cfg.run_dir)}: already trained to step {step} (train.max_steps={cfg.train.max_steps})")
        return cfg, ResumePlan(found, step, done=True)
    if changes.notices and launch_rank() == 0:
        echo(
            f"note: resuming step {step} with changed settings, applied from here on "
            f"(the schedule keeps its step): {'; '.join(changes.notices)}"
        )
    return cfg, ResumePlan(found, step, changes.optimizer_changed)


def check_writable(directory: Path) -> None:
    """One-line error unless a file can be created in ``directory`` (when it exists)."""
    if not directory.is_dir():
        return
    try:
        with tempfile.TemporaryFile(dir=directory, prefix=".write-test"):
            pass
    except OSError as e:
        raise LMError(
            f"{directory} is not writable ({e.strerror or e}): make it writable, or choose another "
            f"run_dir=... (to evaluate a read-only run, pass --out to lm eval)"
        ) from None


def prepare_run_dir(cfg: DictConfig, echo=print) -> None:
    """Launching process, lock held: refuse a fresh run over an earlier run's checkpoints unless
    ``overwrite=true``, which removes that run's files (every file in run_dir but the lock)."""
    run_dir = Path(cfg.run_dir)
    check_writable(run_dir)
    check_writable(run_dir / "checkpoints")
    if cfg.overwrite and not _fresh(cfg):
        raise ConfigError(f"overwrite=true starts {run_dir} over; it cannot be combined with resume={cfg.resume}")
    existing = step_dirs(run_dir / "checkpoints")
    if not _fresh(cfg) or not existing:
        return
    if not cfg.overwrite:
        raise LMError(
            f"run_dir {run_dir} already holds checkpoints of an earlier run (newest {existing[-1].name}); "
            f"continue it with resume=auto, or start over with a new run_dir=... or overwrite=true"
        )
    for entry in run_dir.iterdir():
        if entry.name != LOCK_FILE:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    echo(f"overwrite=true: removed the earlier run's files from {run_dir}")


def _write_run_files(
    run_dir: Path, cfg: ExperimentConfig, resumed_step: Optional[int] = None, tokenizer: Optional[Dict[str, Any]] = None
) -> None:
    """``config.yaml``; a resume that changes it keeps the earlier one as ``config.<step>.yaml``
    (the config that trained up to that step). A copy of the tokenizer, ``tokenizer.json``, keeps the
    run's checkpoints usable when the prepared data directory moves or is deleted."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer and tokenizer.get("path") and Path(tokenizer["path"]).is_file():
        write_atomic(run_dir / RUN_TOKENIZER, Path(tokenizer["path"]).read_bytes())
    text = to_yaml(cfg)
    current = run_dir / "config.yaml"
    if resumed_step is not None and current.is_file() and current.read_text() != text:
        write_atomic(run_dir / f"config.{resumed_step}.yaml", current.read_text())
    write_atomic(current, text)


def _validation_prompt(data_dir: Path, tokenizer, tokens: int = 12) -> str:
    """The start (up to ``tokens`` tokens) of the first validation document: the end-of-training
    sample's prompt when ``train.sample_prompt`` is empty ("" when there is no validation text)."""
    from data.shards import TokenShards

    try:
        shards = TokenShards(data_dir, "validation")
    except Exception:  # no validation split
        return ""
    if shards.num_documents == 0:
        return ""
    starts = list(shards.doc_starts[:2]) + [len(shards)]
    length = min(tokens, int(starts[1]) - int(starts[0]) - 1)  # the document without its end-of-document id
    if length <= 0:
        return ""
    return tokenizer.decode([int(t) for t in shards.window(int(starts[0]), length)])


# -------------------------------------------------------------------------------------- train


def train(cfg: DictConfig, echo=print) -> TrainResult:
    """Run one training job described by a validated experiment config.

    The launching process holds the run-directory lock for the whole run; if it created the run
    directory and the run fails before writing anything, the directory is removed again.
    """
    run_dir = Path(cfg.run_dir)
    if launch_rank() != 0:
        return _train(cfg, echo)
    created = not run_dir.exists()
    lock = RunLock(run_dir, echo).acquire()
    try:
        prepare_run_dir(cfg, echo)
        return _train(cfg, echo)
    finally:
        lock.release()
        if created and [p.name for p in run_dir.iterdir()] == [LOCK_FILE]:
            shutil.rmtree(run_dir, ignore_errors=True)


def _train(cfg: DictConfig, echo) -> TrainResult:
    """The run's steps: resume decision, data, the typed config, module, callbacks, fit, report."""
    run_dir, rank0 = Path(cfg.run_dir), launch_rank() == 0
    cfg, plan = plan_resume(cfg, run_dir / "checkpoints", echo)
    if plan.done:
        assert plan.step is not None  # plan_resume sets the step of every plan it marks done
        return TrainResult(run_dir, plan.checkpoint, plan.step)
    devices, nodes = world_shape(cfg.train)
    from lm.training.threads import apply_threads

    threads = apply_threads(cfg.train.threads, devices)
    data = build_data(cfg)
    exp = resolve(cfg, data.datamodule, echo if rank0 else None)
    # before anything is written: a warm start whose weights do not fit is a one-line error
    module = build_module(exp, data, plan)
    if rank0:
        _write_run_files(run_dir, exp, plan.step, data.tokenizer)
        _announce(exp, module, data, plan, threads, echo)
    stop = StopRequest() if exp.checkpoint.save_on_signal else None
    manifest_extra = {
        "config": to_dict(exp),
        "tokenizer": data.tokenizer,
        "data_dir": str(data.data_dir) if data.data_dir else None,
    }
    checkpoints = CheckpointManager(
        run_dir / "checkpoints",
        exp.checkpoint.every_n_steps,
        exp.checkpoint.keep_last,
        manifest_extra,
        stop=stop,
        resume_from=plan.checkpoint,
    )
    loggers = build_loggers(exp, run_dir, to_dict(exp))
    callbacks = build_callbacks(exp, run_dir, checkpoints, loggers)
    callbacks += getattr(data.datamodule, "callbacks", list)()  # the data's own metrics (a mixture's per source)
    trainer = build_trainer(exp, devices, nodes, callbacks, loggers, echo)
    fit(trainer, module, data, plan, checkpoints)
    return finish(exp, trainer, module, data, plan, checkpoints, stop, echo)


def build_module(cfg: ExperimentConfig, data: RunData, plan: ResumePlan) -> LMModule:
    """The Lightning module, its weights initialised from ``cfg.seed``."""
    if not uses_gpu(cfg.train):
        from lm.training.cpu_allocator import keep_freed_memory

        keep_freed_memory()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module = LMModule(cfg, bytes_per_token=data.bytes_per_token)
    module.apply_optimizer_settings_on_start = plan.apply_optimizer_settings
    if _init_from(cfg) and plan.checkpoint is None:
        # warm start: weights only; the optimizer, the step count and the data position start fresh
        from lm.training.export import warm_start

        warm_start(module.model, str(cfg.init_from))
    return module


def _init_from(cfg: ExperimentConfig) -> bool:
    return cfg.init_from not in (None, "", "none", "None", "null")


def _announce(
    cfg: ExperimentConfig, module: LMModule, data: RunData, plan: ResumePlan, threads: Tuple[int, str], echo
) -> None:
    """Rank 0: the model, data, run directory and thread count (and a warning for a small split)."""
    n = module.model.num_parameters()
    size = f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"
    echo(
        f"model: {model_name(cfg.model)} with {size} parameters (vocabulary {cfg.model.vocab_size}); "
        f"data: {data.describe(cfg)}; run: {Path(cfg.run_dir)}"
        + (f"; resuming from {plan.checkpoint}" if plan.checkpoint else "")
        + (f"; weights from init_from={cfg.init_from}" if _init_from(cfg) and not plan.checkpoint else "")
    )
    echo(f"threads: {threads[0]} per process ({threads[1]}; set train.threads=N)")
    if data.data_dir is not None:
        from data.split import small_split_warning

        warning = small_split_warning(data.datamodule.metadata)
        if warning:
            echo(warning)


def build_callbacks(
    cfg: ExperimentConfig, run_dir: Path, checkpoints: CheckpointManager, loggers: List[Any]
) -> List[Any]:
    """Sample recorder, checkpoints, progress bar, learning-rate monitor and probes, in that order."""
    callbacks: List[Any] = []
    if cfg.train.record_samples:
        from lm.training.callbacks import SampleRecorder

        # before the checkpoint callback: a step is recorded before a checkpoint can include it, so
        # a kill between the two never leaves a checkpointed step without its record
        callbacks.append(SampleRecorder(run_dir))
    callbacks.append(checkpoints)
    if cfg.train.progress_bar:
        from pytorch_lightning.callbacks import TQDMProgressBar

        callbacks.append(TQDMProgressBar(refresh_rate=max(1, cfg.train.log_every_n_steps)))
    if loggers:
        from pytorch_lightning.callbacks import LearningRateMonitor

        callbacks.append(LearningRateMonitor(logging_interval="step"))
    probe_cb = _probe_callback(cfg, run_dir)
    if probe_cb is not None:
        callbacks.append(probe_cb)
    return callbacks


def build_trainer(
    cfg: ExperimentConfig, devices: int, nodes: int, callbacks: List[Any], loggers: List[Any], echo
) -> pl.Trainer:
    """The Lightning ``Trainer``: strategy, precision, step counts, validation cadence, clipping."""
    train = cfg.train
    strategy = build_strategy(train, devices, nodes)
    is_deepspeed = train.strategy == "deepspeed"
    if is_deepspeed and not uses_gpu(train):
        from lm.training.ds_ops import prebuild_cpu_ops

        prebuild_cpu_ops(echo if launch_rank() == 0 else (lambda line: None))
    plugins: List[Any] = []
    if isinstance(strategy, str):
        from pytorch_lightning.plugins.environments import SLURMEnvironment

        if SLURMEnvironment.detect():  # our own signal handling requeues; Lightning's must not
            plugins.append(SLURMEnvironment(auto_requeue=False))
    accumulate = train.accumulate_grad_batches
    return pl.Trainer(
        accelerator="gpu" if uses_gpu(train) else "cpu",
        devices=devices,
        num_nodes=nodes,
        strategy=strategy,
        # Lightning annotates precision as a Literal of its spellings; ours is a str the schema's
        # choices already restrict to them
        precision=_precision(train.precision),  # type: ignore[arg-type]
        max_steps=train.max_steps,
        max_epochs=-1,
        val_check_interval=train.val_every_n_steps * accumulate if train.val_every_n_steps else None,
        check_val_every_n_epoch=None,
        limit_val_batches=train.val_batches if train.val_every_n_steps else 0,
        num_sanity_val_steps=0,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=None if is_deepspeed or not train.grad_clip else train.grad_clip,
        logger=loggers or False,
        callbacks=callbacks,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        deterministic=train.deterministic,
        log_every_n_steps=train.log_every_n_steps,
        default_root_dir=str(cfg.run_dir),
        enable_progress_bar=train.progress_bar,
        enable_model_summary=False,
        benchmark=False,
        plugins=plugins or None,
    )


def fit(trainer: pl.Trainer, module: LMModule, data: RunData, plan: ResumePlan, checkpoints: CheckpointManager) -> None:
    """``Trainer.fit`` from the resumed checkpoint (if any); too many non-finite steps in a row are a
    one-line error naming the last good checkpoint."""
    try:
        trainer.fit(module, datamodule=data.datamodule, ckpt_path=plan.state_path)
    except NonFiniteLossError as e:
        newest = checkpoints.saved[-1] if checkpoints.saved else plan.checkpoint
        kept = f"; the last good checkpoint is {newest}" if newest else ""
        raise LMError(f"{e}{kept}") from None


def finish(
    cfg: ExperimentConfig,
    trainer: pl.Trainer,
    module: LMModule,
    data: RunData,
    plan: ResumePlan,
    checkpoints: CheckpointManager,
    stop: Optional[StopRequest],
    echo,
) -> TrainResult:
    """The result: after a signal stop, the stop (and a SLURM requeue); else the metrics and, on rank 0,
    the final report."""
    result = TrainResult(
        Path(cfg.run_dir),
        checkpoints.saved[-1] if checkpoints.saved else plan.checkpoint,
        trainer.global_step,
        stopped_by_signal=checkpoints.stopped_by_signal,
    )
    if checkpoints.stopped_by_signal:
        _report_stop(trainer, checkpoints, stop, result, echo)
        return result
    result.metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if trainer.is_global_zero:
        _final_report(cfg, module, data.datamodule, result, echo)
    return result


def _report_stop(
    trainer: pl.Trainer, checkpoints: CheckpointManager, stop: Optional[StopRequest], result: TrainResult, echo
) -> None:
    """Say where a signal stopped the run; requeue the SLURM job when the signal asked for it."""
    unsaved = (
        f" (step {checkpoints.skipped_nonfinite} not saved: non-finite loss or weights)"
        if checkpoints.skipped_nonfinite == trainer.global_step
        else ""
    )
    stopped = (
        f"stopped by {checkpoints.stopped_by_signal} at step {trainer.global_step}; "
        f"checkpoint {result.checkpoint}{unsaved}"
    )
    if stop is not None and stop.wants_requeue and trainer.is_global_zero:
        # said before the requeue: SLURM terminates the job's processes as soon as it is requeued
        echo(f"{stopped}; requeueing SLURM job {os.environ.get('SLURM_JOB_ID')}")
        result.requeued = requeue_slurm_job()
        if not result.requeued:
            # exiting 0 here would record the unfinished job as COMPLETED
            raise LMError(
                f"{stopped}, but `scontrol requeue` failed: resubmit the job (lm submit, which "
                f"resumes with resume=auto)"
            )
    elif trainer.is_global_zero:
        echo(stopped)


def _check_world_size(cfg: DictConfig, manifest: Dict[str, Any], resume_from: Path) -> None:
    """DeepSpeed's ZeRO checkpoints are partitioned per rank: resume them on as many ranks."""
    if cfg.train.strategy != "deepspeed":
        return
    devices, nodes = world_shape(cfg.train)
    before = int(manifest.get("world_size", devices * nodes))
    if before != devices * nodes:
        raise ConfigError(
            f"resume from {resume_from}: the DeepSpeed checkpoint was written by {before} ranks, this run "
            f"has {devices * nodes} (train.devices x train.num_nodes); resume it on {before} ranks"
        )


def _precision(value: str) -> str:
    return "32-true" if value == "32" else str(value)


def _probe_callback(cfg: ExperimentConfig, run_dir: Path):
    if cfg.probes.every_n_steps <= 0:
        return None
    try:
        from lm.probes.callback import ProbeCallback
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("lm.probes"):
            raise ConfigError("probes.every_n_steps > 0 but the probes package is not installed") from None
        raise
    return ProbeCallback(cfg.probes, run_dir)


# ------------------------------------------------------------------------------------- report


@torch.no_grad()
def _final_report(cfg: ExperimentConfig, module: LMModule, datamodule, result: TrainResult, echo) -> None:
    """Validation loss, perplexity and bits/byte on rank 0, and a generated sample."""
    model = module.model
    if cfg.train.strategy == "deepspeed" and cfg.train.zero_stage == 3 and result.checkpoint is not None:
        from lm.training.export import load_model

        # the module's parameters are partitioned across ranks: evaluate the consolidated weights
        model = load_model(str(result.checkpoint)).model.to(next(module.parameters()).device)
    was_training = model.training
    model.eval()
    sums = evaluate(
        model,
        datamodule.val_dataloader(),
        module.task_output,
        module.loss_chunk_size,
        module.loss_across_boundary,
        max_batches=cfg.train.val_batches,
    )
    metrics = sums.metrics(module.bytes_per_token)
    for name in ("val/acc", "val/seq_acc"):
        if name in metrics:
            result.metrics[name] = metrics[name]
    if "val/loss" in metrics:
        result.val_loss, result.val_ppl = metrics["val/loss"], metrics["val/ppl"]
        result.val_bpb = metrics.get("val/bpb")
    stop_reason, prompt_from = _final_sample(cfg, model, datamodule, result)
    model.train(was_training)
    summary = {
        "step": result.global_step,
        "checkpoint": str(result.checkpoint),
        "val_loss": result.val_loss,
        "val_ppl": result.val_ppl,
        "val_bpb": result.val_bpb,
        "sample": result.sample,
        "sample_stop": stop_reason,
        "val_acc": result.metrics.get("val/acc"),
        "val_seq_acc": result.metrics.get("val/seq_acc"),
    }
    write_atomic(result.run_dir / "summary.json", json.dumps(summary, indent=1))
    _echo_report(cfg, result, stop_reason, prompt_from, echo)


def _final_sample(cfg: ExperimentConfig, model, datamodule, result: TrainResult) -> Tuple[Optional[str], Optional[str]]:
    """A sample of ``train.sample_tokens`` tokens into ``result.sample`` (corpus runs); (why it stopped,
    where its prompt came from)."""
    if cfg.data.source.kind == "task" or cfg.train.sample_tokens <= 0:
        return None, None
    from data.tokenizer import load_tokenizer
    from lm.evaluation.sampling import sample_with_reason

    tokenizer = load_tokenizer(datamodule.tokenizer_path)
    prompt, prompt_from = cfg.train.sample_prompt, "train.sample_prompt"
    if not prompt:
        prompt, prompt_from = _validation_prompt(datamodule.data_dir, tokenizer), "a validation document's start"
    result.sample, stop_reason = sample_with_reason(
        model,
        lambda s: tokenizer.encode(s).ids,
        lambda ids: tokenizer.decode(ids),
        prompt,
        cfg.train.sample_tokens,
        temperature=0.8,
        top_k=50,
        seed=cfg.seed,
        stop_token=datamodule.eod_id,
    )
    return stop_reason, prompt_from


def _echo_report(
    cfg: ExperimentConfig, result: TrainResult, stop_reason: Optional[str], prompt_from: Optional[str], echo
) -> None:
    metrics_csv = result.run_dir / "logs" / "metrics.csv"
    plot = None
    if metrics_csv.is_file():
        from lm.training.callbacks import plot_loss_curves

        plot = plot_loss_curves(metrics_csv, result.run_dir / "loss.png")
    echo("")
    echo(
        f"finished at step {result.global_step}; checkpoint: {result.checkpoint}"
        + (f"; loss curves: {plot}" if plot else "")
    )
    if result.val_loss is not None and cfg.data.source.kind == "task":
        acc = (
            f", accuracy {result.metrics['val/acc']:.3f}, sequence accuracy {result.metrics['val/seq_acc']:.3f}"
            if "val/acc" in result.metrics
            else ""
        )
        echo(f"validation: loss {result.val_loss:.5f}{acc}")
    elif result.val_loss is not None:
        bpb = f", bits/byte {result.val_bpb:.3f}" if result.val_bpb is not None else ""
        echo(f"validation: loss {result.val_loss:.4f}, perplexity {result.val_ppl:.2f}{bpb}")
    if result.sample is not None:
        echo(f"sample (prompt: {prompt_from}; stopped at the {stop_reason}):")
        echo(result.sample)
