"""Low-rank methods inside other machinery (issue #8 item 6) and the DCT / random projector variants.

GaLore and Fira inside optax.chain + inject_hyperparams + MultiSteps, in a flax
nnx Optimizer, as DiLoCo's inner optimizer under vmap, and checkpointed with
orbax (bit-identical resume, projector state and refresh counter included).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from jaxopt_lab.distributed import WorkerRunner, diloco
from jaxopt_lab.lowrank import LowRankState, fira, galore, scale_by_galore
from jaxopt_lab.models import MLP

RNG = np.random.default_rng(2)
PARAMS = {"w": jnp.asarray(RNG.standard_normal((8, 12)), jnp.float32),
          "t": jnp.asarray(RNG.standard_normal((10, 6)), jnp.float32),
          "b": jnp.zeros((12,), jnp.float32)}
GRADS = [jax.tree.map(lambda p: jnp.asarray(RNG.standard_normal(p.shape), jnp.float32), PARAMS) for _ in range(8)]
ALL = {"w": True, "t": True, "b": False}
METHODS = {"galore": galore, "fira": fira}
KW = dict(rank=2, update_proj_gap=3, label_fn=ALL)
LR = 1e-2


def _run(step, state, grads, params=PARAMS):
    for g in grads:
        updates, state = step(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def _assert_trees_equal(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.fixture(scope="module", params=sorted(METHODS))
def plain(request):
    """(name, tx, jitted update) of the method used as the reference, compiled once per module."""
    tx = METHODS[request.param](LR, **KW)
    return request.param, tx, jax.jit(tx.update)


def _clip(tree, max_norm):
    tree = jax.tree.map(np.asarray, tree)
    norm = np.sqrt(sum(float(np.sum(x.astype(np.float64) ** 2)) for x in jax.tree.leaves(tree)))
    return jax.tree.map(lambda x: (x * np.float32(min(1.0, max_norm / norm))).astype(np.float32), tree)


def test_chain_inject_hyperparams_and_multisteps(plain):
    name, tx, step = plain
    # rank, T and seed fix shapes and the refresh schedule: they must stay Python ints (static_args)
    injected = optax.inject_hyperparams(METHODS[name], static_args=("rank", "update_proj_gap", "seed"))(learning_rate=LR, **KW)
    composed = optax.MultiSteps(optax.chain(optax.clip_by_global_norm(1.0), injected), every_k_schedule=2)
    state, params = composed.init(PARAMS), PARAMS
    composed_step = jax.jit(composed.update)
    ref_state, ref_params = tx.init(PARAMS), PARAMS
    for i in range(0, 6, 2):
        for g in GRADS[i:i + 2]:  # two micro-steps: an update only on the second
            updates, state = composed_step(g, state, params)
            params = optax.apply_updates(params, updates)
        mean = jax.tree.map(lambda a, b: (np.asarray(a) + np.asarray(b)) / np.float32(2), GRADS[i], GRADS[i + 1])
        ref_params, ref_state = _run(step, ref_state, [_clip(mean, 1.0)], ref_params)
        for k in PARAMS:
            np.testing.assert_allclose(np.asarray(params[k]), np.asarray(ref_params[k]), rtol=1e-5, atol=1e-6)
    inner = state.inner_opt_state[1]
    assert isinstance(inner.inner_state[0], LowRankState) and int(inner.inner_state[0].count) == 3
    # the injected learning rate drives the step: doubling it doubles the (linear in lr) update
    twice = state._replace(inner_opt_state=(state.inner_opt_state[0], inner._replace(
        hyperparams={**inner.hyperparams, "learning_rate": 2 * inner.hyperparams["learning_rate"]})))
    outs = []
    for s in (state, twice):
        _, s = composed_step(GRADS[6], s, params)
        u, _ = composed_step(GRADS[7], s, params)
        outs.append(u)
    assert float(jnp.abs(outs[0]["w"]).max()) > 0
    for k in PARAMS:
        np.testing.assert_allclose(np.asarray(outs[1][k]), 2 * np.asarray(outs[0][k]), rtol=1e-5, atol=1e-8)


def _by_layer(tree, first, rest):
    """``first`` for the leaves of the first layer, ``rest`` elsewhere (optax.partition labels)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: first if jax.tree_util.keystr(path).startswith(("['layers'][0]", "['w']")) else rest, tree)


def test_flax_nnx_optimizer_on_a_tiny_mlp():
    # one optimizer, both methods: GaLore on the first layer, Fira on the second (optax.partition)
    model = MLP(4, hidden=(8,), out_features=3, rngs=nnx.Rngs(0))
    tx = optax.partition({"galore": galore(0.05, rank=2, update_proj_gap=5), "fira": fira(0.05, rank=2, update_proj_gap=5)},
                         lambda params: _by_layer(params, "galore", "fira"))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jnp.asarray(RNG.standard_normal((16, 4)), jnp.float32)
    y = jnp.asarray(RNG.standard_normal((16, 3)), jnp.float32)

    def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)

    @nnx.jit
    def train_step(model, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = [float(train_step(model, opt)) for _ in range(25)]
    assert losses[-1] < 0.7 * losses[0]
    states = {k: opt.opt_state.inner_states[k].inner_state[0] for k in ("galore", "fira")}
    assert all(isinstance(low, LowRankState) and int(low.count[...]) == 25 for low in states.values())
    # the 4 × 8 kernel (GaLore) and the 8 × 3 kernel (Fira) are projected at rank 2 on their smaller side
    # (the projectors are laid out like the params, optax.MaskedNode() at the leaves that are not projected)
    assert [b.shape for b in jax.tree.leaves(states["galore"].projectors.basis)] == [(4, 2)]
    assert [b.shape for b in jax.tree.leaves(states["fira"].projectors.basis)] == [(3, 2)]


def test_as_diloco_inner_optimizer_under_vmap():
    # DiLoCo's inner optimizer: GaLore on w, Fira on v (optax.partition), 2 workers under jax.vmap
    workers = 2
    runner = WorkerRunner(workers)
    x = jnp.asarray(RNG.standard_normal((workers, 16, 4)), jnp.float32)
    y = jnp.asarray(RNG.standard_normal((workers, 16, 3)), jnp.float32)
    params = {"w": jnp.asarray(0.3 * RNG.standard_normal((4, 5)), jnp.float32),
              "v": jnp.asarray(0.3 * RNG.standard_normal((5, 3)), jnp.float32), "b": jnp.zeros((3,))}
    inner = optax.partition({"galore": galore(0.05, rank=2, update_proj_gap=2), "fira": fira(0.05, rank=2, update_proj_gap=2)},
                            lambda p: _by_layer(p, "galore", "fira"))
    tx = diloco(inner=inner, outer=optax.sgd(0.7, momentum=0.9, nesterov=True), sync_every=2, axis_name="workers")

    def loss(p, x, y):
        return jnp.mean((x @ p["w"] @ p["v"] + p["b"] - y) ** 2)

    def step(p, state, x, y):
        value, grads = jax.value_and_grad(loss)(p, x, y)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state, value

    mapped = runner.map(step)
    p, state = runner.replicate(params), runner.replicate(tx.init(params))
    losses = []
    for _ in range(6):
        p, state, value = mapped(p, state, x, y)
        losses.append(float(np.mean(value)))
    assert losses[-1] < losses[0]
    for k in p:  # step 6 synchronized: every worker holds the anchor (up to the float rounding of p + (anchor − p))
        np.testing.assert_allclose(np.asarray(p[k][0]), np.asarray(p[k][1]), rtol=1e-6, atol=1e-7)
    for name, d in (("galore", 4), ("fira", 3)):
        low = state.inner_state.inner_states[name].inner_state[0]
        assert isinstance(low, LowRankState) and low.count.tolist() == [6, 6]
        bases = np.asarray(low.projectors.basis["w" if name == "galore" else "v"])  # each worker refreshed its projector from its own gradients
        assert bases.shape == (workers, d, 2) and not np.allclose(bases[0], bases[1])


def test_orbax_checkpoint_resumes_bit_identically(plain, tmp_path):
    name, tx, step = plain
    params, state = _run(step, tx.init(PARAMS), GRADS[:4])
    assert state[0].next_refresh.tolist() == [6, 6]  # refreshed at 0 and 3; the next refresh comes after the restore
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", (params, state))
        ckpt.wait_until_finished()
        fresh = METHODS[name](LR, **KW)  # a new process: a new transformation, a template from its own init
        template = jax.tree.map(ocp.utils.to_shape_dtype_struct, (PARAMS, fresh.init(PARAMS)))
        restored = ckpt.restore(tmp_path / "ckpt", template)
    _assert_trees_equal(restored, (params, state))
    resumed = _run(step, restored[1], GRADS[4:], restored[0])
    uninterrupted = _run(step, tx.init(PARAMS), GRADS)
    _assert_trees_equal(resumed, uninterrupted)


def test_dct_galore_at_full_rank_with_identity_inner_is_sgd():
    # the DCT-II basis is complete and orthonormal: P Pᵀ = I at full rank, so α P (Pᵀ G) = G with α = 1
    tx = optax.chain(scale_by_galore(rank=1.0, update_proj_gap=2, scale=1.0, inner=optax.identity(), projector="dct",
                                     label_fn=ALL), optax.scale(-0.1))
    ours, state = _run(jax.jit(tx.update), tx.init(PARAMS), GRADS[:4])
    for k in PARAMS:
        sgd = np.asarray(PARAMS[k], np.float64) - 0.1 * sum(np.asarray(g[k], np.float64) for g in GRADS[:4])
        np.testing.assert_allclose(np.asarray(ours[k]), sgd, atol=1e-5)
    assert state[0].projectors.indices["w"].dtype == jnp.int32  # only indices are stored


def test_dct_and_random_projections_reduce_a_least_squares_loss():
    # two independent least-squares problems, one per projector, in one optax.partition
    x = jnp.asarray(RNG.standard_normal((32, 8)), jnp.float32)
    y = {k: x @ jnp.asarray(RNG.standard_normal((8, 6)), jnp.float32) for k in ("dct", "random")}  # min loss 0
    params = {k: jnp.zeros((8, 6)) for k in y}
    # (each part sees only its own leaves, so the label function is a function, not a fixed tree)
    tx = optax.partition({k: galore(0.05, rank=2, update_proj_gap=10, scale=1.0, projector=k) for k in y},
                         {k: k for k in y})

    def losses(p):
        return {k: 0.5 * jnp.mean((x @ p[k] - y[k]) ** 2) for k in y}

    @jax.jit
    def step(p, state):
        grads = jax.grad(lambda p: sum(losses(p).values()))(p)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state

    state, p = tx.init(params), params
    before = losses(p)
    for _ in range(150):
        p, state = step(p, state)
    after = losses(p)
    for k in y:
        assert float(after[k]) < 0.2 * float(before[k]), (k, float(before[k]), float(after[k]))
