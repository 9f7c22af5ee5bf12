"""What may change when a run is resumed: every config key is in exactly one class.

* ``OVERRIDABLE``: takes effect silently (logging, checkpoint cadence, probes,
  SLURM, implementation choices that do not change the math's meaning);
* ``NOTICE``: takes effect, with a printed notice naming the old and new value (optimizer
  settings: the schedule's base lr and the optimizer's betas/eps/weight decay are reset to the
  new values; batch shape and world size: the rest of the epoch is re-divided; run length: the
  cosine schedule decays to the new ``train.max_steps``);
* ``FORBIDDEN``: cannot change (model shape and family, data, seed, tokenizer, sequence length,
  strategy, precision): one-line error before anything is written;
* ``DERIVED``: filled by the trainer, compared only when the new config sets them.

:func:`check_resume` compares the new config with the one stored in the checkpoint's manifest.
``tests/training/test_resume_policy.py`` checks that every schema key is classified.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Tuple

from lm.errors import ConfigError

OVERRIDABLE = frozenset(
    {
        "name",
        "run_dir",
        "resume",
        "overwrite",
        # the weights a run started from: a resume continues from its checkpoint's weights either way
        "init_from",
        "data.num_proc",
        "data.batch_size",
        "data.task.val_examples",
        "model.kernel_backend",
        "train.accelerator",
        "train.activation_checkpointing",
        "train.compile",
        "train.loss_chunk_size",
        "train.val_every_n_steps",
        "train.val_batches",
        "train.log_every_n_steps",
        "train.max_nonfinite_steps",
        "train.num_workers",
        "train.threads",
        "train.deterministic",
        "train.progress_bar",
        "train.sample_prompt",
        "train.sample_tokens",
        "train.record_samples",
        "checkpoint.every_n_steps",
        "checkpoint.keep_last",
        "checkpoint.save_on_signal",
        "logging.csv",
        "logging.tensorboard",
        "logging.wandb.mode",
        "logging.wandb.project",
        "logging.wandb.entity",
        "logging.wandb.tags",
        "probes.every_n_steps",
        "probes.batch_size",
        "probes.seq_len",
        "probes.probes",
        "probes.lsa_rank",
        "probes.seed",
        "slurm.partition",
        "slurm.account",
        "slurm.time",
        "slurm.nodes",
        "slurm.gpus_per_node",
        "slurm.cpus_per_task",
        "slurm.mem",
        "slurm.signal_grace_s",
        "slurm.job_name",
        "slurm.template",
        "slurm.extra_sbatch",
        "slurm.setup",
    }
)

#: applied on resume with a notice; OPTIMIZER_KEYS are reset in the restored optimizer/scheduler
OPTIMIZER_KEYS = frozenset({"train.lr", "train.beta1", "train.beta2", "train.eps", "train.weight_decay"})
NOTICE = OPTIMIZER_KEYS | frozenset(
    {
        "train.min_lr_ratio",
        "train.schedule",
        "train.decay_fraction",
        "train.warmup_steps",
        "train.grad_clip",
        "train.accumulate_grad_batches",
        "train.micro_batch_size",
        "train.devices",
        "train.num_nodes",
        "model.dropout",
        # the cosine schedule decays to train.max_steps: a new value changes the lr of every later step
        "train.max_steps",
        "data.loss_across_boundary",
    }
)
#: what a notice adds for keys whose change has a consequence worth naming
CONSEQUENCE = {"train.max_steps": "the learning-rate schedule now decays to the new last step"}

FORBIDDEN = frozenset(
    {
        "seed",
        "data.name",
        "data.out_dir",
        "data.validation_fraction",
        "data.test_fraction",
        "data.split_seed",
        "data.shard_tokens",
        "data.parts",
        "data.budget_bytes",
        "data.sources",
        "data.streaming",
        "data.source.kind",
        "data.source.paths",
        "data.source.split_by",
        "data.source.split_regex",
        "data.source.text_field",
        "data.source.ids_field",
        "data.source.hf_name",
        "data.source.hf_config",
        "data.source.hf_split",
        "data.source.streaming",
        "data.source.max_documents",
        "data.source.max_bytes",
        "data.source.encoding_errors",
        "data.source.max_invalid_utf8",
        "data.tokenizer.path",
        "data.tokenizer.vocab_size",
        "data.tokenizer.min_frequency",
        "data.tokenizer.train_max_bytes",
        "data.tokenizer.eod_token",
        "data.tokenizer.pad_token",
        "data.task.name",
        "data.task.params",
        "model.family",
        "model.variant",
        "model.d_model",
        "model.n_layers",
        "model.n_heads",
        "model.head_dim",
        "model.mlp",
        "model.mlp_ratio",
        "model.norm",
        "model.norm_eps",
        "model.tie_embeddings",
        "model.max_seq_len",
        "model.init_std",
        "model.mixer",
        "model.layers",
        "train.seq_len",
        "train.precision",
        "train.strategy",
        "train.zero_stage",
        "train.offload_optimizer",
        "train.offload_params",
        "data.packing",
        "train.state_passing",
        # the restored optimizer state keeps the implementation flags it was saved with (foreach/fused)
        "train.optimizer",
        # the restored optimizer state holds one entry per parameter group of the run's layout
        "train.weight_decay_groups",
        "train.lr_multipliers",
    }
)

#: set by the trainer (from the data or the task); compared only when the new config sets them
DERIVED = frozenset({"model.vocab_size", "model.input_dim", "model.output_dim", "data.task_output"})

#: keys added after runs existed, with the value that reproduces how a run without them trained: a
#: checkpoint whose config lacks one resumes with that value (:func:`legacy_overrides`)
LEGACY_DEFAULTS: Dict[str, Any] = {"train.weight_decay_groups": "matrices", "train.lr_multipliers": False}

CLASSES = {"overridable": OVERRIDABLE, "notice": NOTICE, "forbidden": FORBIDDEN, "derived": DERIVED}


def schema_keys() -> List[str]:
    """Every leaf key of :class:`~lm.config.schema.ExperimentConfig` (dict-valued fields are leaves)."""
    from lm.config.schema import ExperimentConfig

    def walk(cls, prefix: str) -> List[str]:
        keys = []
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                keys += walk(type(default), f"{prefix}{f.name}.")
            else:
                keys.append(f"{prefix}{f.name}")
        return keys

    return walk(ExperimentConfig, "")


def classify(key: str) -> str:
    """The class of a schema key (``overridable``, ``notice``, ``forbidden`` or ``derived``)."""
    for name, keys in CLASSES.items():
        if key in keys:
            return name
    raise KeyError(key)


def legacy_overrides(old: Dict[str, Any]) -> Dict[str, Any]:
    """Nested overrides for the new config of a resume: :data:`LEGACY_DEFAULTS` for the keys the
    checkpoint's config ``old`` lacks (a run from before them keeps its optimizer's groups)."""
    out: Dict[str, Any] = {}
    for key, value in LEGACY_DEFAULTS.items():
        if _get(old, key)[0]:
            continue
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _get(config: Dict[str, Any], key: str) -> Tuple[bool, Any]:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclasses.dataclass
class ResumeChanges:
    notices: List[str]
    optimizer_changed: bool


def check_resume(old: Dict[str, Any], new: Dict[str, Any], checkpoint: str) -> ResumeChanges:
    """Compare the checkpoint's config ``old`` with ``new`` (both plain dicts).

    Raises a one-line :class:`ConfigError` for changed forbidden keys; returns the notices to print.
    """
    forbidden, notices = [], []
    optimizer_changed = False
    for key in schema_keys():
        has_old, a = _get(old, key)
        has_new, b = _get(new, key)
        if not has_old or not has_new or _same(a, b):
            continue
        kind = classify(key)
        if kind == "derived":
            if b in (None, 0, "") or a in (None, 0, ""):
                continue
            kind = "forbidden"
        if kind == "forbidden":
            forbidden.append(f"{key} ({_show(a)} -> {_show(b)})")
        elif kind == "notice":
            why = f" ({CONSEQUENCE[key]})" if key in CONSEQUENCE else ""
            notices.append(f"{key}: {_show(a)} -> {_show(b)}{why}")
            optimizer_changed |= key in OPTIMIZER_KEYS
    if forbidden:
        more = f" and {len(forbidden) - 3} more" if len(forbidden) > 3 else ""
        raise ConfigError(
            f"resume from {checkpoint}: {', '.join(forbidden[:3])}{more} cannot change on resume; restore the "
            f"checkpoint's value(s), or start a new run (a new run_dir=..., or overwrite=true to replace this one)"
        )
    return ResumeChanges(notices, optimizer_changed)
