"""Synchronization decided on the host: a step that does not synchronize compiles with no collective.

Under shard_map with k > 1 workers per device the inner vmap turns an in-graph
``lax.cond`` into a select, so the old path all-reduces on every step. The
static ``sync`` argument and ``WorkerRunner.map_sync`` fix that; results must
equal the in-graph path.
"""

import re

import jax
import numpy as np
import optax
import pytest

from jaxopt_lab.distributed import WorkerRunner, communicated_bytes, diloco, next_sync
from jaxopt_lab.distributed.local_sgd import local_sgd
from jaxopt_lab.distributed.streaming_diloco import streaming_diloco
from tests.distributed.problem import init_params, make_step, worker_data
from tests.distributed.test_local_sgd import hand_computed_syncs

W = 8
COLLECTIVE = re.compile(r"\b(all-reduce|all-gather|collective-permute|all-to-all|reduce-scatter|collective-broadcast)")

METHODS = {
    "diloco": lambda axis: diloco(optax.adam(0.05), optax.sgd(0.7, momentum=0.9, nesterov=True), sync_every=3,
                                  axis_name=axis),
    "streaming": lambda axis: streaming_diloco(optax.adam(0.05), optax.sgd(0.7, momentum=0.9, nesterov=True),
                                               sync_every=4, num_fragments=2, overlap=1, merge_alpha=0.5,
                                               axis_name=axis),
    "local_sgd": lambda axis: local_sgd(optax.sgd(0.05), sync_every=3, axis_name=axis),
}


def start(runner, tx):
    x, y = worker_data(W)
    return runner.put((runner.replicate(init_params()), runner.replicate(jax.tree.map(np.asarray, tx.init(init_params()))),
                       x, y))


def hlo(runner, tx, sync):
    return runner.map(make_step(tx, sync=sync)).lower(*start(runner, tx)).compile().as_text()


@pytest.fixture(scope="module", params=[8, 4], ids=["1_per_device", "2_per_device"])
def runner(request):
    return WorkerRunner(W, mode="shard_map", devices=jax.devices()[:request.param])


@pytest.mark.parametrize("method", list(METHODS))
def test_a_step_that_does_not_synchronize_has_no_collective(runner, method):
    tx = METHODS[method](runner.axis_name)
    assert not COLLECTIVE.findall(hlo(runner, tx, sync=False))
    sync_unit = 1 if method == "streaming" else True  # streaming: name the fragment
    assert "all-reduce" in COLLECTIVE.findall(hlo(runner, tx, sync=sync_unit))


def test_the_in_graph_decision_communicates_on_every_step_under_vmap():
    # what the host decision avoids: with 2 workers per device the cond is a select, its all-reduce unconditional
    runner = WorkerRunner(W, mode="shard_map", devices=jax.devices()[:4])
    text = hlo(runner, METHODS["diloco"](runner.axis_name), sync=None)
    assert "all-reduce" in COLLECTIVE.findall(text) and "conditional" not in text.split("ENTRY")[-1]


def run_both(runner, tx, steps):
    """The same run by the in-graph decision and by map_sync; returns both (params, state) and the flags seen."""
    args = start(runner, tx)
    old, new = runner.map(make_step(tx)), runner.map_sync(lambda *a, sync: make_step(tx, sync=sync)(*a))
    a = b = args[:2]
    seen = []
    for _ in range(steps):
        seen.append(new.decisions(*b)["sync"])
        a = old(*a, *args[2:])
        b = new(*b, *args[2:])
    return runner.get(a), runner.get(b), seen


@pytest.mark.parametrize("method, expected", [
    ("diloco", [-1, -1, 0] * 2 + [-1, -1]),
    ("streaming", [0, -1, 1, -1] * 2),  # τ = 1, torchft's schedule: fragment 0 sent at t = 1, 5; fragment 1 at 3, 7
    ("local_sgd", [-1, -1, 0] * 2 + [-1, -1]),
])
def test_host_decision_equals_the_in_graph_one(method, expected):
    runner = WorkerRunner(W)
    (pa, sa), (pb, sb), seen = run_both(runner, METHODS[method]("workers"), 8)
    assert seen == expected
    for u, v in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(communicated_bytes(sa), communicated_bytes(sb))
    assert np.ptp(pb["w"], axis=0).max() > 1e-4  # workers differ between syncs: the check is not vacuous


def test_host_decision_under_shard_map_with_two_workers_per_device():
    runner = WorkerRunner(W, mode="shard_map", devices=jax.devices()[:4])
    (pa, _), (pb, _), _ = run_both(runner, METHODS["diloco"](runner.axis_name), 7)
    for u, v in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)


def test_qsr_period_is_read_from_the_state():
    # QSR: rounds lengthen as the learning rate decays; the host follows the state, not a replay
    sched = optax.linear_schedule(0.1, 0.02, 12)
    tx = local_sgd(optax.sgd(sched), sync_every=2, qsr_beta=0.2, learning_rate=sched)
    (pa, sa), (pb, sb), seen = run_both(WorkerRunner(W), tx, 12)
    syncs = [t + 1 for t, s in enumerate(seen) if s == 0]
    assert syncs == hand_computed_syncs(sched, 2, 0.2, 12) == [4, 11]  # rounds of 4, then 7 steps
    np.testing.assert_array_equal(communicated_bytes(sa), communicated_bytes(sb))
    for u, v in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)


def test_next_sync_reads_flags_through_wrappers_and_rejects_disagreement():
    tx = optax.MultiSteps(diloco(optax.sgd(0.1), sync_every=1), every_k_schedule=2)
    assert next_sync(optax.chain(optax.sgd(0.1)).init(init_params())) is None
    assert next_sync(tx.init(init_params())) == 0
    two = (diloco(sync_every=1).init(init_params()), diloco(sync_every=2).init(init_params()))
    with pytest.raises(ValueError, match=r"disagree on the next synchronization \(\[-1, 0\]"):
        next_sync(two)


@pytest.mark.parametrize("make, sync, match", [
    (lambda: diloco(), 2, r"diloco: sync must be None, a bool, or an int in \[-1, 1\), got 2"),
    (lambda: streaming_diloco(sync_every=4, num_fragments=2), True, r"sync=True is ambiguous with 2 fragments"),
    (lambda: local_sgd(optax.sgd(0.1)), "yes", r"local_sgd: sync must be None, a bool, or an int in \[-1, 1\), got 'yes'"),
])
def test_bad_sync_values(make, sync, match):
    tx = make()
    params = init_params()
    with pytest.raises(ValueError, match=match):
        tx.update(params, tx.init(params), params, sync=sync)


# ---- the low-rank projector refresh as DiLoCo's inner optimizer ----------------------------------

DECOMPOSITION = re.compile(r'custom_call_target="[^"]*(gesdd|gesvd|syevd|heevd|geqrf|orgqr|eigh|svd|qr)[^"]*"', re.I)
LR_W = 2


def low_rank_problem():
    from jaxopt_lab.lowrank import galore

    rng = np.random.default_rng(3)
    x = rng.standard_normal((LR_W, 16, 6)).astype(np.float32)
    y = rng.standard_normal((LR_W, 16, 4)).astype(np.float32)
    params = {"w": (0.3 * rng.standard_normal((6, 4))).astype(np.float32), "b": np.zeros((4,), np.float32)}
    tx = diloco(inner=galore(0.05, rank=2, update_proj_gap=3), outer=optax.sgd(0.7), sync_every=4)

    def loss(p, x, y):
        return jax.numpy.mean((x @ p["w"] + p["b"] - y) ** 2)

    runner = WorkerRunner(LR_W)
    args = runner.put((runner.replicate(params), runner.replicate(jax.tree.map(np.asarray, tx.init(params))), x, y))
    return runner, tx, loss, args


def test_a_step_with_no_projector_due_has_no_decomposition():
    runner, tx, loss, args = low_rank_problem()

    def text(**decisions):
        return runner.map(make_step(tx, loss, **decisions)).lower(*args).compile().as_text()

    assert DECOMPOSITION.search(text(sync=False))  # in-graph refresh: under vmap it decomposes every step
    assert not DECOMPOSITION.search(text(sync=False, refresh=False))


def test_host_refresh_decision_equals_the_in_graph_one():
    runner, tx, loss, args = low_rank_problem()
    old = runner.map(make_step(tx, loss))
    new = runner.map_sync(lambda *a, **decisions: make_step(tx, loss, **decisions)(*a))
    a = b = args[:2]
    seen = []
    for _ in range(8):
        seen.append(new.decisions(*b))
        a = old(*a, *args[2:])
        b = new(*b, *args[2:])
    # projector refreshes at steps 1, 4, 7 (count 0, 3, 6), DiLoCo syncs at 4 and 8
    assert [d.get("refresh", "graph") for d in seen] == ["graph", False, False, "graph", False, False, "graph", False]
    assert [d["sync"] for d in seen] == [-1, -1, -1, 0, -1, -1, -1, 0]
    for u, v in zip(jax.tree.leaves(runner.get(a)), jax.tree.leaves(runner.get(b))):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)
