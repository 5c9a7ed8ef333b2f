"""Pretrain -> fine-tune through the experiment runner: model.init_from, frozen base, resume."""

import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from jaxopt_lab.experiment import config as config_lib
from jaxopt_lab.experiment import trainer
from jaxopt_lab.experiment.build import build
from jaxopt_lab.experiment.metrics import read_metrics, without_timing
from jaxopt_lab.finetune.pretrained import ensure_pretrained, restore_params

LORA = {"rank": 2, "alpha": 4.0, "targets": "blocks/.*/(qkv|mlp_in)"}


def pretrain_cfg(out_dir):
    return config_lib.from_dict({
        "run": {"name": "pre", "out_dir": out_dir},
        "data": {"name": "text", "context": 16},
        "model": {"name": "gpt", "preset": "micro"},
        "method": {"name": "adamw", "learning_rate": 3e-3},
        "train": {"steps": 3, "batch_size": 4, "eval_every": 0, "eval_batches": 1},
        "checkpoint": {"every": 0, "keep": 1},
        "logging": {"progress": False, "tensorboard": False},
    })


def finetune_cfg(init_from, out_dir, name="ft", steps=4, method=None):
    return config_lib.from_dict({
        "run": {"name": name, "out_dir": out_dir},
        "data": {"name": "python_code", "context": 16, "max_bytes": 20000},
        "model": {"name": "gpt", "preset": "micro", "init_from": init_from, "lora": LORA},
        "method": method or {"name": "adamw", "learning_rate": 1e-2},
        "train": {"steps": steps, "batch_size": 4, "eval_every": 2, "eval_batches": 1},
        "checkpoint": {"every": 2, "keep": 3},
        "logging": {"progress": False, "tensorboard": False},
    })


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs"))
    cfg = pretrain_cfg(out)
    path = os.path.join(out, "pretrain.toml")
    with open(path, "w") as f:
        f.write(cfg.dumps())
    return out, path, trainer.run_dir_of(cfg)


def test_a_missing_pretraining_run_says_how_to_make_it(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="holds no checkpoint: run its pretraining first"):
        build(finetune_cfg(str(tmp_path / "nothing"), str(tmp_path)))


def test_init_from_a_config_runs_the_pretraining_then_loads_it(pretrained):
    out, path, run_dir = pretrained
    exp = build(finetune_cfg(path, out))  # runs the pretraining (its output is missing)
    assert trainer.latest_checkpoint_step(run_dir) == 3
    saved = restore_params(run_dir)
    _, params, _ = nnx.split(exp.model, nnx.Param, ...)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    from jaxopt_lab.finetune.lora import path_str

    loaded = {path_str(p): np.asarray(v) for p, v in leaves}
    for key, value in saved.items():  # every pretrained parameter, the adapted kernels included
        np.testing.assert_array_equal(loaded[key], np.asarray(value), err_msg=key)
    assert {k for k in loaded if "/lora/" in k} == {f"blocks/0/{m}/lora/lora_{x}" for m in ("qkv", "mlp_in") for x in "ab"}
    # the adapted model starts where the pretrained one is (B = 0)
    assert exp.config.model["init_from"] == path and exp.config.model["lora"]["rank"] == 2


def test_fine_tuning_trains_only_the_adapters_and_reports_their_bytes(pretrained):
    out, path, run_dir = pretrained
    ensure_pretrained(path)  # (run by the test above when the whole file runs)
    result = trainer.run(finetune_cfg(run_dir, out, name="ft_lora"))
    final = result.final
    # micro: width 32; qkv 32 -> 96, mlp_in 32 -> 128 at rank 2
    assert final["trainable_params"] == 2 * (32 + 96) + 2 * (32 + 128)
    assert final["opt_state_bytes"] == 2 * final["trainable_bytes"] + 4  # AdamW's two moments + a count
    after = restore_params(result.run_dir)
    before = restore_params(run_dir)
    for key, value in before.items():
        np.testing.assert_array_equal(np.asarray(after[key]), np.asarray(value), err_msg=key)  # frozen
    assert not np.array_equal(np.asarray(after["blocks/0/qkv/lora/lora_b"]), 0.0)


@pytest.mark.parametrize("method", [
    {"name": "lora_ggpo", "inner": {"name": "adamw", "learning_rate": 1e-2}, "scale": 2.0, "sigma": 0.05},
    pytest.param({"name": "lora_pro", "learning_rate": 1e-2, "scale": 2.0}, marks=pytest.mark.slow),
], ids=["lora_ggpo", "lora_pro"])
def test_a_fine_tuning_run_resumes_bit_identically(pretrained, method):
    out, path, run_dir = pretrained
    ensure_pretrained(path)
    name = f"resume_{method['name']}"
    full = trainer.run(finetune_cfg(run_dir, out, name=name + "_full", method=method))
    cut = trainer.run(finetune_cfg(run_dir, out, name=name + "_cut", method=method))
    shutil.rmtree(os.path.join(cut.run_dir, "checkpoints", "4"))  # as if killed after step 2's checkpoint
    lines = [line for line in open(os.path.join(cut.run_dir, "metrics.jsonl")) if '"step": 3' not in line
             and '"step": 4' not in line]
    with open(os.path.join(cut.run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(lines)
    resumed = trainer.resume(cut.run_dir)
    assert list(without_timing(read_metrics(cut.run_dir))) == list(without_timing(read_metrics(full.run_dir)))
    assert resumed.final["eval_loss"] == full.final["eval_loss"]
    a, b = restore_params(full.run_dir), restore_params(cut.run_dir)
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)
