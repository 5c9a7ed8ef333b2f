"""Every fine-tuning method from a config: model.lora (+ model.eva), model.svfit, model.welore,
model.snella (+ its allocation around the method), method.name = "ist" (the trainer passes its
loss_fn), and full fine-tuning / GaLore beside them; peak training memory in the final metrics."""

import os
import shutil

import jax
import numpy as np
import pytest

from jaxopt_lab.experiment import config as config_lib
from jaxopt_lab.experiment import trainer
from jaxopt_lab.experiment.build import build, validate
from jaxopt_lab.experiment.metrics import read_metrics, without_timing
from jaxopt_lab.finetune.ist import ISTState
from jaxopt_lab.finetune.lora import TRAINABLE, flatten_with_paths
from jaxopt_lab.finetune.pretrained import restore_params

TARGETS = "blocks/.*/(qkv|mlp_in)"
LORA = {"rank": 2, "alpha": 4.0, "targets": TARGETS}
ADAMW = {"name": "adamw", "learning_rate": 1e-2}
ROUTES = {  # name: (model tables, method)
    "full": ({}, ADAMW),
    "galore": ({}, {"name": "galore", "learning_rate": 1e-2, "rank": 4, "update_proj_gap": 2, "scale": 1.0}),
    "lora": ({"lora": LORA}, ADAMW),
    "eva": ({"lora": LORA, "eva": {"batches": 2, "max_steps": 2}}, ADAMW),
    "svfit": ({"svfit": {"targets": TARGETS, "rank": 2}}, ADAMW),
    "welore": ({"welore": {"targets": TARGETS, "threshold": 0.2, "min_reduction": 0.0}}, ADAMW),
    "snella": ({"snella": {"targets": TARGETS, "rank": 4}}, ADAMW),
    "ist": ({"lora": LORA}, {"name": "ist", "inner": ADAMW, "update_ratio": 0.5, "interval": 1, "rl_steps": 8}),
}
SLOW = {"galore"}  # an existing method on the full model (tests/lowrank cover it); each other route takes < 10 s


def pretrain_cfg(out_dir):
    return config_lib.from_dict({
        "run": {"name": "pre", "out_dir": out_dir},
        "data": {"name": "text", "context": 16},
        "model": {"name": "gpt", "preset": "micro", "layers": 2},
        "method": {"name": "adamw", "learning_rate": 3e-3},
        "train": {"steps": 3, "batch_size": 4, "eval_every": 0, "eval_batches": 1},
        "checkpoint": {"every": 0, "keep": 1},
        "logging": {"progress": False, "tensorboard": False},
    })


def finetune_cfg(init_from, out_dir, route, name=None, steps=2, checkpoint_every=0):
    tables, method = ROUTES[route]
    return config_lib.from_dict({
        "run": {"name": name or route, "out_dir": out_dir},
        "data": {"name": "python_code", "context": 16, "max_bytes": 20000},
        "model": {"name": "gpt", "preset": "micro", "layers": 2, "init_from": init_from, **tables},
        "method": method,
        "train": {"steps": steps, "batch_size": 4, "eval_every": 0, "eval_batches": 1},
        "checkpoint": {"every": checkpoint_every, "keep": 3},
        "logging": {"progress": False, "tensorboard": False},
    })


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("routes"))
    return out, trainer.run(pretrain_cfg(out)).run_dir


_RUNS = {}


def run_route(pretrained, route):
    """``(final metrics, initial params (path: array), final params, labels (path: label))``, once per module."""
    if route not in _RUNS:
        out, pre = pretrained
        exp = build(finetune_cfg(pre, out, route))
        run_dir = os.path.join(out, route)
        os.makedirs(run_dir)
        tr = trainer.Trainer(exp, run_dir)
        paths, leaves, _ = flatten_with_paths(tr.initial.params)
        labels = flatten_with_paths(exp.trainable(tr.initial.params))[1] if exp.trainable else [TRAINABLE] * len(paths)
        final = tr.fit().final
        _RUNS[route] = (final, {p: np.asarray(x) for p, x in zip(paths, leaves)}, restore_params(run_dir),
                        dict(zip(paths, labels)))
    return _RUNS[route]


@pytest.mark.parametrize("route", [pytest.param(r, marks=pytest.mark.slow) if r in SLOW else r for r in ROUTES])
def test_each_route_trains_only_its_leaves(pretrained, route):
    final, before, after, labels = run_route(pretrained, route)
    assert final["step"] == 2 and np.isfinite(final["eval_loss"])
    assert final["peak_memory_bytes"] > 0
    moved = {p for p in before if not np.array_equal(before[p], np.asarray(after[p]))}
    trainable = {p for p, label in labels.items() if label == TRAINABLE}
    if route == "snella":  # the allocation moves the frozen sparsity ratios
        ratios = {p for p in before if p.endswith("snella_ratio")}
        assert ratios and ratios <= moved and not ratios & trainable
        moved -= ratios
    assert moved and moved <= trainable, sorted(moved - trainable)
    if route in ("full", "galore"):
        assert "trainable_params" not in final  # no fine-tuning route: every parameter trains
        return
    n_trainable = sum(before[p].size for p in trainable)
    assert final["trainable_params"] == n_trainable < sum(x.size for x in before.values())
    # optimizer state only for the trainable leaves: AdamW's two moments (+ SNELLA's two EMAs of the factors)
    per_leaf = 4 if route == "snella" else 2
    assert final["opt_state_bytes"] <= per_leaf * final["trainable_bytes"] + 256
    expected = {"lora": "lora/lora_", "eva": "lora/lora_", "ist": "lora/lora_", "svfit": "svfit_s",
                "welore": "welore_", "snella": "lora/"}[route]
    assert all(expected in p for p in trainable)


def test_full_fine_tuning_needs_more_peak_memory_than_lora(pretrained):
    full, lora = run_route(pretrained, "full")[0], run_route(pretrained, "lora")[0]
    assert full["peak_memory_bytes"] > lora["peak_memory_bytes"] > 0


def test_ist_gets_its_loss_fn_from_the_trainer_and_updates_only_active_layers(pretrained):
    out, pre = pretrained
    exp = build(finetune_cfg(pre, out, "ist"))
    tr = trainer.Trainer(exp, os.path.join(out, "ist_steps"))
    state = tr.initial
    for step in range(2):  # the second step probes the scores (interval 1), which needs loss_fn
        new, _ = tr.train_step(state, *tr.batch(step))
        ist_state = next(s for s in jax.tree.leaves(new.opt_state, is_leaf=lambda s: isinstance(s, ISTState))
                         if isinstance(s, ISTState))
        active = np.asarray(ist_state.active)
        assert active.sum() == 1  # update_ratio 0.5 of 2 layers
        paths, a, _ = flatten_with_paths(state.params)
        b = flatten_with_paths(new.params)[1]
        for layer in range(2):
            changed = any(not np.array_equal(np.asarray(x), np.asarray(y))
                          for p, x, y in zip(paths, a, b) if p.startswith(f"blocks/{layer}/") and "lora_b" in p)
            assert changed == bool(active[layer]), (step, layer, active)
        state = new
    assert np.any(np.asarray(ist_state.scores) != 0)  # the probes measured losses


@pytest.mark.parametrize("tables, match", [
    ({"svfit": {"targets": TARGETS, "rnak": 2}}, r"unknown config key model\.svfit\.rnak.*rank"),
    ({"svfit": {"targets": TARGETS, "rank": 2, "energy": 0.9}}, "model.svfit: .*exactly one of rank and energy"),
    ({"welore": {"targets": TARGETS, "threshold": 0.2, "compression_target": 0.3}}, "model.welore: .*exactly one"),
    ({"welore": {"compression_target": 1.5}}, r"model.welore: .*compression_target must be in \[0, 1\], got 1.5"),
    ({"snella": {"kernel": "rbf"}}, "model.snella: .*kernel must be one of .*got 'rbf'"),
    ({"snella": {"rank": 4, "allocation": "yes"}}, "model.snella.allocation must be true or false"),
    ({"snella": {"targets": "nothing"}}, "model.snella: snella targets 'nothing' match none"),
    ({"eva": {"rho": 2.0}}, "model.eva initializes LoRA adapters: it needs model.lora"),
    ({"lora": LORA, "eva": {"tau": 2.0}}, r"model.eva: eva tau must be in \(0, 1\], got 2.0"),
    ({"lora": LORA, "svfit": {"rank": 2}}, "model.lora and model.svfit are both given"),
    ({"svfit": {"targets": "(", "rank": 2}}, r"model.svfit.targets = '\(' is not a regular expression"),
])
def test_a_bad_route_table_is_a_config_error_naming_it(pretrained, tables, match):
    out, pre = pretrained
    cfg = finetune_cfg(pre, out, "full")
    cfg = config_lib.from_dict({**cfg.to_dict(), "model": {**cfg.model, **tables}})
    with pytest.raises(config_lib.ConfigError, match=match):
        validate(cfg)


def test_a_bad_ist_table_is_a_config_error(pretrained):
    out, pre = pretrained
    cfg = finetune_cfg(pre, out, "ist")
    cfg = config_lib.from_dict({**cfg.to_dict(), "method": {**cfg.method, "update_ratio": 0.0}})
    with pytest.raises(config_lib.ConfigError, match=r"method 'ist'.*update_ratio.*0\.0"):
        validate(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("route", ["snella", "ist"])  # state: the allocation's EMAs; IST's scores and key
def test_an_adapted_run_resumes_bit_identically(pretrained, route):
    out, pre = pretrained
    full = trainer.run(finetune_cfg(pre, out, route, name=f"{route}_full", steps=4, checkpoint_every=2))
    cut = trainer.run(finetune_cfg(pre, out, route, name=f"{route}_cut", steps=4, checkpoint_every=2))
    shutil.rmtree(os.path.join(cut.run_dir, "checkpoints", "4"))  # as if killed after step 2's checkpoint
    lines = [line for line in open(os.path.join(cut.run_dir, "metrics.jsonl"))
             if '"step": 3' not in line and '"step": 4' not in line]
    with open(os.path.join(cut.run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(lines)
    trainer.resume(cut.run_dir)
    assert list(without_timing(read_metrics(cut.run_dir))) == list(without_timing(read_metrics(full.run_dir)))
    a, b = restore_params(full.run_dir), restore_params(cut.run_dir)
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)
    assert route != "snella" or any(k.endswith("snella_ratio") for k in a)
