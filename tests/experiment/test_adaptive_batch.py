"""AdAdaGrad's norm test as a trainer option: the batch grows by the rule, logged, resumable."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from jaxopt_lab.experiment import config as config_lib
from jaxopt_lab.experiment import trainer
from jaxopt_lab.experiment.build import build
from jaxopt_lab.experiment.metrics import read_metrics, without_timing


def cfg(eta, steps=4, **train):
    return config_lib.from_dict({
        "run": {"name": "ab", "seed": 1},
        "data": {"name": "least_squares", "noise": 1.0},
        "model": {"name": "mlp", "hidden": []},
        "method": {"name": "sgd", "learning_rate": 0.05},
        "train": {"steps": steps, "batch_size": 8, "eval_every": 0, "norm_test_eta": eta, "max_batch_size": 64, **train},
        "checkpoint": {"every": 2, "keep": 2},
        "logging": {"progress": False, "tensorboard": False},
    })


def test_norm_test_grows_the_batch_by_the_rule(tmp_path):
    eta = 0.2
    c = cfg(eta)
    exp = build(c)
    graphdef, params = nnx.split(exp.model, nnx.Param)
    leaves = {tuple(str(k) for k in path): np.asarray(v, np.float64) for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    kernel = next(v for k, v in leaves.items() if v.ndim == 2)
    bias = next(v for k, v in leaves.items() if v.ndim == 1)
    x, y = exp.data.batch(0, 8, 1)
    x = x.reshape(8, -1).astype(np.float64)
    r = x @ kernel[:, 0] + bias[0] - y
    g = np.concatenate([2 * r[:, None] * x, 2 * r[:, None]], axis=1)  # per-example grads of (pred - y)^2
    mean = g.mean(axis=0)
    variance = ((g - mean) ** 2).sum() / 7
    if variance / 8 <= eta**2 * (mean @ mean):
        expected = 8
    else:
        expected = min(64, max(8, 8 * math.ceil(math.ceil(variance / (eta**2 * (mean @ mean))) / 8)))
    records = read_metrics(trainer.run(c, run_dir=str(tmp_path / "grow")).run_dir)
    sizes = [r["batch_size"] for r in records[1:]]
    assert sizes[0] == 8 and sizes[1] == expected and expected > 8
    assert sizes == sorted(sizes)  # never shrinks


def test_a_loose_test_keeps_the_batch_and_changes_nothing(tmp_path):
    loose = read_metrics(trainer.run(cfg(1e6), run_dir=str(tmp_path / "loose")).run_dir)
    fixed = read_metrics(trainer.run(cfg(0.0), run_dir=str(tmp_path / "fixed")).run_dir)
    assert [r["batch_size"] for r in loose[1:]] == [8] * 4
    assert [r["loss"] for r in loose[1:]] == [r["loss"] for r in fixed[1:]]


def test_adaptive_run_resumes_with_its_batch_size(tmp_path):
    import os
    import shutil

    full = trainer.run(cfg(0.2, steps=6), run_dir=str(tmp_path / "full"))
    crashed = str(tmp_path / "crashed")
    shutil.copytree(full.run_dir, crashed)
    shutil.rmtree(os.path.join(crashed, "checkpoints", "6"))  # resume from step 4
    records = read_metrics(full.run_dir)
    assert records[5]["batch_size"] > 8  # the batch had grown before the checkpoint resumed from
    trainer.resume(crashed)
    assert list(without_timing(read_metrics(crashed))) == list(without_timing(read_metrics(full.run_dir)))


def test_bad_settings():
    with pytest.raises(config_lib.ConfigError, match=r"norm_test_eta must be >= 0, got -1"):
        cfg(-1.0)
    with pytest.raises(config_lib.ConfigError, match=r"max_batch_size \(4\) is below train.batch_size \(8\)"):
        cfg(0.1, max_batch_size=4)
