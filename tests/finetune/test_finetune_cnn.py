"""The CNN fine-tuning configs (digits 0-4 -> 5-9), shrunk: they build from a pretrained run, LoRA on
the convs starts at the pretrained model, and only the adapters and the head hold optimizer state;
the methods on the convs' kernel matrices (LoRA-Pro, LoRA-GGPO, IST, EVA, SVFit, WeLore) start at the
pretrained model (WeLore: at its compression) and train only their own leaves and the head."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from jaxopt_lab.experiment import config as config_lib
from jaxopt_lab.experiment import trainer
from jaxopt_lab.experiment.build import build
from jaxopt_lab.finetune.lora import path_str
from jaxopt_lab.finetune.pretrained import restore_params
from jaxopt_lab.lowrank.memory import optimizer_state_bytes

PRETRAIN = "experiments/pretrain_cnn_digits04.toml"
FINETUNE = "experiments/finetune_cnn_digits59.toml"
C0, C1, RANK = 4, 16, 4  # shrunk channels; the configs' LoRA rank (GaLore's: 8)
SHRINK = [f"model.channels=[{C0}, {C1}]", "train.batch_size=8", "train.eval_every=0", "train.eval_batches=1",
          "logging.progress=false", "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs"))
    cfg = config_lib.load(PRETRAIN, SHRINK + [f"run.out_dir={out}", "train.steps=2", "checkpoint.every=0"])
    assert cfg.data["classes"] == [0, 1, 2, 3, 4]
    path = os.path.join(out, "pretrain.toml")
    with open(path, "w") as f:
        f.write(cfg.dumps())
    trainer.run(path)
    return out, path


@pytest.fixture(scope="module")
def variants(pretrained):
    out, path = pretrained
    return config_lib.load_variants(FINETUNE, SHRINK + [f"run.out_dir={out}", f"model.init_from={path}",
                                                        "train.steps=2"])


def params_by_path(model):
    return {path_str(p): np.asarray(v) for p, v in
            jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]}


METHODS = ("full", "lora", "galore", "probe", "lora_pro", "lora_ggpo", "ist", "eva", "svfit", "welore", "snella")


def test_the_config_has_eleven_methods_times_three_seeds(variants):
    assert sorted(variants) == sorted(f"{m}_s{s}" for m in METHODS for s in range(3))
    assert {variants[f"lora_s{s}"].run.seed for s in range(3)} == {0, 1, 2}
    assert all(v.data["classes"] == [5, 6, 7, 8, 9] for v in variants.values())


def test_lora_on_the_convs_starts_at_the_pretrained_model(pretrained, variants):
    full, lora = build(variants["full_s0"]), build(variants["lora_s1"])
    saved = restore_params(trainer.run_dir_of(config_lib.load(pretrained[1])))
    got = params_by_path(lora.model)
    for key, value in saved.items():
        np.testing.assert_array_equal(got[key], np.asarray(value), err_msg=key)
    assert {k for k in got if "/lora/" in k} == {f"convs/{i}/lora/lora_{x}" for i in (0, 1) for x in "ab"}
    x = lora.data.x_test[:16]
    assert set(np.unique(lora.data.y_test)) == {5, 6, 7, 8, 9}
    np.testing.assert_allclose(np.asarray(lora.model(x)), np.asarray(full.model(x)), rtol=1e-5, atol=1e-6)  # B = 0


@pytest.mark.parametrize("variant, trainable", [
    ("lora_s0", [f"convs/{i}/lora/lora_{x}" for i in (0, 1) for x in "ab"] + ["head/bias", "head/kernel"]),
    ("probe_s0", ["head/bias", "head/kernel"]),
])
def test_only_the_adapters_and_the_head_hold_optimizer_state(variants, variant, trainable):
    exp = build(variants[variant])
    params = nnx.state(exp.model, nnx.Param)
    state = exp.tx.init(params)
    by_path = params_by_path(exp.model)
    trainable_bytes = sum(by_path[p].nbytes for p in trainable)
    assert optimizer_state_bytes(state) == 2 * trainable_bytes + 4  # AdamW's two moments + a count
    if variant == "lora_s0":
        assert by_path["convs/1/lora/lora_a"].shape == (9 * C0, RANK)
        assert sum(by_path[p].size for p in trainable) == 9 * RANK + RANK * C0 + 9 * C0 * RANK + RANK * C1 + C1 * 10 + 10


def test_a_lora_step_moves_only_the_adapters_and_the_head(pretrained, variants):
    result = trainer.run(variants["lora_s0"])
    before = restore_params(trainer.run_dir_of(config_lib.load(pretrained[1])))
    after = restore_params(result.run_dir)
    for key in ("convs/0/kernel", "convs/1/kernel", "convs/1/bias"):
        np.testing.assert_array_equal(np.asarray(after[key]), np.asarray(before[key]), err_msg=key)
    assert not np.array_equal(np.asarray(after["head/kernel"]), np.asarray(before["head/kernel"]))
    assert np.any(np.asarray(after["convs/1/lora/lora_b"]) != 0.0)  # B left zero
    assert result.final["trainable_params"] == 9 * RANK + RANK * C0 + 9 * C0 * RANK + RANK * C1 + C1 * 10 + 10


def test_galore_projects_the_conv_kernels(variants):
    exp = build(variants["galore_s0"])
    state = exp.tx.init(nnx.state(exp.model, nnx.Param))
    shapes = {tuple(x.shape) for x in jax.tree.leaves(state) if hasattr(x, "shape")}
    # the (36 x 16) matrix of convs/1 keeps rank-8 moments (its smaller side projected), not full-size ones
    assert (8, 9 * C0) in shapes and (9 * C0, C1) not in shapes and (C1, 9 * C0) not in shapes


@pytest.mark.parametrize("method, trainable", [
    ("lora_pro", r"convs/\d/lora/lora_[ab]"), ("lora_ggpo", r"convs/\d/lora/lora_[ab]"),
    ("ist", r"convs/\d/lora/lora_[ab]"), ("eva", r"convs/\d/lora/lora_[ab]"), ("svfit", r"convs/\d/svfit_s"),
    ("welore", r"convs/\d/welore_[ab]"),
    ("snella", r"convs/\d/lora/(lora_[ab]|snella_(alpha|gamma|beta))")])
def test_the_conv_matrix_methods_start_at_the_pretrained_model_and_train_their_leaves(variants, method, trainable):
    import re

    full, exp = build(variants["full_s0"]), build(variants[f"{method}_s0"])
    x = exp.data.x_test[:16]
    if method not in ("welore", "snella"):  # WeLore starts at its compression, SNELLA with its nonzero update
        np.testing.assert_allclose(np.asarray(exp.model(x)), np.asarray(full.model(x)), rtol=1e-4, atol=1e-5)
    params = nnx.state(exp.model, nnx.Param)
    labels = dict(zip(params_by_path(exp.model), jax.tree.leaves(exp.trainable(params))))
    want = {p for p in labels if re.fullmatch(trainable, p) or p.startswith("head/")}
    assert {p for p, lab in labels.items() if lab == "trainable"} == want and len(want) > 2
