"""Render a job script from a template in ``slurm/`` (or ``slurm.template``) and a :class:`JobSpec`.

Templates are plain bash with ``{{ name }}`` placeholders (no template engine: a placeholder is
replaced by its value, an unknown name is an error, nothing else is interpreted, so ``${VAR}`` and
``%j`` reach bash and SLURM untouched). ``{{ run_training }}`` expands to ``slurm/run-training.sh``
(filled the same way): the part every variant shares (srun in the background, USR1 forwarding,
the fallback requeue).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Dict

from lm.errors import LMError
from lm.slurm.spec import JobSpec, quote

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "slurm"
SHARED = "run-training.sh"
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def template_path(spec: JobSpec) -> Path:
    path = spec.template or TEMPLATE_DIR / f"{spec.variant}.sbatch"
    if not path.is_file():
        raise LMError(f"SLURM template not found: {path} (the templates live in the repository's slurm/ directory)")
    return path


def fill(text: str, values: Dict[str, str], source: str) -> str:
    """Replace every ``{{ name }}`` in ``text``; a name without a value is an error naming ``source``."""

    def one(match: "re.Match[str]") -> str:
        name = match.group(1)
        if name not in values:
            raise LMError(f"{source}: unknown placeholder {{{{ {name} }}}}; known: {', '.join(sorted(values))}")
        return values[name]

    return _PLACEHOLDER.sub(one, text)


def _activate_line(python: str) -> str:
    """Put the submitting interpreter first on PATH (its venv activated when it has one)."""
    prefix, base = Path(sys.prefix), Path(sys.base_prefix)
    activate = prefix / "bin" / "activate"
    if python == sys.executable and prefix != base and activate.is_file():
        return f"# the interpreter `lm submit` ran under\nsource {quote(activate)}"
    return f'# the interpreter `lm submit` ran under\nexport PATH={quote(str(Path(python).parent))}:"$PATH"'


def values(spec: JobSpec) -> Dict[str, str]:
    """Placeholder values: shell-quoted where they land in shell code, plain in #SBATCH lines."""
    options = []
    if spec.partition:
        options.append(f"#SBATCH --partition={spec.partition}")
    if spec.account:
        options.append(f"#SBATCH --account={spec.account}")
    if spec.mem:
        options.append(f"#SBATCH --mem={spec.mem}")
    options += [f"#SBATCH {line}" for line in spec.extra_sbatch]
    setup = "\n".join(spec.setup)
    return {
        "job_name": spec.job_name,
        "nodes": str(spec.nodes),
        "tasks_per_node": str(spec.tasks_per_node),
        "gpus_per_node": str(spec.gpus_per_node),
        "cpus_per_task": str(spec.cpus_per_task),
        "time": spec.time,
        "signal_grace_s": str(spec.signal_grace_s),
        "log_file": str(spec.log_pattern),
        "workdir": str(spec.workdir),
        "sbatch_options": "\n".join(options),
        "setup": f"# slurm.setup\n{setup}" if setup else "",
        "config_dir": quote(spec.config_dir or ""),
        "activate": _activate_line(spec.python),
        "python": quote(spec.python),
        "train_args": " ".join(quote(a) for a in spec.train_args()),
        "run_dir": quote(spec.run_dir),
    }


def render(spec: JobSpec) -> str:
    """The complete job script for ``spec``."""
    vals = values(spec)
    shared = TEMPLATE_DIR / SHARED
    if not shared.is_file():
        raise LMError(f"SLURM template not found: {shared}")
    vals["run_training"] = fill(shared.read_text(), vals, str(shared))
    path = template_path(spec)
    text = fill(path.read_text(), vals, str(path))
    return re.sub(r"\n{3,}", "\n\n", text)
