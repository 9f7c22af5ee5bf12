"""Synthetic multivariate time-series forecasting (the Aaren comparison, ``docs/reproductions.md``).

Each sequence draws its own latent signal: ``n_sources`` sinusoids with random frequency, phase and
amplitude, plus an AR(1) drift, mixed into ``channels`` observed series by a random matrix::

    z_{j,t} = a_j sin(2 pi f_j t + phi_j)             j = 1..n_sources
    r_t     = rho r_{t-1} + sqrt(1 - rho^2) sigma_r e_t     (a slow shared drift, per channel)
    s_t     = M z_t / sqrt(n_sources) + r_t             (channels)
    x_t     = s_t + sigma_obs n_t                       (what the model reads, float32 [T, channels])

The target at step t is the next clean value ``s_{t+1}`` (float32 [T, channels]); the first ``warmup``
steps are not scored (nothing can be inferred from one point). Forecasting well means inferring each
sequence's frequencies, phases and mixing in context and extrapolating them: the model must
aggregate over its whole prefix, which is what Aaren's learned-query attention and the Transformer's
causal attention both do. :func:`persistence_loss` is the naive ``s_{t+1} ~ x_t`` baseline on the same
scale as the training loss (squared error summed over channels, mean over scored steps).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data.tasks.base import Example, Task, TaskSpec, rng_for


@dataclass
class ForecastOptions:
    channels: int = 4
    length: int = 128
    n_sources: int = 3
    min_period: float = 4.0  # steps per cycle of the fastest source
    max_period: float = 32.0
    drift_rho: float = 0.98
    drift_std: float = 0.1
    obs_noise: float = 0.05
    warmup: int = 16


class Forecast(Task):
    name = "forecast"
    Options = ForecastOptions

    @property
    def spec(self) -> TaskSpec:
        c = self.options.channels
        return TaskSpec(input_dim=c, output="vectors", output_dim=c)

    def signal(self, rng: np.random.Generator, length: int) -> np.ndarray:
        """The clean signal s, float64 [length + 1, channels] (one step past the inputs)."""
        o = self.options
        t = np.arange(length + 1)[:, None]
        freq = 1.0 / rng.uniform(o.min_period, o.max_period, o.n_sources)
        phase = rng.uniform(0, 2 * np.pi, o.n_sources)
        amp = rng.uniform(0.5, 1.5, o.n_sources)
        z = amp * np.sin(2 * np.pi * freq * t + phase)  # [L+1, n_sources]
        mix = rng.standard_normal((o.channels, o.n_sources))
        drift = np.zeros((length + 1, o.channels))
        eps = rng.standard_normal((length + 1, o.channels)) * o.drift_std * np.sqrt(1 - o.drift_rho**2)
        drift[0] = rng.standard_normal(o.channels) * o.drift_std
        for i in range(1, length + 1):
            drift[i] = o.drift_rho * drift[i - 1] + eps[i]
        return z @ mix.T / np.sqrt(o.n_sources) + drift

    def example(self, rng: np.random.Generator, length: int = 0) -> Example:
        o = self.options
        n = length or o.length
        s = self.signal(rng, n)
        x = s[:n] + o.obs_noise * rng.standard_normal((n, o.channels))
        mask = np.zeros(n, dtype=bool)
        mask[min(o.warmup, n - 1) :] = True
        return {"inputs": x.astype(np.float32), "targets": s[1:].astype(np.float32), "mask": mask}

    def eval_settings(self):
        o = self.options
        return {"length": [o.length // 2, o.length, 2 * o.length]}


def ar_loss(task: Forecast, order: int = 3, n_examples: int = 64, seed: int = 0, stream: int = 1) -> float:
    """The classical in-context forecaster: at every scored step t, a multivariate AR(``order``) model
    ``x_{j+1} ~ A [x_j, ..., x_{j-order+1}, 1]`` fitted by least squares on the prefix ``x_0..x_t`` alone,
    then applied to the last ``order`` observations (persistence while the prefix has fewer than
    ``2 order + 2`` steps). Same scale as the training loss. Three sinusoids mixed into four channels
    follow a linear recurrence, so this baseline is strong: a model that matches it has learned to
    infer each sequence's dynamics in context."""
    losses = []
    for i in range(n_examples):
        ex = task.example(rng_for(seed, i, stream))
        x, s = ex["inputs"].astype(np.float64), ex["targets"].astype(np.float64)
        for t in np.nonzero(ex["mask"])[0]:
            if t < 2 * order + 2:
                pred = x[t]
            else:
                lags = np.stack([x[j - order + 1 : j + 1][::-1].reshape(-1) for j in range(order - 1, t)])
                design = np.concatenate([lags, np.ones((len(lags), 1))], 1)
                coef, *_ = np.linalg.lstsq(design, x[order : t + 1], rcond=1e-6)
                pred = np.concatenate([x[t - order + 1 : t + 1][::-1].reshape(-1), [1.0]]) @ coef
            losses.append(((pred - s[t]) ** 2).sum())
    return float(np.mean(losses))


def persistence_loss(task: Forecast, n_examples: int = 1024, seed: int = 0, stream: int = 1) -> float:
    """Mean over scored steps of ``||x_t - s_{t+1}||^2`` (the last observation as the forecast)."""
    losses = []
    for i in range(n_examples):
        ex = task.example(rng_for(seed, i, stream))
        err = ((ex["inputs"] - ex["targets"]) ** 2).sum(-1)
        losses.append(err[ex["mask"]])
    return float(np.concatenate(losses).mean())
