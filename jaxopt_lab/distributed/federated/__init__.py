r"""Federated and asynchronous training: a seeded event-driven simulator and server rules as optax transforms.

The simulator (:class:`FederatedSimulator`) draws each client's compute speed
from a seeded distribution, keeps an event queue of in-flight clients in JAX
arrays, applies results in arrival order and records the staleness and the
simulated wall-clock of every update; many server steps run inside one compiled
``lax.scan``. Local training is your pure function
``local_update(params, client_id, num_steps, key) -> params``, vmapped over the
clients a server step consumes. A *trigger* decides when the server steps
(:class:`SyncRound`, :class:`Buffer`, :func:`every_arrival`, :class:`TimeWindow`,
:class:`Compass`); the *server rule* is an ``optax.GradientTransformationExtraArgs``
over the stacked pseudo-gradients :math:`\theta_\text{server} - \theta_\text{client}`
(extra args ``mask``, ``num_examples``, ``staleness``, ...), so server momentum or
Adam is one ``optax.chain`` away.

=============  ===================================  =========================================
method         rule                                 trigger
=============  ===================================  =========================================
FedAvg(M)      ``fedavg(lr, momentum)``             ``SyncRound(m)``
FedProx        ``fedprox()`` + ``prox_mu`` clients  ``SyncRound(m)``
FedAdam        ``chain(scale_by_fedavg(), adam)``   ``SyncRound(m)``
FedAsync       ``fedasync(alpha, "hinge", a, b)``   ``every_arrival()``, ``pseudo_gradient="current"``
FedBuff        ``fedbuff(lr)``                      ``Buffer(K)``, ``concurrency >= K``
FedFix         ``fedfix(lr, period=dt,              ``TimeWindow(dt)``
               total_examples=n)``
FedCompass     ``fedcompass(N, alpha=0.9)``         ``Compass(q_min, q_max)``, ``pseudo_gradient="current"``
FedAMD         ``fedamd(lr, num_clients=N,          ``SyncRound(m)`` (any), ``client_context=fedamd_context``
               initial_anchors=...)`` +
               ``fedamd_local_update`` clients
FedSpeed       ``fedspeed(num_clients=N)`` +        ``SyncRound(m)``, ``client_context=fedspeed_context``
               ``fedspeed_local_update`` clients
FedLEx         ``fedlex(fedlex_guidance(...))`` +   ``SyncRound(m)``, ``client_context=fedlex_context``
               ``fedlex_local_update`` clients
FedBR          ``fedbr_server(D)`` +                ``SyncRound(m)``, ``client_context=fedbr_context``
               ``fedbr_context_client`` clients
WAFL           ``fedavg()`` + clients               ``SyncRound(m)``
               ``wafl_local_update(gamma)``
FedZO          ``fedzo()`` + clients                ``SyncRound(m)``, ``client_context=fedzo_context``
               ``fedzo_local_update(q, mu)``
FZooS          ``fzoos(num_clients=N)`` +           ``SyncRound(m)``, ``client_context=fzoos_context``
               ``fzoos_local_update`` clients
Async Local-   ``delayed_nesterov(lr, N, beta)``    ``every_arrival()``, ``local_steps=``
SGD (DN+DyLU)                                       ``dynamic_local_steps(speeds, H)``
=============  ===================================  =========================================

Example (100 clients on digits, Dirichlet label skew, heterogeneous speeds)::

    import jax, optax
    from flax import nnx
    from jaxopt_lab.data import load_digits, dirichlet_partition
    from jaxopt_lab.models import MLP
    from jaxopt_lab.distributed import federated as fl

    data = load_digits()
    part = dirichlet_partition(data.y_train, num_clients=100, alpha=0.3, seed=1)
    clients = fl.pad_clients(data.x_train, data.y_train, part)
    graphdef, params = nnx.split(MLP(64, (128,), 10, rngs=nnx.Rngs(0)), nnx.Param)

    def loss_fn(p, x, y):  # per-example losses
        return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, p)(x), y)

    local = fl.make_local_update(loss_fn, clients, optax.sgd(0.1), batch_size=16)
    sim = fl.FederatedSimulator(
        local, fl.fedbuff(learning_rate=1.0), fl.Buffer(10),
        num_clients=100, concurrency=20, num_examples=part.sizes,
        local_steps=fl.epoch_steps(part.sizes, 16),          # one local epoch
        speeds="lognormal", speed_sigma=1.0, max_speed_spread=10.0)
    state = sim.init(params, seed=0)
    state, records = sim.run(state, num_steps=200)          # one compiled scan
    records.time[-1], records.staleness                      # sim clock, per-update staleness

``state`` is a NamedTuple of arrays: save it with orbax and ``sim.run`` the
restored state to continue bit-identically.

Per-client step counts are any int array, e.g. asynchronous Local-SGD's
"dynamic local updates" (worker w runs :math:`\lfloor v_w / \max v \cdot H \rfloor`
steps) with the delayed Nesterov server rule::

    speeds = fl.client_speeds(4, "lognormal", sigma=0.5, seed=0)
    sim = fl.FederatedSimulator(
        local, fl.delayed_nesterov(0.7, buffer_size=4), fl.every_arrival(), num_clients=4,
        speeds=speeds, local_steps=fl.dynamic_local_steps(speeds, 50))

A ``local_update`` for any model (an LM on text, ...) only has to be pure and
vmappable: ``num_steps`` is a traced int, so loop with
``jax.lax.fori_loop(0, num_steps, ...)`` (under vmap it runs to the largest
count of the batch, keeping finished lanes unchanged).
"""

from jaxopt_lab.distributed.federated.aggregate import AggregateState, aggregate_pseudo_gradients
from jaxopt_lab.distributed.federated.curriculum import Curriculum, curriculum, pacing_fraction
from jaxopt_lab.distributed.federated.delayed_nesterov import (
    DelayedNesterovState,
    delayed_nesterov,
    dynamic_local_steps,
    scale_by_delayed_nesterov,
)
from jaxopt_lab.distributed.federated.fedasync import ScaleByFedAsyncState, fedasync, scale_by_fedasync
from jaxopt_lab.distributed.federated.fedamd import (
    FedAMDState,
    fedamd,
    fedamd_context,
    fedamd_initial_anchors,
    fedamd_is_anchor,
    fedamd_local_update,
    scale_by_fedamd,
)
from jaxopt_lab.distributed.federated.fedavg import fedavg, scale_by_fedavg
from jaxopt_lab.distributed.federated.fedbr import (
    FedBRServerState,
    fedbr_context,
    fedbr_context_client,
    fedbr_discriminator_apply,
    fedbr_discriminator_init,
    fedbr_init,
    fedbr_local_update,
    fedbr_pseudo_data,
    fedbr_server,
)
from jaxopt_lab.distributed.federated.fedbuff import fedbuff, scale_by_fedbuff
from jaxopt_lab.distributed.federated.fedcompass import fedcompass, scale_by_fedcompass
from jaxopt_lab.distributed.federated.fedfix import fedfix, scale_by_fedfix
from jaxopt_lab.distributed.federated.fedlex import (
    FedLExState,
    fedlex,
    fedlex_context,
    fedlex_guidance,
    fedlex_local_update,
    guidance_from_models,
    scale_by_fedlex,
)
from jaxopt_lab.distributed.federated.fedprox import fedprox, fedprox_local_update
from jaxopt_lab.distributed.federated.fedspeed import (
    FedSpeedState,
    fedspeed,
    fedspeed_context,
    fedspeed_local_update,
    scale_by_fedspeed,
)
from jaxopt_lab.distributed.federated.fedzo import (
    QueryCountState,
    client_objective,
    count_queries,
    fedzo,
    fedzo_context,
    fedzo_local_update,
    query_count,
    random_directions,
)
from jaxopt_lab.distributed.federated.fzoos import (
    FZooSState,
    fzoos,
    fzoos_context,
    fzoos_local_update,
    gp_surrogate_gradient,
    gradient_uncertainty,
    scale_by_fzoos,
)
from jaxopt_lab.distributed.federated.local import ClientData, epoch_steps, make_local_update, pad_clients
from jaxopt_lab.distributed.federated.simulator import FederatedSimulator, SimulatorState, SlotTable, StepRecord
from jaxopt_lab.distributed.federated.speeds import client_speeds
from jaxopt_lab.distributed.federated.staleness import (
    constant_staleness,
    hinge_staleness,
    polynomial_staleness,
    staleness_function,
)
from jaxopt_lab.distributed.federated.triggers import Buffer, Compass, SyncRound, TimeWindow, every_arrival
from jaxopt_lab.distributed.federated.wafl import wafl_local_update, wasserstein_perturb

__all__ = [
    "AggregateState",
    "Buffer",
    "ClientData",
    "Compass",
    "Curriculum",
    "DelayedNesterovState",
    "FZooSState",
    "FedAMDState",
    "FedBRServerState",
    "FedLExState",
    "FedSpeedState",
    "FederatedSimulator",
    "QueryCountState",
    "ScaleByFedAsyncState",
    "SimulatorState",
    "SlotTable",
    "StepRecord",
    "SyncRound",
    "TimeWindow",
    "aggregate_pseudo_gradients",
    "client_objective",
    "client_speeds",
    "constant_staleness",
    "curriculum",
    "count_queries",
    "delayed_nesterov",
    "dynamic_local_steps",
    "epoch_steps",
    "every_arrival",
    "fedamd",
    "fedamd_context",
    "fedamd_initial_anchors",
    "fedamd_is_anchor",
    "fedamd_local_update",
    "fedasync",
    "fedavg",
    "fedbr_context",
    "fedbr_context_client",
    "fedbr_discriminator_apply",
    "fedbr_discriminator_init",
    "fedbr_init",
    "fedbr_local_update",
    "fedbr_pseudo_data",
    "fedbr_server",
    "fedbuff",
    "fedcompass",
    "fedfix",
    "fedlex",
    "fedlex_context",
    "fedlex_guidance",
    "fedlex_local_update",
    "guidance_from_models",
    "fedprox",
    "fedprox_local_update",
    "fedspeed",
    "fedspeed_context",
    "fedspeed_local_update",
    "fedzo",
    "fedzo_context",
    "fedzo_local_update",
    "fzoos",
    "fzoos_context",
    "fzoos_local_update",
    "gp_surrogate_gradient",
    "gradient_uncertainty",
    "hinge_staleness",
    "make_local_update",
    "pacing_fraction",
    "pad_clients",
    "polynomial_staleness",
    "query_count",
    "random_directions",
    "scale_by_delayed_nesterov",
    "scale_by_fedamd",
    "scale_by_fedasync",
    "scale_by_fedavg",
    "scale_by_fedbuff",
    "scale_by_fedcompass",
    "scale_by_fedfix",
    "scale_by_fedlex",
    "scale_by_fedspeed",
    "scale_by_fzoos",
    "staleness_function",
    "wafl_local_update",
    "wasserstein_perturb",
]
