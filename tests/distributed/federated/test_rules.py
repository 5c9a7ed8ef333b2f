"""Server rules and staleness functions against the formulas of their papers, in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_lab.distributed import federated as fl

TAU = np.arange(12)


def test_staleness_functions_match_fedasync_formulas():
    np.testing.assert_allclose(fl.constant_staleness()(TAU), np.ones(12))
    np.testing.assert_allclose(fl.polynomial_staleness(0.5)(TAU), 1 / np.sqrt(1 + TAU), rtol=1e-6)  # FedBuff
    np.testing.assert_allclose(fl.polynomial_staleness(2.0)(TAU), (1 + TAU) ** -2.0, rtol=1e-6)
    hinge = np.where(TAU <= 4, 1.0, 1 / (10 * (TAU - 4) + 1))
    np.testing.assert_allclose(fl.hinge_staleness(10, 4)(TAU), hinge, rtol=1e-6)
    np.testing.assert_allclose(fl.staleness_function("hinge", a=10, b=4)(TAU), hinge, rtol=1e-6)


@pytest.fixture
def arrivals():
    rng = np.random.default_rng(0)
    theta = {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=(2,)).astype(np.float32)}
    stacked = {k: rng.normal(size=(4,) + v.shape).astype(np.float32) for k, v in theta.items()}
    stacked["w"][2] = np.nan  # a masked-out lane holds garbage: it must not leak
    extra = dict(mask=jnp.array([True, True, False, True]), num_examples=jnp.array([3.0, 1.0, 7.0, 4.0]),
                 staleness=jnp.array([0, 3, 1, 8]), elapsed_time=jnp.array([2.0, 6.0, 4.0, 2.0]))
    return theta, stacked, extra


def _apply(rule, theta, stacked, extra):
    upd, _ = rule.update({k: jnp.asarray(v) for k, v in stacked.items()}, rule.init(theta), theta, **extra)
    return {k: np.asarray(v, np.float64) for k, v in upd.items()}


def test_fedavg_is_the_example_weighted_mean_of_the_arrivals(arrivals):
    theta, stacked, extra = arrivals
    keep, n = [0, 1, 3], np.array([3.0, 1.0, 4.0])
    ref = {k: -0.5 * sum(w * stacked[k][i] for w, i in zip(n / n.sum(), keep)) for k in theta}
    got = _apply(fl.fedavg(0.5), theta, stacked, extra)
    for k in theta:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6)


def test_fedbuff_is_the_staleness_weighted_buffer_mean(arrivals):
    theta, stacked, extra = arrivals
    keep, s = [0, 1, 3], 1 / np.sqrt(1 + np.array([0, 3, 8]))
    ref = {k: -0.7 * sum(si * stacked[k][i] for si, i in zip(s, keep)) / 3 for k in theta}
    got = _apply(fl.fedbuff(0.7), theta, stacked, extra)
    for k in theta:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6)


def test_fedfix_is_the_official_unnormalized_aggregation_by_default(arrivals):
    # Accenture/Labs-Federated-Learning FL/server.py: agg_weights = ceil(tau_i / delta_t) * P, P = n / sum(n) over
    # all M clients ("ratio") or 1 / M ("uniform"); aggregation: new = g + lr_g * sum_i d_i (received_i - sent_i)
    theta, stacked, extra = arrivals
    theta64 = {k: v.astype(np.float64) for k, v in theta.items()}
    keep, period, total, m = [0, 1, 3], 2.0, 50.0, 10
    n, elapsed = np.array([3.0, 1.0, 4.0]), np.array([2.0, 6.0, 2.0])
    d = np.ceil(elapsed / period)  # windows in flight (1, 3, 1)
    for weighting, p in (("examples", n / total), ("uniform", np.full(3, 1 / m))):
        sent = [{k: theta64[k] for k in theta} for _ in keep]  # pseudo-gradient Delta_i = sent_i - received_i
        received = [{k: sent[j][k] - stacked[k][i] for k in theta} for j, i in enumerate(keep)]
        new = {k: theta64[k] + 0.5 * sum(d[j] * p[j] * (received[j][k] - sent[j][k]) for j in range(3)) for k in theta}
        rule = fl.fedfix(0.5, weighting=weighting, period=period, num_clients=m, total_examples=total)
        got = _apply(rule, theta, stacked, extra)
        for k in theta:
            np.testing.assert_allclose(theta64[k] + got[k], new[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs period"):
        fl.fedfix(total_examples=total)
    with pytest.raises(ValueError, match="needs total_examples"):
        fl.fedfix(period=period)
    with pytest.raises(ValueError, match="needs num_clients"):
        fl.fedfix(weighting="uniform", period=period)
    with pytest.raises(ValueError, match="period must be"):
        fl.fedfix(period=-1.0, total_examples=total)
    with pytest.raises(ValueError, match="normalize must be one of"):
        fl.fedfix(normalize="group")


def test_fedfix_window_normalized_weights_each_arrival_by_its_data_and_its_windows_in_flight(arrivals):
    theta, stacked, extra = arrivals
    keep, n, d = [0, 1, 3], np.array([3.0, 1.0, 4.0]), np.array([2.0, 6.0, 2.0])  # d: elapsed time (windows x period)
    for weighting, c in (("examples", n * d), ("uniform", d)):
        ref = {k: -0.5 * sum(w * stacked[k][i] for w, i in zip(c / c.sum(), keep)) for k in theta}
        got = _apply(fl.fedfix(0.5, weighting=weighting, normalize="window"), theta, stacked, extra)
        for k in theta:
            np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="fedfix needs elapsed_time"):
        _apply(fl.fedfix(normalize="window"), theta, stacked, {k: v for k, v in extra.items() if k != "elapsed_time"})
    with pytest.raises(ValueError, match="weighting must be one of"):
        fl.fedfix(weighting="time")


def _appfl_fedcompass(theta, locals_, staleness, num_clients, alpha=0.9, a=0.5):
    """APPFL's FedCompassAggregator.aggregate(local_models=..., staleness=...) (gradient_based=False)
    replayed in float64: accumulate alpha_t x_i, then (1 - sum alpha_t) theta + the sum."""
    acc, alpha_sum = {k: np.zeros_like(v) for k, v in theta.items()}, 0.0
    for x, tau in zip(locals_, staleness):
        alpha_t = alpha * (tau + 1) ** (-a) * (1.0 / num_clients)
        alpha_sum += alpha_t
        acc = {k: acc[k] + x[k] * alpha_t for k in theta}
    return {k: (1 - alpha_sum) * theta[k] + acc[k] for k in theta}


def test_fedcompass_is_the_official_mix_over_all_clients_by_default(arrivals):
    theta, stacked, extra = arrivals
    theta64 = {k: v.astype(np.float64) for k, v in theta.items()}
    keep, tau = [0, 1, 3], [0, 3, 8]
    # pseudo_gradient="current": Delta_i = theta - x_i, so the client models are theta - Delta_i
    locals_ = [{k: theta64[k] - stacked[k][i] for k in theta} for i in keep]
    for n in (10, 3):
        ref = _appfl_fedcompass(theta64, locals_, tau, n)
        got = _apply(fl.fedcompass(n), theta, stacked, extra)
        for k in theta:
            np.testing.assert_allclose(theta64[k] + got[k], ref[k], rtol=1e-5, atol=1e-6)
    ref = _appfl_fedcompass(theta64, locals_, tau, 10, alpha=0.5, a=1.0)
    got = _apply(fl.fedcompass(10, 0.5, "polynomial", a=1.0), theta, stacked, extra)
    for k in theta:
        np.testing.assert_allclose(theta64[k] + got[k], ref[k], rtol=1e-5, atol=1e-6)


def test_fedcompass_group_normalization_is_opt_in(arrivals):
    theta, stacked, extra = arrivals
    keep, n, s = [0, 1, 3], np.array([3.0, 1.0, 4.0]), 1 / np.sqrt(1 + np.array([0, 3, 8]))
    for weighting, c in (("examples", n), ("uniform", np.ones(3))):
        for alpha in (1.0, 0.9):
            ref = {k: -alpha * sum(ci * si * stacked[k][i] for ci, si, i in zip(c / c.sum(), s, keep)) for k in theta}
            got = _apply(fl.fedcompass(alpha=alpha, normalize="group", weighting=weighting), theta, stacked, extra)
            for k in theta:
                np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6)
    # 2 fresh arrivals of N = 10: the group-normalized step is N/2 = 5x the official one (5.6x at alpha 1)
    two = {k: v[:2] for k, v in stacked.items() if k == "b"}
    fresh = dict(mask=jnp.array([True, True]), staleness=jnp.array([0, 0]))
    official = _apply(fl.fedcompass(10), theta, two, fresh)["b"]
    grouped = _apply(fl.fedcompass(normalize="group", alpha=1.0), theta, two, fresh)["b"]
    np.testing.assert_allclose(grouped, official / 0.18, rtol=1e-5)


def test_fedcompass_alpha_and_num_clients_can_be_injected(arrivals):
    theta, stacked, extra = arrivals
    rule = optax.inject_hyperparams(fl.fedcompass)(num_clients=10, alpha=0.5)
    state = rule.init(theta)
    upd, state = jax.jit(lambda s: rule.update({k: jnp.asarray(v) for k, v in stacked.items()}, s, theta, **extra))(state)
    ref = _apply(fl.fedcompass(10, 0.5), theta, stacked, extra)
    for k in theta:
        np.testing.assert_allclose(upd[k], ref[k], rtol=1e-6, atol=1e-7)


def test_fedcompass_rejects_bad_arguments():
    with pytest.raises(ValueError, match="needs num_clients, the number of all clients N; got None"):
        fl.fedcompass()
    with pytest.raises(ValueError, match="normalize must be one of .*got 'all'"):
        fl.fedcompass(10, normalize="all")
    with pytest.raises(ValueError, match="weighting='examples' needs normalize='group'"):
        fl.fedcompass(10, weighting="examples")
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\], got 1.5"):
        fl.fedcompass(10, alpha=1.5)
    with pytest.raises(ValueError, match="num_clients must be >= 1, got 0"):
        fl.fedcompass(0)
    with pytest.raises(TypeError, match="num_clients must be an int, got 2.5"):
        fl.fedcompass(2.5)
    with pytest.raises(TypeError, match="alpha must be a number, got '0.9'"):
        fl.fedcompass(10, alpha="0.9")


def test_fedasync_mixes_the_client_model_into_the_server_model():
    rng = np.random.default_rng(1)
    theta = {"w": rng.normal(size=(3,)).astype(np.float32)}
    client = {"w": rng.normal(size=(3,)).astype(np.float32)}
    pg = {"w": jnp.asarray(theta["w"] - client["w"])[None]}  # pseudo_gradient="current"
    for name, kw, s in [("constant", {}, 1.0), ("polynomial", {"a": 0.5}, 1 / np.sqrt(6)),
                        ("hinge", {"a": 2.0, "b": 3.0}, 1 / (2 * 2 + 1))]:
        rule = fl.fedasync(0.6, name, **kw)
        upd, _ = rule.update(pg, rule.init(theta), theta, staleness=jnp.array([5]), mask=jnp.array([True]))
        a = 0.6 * s
        np.testing.assert_allclose(theta["w"] + upd["w"], (1 - a) * theta["w"] + a * client["w"], rtol=1e-5)


def test_fedasync_alpha_schedule_follows_the_server_step():
    rule = fl.fedasync(optax.linear_schedule(0.8, 0.2, 3), "constant")
    theta = {"w": jnp.ones(())}
    state = rule.init(theta)
    got = []
    for _ in range(4):
        upd, state = rule.update({"w": jnp.ones((1,))}, state, theta)
        got.append(-float(upd["w"]))
    np.testing.assert_allclose(got, [0.8, 0.6, 0.4, 0.2], rtol=1e-6)


def test_server_momentum_and_adam_chain_after_the_aggregation(arrivals):
    theta, stacked, extra = arrivals
    keep, n = [0, 1, 3], np.array([3.0, 1.0, 4.0])
    agg = {k: sum(w * stacked[k][i] for w, i in zip(n / n.sum(), keep)) for k in theta}
    # FedAvgM: m <- d + 0.9 m, update = -0.1 m, three server steps of the same arrivals
    rule = fl.fedavg(0.1, momentum=0.9)
    state, m = rule.init(theta), {k: 0.0 for k in theta}
    sj = {k: jnp.asarray(v) for k, v in stacked.items()}
    for _ in range(3):
        upd, state = rule.update(sj, state, theta, **extra)
        m = {k: agg[k] + 0.9 * m[k] for k in theta}
        for k in theta:
            np.testing.assert_allclose(upd[k], -0.1 * m[k], rtol=1e-5, atol=1e-6)
    # FedAdam: optax.adam over the aggregated pseudo-gradient
    fedadam = optax.chain(fl.scale_by_fedavg(), optax.adam(0.01))
    got = _apply(fedadam, theta, stacked, extra)
    adam = optax.adam(0.01)
    ref, _ = adam.update({k: jnp.asarray(v, jnp.float32) for k, v in agg.items()}, adam.init(theta), theta)
    for k in theta:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-7)


def test_no_arrival_gives_a_zero_update(arrivals):
    theta, stacked, extra = arrivals
    extra = dict(extra, mask=jnp.zeros((4,), bool))
    for rule in (fl.fedavg(), fl.fedbuff(), fl.fedfix(period=1.0, total_examples=9.0), fl.fedfix(normalize="window"),
                 fl.fedcompass(10), fl.fedcompass(normalize="group"), fl.fedasync(0.5)):
        for v in _apply(rule, theta, stacked, extra).values():
            np.testing.assert_array_equal(v, 0.0)


def test_lognormal_speeds_are_seeded_and_clipped_to_the_spread():
    a = fl.client_speeds(500, "lognormal", sigma=2.0, max_spread=10.0, seed=3)
    np.testing.assert_array_equal(a, fl.client_speeds(500, "lognormal", sigma=2.0, max_spread=10.0, seed=3))
    assert not np.array_equal(a, fl.client_speeds(500, "lognormal", sigma=2.0, max_spread=10.0, seed=4))
    assert a.max() / a.min() == pytest.approx(10.0)  # sigma 2 saturates both ends
    z = np.random.default_rng(3).standard_normal(500)
    np.testing.assert_allclose(a, np.exp(np.clip(2.0 * z, -np.log(10) / 2, np.log(10) / 2)))
    np.testing.assert_array_equal(fl.client_speeds(4), np.ones(4))
    np.testing.assert_array_equal(fl.client_speeds(3, [1, 2.5, 4]), [1, 2.5, 4])
