"""Batch-size rescaling helpers: the rules' arithmetic, schedules, and rescale_config on real configs."""

import math

import numpy as np
import optax
import pytest

from jaxopt_lab.experiment import config as config_lib
from jaxopt_lab.experiment.methods import learning_rate_schedule
from jaxopt_lab.schedules import (
    linear_scaled_learning_rate,
    predicted_max_learning_rate,
    regime_adaptation,
    rescale_config,
    scaling_rule,
    sqrt_scaled_learning_rate,
    steps_for_batch,
)


def test_rules():
    assert linear_scaled_learning_rate(0.1, 32, 128) == pytest.approx(0.4)
    assert sqrt_scaled_learning_rate(0.1, 32, 128) == pytest.approx(0.2)
    sched = sqrt_scaled_learning_rate(optax.linear_schedule(1.0, 0.0, 10), 16, 64)
    assert sched(0) == pytest.approx(2.0) and sched(5) == pytest.approx(1.0)
    assert regime_adaptation(10, 32, 512) == 160
    assert regime_adaptation([2, 4], 32, 64) == [4, 8]
    assert steps_for_batch(900, 32, 512) == 900
    assert steps_for_batch(900, 32, 512, adapt_regime=False) == math.ceil(900 * 32 / 512)
    assert predicted_max_learning_rate([8, 32], 8, 0.1, "sqrt") == pytest.approx([0.1, 0.2])
    assert scaling_rule("sgd") == "linear" and scaling_rule("adamw") == "sqrt"
    with pytest.raises(ValueError, match="no batch-size scaling rule is known for method 'lion'"):
        scaling_rule("lion")
    with pytest.raises(ValueError, match="new_batch must be a positive int"):
        sqrt_scaled_learning_rate(0.1, 32, 0)


def _config(method):
    return config_lib.from_dict({
        "run": {"name": "t"}, "data": {"name": "digits"}, "model": {"name": "mlp"}, "method": method,
        "train": {"steps": 100, "batch_size": 16, "grad_accum": 2},
    })


def test_rescale_config_sgd_linear_adam_sqrt():
    cfg = _config({"name": "sgd", "learning_rate": 0.1, "momentum": 0.9})
    new = rescale_config(cfg, 128)
    assert isinstance(new, config_lib.ExperimentConfig)
    assert new.method["learning_rate"] == pytest.approx(0.1 * 128 / 32)
    assert new.train.batch_size == 64 and new.train.grad_accum == 2 and new.train.steps == 100
    assert cfg.method["learning_rate"] == 0.1  # the input is not modified
    sched = {"schedule": "warmup_cosine_decay_schedule", "init_value": 0.0, "peak_value": 1e-3,
             "warmup_steps": 10, "decay_steps": 100, "end_value": 1e-4}
    adam = _config({"name": "adamw", "learning_rate": sched})
    new = rescale_config(adam, 8, keep="epochs")
    lr_old, lr_new = learning_rate_schedule(adam.method), learning_rate_schedule(new.method)
    assert new.train.steps == 400 and new.method["learning_rate"]["decay_steps"] == 400
    assert new.method["learning_rate"]["warmup_steps"] == 40
    # the same schedule, stretched 4x in steps and scaled by sqrt(8/32) = 1/2
    for t in (0, 5, 10, 50, 99):
        np.testing.assert_allclose(lr_new(4 * t), 0.5 * lr_old(t), rtol=1e-5, atol=1e-12)
    d = rescale_config(adam.to_dict(), 64, rule="linear")
    assert isinstance(d, dict) and d["method"]["learning_rate"]["peak_value"] == pytest.approx(2e-3)


def test_rescale_config_errors():
    cfg = _config({"name": "sgd", "learning_rate": 0.1})
    with pytest.raises(ValueError, match="not a multiple of train.grad_accum=2"):
        rescale_config(cfg, 33)
    with pytest.raises(ValueError, match="rule must be one of"):
        rescale_config(cfg, 64, rule="cubic")
    with pytest.raises(ValueError, match="no batch-size scaling rule"):
        rescale_config(_config({"name": "lion", "learning_rate": 1e-4}), 64)
