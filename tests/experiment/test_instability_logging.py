"""train.instability_every: a GPT run logs Wortsman et al.'s monitors (max attention logit, output log Z)."""

import numpy as np
import pytest
from flax import nnx

from jaxopt_lab.experiment import config as config_lib
from jaxopt_lab.experiment import trainer
from jaxopt_lab.experiment.build import build
from jaxopt_lab.experiment.metrics import read_metrics

KEYS = ("attn_logit_max", "log_z_mean", "log_z_abs_max")


def gpt_config(**train):
    return config_lib.from_dict({
        "run": {"name": "inst", "seed": 0},
        "data": {"name": "text", "context": 16},
        "model": {"name": "gpt", "preset": "micro"},
        "method": {"name": "adamw", "learning_rate": 1e-2},
        "train": {"steps": 4, "batch_size": 4, "eval_every": 0, "eval_batches": 1, **train},
        "checkpoint": {"every": 0},
        "logging": {"progress": False},
    })


def test_gpt_run_logs_the_monitors_every_k_steps_and_they_match_an_independent_computation(tmp_path):
    cfg = gpt_config(instability_every=2)
    exp = build(cfg)
    t = trainer.Trainer(exp, str(tmp_path / "direct"))
    state = t.initial
    for step in range(2):
        state, _ = t.train_step(state, *t.batch(step))
    got = t.instability_monitors(state.params, 1)
    # independent: the GPT's own attention logits and output logits, numpy float64
    graphdef, _, rest = nnx.split(exp.model, nnx.Param, ...)
    model = nnx.merge(graphdef, state.params, rest)
    x = t.batch(1)[0][0]
    logits, scores = model.forward_with_attention_logits(x, attention_logits=True)
    causal = np.tril(np.ones(scores[0].shape[-2:], bool))
    attn = max(np.abs(np.where(causal, np.asarray(s, np.float64), 0.0)).max() for s in scores)
    z = np.asarray(logits, np.float64)
    m = z.max(-1, keepdims=True)
    log_z = (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]
    assert got["attn_logit_max"] == pytest.approx(attn, rel=1e-5)
    assert got["log_z_mean"] == pytest.approx(log_z.mean(), rel=1e-5)
    assert got["log_z_abs_max"] == pytest.approx(np.abs(log_z).max(), rel=1e-5)

    records = read_metrics(trainer.run(cfg, run_dir=str(tmp_path / "run")).run_dir)
    logged = [r["step"] for r in records if all(k in r for k in KEYS)]
    assert logged == [2, 4], records
    assert all(not any(k in r for k in KEYS) for r in records if r.get("step") not in (2, 4))


def test_off_by_default_and_validated():
    assert gpt_config().train.instability_every == 0
    with pytest.raises(config_lib.ConfigError, match="instability_every"):
        gpt_config(instability_every=-1)
    bad = gpt_config(instability_every=1)
    with pytest.raises(config_lib.ConfigError, match="instability_every is for single-worker"):
        config_lib.from_dict({**_raw(bad), "workers": {"count": 2}})


def test_non_gpt_model_is_refused_before_training(tmp_path):
    cfg = config_lib.from_dict({
        "run": {"name": "mlp", "seed": 0}, "data": {"name": "digits"}, "model": {"name": "mlp", "hidden": [8]},
        "method": {"name": "sgd", "learning_rate": 0.1}, "train": {"steps": 2, "batch_size": 8, "instability_every": 1},
        "checkpoint": {"every": 0}, "logging": {"progress": False}})
    with pytest.raises(config_lib.ConfigError, match="train.instability_every needs a GPT"):
        trainer.Trainer(build(cfg), str(tmp_path / "r"))


def _raw(cfg):
    import tomllib
    return tomllib.loads(cfg.dumps())
