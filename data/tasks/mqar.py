"""Multi-query associative recall as the Zoology benchmark runs it (Arora, Eyuboglu et al., 2023,
"Zoology: measuring and improving recall in efficient language models").

One example is ``seq_len`` tokens over a vocabulary of ``V`` (up to 8192)::

    k_1 v_1 k_2 v_2 ... k_n v_n | x x q_1 x x x q_2 x ... x          (n pairs, then the query region)

* keys: ``n`` distinct ids from ``[1, V/2)``; values: ``n`` distinct ids from ``[V/2, V)``;
* the query region has ``S = (seq_len - 2n) / 2`` slots, slot ``s`` at position ``2n + 2s``; the
  ``m`` queries (``n_queries``, default ``m = n``: every key asked once) take distinct slots drawn
  without replacement with a power law in the gap ``s`` since the end of the pairs::

      P(s) ∝ (s + 1) ** (power_a - 1),   s = 0 .. S-1       (power_a = 1: uniform; 0.01: short gaps)

  and each holds a distinct key among the ``n`` shown; scored: the value of that key, predicted
  at the query's position (the value itself is not shown after the query);
* every other position of the query region holds a random id from ``[1, V)`` (``random_non_queries``;
  else the blank id 0), so a model cannot find the queries by their neighbours.

Difficulty knobs: more pairs (``n_pairs``) -> more to remember; a longer ``seq_len`` -> longer gaps;
a larger ``power_a`` -> gaps spread over the whole query region; the vocabulary size -> harder
to memorise, as Zoology found for V > 1k.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import numpy as np

from data.tasks.base import Example, Task, TaskSpec

BLANK = 0


@dataclass
class MQAROptions:
    vocab_size: int = 8192
    seq_len: int = 256
    n_pairs: int = 16
    n_queries: int = 0  # 0: every key is queried once (Zoology); else that many distinct keys
    power_a: float = 0.01
    random_non_queries: bool = True
    eval_pairs: List[int] = field(default_factory=lambda: [4, 8, 16, 32, 64])


def gap_distribution(slots: int, power_a: float) -> np.ndarray:
    """P(s) ∝ (s + 1)^(power_a - 1) over the query slots ``s = 0 .. slots-1`` (sums to 1)."""
    p = np.arange(1, slots + 1, dtype=np.float64) ** (float(power_a) - 1.0)
    return p / p.sum()


class MQAR(Task):
    name = "mqar"
    Options = MQAROptions

    def __init__(self, options):
        super().__init__(options)
        from lm.errors import ConfigError

        o = options
        if o.vocab_size < 4:
            raise ConfigError(f"data.task.params.vocab_size: must be >= 4 (keys and values), got {o.vocab_size}")
        if o.seq_len <= 0 or o.seq_len % 2:
            raise ConfigError(f"data.task.params.seq_len: must be a positive even number, got {o.seq_len}")
        if not o.power_a > 0:
            raise ConfigError(f"data.task.params.power_a: must be > 0 (1.0: uniform gaps), got {o.power_a}")
        try:
            self.check(o.n_pairs, o.seq_len, o.n_queries)
        except ValueError as e:
            raise ConfigError(f"data.task.params: {e}") from None

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec(vocab_size=int(self.options.vocab_size), output="classes", pad_id=BLANK)

    def check(self, n: int, seq_len: int, m: int = 0) -> int:
        """The number of queries of an example with ``n`` pairs in ``seq_len`` tokens (ValueError
        when they do not fit)."""
        o = self.options
        m = m or n
        keys, values = o.vocab_size // 2 - 1, o.vocab_size - o.vocab_size // 2
        if n <= 0:
            raise ValueError(f"n_pairs must be > 0, got {n}")
        if n > min(keys, values):
            raise ValueError(
                f"n_pairs ({n}) exceeds the distinct keys/values of vocab_size {o.vocab_size} ({min(keys, values)})"
            )
        if m > n:
            raise ValueError(f"n_queries ({m}) cannot exceed n_pairs ({n}): each query asks a distinct key")
        if seq_len % 2 or 2 * n + 2 * m > seq_len:
            raise ValueError(f"{n} pairs and {m} queries need an even seq_len >= {2 * n + 2 * m}, got {seq_len}")
        return m

    def example(self, rng: np.random.Generator, n_pairs: int = 0, seq_len: int = 0, n_queries: int = 0) -> Example:
        o = self.options
        n = n_pairs or o.n_pairs
        L = seq_len or o.seq_len
        m = self.check(n, L, n_queries or min(o.n_queries, n))
        half = o.vocab_size // 2
        keys = 1 + rng.choice(half - 1, size=n, replace=False)
        values = half + rng.choice(o.vocab_size - half, size=n, replace=False)
        slots = (L - 2 * n) // 2
        gaps = rng.choice(slots, size=m, replace=False, p=gap_distribution(slots, o.power_a))
        asked = rng.choice(n, size=m, replace=False) if m < n else rng.permutation(n)
        if o.random_non_queries:
            tokens = rng.integers(1, o.vocab_size, size=L)
        else:
            tokens = np.full(L, BLANK)
        tokens[0 : 2 * n : 2], tokens[1 : 2 * n : 2] = keys, values
        where = 2 * n + 2 * gaps
        tokens[where] = keys[asked]
        tokens = tokens.astype(np.int64)
        targets = np.append(tokens[1:], BLANK).astype(np.int64)
        targets[where] = values[asked]
        mask = np.zeros(L, dtype=bool)
        mask[where] = True
        return {"inputs": tokens, "targets": targets, "mask": mask}

    def eval_settings(self):
        """The pair counts of ``eval_pairs`` whose pairs and queries fit ``seq_len``."""
        fits = []
        for n in self.options.eval_pairs:
            try:
                self.check(int(n), self.options.seq_len, min(self.options.n_queries, int(n)))
                fits.append(int(n))
            except ValueError:
                pass
        return {"n_pairs": fits} if fits else {}
