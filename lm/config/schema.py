"""The typed schema of an experiment: every key a YAML file or a ``key=value`` override may set.

An experiment is one :class:`ExperimentConfig`. ``configs/<group>/*.yaml`` files fill its sections
(``data``, ``model``, ``train``), ``configs/experiment/*.yaml`` compose them, and the loader
(:mod:`lm.config.loader`) rejects unknown keys and wrong types with the full key path.
Family-specific token-mixer options live in ``model.mixer`` and are checked against the
family's own dataclass (see :mod:`lm.models.registry`).

Enumerated string keys are declared with :func:`choice`: their allowed values sit on the field
(``metadata["choices"]``), :func:`choices` collects them by key path, and the loader rejects any other
value with a "did you mean". (``typing.Literal`` would say the same, but OmegaConf 2.3, which
pyproject.toml allows, rejects it, and OmegaConf's own error has no suggestion.)

The classes stay mutable while OmegaConf composes and merges into them (and ``lm.models`` resolves
``model.variant`` in its own copy); :func:`lm.config.resolve.resolve` hands the run one frozen
instance (:func:`freeze`: assigning to any field of it raises ``dataclasses.FrozenInstanceError``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, cast


def choice(default: Optional[str], options: Sequence[str]) -> Any:
    """A string field that takes one of ``options`` (or None when it is Optional)."""
    return field(default=default, metadata={"choices": tuple(options)})


class Frozen:
    """Base of every section: :func:`freeze` makes an instance (and its nested sections) read-only."""

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen", False):
            raise dataclasses.FrozenInstanceError(
                f"cannot assign to field {name!r}: the resolved config is frozen (dataclasses.replace makes a copy)"
            )
        object.__setattr__(self, name, value)


# ----------------------------------------------------------------------------------------- data


@dataclass
class SourceConfig(Frozen):
    """Where documents come from.

    kind:
      ``stdlib``  the Python standard library's own source files (embedded default, no network);
      ``text``    local text files / globs in ``paths``; a document per file (``split_by: file``), per
                  blank-line separated block (``blank_line``), or per piece between matches of
                  ``split_regex`` (``regex``; its default starts a document at every WikiText-style
                  top-level heading line `` = Title = ``, keeping `` = = Section = = `` inside);
      ``json`` / ``jsonl`` / ``parquet`` / ``csv``  local files read by HF ``datasets``, text in
                  ``text_field``;
      ``hf``      a dataset on the HF hub (``hf_name``, ``hf_config``, ``hf_split``), streamed when
                  ``streaming`` is true; with ``paths``, local files read by the ``datasets`` builder
                  named in ``hf_name`` (``parquet``, ``json``, ``csv``, ``text``, ...):
                  ``load_dataset(hf_name, data_files=paths, split=hf_split)``;
      ``megatron``  GPT-NeoX/Megatron ``.bin``/``.idx`` pairs (``paths``: their prefixes), token ids
                  kept as they are (``tokenizer.path`` names the tokenizer they were made with);
      ``hf_tokens`` a ``save_to_disk`` directory or parquet/json(l) files of token ids in the column
                  ``ids_field`` (same tokenizer rule).
    """

    kind: str = choice(
        "stdlib", ("stdlib", "text", "json", "jsonl", "parquet", "csv", "hf", "megatron", "hf_tokens", "task")
    )
    paths: List[str] = field(default_factory=list)
    split_by: str = choice("file", ("file", "blank_line", "regex"))
    # split_by: regex: a document starts at every match (zero-width lookaheads keep the matched line);
    # the default: WikiText-style article headings " = Title = " (not " = = Section = = ")
    split_regex: str = r"(?m)^(?=[ \t]*= (?!=)[^\n]*[^=\n] =[ \t]*$)"
    text_field: str = "text"
    ids_field: str = "input_ids"  # kind hf_tokens: the column of token ids
    hf_name: Optional[str] = None
    hf_config: Optional[str] = None
    hf_split: str = "train"
    streaming: bool = False
    max_documents: Optional[int] = None
    max_bytes: Optional[int] = None
    encoding_errors: str = choice("replace", ("replace", "fail"))
    # replace: a file whose share of invalid UTF-8 bytes is above this fails (binary, not text); 1.0: off
    max_invalid_utf8: float = 0.01


@dataclass
class TokenizerConfig(Frozen):
    """A byte-level BPE trained on the training split, or an existing tokenizer.

    ``path``: None trains one; otherwise a ``tokenizer.json`` file or a HF hub tokenizer name.
    """

    path: Optional[str] = None
    vocab_size: int = 8192
    min_frequency: int = 2
    train_max_bytes: int = 40_000_000
    eod_token: str = "<|endoftext|>"
    pad_token: str = "<|pad|>"


@dataclass
class TaskConfig(Frozen):
    """A synthetic task generated on the fly (``source.kind: task``); see ``data/tasks``.

    ``params`` are the task's own parameters, checked against its dataclass.
    """

    name: str = "associative_recall"
    params: Dict[str, Any] = field(default_factory=dict)
    val_examples: int = 256


@dataclass
class MixtureSourceConfig(Frozen):
    """One corpus of a mixture (``data.sources``): prepared like ``data.source`` into
    ``<out_dir>/<name>`` with the shared tokenizer, drawn in proportion to ``weight``."""

    name: str = ""  # required: the directory under out_dir and the metric prefix (val/<name>/loss)
    weight: float = 1.0  # relative share of training windows (normalised over the sources)
    source: SourceConfig = field(default_factory=SourceConfig)


@dataclass
class DataConfig(Frozen):
    """A tokenized corpus (source, tokenizer, split, shards) or a synthetic task."""

    name: str = "stdlib"
    source: SourceConfig = field(default_factory=SourceConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    out_dir: str = "artifacts/data/${.name}"
    validation_fraction: float = 0.02
    test_fraction: float = 0.0
    split_seed: int = 1234
    num_proc: int = 0  # 0: one worker per CPU core
    batch_size: int = 256  # documents per tokenization batch
    shard_tokens: int = 64 * 1024 * 1024
    # 0: one prepared directory; n > 0: the source's files in n parts prepared separately (num_proc at a
    # time, or one per `lm data prepare --shard i/n`), resumable part by part, read through one index
    # (data/parts.py, docs/data.md)
    parts: int = 0
    # read only the first source files (in order) whose sizes add up to at most this many bytes (always
    # the first file); null: all (`lm data prepare --max-bytes`)
    budget_bytes: Optional[int] = None
    # a weighted mixture (data/mixture.py, docs/data.md): non-empty replaces `source`; the tokenizer is
    # `tokenizer.path` or trained on the first source, and shared by all
    sources: List[MixtureSourceConfig] = field(default_factory=list)
    # tokenize local json/jsonl/parquet/csv files (or kind hf with paths) on the fly during training, in
    # the DataLoader's worker processes, instead of preparing shards (data/streaming.py; needs tokenizer.path)
    streaming: bool = False
    task: TaskConfig = field(default_factory=TaskConfig)
    # reset | stream: how documents packed into one training window see each other. reset: every
    # recurrent state, convolution, token shift and attention restarts at each document (the
    # end-of-document id that precedes a document opens its segment, as `lm eval ppl` scores it);
    # stream: one token stream, state flows across documents (the behaviour of runs before this key)
    packing: str = choice("reset", ("reset", "stream"))
    # predict the first token of each document (from the end-of-document id before it); false: those
    # targets are not scored (neither in training nor in validation)
    loss_across_boundary: bool = True
    # filled by lm.config.resolve for task runs (the task's output kind) and recorded in config.yaml and
    # the checkpoint manifests; not set by users
    task_output: Optional[str] = choice(None, ("classes", "vectors", "multilabel"))


# ---------------------------------------------------------------------------------------- model


@dataclass
class ModelConfig(Frozen):
    """The shared skeleton: embedding -> n_layers x [norm, mixer, norm, mlp] -> norm -> head.

    ``family``/``variant`` pick the token mixer from the registry; ``mixer`` holds that family's
    own options (validated against its dataclass). ``vocab_size: 0`` takes the tokenizer's size
    rounded up to a multiple of 64.
    """

    family: str = "transformer"
    variant: Optional[str] = None
    vocab_size: int = 0
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    head_dim: Optional[int] = None  # default d_model // n_heads
    mlp: str = choice("swiglu", ("swiglu", "rwkv_cmix", "none"))
    mlp_ratio: float = 4.0
    norm: str = choice("rmsnorm", ("rmsnorm", "layernorm", "none"))
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    max_seq_len: int = 2048
    init_std: float = 0.02
    dropout: float = 0.0
    input_dim: Optional[int] = None  # continuous inputs (regression tasks): linear embedding
    output_dim: Optional[int] = None  # continuous outputs: linear readout instead of the LM head
    # the scan ops' backend (kernels/README.md); auto (or null): by device, fla: flash-linear-attention's
    # kernels (the fla extra; linear_scan, gla, delta_rule and dplr have them)
    kernel_backend: Optional[str] = choice("auto", ("auto", "reference", "torch", "triton", "fla"))
    mixer: Dict[str, Any] = field(default_factory=dict)
    # a hybrid (lm/models/hybrid.py): null, every layer is `family`; a pattern {every: N, mixer: <layer>,
    # offset: N-1, default: <layer>} (layer i is `mixer` when i % every == offset); or a list of n_layers
    # <layer>s. <layer>: a family, variant or family/variant name, or {family:, variant:, mixer: {options}}
    layers: Any = None


# ---------------------------------------------------------------------------------------- train


@dataclass
class TrainConfig(Frozen):
    """Optimisation, batch shapes, precision and distribution."""

    seq_len: int = 256
    micro_batch_size: int = 8
    accumulate_grad_batches: int = 1
    max_steps: int = 1000
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    # cosine: warmup, then cosine decay to min_lr_ratio * lr; wsd: warmup, constant, then a linear decay
    # to min_lr_ratio * lr over the last decay_fraction of max_steps (lm/training/schedule.py)
    schedule: str = choice("cosine", ("cosine", "wsd"))
    decay_fraction: float = 0.2
    # torch.optim.AdamW as is, or with foreach=True / fused=True (DeepSpeed CPU offload: DeepSpeedCPUAdam)
    optimizer: str = choice("adamw", ("adamw", "adamw_foreach", "adamw_fused"))
    # which parameters decay (docs/recipes.md): family = each token mixer's recipe (no decay on norms, biases,
    # lerp/decay/bonus parameters; RWKV-7: only its four projections), the skeleton's matrices elsewhere;
    # matrices = every parameter with 2+ dimensions (the split before the recipes)
    weight_decay_groups: str = choice("family", ("family", "matrices"))
    # per-group learning-rate multipliers from the family recipe (RWKV-7: w0 at 2x); false: one lr for all
    lr_multipliers: bool = True
    precision: str = choice("32-true", ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true"))
    accelerator: str = choice("auto", ("auto", "cpu", "gpu", "cuda"))
    devices: int = 1  # processes per node (0: all visible GPUs)
    num_nodes: int = 1
    strategy: str = choice("auto", ("auto", "single", "ddp", "deepspeed"))
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    activation_checkpointing: bool = False
    compile: bool = False
    loss_chunk_size: int = 0  # > 0: LM-head cross-entropy in chunks of this many tokens
    val_every_n_steps: int = 200
    val_batches: int = 20
    log_every_n_steps: int = 10
    max_nonfinite_steps: int = 5
    num_workers: int = 0
    # CPU threads per training process (torch.set_num_threads); 0: $OMP_NUM_THREADS if set, else the
    # physical cores, 1 per rank when several ranks share a node (lm/training/threads.py)
    threads: int = 0
    # torch.use_deterministic_algorithms: off by default, because CUDA has no deterministic kernels for
    # some ops (that setting makes them raise); CPU runs resume bit-exactly either way (tested)
    deterministic: bool = False
    progress_bar: bool = True
    sample_prompt: str = ""  # "": the start of a validation document of the corpus
    sample_tokens: int = 64
    record_samples: bool = False  # write each step's sample indices to <run_dir>/samples/rank*.jsonl
    # truncated BPTT: each batch row reads consecutive windows of its own stretch of the corpus and starts
    # from the row's detached final state of the previous step (saved in checkpoints); recurrent families
    # only. With data.packing=reset a document that ends still resets its row's state.
    state_passing: bool = False


@dataclass
class CheckpointConfig(Frozen):
    every_n_steps: int = 500
    keep_last: int = 3
    save_on_signal: bool = True


@dataclass
class WandbConfig(Frozen):
    mode: str = choice("disabled", ("disabled", "offline", "online"))
    project: str = "rnn-lm"
    entity: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class LoggingConfig(Frozen):
    csv: bool = True
    tensorboard: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ProbesConfig(Frozen):
    """Attention-equivalence probes during training (lm/probes); ``every_n_steps: 0`` is off."""

    every_n_steps: int = 0
    batch_size: int = 8  # >= 4 for the LSA fit (fit, ridge selection and held-out halves)
    seq_len: int = 64
    probes: List[str] = field(default_factory=lambda: ["form", "attention", "lsa_fit"])
    lsa_rank: int = 6
    seed: int = 0


@dataclass
class SlurmConfig(Frozen):
    """``lm submit``: the sbatch job (templates in ``slurm/``; see docs/slurm.md)."""

    partition: Optional[str] = None
    account: Optional[str] = None
    time: str = "01:00:00"  # MM | MM:SS | HH:MM:SS | D-HH | D-HH:MM | D-HH:MM:SS
    nodes: int = 1
    gpus_per_node: int = 0  # 0: the CPU template (train.devices ranks per node); > 0: one rank per GPU
    cpus_per_task: int = 2
    mem: Optional[str] = None  # per node, e.g. 64G (sbatch --mem)
    signal_grace_s: int = 120  # USR1 this many seconds before the time limit: checkpoint and requeue
    job_name: Optional[str] = None  # default: the experiment's name
    template: Optional[str] = None  # a custom template file (default: slurm/<variant>.sbatch)
    extra_sbatch: List[str] = field(default_factory=list)  # more options, e.g. ["--qos=high"]
    setup: List[str] = field(default_factory=list)  # shell lines run before training (module load ...)


# ----------------------------------------------------------------------------------- experiment


@dataclass
class ExperimentConfig(Frozen):
    name: str = "default"
    seed: int = 1234
    run_dir: str = "runs/${name}"
    resume: str = "none"  # none | auto | <checkpoint path>
    overwrite: bool = False  # a fresh run (resume: none) may replace the checkpoints of an earlier run in run_dir
    # warm start: model weights only from a run, checkpoint or export directory (a new optimizer, step 0,
    # a new data position); cannot be combined with resume=<checkpoint> (resume=auto uses it only until
    # the run has a checkpoint of its own)
    init_from: Optional[str] = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    probes: ProbesConfig = field(default_factory=ProbesConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


#: config groups: a YAML file in ``configs/<group>/`` fills the section of the same name
GROUPS: Dict[str, type] = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


def choices(cls: type = ExperimentConfig, prefix: str = "") -> Dict[str, Tuple[str, ...]]:
    """Allowed values of every enumerated key under ``cls``, by key path (``train.strategy``)."""
    out: Dict[str, Tuple[str, ...]] = {}
    for f in dataclasses.fields(cls):
        if "choices" in f.metadata:
            out[prefix + f.name] = f.metadata["choices"]
        elif f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            out.update(choices(f.default_factory, f"{prefix}{f.name}."))
    return out


def freeze(obj: Any) -> Any:
    """Make a section instance and every section nested in it read-only (in place); returns it."""
    if isinstance(obj, Frozen):
        for f in dataclasses.fields(cast(Any, obj)):  # every Frozen section is a dataclass
            freeze(getattr(obj, f.name))
        object.__setattr__(obj, "_frozen", True)
    return obj
