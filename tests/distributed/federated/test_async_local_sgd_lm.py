"""scripts/async_local_sgd_lm.py on the micro GPT: one delayed-Nesterov round is one DiLoCo round.

With speeds (1, 0.5, 0.25, 0.5) and H = 4, dynamic local updates give the
workers 4, 2, 1, 2 steps: every round takes 4 simulated seconds, so all four
workers leave at t = 0 from the initial model and are back at t = 4. Four
asynchronous arrivals through the delayed Nesterov rule (N = 4: plain steps
0.7 g/4, momentum applied on the 4th) must then land exactly where one
synchronous DiLoCo round (Nesterov SGD 0.7, momentum 0.9, on the average) with
the same local steps lands: 0.7 (ḡ + 0.9 ḡ) from the start. A naive
per-arrival momentum, a missing Nesterov term, a wrong sign or wrong dynamic
step counts would all break it.
"""

import os
import sys

import jax
import numpy as np
import pytest

from jaxopt_lab.distributed.federated.delayed_nesterov import dynamic_local_steps

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "scripts"))
import async_local_sgd_lm as script

SPEEDS, H = [1.0, 0.5, 0.25, 0.5], 4


@pytest.fixture(scope="module")
def problem():
    # Two small simulations run once each: XLA's optimizations would cost more compile time than they save.
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield script.build_problem("micro", num_workers=4, batch=4, context=16, inner_lr=3e-3, val_windows=16)
    finally:
        jax.config.update("jax_disable_most_optimizations", old)


def test_server_steps_within_budget():
    steps = script.method_local_steps("dn", SPEEDS, H)
    assert steps.tolist() == [4, 4, 4, 4]
    # async: worker w arrives every 4 / v_w s -> 16 s hold 4 + 2 + 1 + 2 arrivals; sync: rounds of 16 s
    assert script.server_steps_within("dn", SPEEDS, steps, 16.0) == 9
    assert script.server_steps_within("diloco", SPEEDS, steps, 16.0) == 1
    assert script.server_steps_within("diloco", SPEEDS, steps, 15.9) == 0
    dyn = script.method_local_steps("dn_dylu", SPEEDS, H)
    assert dyn.tolist() == dynamic_local_steps(SPEEDS, H).tolist() == [4, 2, 1, 2]
    assert script.server_steps_within("dn_dylu", SPEEDS, dyn, 8.0) == 8


def test_delayed_nesterov_round_with_dynamic_steps_equals_a_diloco_round(problem):
    dyn = dynamic_local_steps(SPEEDS, H)
    a = script.run_method("dn_dylu", problem, SPEEDS, H, time_budget=4.0)
    s = script.run_method("diloco", problem, SPEEDS, H, time_budget=4.0, local_steps=dyn)
    assert (a["server_updates"], a["worker_updates"], a["sim_time"]) == (4, 4, 4.0)
    assert (s["server_updates"], s["worker_updates"], s["sim_time"]) == (1, 4, 4.0)
    assert sorted(a["clients"]) == [0, 1, 2, 3]
    assert a["local_steps"] == [int(dyn[c]) for c in a["clients"]]  # dynamic local updates, per worker
    assert a["staleness"] == [0, 1, 2, 3]  # all sent version 0, applied one after another
    assert a["inner_steps"] == s["inner_steps"] == int(dyn.sum())

    leaves = zip(*(jax.tree.leaves(t) for t in (a["final_params"], s["final_params"], problem.params)))
    for x, y, x0 in leaves:
        x, y, x0 = np.asarray(x), np.asarray(y), np.asarray(x0)
        step = np.abs(y - x0).max()
        assert step > 1e-3  # every leaf moved (AdamW moves each by ~lr per step)
        assert float(np.abs(x - y).max()) < 1e-3 * float(step), x.shape  # equal up to float rounding (vmap of 4 vs 1 lane)

    # the curves: the initial model, then the round (sync) / the 4th arrival (async, evaluated every N = 4)
    assert a["eval_time"] == s["eval_time"] == [0.0, 4.0]
    assert all(np.isfinite(a["eval_val_loss"])) and all(np.isfinite(s["eval_val_loss"]))
    assert abs(a["eval_val_loss"][0] - np.log(256)) < 0.05  # an untrained byte model
    assert a["final_val_loss"] < a["eval_val_loss"][0] - 0.3  # one round of training lowered the loss
    assert abs(a["final_val_loss"] - s["final_val_loss"]) < 1e-3
