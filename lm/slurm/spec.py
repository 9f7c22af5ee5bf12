"""What a SLURM job for an experiment looks like: :class:`JobSpec`, built from a validated config
and the ``lm submit`` flags, with every check done before anything is written or submitted.

Shape of the job: ``nodes`` x ``tasks_per_node`` ranks, one ``srun`` task per rank. With GPUs
(``slurm.gpus_per_node > 0``) there is one rank per GPU; on CPUs ``train.devices`` ranks per node.
The job trains a snapshot of the composed config (``<run_dir>/slurm/experiment.yaml``), so a
requeued job runs exactly what was submitted, and always with ``resume=auto``.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig

from lm.errors import ConfigError
from lm.slurm.timefmt import check_time

#: ``lm submit`` flag -> ``slurm`` config key
FLAGS = {
    "nodes": "--nodes",
    "gpus_per_node": "--gpus-per-node",
    "cpus_per_task": "--cpus-per-task",
    "time": "--time",
    "partition": "--partition",
    "account": "--account",
}

_NAME = re.compile(r"^[A-Za-z0-9_.,:+-]+$")
_MEM = re.compile(r"^\d+[KMGT]?$", re.IGNORECASE)
_UNSAFE_PATH = re.compile(r"[\s%]")


@dataclass
class JobSpec:
    job_name: str
    run_dir: Path
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    cpus_per_task: int
    time: str
    signal_grace_s: int
    partition: Optional[str] = None
    account: Optional[str] = None
    mem: Optional[str] = None
    extra_sbatch: List[str] = field(default_factory=list)
    setup: List[str] = field(default_factory=list)
    template: Optional[Path] = None
    workdir: Path = field(default_factory=Path.cwd)
    config_dir: Optional[Path] = None
    python: str = sys.executable

    @property
    def variant(self) -> str:
        """cpu | gpu-single-node | gpu-multi-node: which template in ``slurm/`` renders the job."""
        if self.gpus_per_node == 0:
            return "cpu"
        return "gpu-single-node" if self.nodes == 1 else "gpu-multi-node"

    @property
    def slurm_dir(self) -> Path:
        return self.run_dir / "slurm"

    @property
    def script_path(self) -> Path:
        return self.slurm_dir / "job.sbatch"

    @property
    def snapshot_path(self) -> Path:
        return self.slurm_dir / "experiment.yaml"

    @property
    def log_pattern(self) -> Path:
        """The job's output file (``%j``: the job id; a requeued job appends to the same file)."""
        return self.slurm_dir / "job-%j.out"

    def train_args(self) -> List[str]:
        """Arguments of ``lm train`` in the job (the template appends ``resume=auto``)."""
        return [str(self.snapshot_path)]


def _flag(key: str) -> str:
    return f"{FLAGS[key]}/slurm.{key}" if key in FLAGS else f"slurm.{key}"


def apply_flags(cfg: DictConfig, flags: Dict[str, Any]) -> None:
    """Set ``slurm.*`` from the ``lm submit`` flags that were given (None: not given)."""
    for key, value in flags.items():
        if value is not None:
            if key not in FLAGS:
                raise ValueError(key)
            cfg.slurm[key] = value


def check_resume(overrides: List[str]) -> None:
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "resume" and value.strip() != "auto":
            raise ConfigError(
                f"lm submit always trains with resume=auto (a requeued job continues from its last "
                f"checkpoint); remove '{item}', or point run_dir at the run to continue"
            )


def _positive(cfg: DictConfig, key: str, minimum: int) -> int:
    value = int(cfg.slurm[key])
    if value < minimum:
        raise ConfigError(f"{_flag(key)}: must be >= {minimum}, got {value}")
    return value


def _name(value: Optional[str], key: str) -> Optional[str]:
    if value is None or str(value) == "":
        return None
    if not _NAME.match(str(value)):
        raise ConfigError(f"{_flag(key)}: '{value}' is not a valid SLURM name (letters, digits, _ . , : + -)")
    return str(value)


def job_spec(cfg: DictConfig) -> JobSpec:
    """A :class:`JobSpec` for a validated experiment config; ConfigError on anything inconsistent."""
    from lm.config import config_root

    slurm, train = cfg.slurm, cfg.train
    time_s = check_time(slurm.time)
    nodes = _positive(cfg, "nodes", 1)
    gpus = _positive(cfg, "gpus_per_node", 0)
    cpus = _positive(cfg, "cpus_per_task", 1)
    grace = _positive(cfg, "signal_grace_s", 1)
    if grace >= time_s:
        raise ConfigError(
            f"slurm.signal_grace_s ({grace}) must be shorter than the time limit "
            f"--time/slurm.time={slurm.time} ({time_s} s): the USR1 warning comes that many "
            f"seconds before the limit"
        )
    accelerator = str(train.accelerator)
    if gpus > 0 and accelerator == "cpu":
        raise ConfigError(
            f"--gpus-per-node/slurm.gpus_per_node={gpus} asks for GPUs but train.accelerator=cpu; "
            f"set train.accelerator=gpu (or auto), or request no GPUs"
        )
    if gpus == 0 and accelerator in ("gpu", "cuda"):
        raise ConfigError(f"train.accelerator={accelerator} needs GPUs: pass --gpus-per-node N (slurm.gpus_per_node)")
    devices = int(train.devices)
    if gpus > 0:
        if devices not in (0, 1, gpus):
            raise ConfigError(
                f"train.devices={devices} disagrees with --gpus-per-node/slurm.gpus_per_node={gpus} "
                f"(one rank per GPU); set train.devices={gpus} or 0"
            )
        tasks = gpus
    else:
        tasks = max(1, devices)
    if int(train.num_nodes) not in (1, nodes):
        raise ConfigError(f"train.num_nodes={train.num_nodes} disagrees with --nodes/slurm.nodes={nodes}")
    mem = None if slurm.mem in (None, "") else str(slurm.mem)
    if mem is not None and not _MEM.match(mem):
        raise ConfigError(f"slurm.mem: '{mem}' is not a SLURM memory size (e.g. 64G, 500M, 4096)")
    extra = [str(x).strip() for x in slurm.extra_sbatch]
    for line in extra:
        if not line.startswith("-") or "\n" in line:
            raise ConfigError(f"slurm.extra_sbatch: '{line}' is not an sbatch option (e.g. --qos=high)")
    run_dir = Path(str(cfg.run_dir)).expanduser().resolve()
    if _UNSAFE_PATH.search(str(run_dir)):
        raise ConfigError(f"run_dir: '{run_dir}' contains whitespace or '%', which #SBATCH --output cannot hold")
    template = None
    if slurm.template:
        template = Path(str(slurm.template)).expanduser().resolve()
        if not template.is_file():
            raise ConfigError(f"slurm.template: file not found: {slurm.template}")
    job_name = _name(slurm.job_name, "job_name") or re.sub(r"[^A-Za-z0-9_.+-]", "_", str(cfg.name))
    return JobSpec(
        job_name=job_name,
        run_dir=run_dir,
        nodes=nodes,
        tasks_per_node=tasks,
        gpus_per_node=gpus,
        cpus_per_task=cpus,
        time=str(slurm.time).strip(),
        signal_grace_s=grace,
        partition=_name(slurm.partition, "partition"),
        account=_name(slurm.account, "account"),
        mem=mem,
        extra_sbatch=extra,
        setup=[str(s) for s in slurm.setup],
        template=template,
        workdir=Path.cwd().resolve(),
        config_dir=config_root().resolve(),
        python=sys.executable,
    )


def quote(value: Any) -> str:
    return shlex.quote(str(value))
