"""What every synthetic task provides: examples generated from a seed, and how they are scored.

An example is a dict of numpy arrays over one sequence of length T:

* ``inputs``: int64 [T] tokens, or float32 [T, input_dim] vectors;
* ``targets``: int64 [T] classes (cross-entropy), or float32 [T, output_dim] (squared error, or
  multi-label binary cross-entropy for ``multilabel``);
* ``mask``: bool [T], the positions that are scored.

Generation is a pure function of ``(seed, index)``, so any example can be regenerated and a
resumed run sees exactly the examples an uninterrupted one would have.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np

Example = Dict[str, np.ndarray]

#: output kinds and the loss each implies
OUTPUTS = {"classes": "cross_entropy", "vectors": "mse", "multilabel": "bce"}


@dataclass
class TaskSpec:
    """Shapes the model needs: token inputs (vocab_size) or vectors (input_dim); outputs."""

    vocab_size: int = 0  # token inputs (and the class count when output == "classes")
    input_dim: Optional[int] = None
    output: str = "classes"  # classes | vectors | multilabel
    output_dim: Optional[int] = None  # vectors / multilabel
    pad_id: int = 0


class Task(abc.ABC):
    """Base class: ``options`` is the task's dataclass of parameters."""

    name: str = ""
    Options: type = object

    def __init__(self, options: Any):
        self.options = options

    @property
    @abc.abstractmethod
    def spec(self) -> TaskSpec:
        """What the task's examples look like (input and output kinds, sizes, padding id)."""

    @abc.abstractmethod
    def example(self, rng: np.random.Generator) -> Example:
        """One example. A task adds its per-example parameters as keyword arguments with defaults
        (e.g. ``length: int = 0``, 0 taking the option's value) that override its options for this
        example (e.g. a length for evaluation); ``lm eval icl --sweep`` finds them in the signature."""

    def eval_settings(self) -> Dict[str, list]:
        """Parameter sweeps ``lm eval icl`` reports accuracy against (e.g. {"n_pairs": [...]})."""
        return {}


def rng_for(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    """The generator of example ``index`` (``stream`` separates train / validation / test)."""
    return np.random.default_rng([int(seed), int(stream), int(index)])
