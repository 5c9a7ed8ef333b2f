"""Streaming DiLoCo: reduces to DiLoCo, staggered fragment schedule, float64 reference with overlap."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_lab.distributed import WorkerRunner, communicated_bytes, diloco
from jaxopt_lab.distributed.streaming_diloco import balanced_fragments, fragment_assignment, streaming_diloco
from tests.distributed.problem import DIM, init_params, make_step, run, worker_data

W = 4
RUNNER = WorkerRunner(W)


def torchft_events(steps, H, P, tau):
    """Per step t = 1..steps, the (kind, fragment) events of torchft's ``DiLoCo._step_post_hook``.

    Written from torchft/local_sgd.py: a local counter runs 1..H/P; at H/P - τ the
    fragment ``manager_step % P`` is prepared (pseudo-gradient sent), at H/P it is
    synced (outer step, then ``lerp_`` of global toward local by α) and the
    manager step advances.
    """
    events, local_step, manager_step = {}, 0, 0
    for t in range(1, steps + 1):
        local_step += 1
        if local_step == H // P - tau:
            events.setdefault(t, []).append(("send", manager_step % P))
        if local_step == H // P:
            events.setdefault(t, []).append(("merge", manager_step % P))
            manager_step, local_step = manager_step + 1, 0
    return events



def test_one_fragment_no_overlap_alpha0_is_diloco():
    outer = optax.sgd(0.7, momentum=0.9, nesterov=True)
    a, _ = run(RUNNER, streaming_diloco(optax.adam(0.05), outer, sync_every=3, num_fragments=1, merge_alpha=0.0), 8, W)
    b, _ = run(RUNNER, diloco(optax.adam(0.05), outer, sync_every=3), 8, W)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)


def per_step_bytes(tx, steps):
    x, y = worker_data(W)
    params, state = RUNNER.replicate(init_params()), RUNNER.replicate(tx.init(init_params()))
    step = RUNNER.map(make_step(tx))
    out = []
    for _ in range(steps):
        params, state = step(params, state, x, y)
        out.append(communicated_bytes(state)[0])
    return np.diff([0.0] + out)


def test_fragments_sync_on_a_staggered_schedule():
    # leaves in tree order: b (1 float), w (5 floats) -> fragments [b], [w]; H=4, τ=1: as torchft,
    # fragment 0 is sent at H/P - τ = 1 (merged at 2), fragment 1 at 2H/P - τ = 3 (merged at 4)
    tx = streaming_diloco(optax.sgd(0.05), optax.sgd(0.7), sync_every=4, num_fragments=2, overlap=1)
    np.testing.assert_array_equal(per_step_bytes(tx, 8), [4, 0, 20, 0, 4, 0, 20, 0])
    expected = np.zeros(8)
    for t, evs in torchft_events(8, 4, 2, 1).items():
        expected[t - 1] += sum((4, 20)[p] for kind, p in evs if kind == "send")
    np.testing.assert_array_equal(per_step_bytes(tx, 8), expected)


def test_matches_float64_reference_with_overlap_and_merge():
    H, P, tau, alpha, lr, olr, mu, steps = 4, 2, 1, 0.5, 0.05, 0.7, 0.9, 11
    tx = streaming_diloco(optax.sgd(lr), optax.sgd(olr, momentum=mu, nesterov=True), H, P, tau, alpha)
    params, _ = run(RUNNER, tx, steps, W)
    x, y = (a.astype(np.float64) for a in worker_data(W))
    p0 = {k: v.astype(np.float64) for k, v in init_params().items()}
    local = {k: np.broadcast_to(v, (W,) + v.shape).copy() for k, v in p0.items()}
    anchor = dict(p0)
    mom = {k: np.zeros_like(v) for k, v in p0.items()}
    names, deltas = ["b", "w"], {}  # fragment 0 = [b], fragment 1 = [w]
    events = torchft_events(steps, H, P, tau)
    for t in range(1, steps + 1):
        r = np.einsum("wnd,wd->wn", x, local["w"]) + local["b"][:, None] - y
        g = {"w": np.einsum("wn,wnd->wd", r, x) / x.shape[1], "b": r.mean(axis=1)}
        local = {k: local[k] - lr * g[k] for k in local}
        for kind, p in events.get(t, []):
            k = names[p]
            if kind == "send":  # torchft prepare_sync: pseudo-gradient anchor - local, averaged
                deltas[k] = (anchor[k] - local[k]).mean(axis=0)
            else:  # perform_sync: outer Nesterov step on the anchor, then lerp_(local, alpha)
                mom[k] = mu * mom[k] + deltas[k]
                anchor[k] = anchor[k] - olr * (mu * mom[k] + deltas[k])
                local[k] = anchor[k] + alpha * (local[k] - anchor[k])
    for k in local:
        np.testing.assert_allclose(params[k], local[k], rtol=2e-5, atol=2e-6)


# A "model" of 4 blocks and a loose bias: prediction x @ (sum of the blocks' w) + head.
BLOCKS = 4


def block_params():
    rng = np.random.default_rng(2)
    return {"blocks": [{"w": rng.normal(size=(DIM,)).astype(np.float32)} for _ in range(BLOCKS)],
            "head": np.zeros((), np.float32)}


def block_loss(params, x, y):
    w = sum(b["w"] for b in params["blocks"])
    return 0.5 * jnp.mean(jnp.square(x @ w + params["head"] - y))


def run_blocks(tx, steps):
    x, y = worker_data(W)
    step = jax.jit(jax.vmap(make_step(tx, block_loss), axis_name="workers"))
    params, state = RUNNER.replicate(block_params()), RUNNER.replicate(tx.init(block_params()))
    for _ in range(steps):
        params, state = step(params, state, x, y)
    return jax.tree.map(np.asarray, params)


def reference_blocks(fragments, H, tau, alpha, lr, olr, mu, steps):
    """Float64 replay; ``fragments``: per fragment, the names of its units ("0".."3" blocks, "head")."""
    x, y = (a.astype(np.float64) for a in worker_data(W))
    p0 = block_params()
    p0 = {**{str(i): b["w"].astype(np.float64) for i, b in enumerate(p0["blocks"])}, "head": p0["head"].astype(np.float64)}
    local = {k: np.broadcast_to(v, (W,) + v.shape).copy() for k, v in p0.items()}
    anchor, mom = dict(p0), {k: np.zeros_like(v) for k, v in p0.items()}
    events = torchft_events(steps, H, len(fragments), tau)
    deltas = {}
    for t in range(1, steps + 1):
        w = sum(local[str(i)] for i in range(BLOCKS))
        r = np.einsum("wnd,wd->wn", x, w) + local["head"][:, None] - y
        gw = np.einsum("wn,wnd->wd", r, x) / x.shape[1]
        g = {**{str(i): gw for i in range(BLOCKS)}, "head": r.mean(axis=1)}
        local = {k: local[k] - lr * g[k] for k in local}
        for kind, p in events.get(t, []):
            for k in fragments[p]:
                if kind == "send":
                    deltas[k] = (anchor[k] - local[k]).mean(axis=0)
                else:
                    mom[k] = mu * mom[k] + deltas[k]
                    anchor[k] = anchor[k] - olr * (mu * mom[k] + deltas[k])
                    local[k] = anchor[k] + alpha * (local[k] - anchor[k])
    return local


@pytest.mark.parametrize(
    "pattern, fragments",
    [("strided", [["0", "2", "head"], ["1", "3"]]),  # block i -> i mod 2, then the loose head
     ("contiguous", [["0", "1"], ["2", "3", "head"]])],  # sizes 5,5,5,5,1 cut in two runs
)
@pytest.mark.parametrize("tau, alpha", [(0, None), (1, None), (1, 0.5)])  # None: the default, torchft's 0.0
def test_fragment_patterns_match_float64_reference(pattern, fragments, tau, alpha):
    H, lr, olr, mu, steps = 4, 0.02, 0.7, 0.9, 9
    kwargs = {} if alpha is None else {"merge_alpha": alpha}
    tx = streaming_diloco(optax.sgd(lr), optax.sgd(olr, momentum=mu, nesterov=True), H, 2, tau,
                          fragment_pattern=pattern, **kwargs)
    params = run_blocks(tx, steps)
    expected = reference_blocks(fragments, H, tau, 0.0 if alpha is None else alpha, lr, olr, mu, steps)
    for i in range(BLOCKS):
        np.testing.assert_allclose(params["blocks"][i]["w"], expected[str(i)], rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(params["head"], expected["head"], rtol=2e-5, atol=2e-6)


def test_default_without_overlap_is_diloco_one_fragment():
    # no merge_alpha given, overlap 0: the worker takes the new anchor (alpha 0), as DiLoCo does
    outer = optax.sgd(0.7, momentum=0.9, nesterov=True)
    a, _ = run(RUNNER, streaming_diloco(optax.adam(0.05), outer, sync_every=3, num_fragments=1), 7, W)
    b, _ = run(RUNNER, diloco(optax.adam(0.05), outer, sync_every=3), 7, W)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_strided_assignment_of_a_gpt_tree():
    from flax import nnx

    from jaxopt_lab.models.gpt import GPT

    _, params = nnx.split(GPT(vocab_size=7, layers=5, width=8, heads=2, context=4, rngs=nnx.Rngs(0)), nnx.Param)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    groups = fragment_assignment(params, 3)
    for p, group in enumerate(groups):
        for block in range(5):  # every leaf of block i, and only those, in fragment i mod 3
            in_block = {i for i, path in enumerate(paths) if path.startswith(f"['blocks'][{block}]")}
            assert (in_block <= set(group)) == (block % 3 == p) and in_block
    assert sorted(i for g in groups for i in g) == list(range(len(paths)))
    with pytest.raises(ValueError, match=r"num_fragments=4 is more than the 3 units of the strided pattern"):
        fragment_assignment({"blocks": [np.zeros(2), np.zeros(2)], "head": np.zeros(1)}, 4)


def test_balanced_fragments_are_contiguous_ordered_and_cover_every_leaf_once():
    assert balanced_fragments([100, 1, 1, 1, 50, 50], 3) == [[0], [1, 2, 3], [4, 5]]
    assert balanced_fragments([10, 10, 10, 10], 2) == [[0, 1], [2, 3]]
    assert balanced_fragments([1, 1, 10, 1000], 4) == [[0], [1], [2], [3]]  # a huge last leaf
    assert balanced_fragments([1000, 1, 1, 1], 3) == [[0], [1], [2, 3]]  # a huge first leaf
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(1, 1000, rng.integers(1, 12)) ** rng.integers(1, 3)
        p = int(rng.integers(1, len(sizes) + 1))
        assert [i for g in balanced_fragments(sizes.tolist(), p) for i in g] == list(range(len(sizes)))
        assert all(balanced_fragments(sizes.tolist(), p))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sync_every=10, num_fragments=3), r"num_fragments=3 must divide sync_every=10"),
        (dict(sync_every=8, num_fragments=4, overlap=2), r"overlap must be an int in \[0, H/P = 2\), got 2"),
        (dict(merge_alpha=1.5), r"merge_alpha must be a number in \[0, 1\], got 1.5"),
        (dict(merge_alpha="0.5"), r"merge_alpha must be a number in \[0, 1\], got '0.5'"),
        (dict(sync_every=8, num_fragments=4, overlap=True), r"overlap must be an int in \[0, H/P = 2\), got True"),
        (dict(fragment_pattern="sequential"), r"fragment_pattern must be one of \('strided', 'contiguous'\), got 'sequential'"),
        (dict(compressor="e3m0"), r"compressor must be a jaxopt_lab.distributed.compression compressor, got 'e3m0'"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        streaming_diloco(**kwargs)
