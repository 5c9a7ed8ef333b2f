"""FZooS vs FedZO on federated zeroth-order logistic regression, at equal query budgets.

    PYTHONPATH=$PWD python scripts/fzoos_zeroth_order.py [--rounds 30] [--seeds 2] [--tasks synthetic digits]

Clients only query their objective (the mean logistic loss over their own
data); nobody computes a gradient. Two tasks, each split over 5 clients by
Dirichlet(0.5) label skew, full participation (``SyncRound(5)``), 10 local
steps of Adam(0.01) per round (the official FZooS runs' local optimizer), the
server averaging uniformly (the global objective is the clients' mean):

- synthetic: binary logistic regression, 100 features (``logistic_regression``), d = 101;
- digits: 10-class multinomial logistic regression on the 64 pixels, d = 650.

Methods: FZooS (:func:`~jaxopt_lab.distributed.federated.fzoos_local_update`,
official defaults except ``--features`` random features for the CPU), FZooS
without the adaptive correction, and FedZO
(:func:`~jaxopt_lab.distributed.federated.fedzo_local_update`, ``--q`` random
directions, smoothing 0.005, the same Adam). Queries are counted by the
server rules (``query_count``); the table reads each run's global objective
(and test accuracy) after the last round whose cumulative queries per client
fit each budget, averaged over seeds.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_lab.data import dirichlet_partition, load_digits, logistic_regression
from jaxopt_lab.distributed import federated as fl

CLIENTS, STEPS = 5, 10


def task(name, seed):
    if name == "synthetic":
        data = logistic_regression(num_examples=1000, dim=100, seed=seed)
        x_tr, x_te = data.x_train, data.x_test
        params = {"w": jnp.zeros((100, 1)), "b": jnp.zeros((1,))}

        def loss_fn(p, x, y):
            z = (x @ p["w"] + p["b"])[:, 0]
            return jax.nn.softplus(-(2.0 * y - 1.0) * z)

        def predict(p, x):
            return ((x @ p["w"] + p["b"])[:, 0] > 0).astype(jnp.int32)
    else:
        data = load_digits(seed=seed)
        x_tr, x_te = data.x_train.reshape(len(data.x_train), -1), data.x_test.reshape(len(data.x_test), -1)
        params = {"w": jnp.zeros((64, 10)), "b": jnp.zeros((10,))}

        def loss_fn(p, x, y):
            return optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y)

        def predict(p, x):
            return jnp.argmax(x @ p["w"] + p["b"], -1)
    part = dirichlet_partition(data.y_train, CLIENTS, 0.5, seed=seed)
    clients = fl.pad_clients(x_tr, data.y_train, part)
    value_fn = fl.client_objective(loss_fn, clients)
    x_te, y_te = jnp.asarray(x_te), jnp.asarray(data.y_test)

    def evaluate(p):
        obj = jnp.mean(jax.vmap(lambda c: value_fn(p, c))(jnp.arange(CLIENTS)))
        return {"objective": obj, "accuracy": jnp.mean(predict(p, x_te) == y_te)}

    return params, value_fn, evaluate


def methods(value_fn, args):
    kw = dict(num_features=args.features)
    return {
        "FZooS": (fl.fzoos_local_update(value_fn, optax.adam(args.lr), **kw),
                  fl.fzoos(num_clients=CLIENTS, **kw), fl.fzoos_context),
        "FZooS, no correction": (fl.fzoos_local_update(value_fn, optax.adam(args.lr), correction=False, **kw),
                                 fl.fzoos(num_clients=CLIENTS, **kw), fl.fzoos_context),
        f"FedZO (q={args.q})": (fl.fedzo_local_update(value_fn, optax.adam(args.lr), args.q, 0.005),
                                fl.fedzo(), fl.fedzo_context),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--tasks", nargs="+", default=["synthetic", "digits"])
    ap.add_argument("--features", type=int, default=2000, help="FZooS random features (official 10000)")
    ap.add_argument("--q", type=int, default=10, help="FedZO directions per step")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--budgets", type=int, nargs="+", default=[500, 1500, 3000])
    args = ap.parse_args()
    t0 = time.time()
    for name in args.tasks:
        curves: dict[str, list] = {}
        for seed in range(args.seeds):
            params, value_fn, evaluate = task(name, seed)
            f0 = float(evaluate(params)["objective"])
            for label, (local, rule, ctx) in methods(value_fn, args).items():
                sim = fl.FederatedSimulator(local, rule, fl.SyncRound(CLIENTS), num_clients=CLIENTS,
                                            local_steps=STEPS, client_context=ctx)
                state = sim.init(params, seed=seed)
                rows, total = [(0, f0, float(evaluate(params)["accuracy"]))], 0
                for _ in range(args.rounds):  # one round a call, to read the query counter after each
                    state, _ = sim.run(state, 1)
                    total = int(fl.query_count(state.rule_state))
                    ev = evaluate(state.params)
                    rows.append((total / CLIENTS, float(ev["objective"]), float(ev["accuracy"])))
                curves.setdefault(label, []).append(rows)
                print(f"{name} seed {seed} {label}: objective {rows[-1][1]:.4f} acc {rows[-1][2]:.3f} after "
                      f"{rows[-1][0]:.0f} queries/client ({time.time() - t0:.0f} s)", flush=True)
        print(f"\n### {name}: global objective (test accuracy) at a query budget per client, "
              f"mean of {args.seeds} seeds; {args.rounds} rounds, start {f0:.4f}\n")
        print("| method | queries/client/round | " + " | ".join(f"{b} queries" for b in args.budgets) + " |")
        print("|---|---:|" + "---:|" * len(args.budgets))
        for label, runs in curves.items():
            cells = []
            for b in args.budgets:
                at = [max((r for r in rows if r[0] <= b), key=lambda r: r[0]) for rows in runs]
                if any(a[0] < b and a is rows[-1] for a, rows in zip(at, runs)):
                    cells.append("—")  # the run ended before the budget
                    continue
                cells.append(f"{np.mean([a[1] for a in at]):.4f} ({np.mean([a[2] for a in at]):.3f})")
            per_round = np.mean([np.diff([r[0] for r in rows])[1:].mean() for rows in runs])
            print(f"| {label} | {per_round:.0f} | " + " | ".join(cells) + " |")
    print(f"\nwall {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
