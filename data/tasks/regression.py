"""Continuous in-context learning tasks.

icl_regression (in-context linear regression): a fresh W ~ N(0, I) [dy, dx] per sequence,
x_i ~ N(0, I), y_i = W x_i (+ noise)::

    tokens  [x_1, y_1], ..., [x_n, y_n], [x_q, 0]      (dx + dy each)
    scored  y_q = W x_q at the query position (squared error)

lsa_teacher: x_t ~ N(0, I) in R^d and the output of one fixed random linear self-attention layer
(the teacher, drawn from ``teacher_seed``): ``y_t = c W_O sum_{s<=t} (W_V x_s)(W_K x_s)^T (W_Q x_t)``
with the constant ``c = 1 / (sqrt(key_dim) * length)`` keeping outputs O(1); scored at every
position. A gated RNN with enough units can represent the teacher exactly (the construction).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import numpy as np

from data.tasks.base import Example, Task, TaskSpec


@dataclass
class ICLRegressionOptions:
    dx: int = 10
    dy: int = 1
    n_pairs: int = 10
    noise: float = 0.0
    eval_pairs: List[int] = field(default_factory=lambda: [5, 10, 20])


class ICLRegression(Task):
    name = "icl_regression"
    Options = ICLRegressionOptions

    @property
    def spec(self) -> TaskSpec:
        o = self.options
        return TaskSpec(input_dim=o.dx + o.dy, output="vectors", output_dim=o.dy)

    def example(self, rng: np.random.Generator, n_pairs: int = 0) -> Example:
        o = self.options
        n = n_pairs or o.n_pairs
        W = rng.standard_normal((o.dy, o.dx))
        x = rng.standard_normal((n + 1, o.dx))
        y = x @ W.T + o.noise * rng.standard_normal((n + 1, o.dy))
        inputs = np.concatenate([x, y], 1)
        inputs[-1, o.dx :] = 0.0
        targets = np.zeros((n + 1, o.dy))
        targets[-1] = x[-1] @ W.T
        mask = np.zeros(n + 1, dtype=bool)
        mask[-1] = True
        return {"inputs": inputs.astype(np.float32), "targets": targets.astype(np.float32), "mask": mask}

    def eval_settings(self):
        return {"n_pairs": list(self.options.eval_pairs)}


def one_step_gd_loss(task: ICLRegression, n_examples: int = 4096, seed: int = 0, n_pairs: int = 0):
    """(loss, learning rate) of one gradient-descent step from W = 0 with the best learning rate.

    One step on ``1/2 sum_i ||W x_i - y_i||^2`` gives ``W = eta sum_i y_i x_i^T``; the prediction
    ``eta (sum_i y_i x_i^T) x_q`` is linear in eta, so the best eta is a least-squares fit.
    The loss is the mean over examples of ``||y_hat - y_q||^2`` (summed over output dims).
    """
    rng = np.random.default_rng(seed)
    o = task.options
    preds, targets = [], []
    for _ in range(n_examples):
        ex = task.example(rng, n_pairs=n_pairs)
        x, y = ex["inputs"][:-1, : o.dx], ex["inputs"][:-1, o.dx :]
        xq = ex["inputs"][-1, : o.dx]
        preds.append((y.T @ x) @ xq)
        targets.append(ex["targets"][-1])
    p, t = np.array(preds), np.array(targets)
    eta = float((p * t).sum() / max((p * p).sum(), 1e-12))
    loss = float(((eta * p - t) ** 2).sum(-1).mean())
    return loss, eta


@dataclass
class LSATeacherOptions:
    dim: int = 8
    heads: int = 1
    key_dim: int = 8
    length: int = 16
    teacher_seed: int = 0


class LSATeacher(Task):
    name = "lsa_teacher"
    Options = LSATeacherOptions

    def __init__(self, options):
        super().__init__(options)
        o = options
        rng = np.random.default_rng(o.teacher_seed)
        scale = 1.0 / np.sqrt(o.dim)
        self.W_Q = rng.standard_normal((o.heads, o.key_dim, o.dim)) * scale
        self.W_K = rng.standard_normal((o.heads, o.key_dim, o.dim)) * scale
        self.W_V = rng.standard_normal((o.heads, o.key_dim, o.dim)) * scale
        self.W_O = rng.standard_normal((o.dim, o.heads * o.key_dim)) / np.sqrt(o.heads * o.key_dim)

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec(input_dim=self.options.dim, output="vectors", output_dim=self.options.dim)

    def teacher(self, x: np.ndarray) -> np.ndarray:
        """The teacher LSA layer on x [T, d]."""
        q = np.einsum("hkd,td->thk", self.W_Q, x)
        k = np.einsum("hkd,td->thk", self.W_K, x)
        v = np.einsum("hkd,td->thk", self.W_V, x)
        scores = np.tril(np.einsum("thk,shk->hts", q, k))
        heads = np.einsum("hts,shv->thv", scores, v) / (np.sqrt(self.options.key_dim) * self.options.length)
        return heads.reshape(len(x), -1) @ self.W_O.T

    def example(self, rng: np.random.Generator, length: int = 0) -> Example:
        T = length or self.options.length
        x = rng.standard_normal((T, self.options.dim))
        return {
            "inputs": x.astype(np.float32),
            "targets": self.teacher(x).astype(np.float32),
            "mask": np.ones(T, dtype=bool),
        }
