"""IST against a float64 numpy re-implementation of its score update and layer selection."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_lab.finetune import freeze_base, ist
from jaxopt_lab.finetune.ist import choose, choose_distinct, layer_groups

L, LR, RL_LR, SUP, INTERVAL, SEED = 4, 0.1, 10.0, 0.25, 2, 5


def _params(rng, layers=L):
    blocks = {}
    for i in range(layers):
        blocks[str(i)] = {"qkv": {"kernel": jnp.asarray(rng.normal(size=(4, 4))),
                                  "lora": {"lora_a": jnp.asarray(rng.normal(size=(4, 2))),
                                           "lora_b": jnp.asarray(0.3 * rng.normal(size=(2, 4)))}},
                          "mlp": {"kernel": jnp.asarray(rng.normal(size=(4, 4))),
                                  "lora": {"lora_a": jnp.asarray(rng.normal(size=(4, 2))),
                                           "lora_b": jnp.asarray(0.3 * rng.normal(size=(2, 4)))}}}
    return {"blocks": blocks, "head": jnp.asarray(rng.normal(size=(4,)))}


X = np.random.default_rng(9).normal(size=(3, 4))


def _loss_np(p):
    """A loss through every adapter: the layers' adapted maps applied in turn."""
    h = X
    for i in range(L):
        blk = p["blocks"][str(i)]
        h = np.tanh(h @ (blk["qkv"]["kernel"] + 2.0 * blk["qkv"]["lora"]["lora_a"] @ blk["qkv"]["lora"]["lora_b"]))
        h = np.tanh(h @ (blk["mlp"]["kernel"] + 2.0 * blk["mlp"]["lora"]["lora_a"] @ blk["mlp"]["lora"]["lora_b"]))
    return float(np.mean((h @ p["head"] - 1.0) ** 2))


def _loss(p):
    h = jnp.asarray(X)
    for i in range(L):
        blk = p["blocks"][str(i)]
        h = jnp.tanh(h @ (blk["qkv"]["kernel"] + 2.0 * blk["qkv"]["lora"]["lora_a"] @ blk["qkv"]["lora"]["lora_b"]))
        h = jnp.tanh(h @ (blk["mlp"]["kernel"] + 2.0 * blk["mlp"]["lora"]["lora_a"] @ blk["mlp"]["lora"]["lora_b"]))
    return jnp.mean((h @ p["head"] - 1.0) ** 2)


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _official_distinct_masks(key, p, n, sets):
    """The official ISTCallback's probe sets: each drawn (torch.multinomial's distribution, here
    choose with split keys), redrawn (keys fold_in(k, 1), fold_in(k, 2), ...) while equal to an earlier one."""
    masks = []
    for k in jax.random.split(key, sets):
        m, tries = np.asarray(choose(k, p, n), np.float64), 0
        while any(np.array_equal(m, e) for e in masks):
            tries += 1
            m = np.asarray(choose(jax.random.fold_in(k, tries), p, n), np.float64)
        masks.append(m)
    return masks


def test_probe_sets_are_distinct_as_the_official_loop_redraws_them():
    key, p = jax.random.key(5), jnp.full(4, 0.5)
    for _ in range(20):
        key, sub = jax.random.split(key)
        masks = np.asarray(choose_distinct(sub, p, 2, 3))
        assert len({tuple(m) for m in masks}) == 3 and np.all(masks.sum(1) == 2)
        np.testing.assert_array_equal(masks, np.array(_official_distinct_masks(sub, p, 2, 3)))
    masks = np.asarray(choose_distinct(key, jnp.full(2, 0.5), 1, 3))  # 2 sets < 3 probes: ends, one repeats
    assert masks.shape == (3, 2) and len({tuple(m) for m in masks}) == 2


def test_layers_group_the_pairs_by_block():
    paths = ["blocks/0/qkv/lora/lora_a", "blocks/0/qkv/lora/lora_b", "blocks/1/mlp/lora/lora_a",
             "blocks/1/mlp/lora/lora_b", "blocks/0/mlp/lora/lora_a", "blocks/0/mlp/lora/lora_b", "head"]
    names, groups = layer_groups(paths)
    assert names == ["0", "1"] and groups == [[0, 1, 4, 5], [2, 3]]
    with pytest.raises(ValueError, match="does not match the adapter 'head2'"):
        layer_groups(paths + ["head2/lora/lora_a", "head2/lora/lora_b"])


def test_steps_match_the_float64_score_rule_and_only_active_layers_move():
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        params = _params(rng)
        tx = ist(freeze_base(optax.sgd(LR), train_also="head"), update_ratio=0.5, suppress_ratio=0.5, rl_lr=RL_LR,
                 suppression=SUP, interval=INTERVAL, seed=SEED)
        state = tx.init(params)
        step = jax.jit(lambda g, s, p: tx.update(g, s, p, loss_fn=_loss))
        scores = np.zeros(L)
        key = jax.random.key(SEED)
        for t in range(5):
            grads = jax.grad(_loss)(params)
            updates, state = step(grads, state, params)
            # the reference
            key, k_score, k_sel = jax.random.split(key, 3)
            if t % INTERVAL == 0 and t > 0:
                p = 1 / (1 + np.exp(-scores))
                masks, rewards = [], []
                for m in _official_distinct_masks(k_score, jnp.asarray(p, jnp.float32), 2, 3):
                    probe = _np(params)
                    for g in range(L):
                        b = probe["blocks"][str(g)]
                        for name in ("qkv", "mlp"):
                            b[name]["lora"]["lora_b"] = b[name]["lora"]["lora_b"] * (1 - m[g] * (1 - SUP))
                    masks.append(m)
                    rewards.append(np.exp(-_loss_np(probe)))
                r = np.array(rewards) - np.mean(rewards)
                scores = scores + RL_LR * (r[:, None] * np.array(masks)).sum(0) * p * (1 - p)
                assert np.any(scores != 0)
            active = np.asarray(choose(k_sel, jnp.asarray(1 / (1 + np.exp(scores)), jnp.float32), 2))
            np.testing.assert_allclose(np.asarray(state.scores), scores, rtol=1e-5, atol=1e-6)  # float32 losses and scores
            np.testing.assert_array_equal(np.asarray(state.active), active > 0)
            assert active.sum() == 2
            g_np, u_np = _np(grads), _np(updates)
            for i in range(L):
                for name in ("qkv", "mlp"):
                    for f in ("lora_a", "lora_b"):
                        expect = -LR * g_np["blocks"][str(i)][name]["lora"][f] * active[i]
                        np.testing.assert_allclose(u_np["blocks"][str(i)][name]["lora"][f], expect, rtol=1e-12)
                    np.testing.assert_array_equal(u_np["blocks"][str(i)][name]["kernel"], 0.0)
            np.testing.assert_allclose(u_np["head"], -LR * g_np["head"], rtol=1e-12)  # not a layer: always trains
            params = optax.apply_updates(params, updates)


def test_selecting_every_layer_is_the_plain_lora_step():
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: x.astype(jnp.float32), _params(rng))
    inner = freeze_base(optax.adam(1e-2))
    tx = ist(inner, update_ratio=1.0, interval=1)
    s_ist, s_ref = tx.init(params), inner.init(params)
    for _ in range(3):
        grads = jax.grad(_loss)(params)
        u_ist, s_ist = tx.update(grads, s_ist, params, loss_fn=_loss)
        u_ref, s_ref = inner.update(grads, s_ref, params)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), u_ist, u_ref)
        params = optax.apply_updates(params, u_ist)
    assert np.any(np.asarray(s_ist.scores) != 0)  # the probes ran (and changed nothing of the step)


def test_clear_errors():
    params = _params(np.random.default_rng(2))
    tx = ist(optax.sgd(0.1))
    state = tx.init(params)
    with pytest.raises(ValueError, match="loss_fn"):
        tx.update(params, state, params)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, state, loss_fn=_loss)
    for kwargs, match in [(dict(update_ratio=0.0), "update_ratio"), (dict(suppress_ratio=1.5), "suppress_ratio"),
                          (dict(rl_steps=0), "rl_steps"), (dict(interval=0), "interval"),
                          (dict(layer_pattern="("), "layer_pattern"), (dict(rl_lr=-1.0), "rl_lr")]:
        with pytest.raises(ValueError, match=match):
            ist(optax.sgd(0.1), **kwargs)
    with pytest.raises(ValueError, match="does not match the adapter"):
        ist(optax.sgd(0.1), layer_pattern=r"layers/(\d+)/").init(params)
