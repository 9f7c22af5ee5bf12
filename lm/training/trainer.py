"""``lm train``: data, model and Trainer from one validated experiment config.

Order of work: validate the whole config (before anything heavy); the launching process (global
rank 0) takes the run-directory lock (:mod:`lm.training.run_lock`) and checks the run directory:
writable, a fresh run does not silently replace an earlier run's checkpoints, ``resume=auto``
finds a verified checkpoint (rejected ones are named with their reason) and the new config may
resume it (:mod:`lm.training.resume_policy`) -- all before anything is written; then prepare the
token shards if needed (rank 0; the others wait), resolve the vocabulary, build datamodule +
module + loggers + callbacks + strategy, ``Trainer.fit``, then (rank 0) report validation
perplexity and bits per byte and print a generated sample.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from data.atomic import write_atomic
from lm.config.loader import plain, to_yaml
from lm.errors import ConfigError, LMError
from lm.models.registry import model_name
from lm.training.checkpoint import (
    STATE,
    latest_complete,
    read_manifest,
    resolve_checkpoint,
    step_dirs,
)
from lm.training.checkpoint_manager import CheckpointManager
from lm.training.loggers import build_loggers
from lm.training.module import LMModule, NonFiniteLossError, batch_loss, validation_metrics
from lm.training.resume_policy import check_resume
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
    devices, nodes = int(train.devices), int(train.num_nodes)
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


def resolve_vocab(cfg: DictConfig, data_vocab: int, echo=None) -> int:
    """model.vocab_size: 0 (every size config's default) takes the tokenizer's size rounded up to 64;
    a fixed size smaller than it is an error, larger than that rounded size a warning (``echo``):
    the extra embedding rows are never trained."""
    v = int(cfg.model.vocab_size)
    rounded = 64 * math.ceil(data_vocab / 64)
    if v == 0:
        return rounded
    if v < data_vocab:
        raise ConfigError(
            f"model.vocab_size ({v}) is smaller than the tokenizer's vocabulary ({data_vocab}) of "
            f"{cfg.data.out_dir}; set model.vocab_size=0 to take it from the data"
        )
    if v > rounded and echo is not None:
        rows = v - data_vocab
        echo(f"warning: model.vocab_size={v} exceeds the tokenizer's {data_vocab} tokens of {cfg.data.out_dir}: "
             f"{rows} embedding rows ({rows * int(cfg.model.d_model):,} parameters per embedding matrix) are never "
             f"trained; model.vocab_size=0 takes the size from the data")
    return v


# ------------------------------------------------------------------------------------- resume


def _fresh(cfg: DictConfig) -> bool:
    return str(cfg.resume) in ("none", "", "null", "None")


def resume_checkpoint(cfg: DictConfig, ckpt_dir: Path, echo=print) -> Optional[Path]:
    """The verified checkpoint to resume from (None: a fresh start); rejected ones are named.

    ``resume=auto`` with checkpoint directories but none usable is a one-line error: nothing is
    deleted, appended or overwritten.
    """
    if _fresh(cfg):
        return None
    if str(cfg.resume) != "auto":
        return resolve_checkpoint(str(cfg.resume))
    rejected: List = []
    found = latest_complete(ckpt_dir, verify=True, rejected=rejected)
    if launch_rank() == 0:
        for path, reason in rejected:
            echo(f"note: checkpoint {path} rejected: {reason}")
    if found is None and step_dirs(ckpt_dir):
        path, reason = rejected[-1] if rejected else (ckpt_dir, "none is complete")
        raise LMError(f"resume=auto: no usable checkpoint in {ckpt_dir} (newest {path.name}: {reason}); nothing was "
                      f"changed: restore a checkpoint, pass resume=<checkpoint>, or start over with a new run_dir=... "
                      f"or overwrite=true")
    return found


def check_writable(directory: Path) -> None:
    """One-line error unless a file can be created in ``directory`` (when it exists)."""
    if not directory.is_dir():
        return
    try:
        with tempfile.TemporaryFile(dir=directory, prefix=".write-test"):
            pass
    except OSError as e:
        raise LMError(f"{directory} is not writable ({e.strerror or e}): make it writable, or choose another "
                      f"run_dir=... (to evaluate a read-only run, pass --out to lm eval)") from None


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
        raise LMError(f"run_dir {run_dir} already holds checkpoints of an earlier run (newest {existing[-1].name}); "
                      f"continue it with resume=auto, or start over with a new run_dir=... or overwrite=true")
    for entry in run_dir.iterdir():
        if entry.name != LOCK_FILE:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    echo(f"overwrite=true: removed the earlier run's files from {run_dir}")


def _write_run_files(run_dir: Path, cfg: DictConfig, resumed_step: Optional[int] = None) -> None:
    """``config.yaml``; a resume that changes it keeps the earlier one as ``config.<step>.yaml``
    (the config that trained up to that step)."""
    run_dir.mkdir(parents=True, exist_ok=True)
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
    from data.datamodule import TokenDataModule

    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    resume_from = resume_checkpoint(cfg, ckpt_dir, echo)
    apply_optimizer_settings = False
    resumed_step: Optional[int] = None
    if resume_from is not None:
        manifest = read_manifest(resume_from)
        if "packing" not in manifest.get("config", {}).get("data", {"packing": None}):
            # a run from before data.packing trained on one stream: it keeps doing so
            cfg.data.packing = "stream"
        changes = check_resume(manifest.get("config", {}), plain(cfg), str(resume_from))
        _check_world_size(cfg, manifest, resume_from)
        if int(manifest["step"]) >= int(cfg.train.max_steps):
            echo(f"{run_dir}: already trained to step {manifest['step']} (train.max_steps={cfg.train.max_steps})")
            return TrainResult(run_dir, resume_from, int(manifest["step"]))
        if changes.notices and launch_rank() == 0:
            echo(f"note: resuming step {manifest['step']} with changed settings, applied from here on "
                 f"(the schedule keeps its step): {'; '.join(changes.notices)}")
        apply_optimizer_settings = changes.optimizer_changed
        resumed_step = int(manifest["step"])
    devices, nodes = world_shape(cfg.train)
    from lm.training.threads import apply_threads

    threads, threads_from = apply_threads(int(cfg.train.threads), devices)

    if cfg.data.source.kind == "task":
        datamodule, bytes_per_token, tokenizer = _task_data(cfg)
        data_dir = None
    else:
        data_dir = prepare_data(cfg, progress=bool(cfg.train.progress_bar))
        datamodule = TokenDataModule(
            data_dir, int(cfg.train.seq_len), int(cfg.train.micro_batch_size), int(cfg.seed),
            num_workers=int(cfg.train.num_workers), val_batches=int(cfg.train.val_batches),
            doc_start_mask=cfg.data.packing == "reset", state_passing=bool(cfg.train.state_passing),
        )
        cfg.model.vocab_size = resolve_vocab(cfg, datamodule.vocab_size, echo if launch_rank() == 0 else None)
        bytes_per_token = datamodule.bytes_per_token
        tokenizer = {"path": str(datamodule.tokenizer_path), "sha256": datamodule.tokenizer_sha256}
    if cfg.data.source.kind == "task":
        output = datamodule.task.spec.output
        if cfg.data.task_output not in (None, output):
            raise ConfigError(f"data.task_output: the task {cfg.data.task.name} outputs {output!r}, not "
                              f"{cfg.data.task_output!r} (it is filled from the task: remove the key)")
        cfg.data.task_output = output
    config = plain(cfg)
    if launch_rank() == 0:
        _write_run_files(run_dir, cfg, resumed_step)

    if not uses_gpu(cfg.train):
        from lm.training.cpu_allocator import keep_freed_memory

        keep_freed_memory()
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    module = LMModule(config, bytes_per_token=bytes_per_token)
    module.apply_optimizer_settings_on_start = apply_optimizer_settings
    if launch_rank() == 0:
        n = module.model.num_parameters()
        source = data_dir if data_dir is not None else f"task {cfg.data.task.name}"
        size = f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"
        echo(f"model: {model_name(cfg.model)} with {size} parameters (vocabulary {cfg.model.vocab_size}); "
             f"data: {source}; run: {run_dir}" + (f"; resuming from {resume_from}" if resume_from else ""))
        echo(f"threads: {threads} per process ({threads_from}; set train.threads=N)")
        if data_dir is not None:
            from data.split import small_split_warning

            warning = small_split_warning(datamodule.metadata)
            if warning:
                echo(warning)

    stop = StopRequest() if cfg.checkpoint.save_on_signal else None
    manifest_extra = {"config": config, "tokenizer": tokenizer, "data_dir": str(data_dir) if data_dir else None}
    checkpoints = CheckpointManager(ckpt_dir, int(cfg.checkpoint.every_n_steps), int(cfg.checkpoint.keep_last),
                                    manifest_extra, stop=stop, resume_from=resume_from)
    callbacks: List[Any] = []
    if cfg.train.record_samples:
        from lm.training.callbacks import SampleRecorder

        # before the checkpoint callback: a step is recorded before a checkpoint can include it, so
        # a kill between the two never leaves a checkpointed step without its record
        callbacks.append(SampleRecorder(run_dir))
    callbacks.append(checkpoints)
    if cfg.train.progress_bar:
        from pytorch_lightning.callbacks import TQDMProgressBar

        callbacks.append(TQDMProgressBar(refresh_rate=max(1, int(cfg.train.log_every_n_steps))))
    from pytorch_lightning.callbacks import LearningRateMonitor

    loggers = build_loggers(cfg, run_dir, config)
    if loggers:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    probe_cb = _probe_callback(cfg, run_dir)
    if probe_cb is not None:
        callbacks.append(probe_cb)

    strategy = build_strategy(cfg.train, devices, nodes)
    is_deepspeed = cfg.train.strategy == "deepspeed"
    if is_deepspeed and not uses_gpu(cfg.train):
        from lm.training.ds_ops import prebuild_cpu_ops

        prebuild_cpu_ops(echo if launch_rank() == 0 else (lambda line: None))
    plugins = []
    if isinstance(strategy, str):
        from pytorch_lightning.plugins.environments import SLURMEnvironment

        if SLURMEnvironment.detect():  # our own signal handling requeues; Lightning's must not
            plugins.append(SLURMEnvironment(auto_requeue=False))
    accumulate = int(cfg.train.accumulate_grad_batches)
    trainer = pl.Trainer(
        accelerator="gpu" if uses_gpu(cfg.train) else "cpu",
        devices=devices,
        num_nodes=nodes,
        strategy=strategy,
        precision=_precision(cfg.train.precision),
        max_steps=int(cfg.train.max_steps),
        max_epochs=-1,
        val_check_interval=int(cfg.train.val_every_n_steps) * accumulate if cfg.train.val_every_n_steps else None,
        check_val_every_n_epoch=None,
        limit_val_batches=int(cfg.train.val_batches) if cfg.train.val_every_n_steps else 0,
        num_sanity_val_steps=0,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=None if is_deepspeed or not cfg.train.grad_clip else float(cfg.train.grad_clip),
        logger=loggers or False,
        callbacks=callbacks,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        deterministic=bool(cfg.train.deterministic),
        log_every_n_steps=int(cfg.train.log_every_n_steps),
        default_root_dir=str(run_dir),
        enable_progress_bar=bool(cfg.train.progress_bar),
        enable_model_summary=False,
        benchmark=False,
        plugins=plugins or None,
    )

    try:
        trainer.fit(module, datamodule=datamodule,
                    ckpt_path=str(resume_from / STATE) if resume_from is not None else None)
    except NonFiniteLossError as e:
        newest = checkpoints.saved[-1] if checkpoints.saved else resume_from
        kept = f"; the last good checkpoint is {newest}" if newest else ""
        raise LMError(f"{e}{kept}") from None

    result = TrainResult(run_dir, checkpoints.saved[-1] if checkpoints.saved else resume_from,
                         trainer.global_step, stopped_by_signal=checkpoints.stopped_by_signal)
    if checkpoints.stopped_by_signal:
        unsaved = (f" (step {checkpoints.skipped_nonfinite} not saved: non-finite loss or weights)"
                   if checkpoints.skipped_nonfinite == trainer.global_step else "")
        stopped = (f"stopped by {checkpoints.stopped_by_signal} at step {trainer.global_step}; "
                   f"checkpoint {result.checkpoint}{unsaved}")
        if stop is not None and stop.wants_requeue and trainer.is_global_zero:
            # said before the requeue: SLURM terminates the job's processes as soon as it is requeued
            echo(f"{stopped}; requeueing SLURM job {os.environ.get('SLURM_JOB_ID')}")
            result.requeued = requeue_slurm_job()
            if not result.requeued:
                # exiting 0 here would record the unfinished job as COMPLETED
                raise LMError(f"{stopped}, but `scontrol requeue` failed: resubmit the job (lm submit, which "
                              f"resumes with resume=auto)")
        elif trainer.is_global_zero:
            echo(stopped)
        return result
    result.metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if trainer.is_global_zero:
        _final_report(cfg, module, datamodule, trainer, result, echo)
    return result


def _check_world_size(cfg: DictConfig, manifest: Dict[str, Any], resume_from: Path) -> None:
    """DeepSpeed's ZeRO checkpoints are partitioned per rank: resume them on as many ranks."""
    if cfg.train.strategy != "deepspeed":
        return
    devices, nodes = world_shape(cfg.train)
    before = int(manifest.get("world_size", devices * nodes))
    if before != devices * nodes:
        raise ConfigError(f"resume from {resume_from}: the DeepSpeed checkpoint was written by {before} ranks, this run "
                          f"has {devices * nodes} (train.devices x train.num_nodes); resume it on {before} ranks")


def _task_data(cfg: DictConfig):
    """The datamodule of a synthetic task, with the model's input/output shapes set from it."""
    from data.tasks import build_task
    from data.tasks.datamodule import TaskDataModule

    task = build_task(str(cfg.data.task.name), plain(cfg.data.task.params))
    spec = task.spec
    if spec.input_dim:
        cfg.model.input_dim = spec.input_dim
        cfg.model.vocab_size = 0
    else:
        cfg.model.vocab_size = spec.vocab_size
    cfg.model.output_dim = spec.output_dim if spec.output != "classes" else None
    datamodule = TaskDataModule(task, int(cfg.train.micro_batch_size), int(cfg.seed),
                                val_examples=int(cfg.data.task.val_examples), num_workers=int(cfg.train.num_workers))
    return datamodule, 0.0, {}


def _precision(value: str) -> str:
    return "32-true" if value == "32" else str(value)


def _probe_callback(cfg: DictConfig, run_dir: Path):
    if int(cfg.probes.every_n_steps) <= 0:
        return None
    try:
        from lm.probes.callback import ProbeCallback
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("lm.probes"):
            raise ConfigError("probes.every_n_steps > 0 but the probes package is not installed") from None
        raise
    return ProbeCallback(cfg.probes, run_dir)


@torch.no_grad()
def _final_report(cfg, module: LMModule, datamodule, trainer, result: TrainResult, echo) -> None:
    """Validation loss, perplexity and bits/byte on rank 0, and a generated sample."""
    from data.tokenizer import load_tokenizer
    from lm.evaluation.sampling import sample_with_reason

    model = module.model
    if cfg.train.strategy == "deepspeed" and int(cfg.train.zero_stage) == 3 and result.checkpoint is not None:
        from lm.training.export import load_model

        # the module's parameters are partitioned across ranks: evaluate the consolidated weights
        model = load_model(str(result.checkpoint)).model.to(next(module.parameters()).device)
    was_training = model.training
    model.eval()
    sums = {"loss_sum": 0.0, "count": 0, "correct": 0.0, "seq_correct": 0.0, "sequences": 0.0}
    loader = datamodule.val_dataloader()
    device = next(model.parameters()).device
    for i, batch in enumerate(loader):
        if cfg.train.val_batches and i >= int(cfg.train.val_batches):
            break
        s, n, extra = batch_loss(model, {k: v.to(device) for k, v in batch.items()}, module.task_output,
                                 module.loss_chunk_size, module.loss_across_boundary)
        sums["loss_sum"] += float(s)
        sums["count"] += int(n)
        for name in ("correct", "seq_correct", "sequences"):
            sums[name] += float(extra.get(name, 0.0))
    metrics = validation_metrics(bytes_per_token=module.bytes_per_token, **sums)
    for name in ("val/acc", "val/seq_acc"):
        if name in metrics:
            result.metrics[name] = metrics[name]
    if "val/loss" in metrics:
        result.val_loss, result.val_ppl = metrics["val/loss"], metrics["val/ppl"]
        result.val_bpb = metrics.get("val/bpb")
    tokenizer = load_tokenizer(datamodule.tokenizer_path) if cfg.data.source.kind != "task" else None
    stop_reason = prompt_from = None
    if tokenizer is not None and int(cfg.train.sample_tokens) > 0:
        prompt, prompt_from = str(cfg.train.sample_prompt), "train.sample_prompt"
        if not prompt:
            prompt, prompt_from = _validation_prompt(datamodule.data_dir, tokenizer), "a validation document's start"
        result.sample, stop_reason = sample_with_reason(
            model, lambda s: tokenizer.encode(s).ids, lambda ids: tokenizer.decode(ids),
            prompt, int(cfg.train.sample_tokens), temperature=0.8, top_k=50,
            seed=int(cfg.seed), stop_token=datamodule.eod_id,
        )
    model.train(was_training)
    summary = {"step": result.global_step, "checkpoint": str(result.checkpoint), "val_loss": result.val_loss,
               "val_ppl": result.val_ppl, "val_bpb": result.val_bpb, "sample": result.sample,
               "sample_stop": stop_reason,
               "val_acc": result.metrics.get("val/acc"), "val_seq_acc": result.metrics.get("val/seq_acc")}
    write_atomic(result.run_dir / "summary.json", json.dumps(summary, indent=1))
    metrics_csv = result.run_dir / "logs" / "metrics.csv"
    plot = None
    if metrics_csv.is_file():
        from lm.training.callbacks import plot_loss_curves

        plot = plot_loss_curves(metrics_csv, result.run_dir / "loss.png")
    echo("")
    echo(f"finished at step {result.global_step}; checkpoint: {result.checkpoint}"
         + (f"; loss curves: {plot}" if plot else ""))
    if result.val_loss is not None and cfg.data.source.kind == "task":
        acc = (f", accuracy {result.metrics['val/acc']:.3f}, sequence accuracy {result.metrics['val/seq_acc']:.3f}"
               if "val/acc" in result.metrics else "")
        echo(f"validation: loss {result.val_loss:.5f}{acc}")
    elif result.val_loss is not None:
        bpb = f", bits/byte {result.val_bpb:.3f}" if result.val_bpb is not None else ""
        echo(f"validation: loss {result.val_loss:.4f}, perplexity {result.val_ppl:.2f}{bpb}")
    if result.sample is not None:
        echo(f"sample (prompt: {prompt_from}; stopped at the {stop_reason}):")
        echo(result.sample)
