"""The synthetic forecasting task (the Aaren comparison): shapes and scored steps, examples are a pure
function of (seed, index), the target is the next clean value, and the baselines order as they must
(the in-context AR fit is exact on noise-free data and beats persistence on the default task)."""

from __future__ import annotations

import numpy as np
import pytest

from data.tasks import build_task
from data.tasks.base import rng_for
from data.tasks.forecast import ar_loss, persistence_loss
from lm.errors import ConfigError


def test_shapes_mask_and_determinism():
    task = build_task("forecast", {"channels": 3, "length": 40, "warmup": 5})
    assert task.spec.input_dim == 3 and task.spec.output == "vectors" and task.spec.output_dim == 3
    ex = task.example(rng_for(7, 11))
    assert ex["inputs"].shape == (40, 3) and ex["targets"].shape == (40, 3) and ex["inputs"].dtype == np.float32
    assert not ex["mask"][:5].any() and ex["mask"][5:].all()
    again = task.example(rng_for(7, 11))
    assert all(np.array_equal(ex[k], again[k]) for k in ex)
    assert not np.array_equal(ex["inputs"], task.example(rng_for(7, 12))["inputs"])
    assert task.example(rng_for(0, 0), length=64)["inputs"].shape == (64, 3)


def test_target_is_the_next_clean_value():
    task = build_task("forecast", {"obs_noise": 0.0, "length": 50})
    ex = task.example(rng_for(0, 3))
    np.testing.assert_allclose(ex["targets"][:-1], ex["inputs"][1:], rtol=0, atol=1e-6)
    noisy = build_task("forecast", {"obs_noise": 0.5, "length": 50}).example(rng_for(0, 3))
    np.testing.assert_allclose(noisy["targets"], ex["targets"], atol=1e-6)  # the same signal, noisier inputs
    assert np.abs(noisy["inputs"] - ex["inputs"]).mean() > 0.2


def test_baselines():
    # noise-free sinusoids without drift follow a linear recurrence: the in-context AR fit is exact
    clean = build_task("forecast", {"obs_noise": 0.0, "drift_std": 0.0, "length": 64})
    assert ar_loss(clean, order=3, n_examples=8) < 1e-8
    task = build_task("forecast", {})
    persist, ar = persistence_loss(task, 256), ar_loss(task, 3, 16)
    assert 0.3 < persist < 1.2 and ar < 0.25 * persist


def test_unknown_parameter_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data.task.params.chanels: unknown parameter .*did you mean 'channels'"):
        build_task("forecast", {"chanels": 2})
