"""Federated simulation throughput: our compiled simulator against a Python loop over clients.

    python scripts/bench_federated.py [--rounds 400] [--repeats 5]

The task (the same for every contender): digits split over 100 clients by
Dirichlet(alpha=0.3) label skew, a 64-128-10 MLP, 10 clients a round, one local
epoch of batch 16 with SGD(0.1), example-weighted FedAvg.

- ours, sync: ``FederatedSimulator`` with ``SyncRound(10)``: rounds run inside one
  compiled ``lax.scan`` (``--rounds`` per dispatch), the 10 clients of a round
  vmapped, client data padded to one shape with masks.
- ours, async: FedBuff (``Buffer(10)``, concurrency 20, log-normal speeds with a
  10x spread): the event queue lives in JAX arrays inside the same scan; one
  server step consumes 10 client updates, like a round.
- vmapped JAX round: what a JAX user writes without a simulator: rounds in a
  ``lax.scan``, each sampling 10 clients and vmapping a masked one-epoch local
  loop over them (to the round's largest step count), then the weighted
  average. Our sync simulator's ratio to it is printed at the end.
- python loop: for each round, a jitted local epoch called once per sampled
  client (the same ``local_update`` function, jitted alone), then a jitted
  weighted average: the floor any JAX user gets without a simulator.
- Flower (``flwr``) and fedjax, when installed (import-guarded).
- bookkeeping only: the vmapped round and our sync simulator with the local
  training replaced by a no-op (selection, dispatch draws, sorting, the
  weighted average, the records), to split each round's time.

Rates are medians over ``--repeats`` timed runs after a warm-up, the
contenders timed in turn so that load from other processes hits them alike;
every ratio is against the Python loop measured in the same run. "per CPU-s"
divides by this process's CPU time instead of wall-clock (less sensitive to a
shared machine; XLA threads count double).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxopt_lab.data import dirichlet_partition, load_digits
from jaxopt_lab.distributed import federated as fl
from jaxopt_lab.models import MLP

NUM_CLIENTS, PER_ROUND, BATCH, LR, ALPHA = 100, 10, 16, 0.1, 0.3


def setup():
    data = load_digits()
    part = dirichlet_partition(data.y_train, NUM_CLIENTS, ALPHA, seed=1)
    clients = fl.pad_clients(data.x_train.reshape(len(data.x_train), -1), data.y_train, part)
    graphdef, params = nnx.split(MLP(64, (128,), 10, rngs=nnx.Rngs(0)), nnx.Param)
    params = nnx.to_pure_dict(params)

    def loss_fn(p, x, y):
        model = nnx.merge(graphdef, nnx.State(p))
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y)

    local = fl.make_local_update(loss_fn, clients, optax.sgd(LR), BATCH)
    steps = fl.epoch_steps(part.sizes, BATCH)
    return part, params, local, steps, clients, loss_fn


def simulator_runner(sim, params, rounds):
    """A closure running ``rounds`` server steps per call (one compiled scan), carrying the state."""
    state = [sim.init(params, seed=0)]

    def go():
        state[0], _ = sim.run(state[0], rounds)
        return state[0].params

    return go, state


def python_loop_runner(part, params, local, steps, rounds):
    """The baseline: per round, one jitted local-epoch call per sampled client, then a jitted average."""
    one = jax.jit(local)
    sizes = part.sizes.astype(np.float32)

    @jax.jit
    def average(models, weights):
        w = weights / weights.sum()
        return jax.tree.map(lambda *xs: sum(wi * x for wi, x in zip(w, xs)), *models)

    rng = np.random.default_rng(0)
    keys = np.asarray(jax.random.split(jax.random.PRNGKey(0), rounds * PER_ROUND))  # host-side, made once
    state = [params]

    def go():
        p = state[0]
        for r in range(rounds):
            cids = rng.choice(NUM_CLIENTS, PER_ROUND, replace=False)
            models = [one(p, np.int32(c), np.int32(steps[c]), keys[r * PER_ROUND + i]) for i, c in enumerate(cids)]
            p = average(models, sizes[cids])
        state[0] = p
        return p

    return go


def vmapped_round_runner(clients, sizes, steps, params, loss_fn, rounds, train=True):
    """The plain "vmapped JAX round": rounds in a ``lax.scan``; each samples 10 clients and vmaps a
    masked one-epoch local loop (shuffled minibatches of 16, SGD) over them, then averages by
    example count. The simplest fast code a JAX user would write, without any simulator."""
    x, y = clients.x, clients.y
    max_size = x.shape[1]
    sizes_j = jnp.asarray(sizes, jnp.int32)
    steps_j = jnp.asarray(steps, jnp.int32)

    def batch_loss(p, xb, yb, valid):
        losses = loss_fn(p, xb, yb)
        return jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.maximum(valid.sum(), 1)

    def client_epoch(p0, cid, n_steps, max_steps, key):
        n = sizes_j[cid]
        order = jnp.argsort(jax.random.uniform(key, (max_size,)) + (jnp.arange(max_size) >= n))
        xc, yc = x[cid][order], y[cid][order]

        def body(s, p):
            pos = s * BATCH + jnp.arange(BATCH)
            valid = pos < n
            idx = jnp.minimum(pos, max_size - 1)
            g = jax.grad(batch_loss)(p, xc[idx], yc[idx], valid)
            return jax.tree.map(lambda w, gw: jnp.where(s < n_steps, w - LR * gw, w), p, g)

        if not train:  # the round's bookkeeping alone (selection, weights, average)
            return jax.tree.map(lambda w: w + 0 * n_steps.astype(w.dtype), p0)
        return jax.lax.fori_loop(0, max_steps, body, p0)

    def one_round(p, key):
        k_sel, k_train = jax.random.split(key)
        cids = jax.random.choice(k_sel, NUM_CLIENTS, (PER_ROUND,), replace=False)
        n_steps = steps_j[cids]
        models = jax.vmap(client_epoch, in_axes=(None, 0, 0, None, 0))(
            p, cids, n_steps, n_steps.max(), jax.random.split(k_train, PER_ROUND))
        w = sizes_j[cids].astype(jnp.float32)
        w = w / w.sum()
        return jax.tree.map(lambda m: jnp.tensordot(w, m, axes=1), models), None

    @jax.jit
    def run(p, key):
        return jax.lax.scan(one_round, p, jax.random.split(key, rounds))[0]

    state = [params, jax.random.PRNGKey(0)]

    def go():
        state[1], k = jax.random.split(state[1])
        state[0] = run(state[0], k)
        return state[0]

    return go


def interleaved_rates(runners, repeats):
    """Median units/s of each ``(fn, units)``, timing them in turn (ABCABC...) so load drifts hit all alike."""
    for fn, _ in runners.values():
        jax.block_until_ready(fn())  # compile and warm up
    times = {name: [] for name in runners}
    cpu = {name: [] for name in runners}
    for _ in range(repeats):
        for name, (fn, units) in runners.items():
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn())
            times[name].append((time.perf_counter() - t0) / units)
            cpu[name].append((time.process_time() - c0) / units)
    return ({name: 1.0 / statistics.median(ts) for name, ts in times.items()},
            {name: 1.0 / statistics.median(ts) for name, ts in cpu.items()})


def try_import(name):
    try:
        return __import__(name)
    except ImportError:
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=400, help="rounds per timed run (one scan for the simulator)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    part, params, local, steps, clients, loss_fn = setup()
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  jax {jax.__version__}")
    print(f"task: {part.summary()}; 64-128-10 MLP, {PER_ROUND} clients/round, 1 local epoch "
          f"(mean {steps.mean():.2f} steps, max {steps.max()}), batch {BATCH}, SGD {LR}")

    sync_sim = fl.FederatedSimulator(local, fl.fedavg(), fl.SyncRound(PER_ROUND), num_clients=NUM_CLIENTS,
                                     num_examples=part.sizes, local_steps=steps)
    async_sim = fl.FederatedSimulator(local, fl.fedbuff(), fl.Buffer(PER_ROUND), num_clients=NUM_CLIENTS,
                                      concurrency=2 * PER_ROUND, num_examples=part.sizes, local_steps=steps,
                                      speeds="lognormal", speed_sigma=1.0, max_speed_spread=10.0)
    sync_fn, _ = simulator_runner(sync_sim, params, args.rounds)
    no_training = lambda p, client, n, key: jax.tree.map(lambda w: w + 0 * n.astype(w.dtype), p)  # noqa: E731
    book_sim = fl.FederatedSimulator(no_training, fl.fedavg(), fl.SyncRound(PER_ROUND), num_clients=NUM_CLIENTS,
                                     num_examples=part.sizes, local_steps=steps)
    book_fn, _ = simulator_runner(book_sim, params, args.rounds)
    async_fn, astate = simulator_runner(async_sim, params, args.rounds)
    loop_rounds = max(args.rounds // 8, 20)
    rates, cpu_rates = interleaved_rates({
        "loop": (python_loop_runner(part, params, local, steps, loop_rounds), loop_rounds),
        "vmapped": (vmapped_round_runner(clients, part.sizes, steps, params, loss_fn, args.rounds), args.rounds),
        "sync": (sync_fn, args.rounds),
        "async": (async_fn, args.rounds),
        "vmapped_book": (vmapped_round_runner(clients, part.sizes, steps, params, loss_fn, args.rounds, train=False),
                         args.rounds),
        "sync_book": (book_fn, args.rounds),
    }, args.repeats)
    loop, sync, asyn = rates["loop"], rates["sync"], rates["async"]
    rows = [("python loop over clients (jitted local epoch)", "loop", "rounds/s"),
            ("vmapped JAX round (scan + vmap, masked loop)", "vmapped", "rounds/s"),
            ("ours: sync FedAvg, lax.scan + vmap", "sync", "rounds/s"),
            ("ours: async FedBuff K=10, concurrency 20", "async", "server steps/s (10 updates each)"),
            ("vmapped JAX round, no local training", "vmapped_book", "rounds/s (bookkeeping only)"),
            ("ours: sync FedAvg, no local training", "sync_book", "rounds/s (bookkeeping only)")]
    print(f"\n{'contender':<48} | {'rate':>10} | {'vs loop':>7} | {'per CPU-s':>9} | unit")
    print("-" * 110)
    for name, key, unit in rows:
        print(f"{name:<48} | {rates[key]:>10.0f} | {rates[key] / loop:>6.1f}x | {cpu_rates[key]:>9.0f} | {unit}")
    for name, module in (("Flower simulation (flwr)", "flwr"), ("fedjax", "fedjax")):
        if try_import(module) is None:
            print(f"{name:<48} | {'not installed':>10} |")
        else:
            print(f"{name:<48} | {'installed, not wired up in this script':>10} |")
    print(f"\nours sync / vmapped JAX round = {sync / rates['vmapped']:.2f} "
          f"(per CPU-s: {cpu_rates['sync'] / cpu_rates['vmapped']:.2f})")
    for key in ("vmapped", "sync", "vmapped_book", "sync_book"):
        print(f"{key:>12}: {1e6 / rates[key]:7.1f} us/round wall, {1e6 / cpu_rates[key]:7.1f} us/round CPU")
    st = astate[0]
    print(f"\nasync/sync = {asyn / sync:.2f}; FedBuff over all its runs: {int(st.version)} server steps, "
          f"{int(st.applied)} updates applied, {float(st.time):.0f} simulated seconds")


if __name__ == "__main__":
    main()
