"""Bad input is a ValueError naming the bad value, raised before anything is compiled."""

import numpy as np
import optax
import pytest

from jaxopt_lab.distributed import federated as fl
from tests.distributed.federated import problem as pb

_, DATA, _, _ = pb.make_clients([2, 3, 4])


def local(params, client_id, num_steps, key):
    return params


def sim(trigger=fl.SyncRound(2), rule=None, **kw):
    kw.setdefault("num_clients", 3)
    return fl.FederatedSimulator(local, rule or fl.fedavg(), trigger, **kw)


CASES = [
    (lambda: fl.Buffer(0), r"buffer size K must be >= 1, got 0"),
    (lambda: fl.Buffer(-2), r"buffer size K must be >= 1, got -2"),
    (lambda: fl.SyncRound(0), r"clients_per_round must be >= 1, got 0"),
    (lambda: fl.TimeWindow(0.0), r"window period must be > 0, got 0.0"),
    (lambda: fl.Compass(0, 4), r"q_min must be >= 1, got 0"),
    (lambda: fl.Compass(5, 2), r"q_max \(2\) must be >= q_min \(5\)"),
    (lambda: sim(fl.Buffer(3), concurrency=2), r"concurrency \(2\) must be >= the buffer size K \(3\)"),
    (lambda: sim(fl.Buffer(1), concurrency=4), r"concurrency \(4\) must be <= num_clients \(3\)"),
    (lambda: sim(fl.SyncRound(4)), r"clients_per_round \(4\) must be <= num_clients \(3\)"),
    (lambda: sim(fl.SyncRound(2), concurrency=3), r"SyncRound\(2\) keeps m = 2 clients in flight; concurrency=3"),
    (lambda: sim(fl.Buffer(1), concurrency=3, lane_groups=[1, 2, 0]), r"lane_groups size must be >= 1, got 0"),
    (lambda: fl.fedasync(alpha=0.0), r"alpha must be in \(0, 1\], got 0.0"),
    (lambda: fl.fedasync(alpha=1.5), r"alpha must be in \(0, 1\], got 1.5"),
    (lambda: fl.fedasync(alpha=np.float32(2.0)), r"alpha must be in \(0, 1\], got 2.0"),
    (lambda: sim(dropout=-0.1), r"dropout probability must be >= 0 and <= 1, got -0.1 for client 0"),
    (lambda: sim(dropout=[0.0, 0.2, 1.5]), r"dropout probability must be >= 0 and <= 1, got 1.5 for client 2"),
    (lambda: sim(dropout=[0.1, 0.1]), r"dropout probability must have one entry per client \(3\), got shape \(2,\)"),
    (lambda: sim(speeds=[1.0, 2.0]), r"speeds must have one entry per client \(3\), got shape \(2,\)"),
    (lambda: sim(speeds=[1.0, 0.0, 2.0]), r"speeds must be > 0, got 0.0 for client 1"),
    (lambda: sim(speeds="gaussian"), r"speeds must be one of .*got 'gaussian'"),
    (lambda: sim(speeds="lognormal", speed_sigma=-1.0), r"speed_sigma must be >= 0, got -1.0"),
    (lambda: sim(speeds="lognormal", max_speed_spread=0.5), r"max_speed_spread must be >= 1, got 0.5"),
    (lambda: sim(local_steps=-1), r"local_steps must be >= 0, got -1 for client 0"),
    (lambda: sim(local_steps=[1, 2]), r"local_steps must have one entry per client \(3\)"),
    (lambda: sim(local_steps=[1, 2.5, 3]), r"local_steps must hold integers"),
    (lambda: sim(num_examples=[3, -1, 2]), r"num_examples must be >= 0, got -1.0 for client 1"),
    (lambda: sim(pseudo_gradient="server"), r"pseudo_gradient must be one of .*got 'server'"),
    (lambda: sim(step_time=0.0), r"step_time must be > 0, got 0.0"),
    (lambda: sim(time_jitter=-0.5), r"time_jitter must be >= 0, got -0.5"),
    (lambda: sim(latency=-1.0), r"latency must be >= 0, got -1.0"),
    (lambda: sim(num_clients=0), r"num_clients must be >= 1, got 0"),
    (lambda: sim(fl.Compass(1, 3), local_steps=[1, 2, 3]), r"Compass sets the local step counts itself"),
    (lambda: sim(lane_groups=[1, 3]), r"lane_groups sizes must be >= 1 and sum to the number of lanes \(2\), got \(1, 3\)"),
    (lambda: sim(lane_groups=3), r"lane_groups \(3\) must be <= the number of lanes \(2\)"),
    (lambda: sim(trigger="buffer"), r"trigger must be SyncRound, Buffer, TimeWindow or Compass, got 'buffer'"),
    (lambda: sim(rule=optax.sgd), r"rule must be an optax GradientTransformation"),
    (lambda: fl.fedbuff(staleness="exponential"), r"staleness must be one of .*got 'exponential'"),
    (lambda: fl.fedbuff(staleness="polynomial", a=-1.0), r"staleness exponent a must be >= 0, got -1.0"),
    (lambda: fl.fedasync(0.5, "hinge", a=1.0, b=-2.0), r"hinge threshold b must be >= 0, got -2.0"),
    (lambda: fl.fedavg(weighting="median"), r"weighting must be one of .*got 'median'"),
    (lambda: fl.make_local_update(pb.loss_fn, DATA, optax.sgd(0.1), batch_size=0), r"batch_size must be >= 1, got 0"),
    (lambda: fl.make_local_update(pb.loss_fn, DATA, optax.sgd(0.1), 2, prox_mu=-0.1), r"prox_mu must be >= 0, got -0.1"),
    (lambda: fl.fedprox_local_update(pb.loss_fn, DATA, optax.sgd(0.1), 2, mu=0.0), r"FedProx mu must be a number > 0, got 0.0"),
    (lambda: fl.client_speeds(3, "lognormal", max_spread=0.9), r"max_speed_spread must be >= 1, got 0.9"),
    (lambda: fl.epoch_steps([3, 4], batch_size=0), r"batch_size must be >= 1, got 0"),
    (lambda: fl.pad_clients(np.zeros((3, 2)), np.zeros(4), [[0], [1]]), r"x and y must hold the same number of examples"),
    (lambda: fl.pad_clients(np.zeros((3, 2)), np.zeros(3), [[0], [5]]), r"client 1 has an example index outside \[0, 3\)"),
]


@pytest.mark.parametrize("make, message", CASES, ids=[m for _, m in CASES])
def test_bad_input_is_a_value_error_naming_the_value(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_run_checks_its_arguments_before_compiling():
    s = sim()
    state = s.init(pb.init_params())
    with pytest.raises(ValueError, match=r"num_steps must be >= 1, got 0"):
        s.run(state, 0)
    with pytest.raises(ValueError, match=r"eval_every must be >= 1, got 0"):
        s.run(state, 3, eval_every=0)
    assert s._run._cache_size() == 0  # nothing was compiled
