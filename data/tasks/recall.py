"""Token-level in-context recall tasks.

associative_recall (multi-query associative recall, MQAR)::

    k_1 v_1 k_2 v_2 ... k_n v_n  q_1 a_1 q_2 a_2 ... q_m a_m
    keys from [2, 2 + n_keys), values from [2 + n_keys, 2 + n_keys + n_values), each q_j one of the
    keys shown, a_j its value; scored: predicting a_j at the position of q_j.

induction (copying)::

    BOS s_1 ... s_L SEP s_1 ... s_L     a random segment and its copy; scored: the copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import numpy as np

from data.tasks.base import Example, Task, TaskSpec

PAD, SEP = 0, 1


@dataclass
class AssociativeRecallOptions:
    n_pairs: int = 8
    n_queries: int = 4
    n_keys: int = 32
    n_values: int = 32
    eval_pairs: List[int] = field(default_factory=lambda: [4, 8, 16, 32])


class AssociativeRecall(Task):
    name = "associative_recall"
    Options = AssociativeRecallOptions

    @property
    def spec(self) -> TaskSpec:
        o = self.options
        return TaskSpec(vocab_size=2 + o.n_keys + o.n_values, output="classes", pad_id=PAD)

    def example(self, rng: np.random.Generator, n_pairs: int = 0, n_queries: int = 0) -> Example:
        o = self.options
        n = n_pairs or o.n_pairs
        m = n_queries or o.n_queries
        if n > o.n_keys:
            raise ValueError(f"n_pairs ({n}) cannot exceed n_keys ({o.n_keys})")
        keys = 2 + rng.choice(o.n_keys, size=n, replace=False)
        values = 2 + o.n_keys + rng.integers(0, o.n_values, size=n)
        asked = rng.integers(0, n, size=m)
        context = np.stack([keys, values], 1).reshape(-1)
        queries = np.stack([keys[asked], values[asked]], 1).reshape(-1)
        seq = np.concatenate([context, queries]).astype(np.int64)
        inputs, targets = seq[:-1], seq[1:]
        mask = np.zeros(len(inputs), dtype=bool)
        mask[2 * n :: 2] = True  # positions holding a query key: the next token is its value
        return {"inputs": inputs, "targets": targets, "mask": mask}

    def eval_settings(self):
        return {"n_pairs": list(self.options.eval_pairs)}


@dataclass
class InductionOptions:
    length: int = 16  # segment length
    vocab: int = 32
    eval_lengths: List[int] = field(default_factory=lambda: [8, 16, 32, 64])


class Induction(Task):
    name = "induction"
    Options = InductionOptions

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec(vocab_size=2 + self.options.vocab, output="classes", pad_id=PAD)

    def example(self, rng: np.random.Generator, length: int = 0) -> Example:
        L = length or self.options.length
        segment = 2 + rng.integers(0, self.options.vocab, size=L)
        seq = np.concatenate([segment, [SEP], segment]).astype(np.int64)
        inputs, targets = seq[:-1], seq[1:]
        mask = np.zeros(len(inputs), dtype=bool)
        mask[L:] = True  # from SEP on, the next token is the copy
        return {"inputs": inputs, "targets": targets, "mask": mask}

    def eval_settings(self):
        return {"length": list(self.options.eval_lengths)}
