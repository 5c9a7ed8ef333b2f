"""Run a federated-simulation config: several methods on one client population, side by side.

A federated config (``experiments/fed_digits.toml``) is recognized by its
``[federated]`` table; ``jaxopt-lab run`` hands it here. Sections::

    [run]              name, seed, out_dir
    [federated]        the population and the budget, shared by every method:
                       num_clients, dirichlet_alpha, partition_seed, test_fraction,
                       hidden, batch_size, local_epochs, client_learning_rate, prox_mu,
                       speeds, speed_sigma, max_speed_spread, speed_seed, step_time,
                       time_jitter, dropout, sim_time, target_accuracy, chunk_steps,
                       num_seeds (simulation seeds run.seed, run.seed + 1, ...: the
                       client sampling, jitter, shuffles; data split, speeds and the
                       initial model stay fixed), checkpoint_every (server steps between
                       checkpoints, taken at the end of a chunk), checkpoint_keep
    [methods.NAME]     rule = fedavg | fedprox | fedbuff | fedasync | fedfix | fedcompass
                       | fedspeed | fedlex | local_scaling | fedbr (these four bring their own client:
                       lamb, rho, clip_norm | explore_fraction, explore_epochs, normalization |
                       scaling, scaling_beta, scaling_alpha | fedbr_mu, fedbr_lam, decorr,
                       num_pseudo), client_learning_rate; the plain
                       client of the other rules takes prox_mu (overrides [federated]'s),
                       curriculum = curriculum | anti | random, pacing, pace_a, pace_b,
                       trigger = sync | buffer | every_arrival | window | compass,
                       the trigger's arguments (clients_per_round, buffer_size,
                       concurrency, period, q_min, q_max), the rule's arguments
                       (learning_rate, momentum, alpha, staleness, a, b, weighting,
                       normalize; fedcompass gets num_clients from [federated], fedfix
                       also its period and the clients' total example count),
                       pseudo_gradient, eval_every (server steps between evaluations)

Every method runs until ``sim_time`` simulated seconds, evaluating test
accuracy inside the compiled scan every ``eval_every`` server steps. The run
directory gets ``config.toml``, ``NAME/metrics.jsonl`` (step, version,
sim_time, client_updates, mean staleness, eval_loss, eval_accuracy),
``accuracy.png`` (test accuracy against simulated wall-clock and against client
updates) and ``summary.md`` (time and updates to ``target_accuracy``).
Unknown sections or keys are a ConfigError naming them.

Each method's seeds are checkpointed (orbax: the simulator state and the host-side counters,
``NAME/seed_<s>/checkpoints/<server step>``) every ``checkpoint_every`` server steps and when
they end, and the evaluation records are appended to ``NAME/metrics.jsonl`` as they come, so
``jaxopt-lab resume RUN_DIR`` continues a killed run: finished seeds and methods are read back,
an interrupted seed continues from its last checkpoint, and the result equals an uninterrupted
run's, record for record. A NaN or inf evaluation loss or server parameter stops the run (rc 1)
naming the method, seed, step and last checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from jaxopt_lab.experiment.config import ConfigError, _suggest, apply_overrides, check_run_name, read_toml
from jaxopt_lab.experiment.trainer import NonFiniteLossError, RunDirError, check_not_a_file

FEDERATED_DEFAULTS: dict[str, Any] = {
    "num_clients": 100,
    "dirichlet_alpha": 0.3,
    "partition_seed": 1,
    "test_fraction": 0.2,
    "hidden": [128],
    "batch_size": 16,
    "local_epochs": 1,
    "client_learning_rate": 0.1,
    "prox_mu": 0.0,
    "speeds": "lognormal",
    "speed_sigma": 1.0,
    "max_speed_spread": 10.0,
    "speed_seed": 0,
    "step_time": 1.0,
    "time_jitter": 0.0,
    "dropout": 0.0,
    "sim_time": 300.0,
    "target_accuracy": 0.9,
    "chunk_steps": 50,
    "num_seeds": 1,
    "checkpoint_every": 200,
    "checkpoint_keep": 2,
}
RUN_DEFAULTS: dict[str, Any] = {"name": "federated", "seed": 0, "out_dir": "runs"}
TRIGGER_KEYS = {
    "sync": ("clients_per_round",),
    "buffer": ("buffer_size", "concurrency"),
    "every_arrival": ("concurrency",),
    "window": ("period", "concurrency"),
    "compass": ("q_min", "q_max", "concurrency"),
}
METHOD_KEYS = ("rule", "trigger", "pseudo_gradient", "eval_every", "client_learning_rate")
RULE_KEYS = ("learning_rate", "momentum", "nesterov", "alpha", "staleness", "a", "b", "weighting", "normalize")
# the plain client's options (any rule without a client of its own): FedProx term, curriculum
PLAIN_CLIENT_KEYS = ("prox_mu", "curriculum", "pacing", "pace_a", "pace_b")
# rules that come with their own client (and client context), and that client's options
CLIENT_RULES = {
    "fedspeed": ("lamb", "rho", "clip_norm"),
    "fedlex": ("explore_fraction", "explore_epochs", "normalization"),
    "local_scaling": ("scaling", "scaling_beta", "scaling_alpha"),
    "fedbr": ("fedbr_mu", "fedbr_lam", "decorr", "num_pseudo"),
}


def is_federated(raw: Mapping[str, Any]) -> bool:
    """Whether a raw TOML config is a federated-simulation config."""
    return "federated" in raw


@dataclasses.dataclass
class SeedRun:
    seed: int
    records: list[dict[str, Any]]  # one per evaluation
    server_steps: int
    client_updates: int
    mean_staleness: float
    wall_seconds: float = 0.0  # compute time of this seed, summed over the processes that ran it


@dataclasses.dataclass
class MethodResult:
    name: str
    runs: list[SeedRun]  # one per simulation seed
    wall_seconds: float


def _rules():
    from jaxopt_lab.distributed import federated as fl

    return {"fedavg": fl.fedavg, "fedprox": fl.fedprox, "fedbuff": fl.fedbuff, "fedasync": fl.fedasync,
            "fedfix": fl.fedfix, "fedcompass": fl.fedcompass, "fedspeed": _fedspeed_rule, "fedlex": _fedlex_rule,
            "local_scaling": _local_scaling_rule, "fedbr": _fedbr_rule}


# the server-rule arguments a config may give the rules that come with their own client
def _fedspeed_rule(learning_rate=1.0, weighting="uniform"):
    raise NotImplementedError  # signature only: build_method builds fl.fedspeed with num_clients


def _fedlex_rule(learning_rate=1.0, momentum=None, weighting="examples"):
    raise NotImplementedError  # signature only: build_method builds fl.fedlex with the explored guidance


def _local_scaling_rule(learning_rate=1.0, weighting="examples"):
    raise NotImplementedError  # signature only: build_method builds local_scaling_server


def _fedbr_rule(learning_rate=1.0, weighting="uniform"):
    raise NotImplementedError  # signature only: build_method builds fedbr_server with the discriminator


def validate(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Checks sections, keys and values; returns the resolved config (defaults filled in)."""
    for section in raw:
        if section not in ("run", "federated", "methods"):
            raise ConfigError(f"unknown config section [{section}] in a federated config"
                              f"{_suggest(section, ('run', 'federated', 'methods'))}")
    out = {"run": dict(RUN_DEFAULTS), "federated": dict(FEDERATED_DEFAULTS), "methods": {}}
    for section, defaults in (("run", RUN_DEFAULTS), ("federated", FEDERATED_DEFAULTS)):
        body = raw.get(section, {})
        if not isinstance(body, Mapping):
            raise ConfigError(f"[{section}] must be a table, got {body!r}")
        for key, value in body.items():
            if key not in defaults:
                raise ConfigError(f"unknown config key {section}.{key}{_suggest(key, defaults)}")
            default = defaults[key]
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            ok = (isinstance(value, type(default)) and not (isinstance(value, bool) and not isinstance(default, bool)))
            if key == "speeds":
                ok = isinstance(value, (str, list))
            if not ok:
                raise ConfigError(f"{section}.{key} must be {type(default).__name__}, got {value!r}")
            out[section][key] = value
    check_run_name(out["run"]["name"])
    if not out["run"]["out_dir"].strip():
        raise ConfigError(f"run.out_dir must not be empty, got {out['run']['out_dir']!r}")
    fed = out["federated"]
    for key in ("sim_time", "client_learning_rate", "step_time"):
        if not fed[key] > 0:
            raise ConfigError(f"federated.{key} must be > 0, got {fed[key]!r}")
    if not 0 < fed["target_accuracy"] <= 1:
        raise ConfigError(f"federated.target_accuracy must be in (0, 1], got {fed['target_accuracy']!r}")
    for key in ("num_clients", "batch_size", "local_epochs", "chunk_steps", "num_seeds", "checkpoint_every",
                "checkpoint_keep"):
        if fed[key] < 1:
            raise ConfigError(f"federated.{key} must be >= 1, got {fed[key]!r}")
    for key, ok, bounds in (
        ("dirichlet_alpha", fed["dirichlet_alpha"] > 0, "> 0"),
        ("test_fraction", 0 < fed["test_fraction"] < 1, "in (0, 1)"),
        ("prox_mu", fed["prox_mu"] >= 0, ">= 0"),
        ("speed_sigma", fed["speed_sigma"] >= 0, ">= 0"),
        ("max_speed_spread", fed["max_speed_spread"] >= 1, ">= 1"),
        ("time_jitter", fed["time_jitter"] >= 0, ">= 0"),
        ("dropout", 0 <= fed["dropout"] <= 1, "in [0, 1]"),
    ):
        if not ok or (isinstance(fed[key], float) and not np.isfinite(fed[key])):
            raise ConfigError(f"federated.{key} must be {bounds}, got {fed[key]!r}")
    hidden = fed["hidden"]
    if not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden):
        raise ConfigError(f"federated.hidden must be a list of ints >= 1, got {hidden!r}")
    methods = raw.get("methods")
    if not isinstance(methods, Mapping) or not methods:
        raise ConfigError("a federated config needs one or more [methods.NAME] tables")
    rules = _rules()
    for name, body in methods.items():
        if not isinstance(body, Mapping):
            raise ConfigError(f"[methods.{name}] must be a table, got {body!r}")
        rule, trigger = body.get("rule"), body.get("trigger")
        if rule not in rules:
            raise ConfigError(f"methods.{name}.rule must be one of {', '.join(rules)}, got {rule!r}")
        if trigger not in TRIGGER_KEYS:
            raise ConfigError(f"methods.{name}.trigger must be one of {', '.join(TRIGGER_KEYS)}, got {trigger!r}")
        valid = set(METHOD_KEYS) | set(TRIGGER_KEYS[trigger]) | set(RULE_KEYS)
        valid |= set(CLIENT_RULES[rule]) if rule in CLIENT_RULES else set(PLAIN_CLIENT_KEYS)
        takes = set(inspect.signature(rules[rule]).parameters)
        for key in body:
            if key not in valid:
                raise ConfigError(f"unknown config key methods.{name}.{key} for trigger {trigger!r}{_suggest(key, valid)}")
            if key in RULE_KEYS and key not in takes and not (key in ("a", "b") and "staleness_kwargs" in takes):
                raise ConfigError(f"methods.{name}.{key} is not an argument of rule {rule!r}")
        momentum = body.get("momentum", 0.0)
        if isinstance(momentum, (int, float)) and not isinstance(momentum, bool) and not 0 <= momentum < 1:
            raise ConfigError(f"methods.{name}.momentum must be in [0, 1), got {momentum!r}")
        lr = body.get("learning_rate", 1.0)
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (np.isfinite(lr) and lr > 0):
            raise ConfigError(f"methods.{name}.learning_rate must be a number > 0, got {lr!r}")
        out["methods"][name] = dict(body)
    return out


def build_method(cfg: Mapping[str, Any], method: Mapping[str, Any], setup: dict[str, Any]):
    """The simulator of one method (raises ValueError for bad values before any compute)."""
    from jaxopt_lab.distributed import federated as fl

    fed = cfg["federated"]
    kind = method["trigger"]
    args = {k: method[k] for k in TRIGGER_KEYS[kind] if k in method}
    concurrency = args.pop("concurrency", None)
    if kind == "sync":
        trigger = fl.SyncRound(args.get("clients_per_round", 10))
    elif kind == "buffer":
        trigger = fl.Buffer(args.get("buffer_size", 10))
    elif kind == "every_arrival":
        trigger = fl.every_arrival()
    elif kind == "window":
        if "period" not in args:
            raise ConfigError("a window trigger needs period (simulated seconds)")
        trigger = fl.TimeWindow(float(args["period"]))
    else:
        trigger = fl.Compass(args.get("q_min", 1), args.get("q_max", 4))
    rule_args = {k: method[k] for k in RULE_KEYS if k in method}
    if method["rule"] == "fedcompass":  # the official alpha_i = alpha s(tau_i) / N needs N
        rule_args["num_clients"] = fed["num_clients"]
    if method["rule"] == "fedfix" and method.get("normalize", "clients") == "clients":
        # the official unnormalized weights p_i d_i need the window, N and all clients' examples
        rule_args.update(period=method.get("period"), num_clients=fed["num_clients"],
                         total_examples=float(np.sum(setup["sizes"])))
    local, rule, context = _build_client(cfg, method, setup, rule_args)
    if rule is None:
        rule = _rules()[method["rule"]](**rule_args)
    # FedAsync and FedCompass mix client models into the *current* server model (official code)
    pseudo = method.get("pseudo_gradient", "current" if method["rule"] in ("fedasync", "fedcompass") else "dispatch")
    steps = {} if kind == "compass" else {"local_steps": setup["local_steps"]}
    return fl.FederatedSimulator(
        local, rule, trigger, num_clients=fed["num_clients"], concurrency=concurrency, client_context=context,
        num_examples=setup["sizes"], speeds=fed["speeds"], speed_sigma=fed["speed_sigma"],
        max_speed_spread=fed["max_speed_spread"], speed_seed=fed["speed_seed"], step_time=fed["step_time"],
        time_jitter=fed["time_jitter"], dropout=fed["dropout"], pseudo_gradient=pseudo, **steps)


def _build_client(cfg: Mapping[str, Any], method: Mapping[str, Any], setup: Mapping[str, Any], rule_args: dict):
    """``(local_update, rule or None, client_context or None)`` of a method: the shared plain client,
    a plain client with its own options (FedProx term, curriculum, learning rate), or the client of a
    rule that comes with one (FedSpeed, FedLEx, local scaling). ``setup`` without ``clients`` (the
    dry check before loading data) validates the values on a one-client stand-in."""
    import optax

    from jaxopt_lab.distributed import federated as fl
    from jaxopt_lab.distributed.local_scaling import local_scaling_server, scaled_local_update

    fed = cfg["federated"]
    name = method["rule"]
    lr = method.get("client_learning_rate", fed["client_learning_rate"])
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"client_learning_rate must be a number > 0, got {lr!r}")
    own = [k for k in PLAIN_CLIENT_KEYS + ("client_learning_rate",) if k in method]
    if name not in CLIENT_RULES and not own:
        return setup["local_update"], None, None
    dry = "clients" not in setup
    if dry:
        import numpy as np

        clients = fl.pad_clients(np.zeros((1, 1), np.float32), np.zeros((1,), np.int32), [np.array([0])])
        loss_fn = lambda p, x, y: x[:, 0]  # noqa: E731
    else:
        clients, loss_fn = setup["clients"], setup["loss_fn"]
    batch = fed["batch_size"]
    if name == "fedspeed":
        args = {k: method[k] for k in ("lamb", "rho", "clip_norm") if k in method}
        local = fl.fedspeed_local_update(loss_fn, clients, optax.sgd(lr), batch, **args)
        return local, fl.fedspeed(num_clients=fed["num_clients"], **rule_args), fl.fedspeed_context
    if name == "fedlex":
        frac = method.get("explore_fraction", 0.1)
        epochs = method.get("explore_epochs", 1)
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac <= 1:
            raise ValueError(f"explore_fraction must be in (0, 1], got {frac!r}")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"explore_epochs must be an int >= 1, got {epochs!r}")
        normalization = method.get("normalization", "minmax")
        if normalization not in ("minmax", "robust"):
            raise ValueError(f"normalization must be minmax or robust, got {normalization!r}")
        local = fl.fedlex_local_update(loss_fn, clients, optax.sgd(lr), batch)
        if dry:
            return local, fl.fedlex({}, **rule_args), fl.fedlex_context
        import numpy as np

        n = fed["num_clients"]
        ids = np.sort(np.random.default_rng(cfg["run"]["seed"]).choice(n, max(1, round(frac * n)), replace=False))
        explore = fl.make_local_update(loss_fn, clients, optax.sgd(lr), batch)
        steps = fl.epoch_steps(np.asarray(setup["sizes"])[ids], batch, epochs)
        guidance = fl.fedlex_guidance(explore, setup["params"], ids, steps, seed=cfg["run"]["seed"],
                                      normalization=normalization)
        return local, fl.fedlex(guidance, **rule_args), fl.fedlex_context
    if name == "local_scaling":
        scaling = method.get("scaling", "adam")
        rule, context = local_scaling_server(scaling, method.get("scaling_beta", 0.999),
                                             method.get("scaling_alpha", 1e-8), **rule_args)
        return scaled_local_update(loss_fn, clients, lr, batch, scaling=scaling), rule, context
    if name == "fedbr":  # the discriminator rides in the rule's state (fl.fedbr_server)
        import jax
        import numpy as np

        opts = {"mu": method.get("fedbr_mu", 0.5), "lam": method.get("fedbr_lam", 1.0),
                "decorr": method.get("decorr", 0.1)}
        num_pseudo = method.get("num_pseudo", 32)
        if isinstance(num_pseudo, bool) or not isinstance(num_pseudo, int) or num_pseudo < 1:
            raise ValueError(f"num_pseudo must be an int >= 1, got {num_pseudo!r}")
        if dry:
            pool, dim, feats, head, classes = np.zeros((1, 1), np.float32), 1, loss_fn, loss_fn, 2
        else:  # 32 means of 10 random training rows (the official draws them from a proxy set)
            x = np.asarray(clients.x)
            pool = np.concatenate([x[k, :n] for k, n in enumerate(np.asarray(clients.sizes))])
            dim = fed["hidden"][-1] if fed["hidden"] else pool.shape[-1]
            feats, head, classes = setup["features_fn"], setup["head_fn"], setup["num_classes"]
        pseudo = fl.fedbr_pseudo_data(pool, num_pseudo, 10, seed=cfg["run"]["seed"])
        local = fl.fedbr_local_update(feats, head, clients, optax.sgd(lr), batch, pseudo, num_classes=classes, **opts)
        disc = fl.fedbr_discriminator_init(dim, jax.random.key(cfg["run"]["seed"]))
        rule, context = fl.fedbr_server(disc, **rule_args)
        return fl.fedbr_context_client(local), rule, context
    cur = None
    if "curriculum" in method:
        cur = fl.curriculum(method["curriculum"], method.get("pacing", "linear"), method.get("pace_a", 0.8),
                            method.get("pace_b", 0.2))
    elif any(k in method for k in ("pacing", "pace_a", "pace_b")):
        raise ValueError("pacing, pace_a and pace_b need curriculum = curriculum | anti | random")
    local = fl.make_local_update(loss_fn, clients, optax.sgd(lr), batch,
                                 prox_mu=method.get("prox_mu", fed["prox_mu"]), curriculum=cur)
    return local, None, None


def build_setup(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Data, partition, model and the shared local update of a federated config."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from jaxopt_lab.data import dirichlet_partition, load_digits
    from jaxopt_lab.distributed import federated as fl
    from jaxopt_lab.models import MLP

    fed = cfg["federated"]
    data = load_digits(test_fraction=fed["test_fraction"], seed=0)
    x_train = data.x_train.reshape(len(data.x_train), -1)
    part = dirichlet_partition(data.y_train, fed["num_clients"], fed["dirichlet_alpha"], seed=fed["partition_seed"])
    clients = fl.pad_clients(x_train, data.y_train, part)
    def make_model():
        return MLP(x_train.shape[1], tuple(fed["hidden"]), data.num_classes, rngs=nnx.Rngs(cfg["run"]["seed"]))

    graphdef, _ = nnx.split(nnx.eval_shape(make_model), nnx.Param)
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.split(make_model(), nnx.Param)[1]))()  # one compile

    def logits(p, x):
        return nnx.merge(graphdef, nnx.State(p))(x)

    def loss_fn(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(logits(p, x), y)

    def features_fn(p, x):  # FedBR's split of the MLP: last hidden activations, then the last layer
        return nnx.merge(graphdef, nnx.State(p)).features(x)

    def head_fn(p, z):
        return nnx.merge(graphdef, nnx.State(p)).head(z)

    local = fl.make_local_update(loss_fn, clients, optax.sgd(fed["client_learning_rate"]), fed["batch_size"],
                                 prox_mu=fed["prox_mu"])
    x_test = jnp.asarray(data.x_test.reshape(len(data.x_test), -1))
    y_test = jnp.asarray(data.y_test)

    def eval_fn(p):
        out = logits(p, x_test)
        return {"eval_loss": optax.softmax_cross_entropy_with_integer_labels(out, y_test).mean(),
                "eval_accuracy": (out.argmax(-1) == y_test).mean()}

    return {"params": params, "local_update": local, "sizes": part.sizes, "eval_fn": eval_fn,
            "loss_fn": loss_fn, "clients": clients, "features_fn": features_fn, "head_fn": head_fn,
            "num_classes": data.num_classes,
            "eval_jit": jax.jit(eval_fn),
            "local_steps": fl.epoch_steps(part.sizes, fed["batch_size"], fed["local_epochs"]),
            "partition": part}


SEED_DIR = "seed_{}"  # per method and simulation seed: its orbax checkpoints


def _append_records(path: str, records: list[dict[str, Any]]) -> None:
    """Append evaluation records to a method's metrics.jsonl (strict JSON: no NaN/Infinity)."""
    with open(path, "a") as f:
        f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in records)
        f.flush()
        os.fsync(f.fileno())


def _save_checkpoint(ckpt, step: int, state, meta: dict[str, Any]) -> None:
    """Save the simulator state and the host-side progress of one seed; wait until it is on disk."""
    ckpt.save(step, state, meta)
    ckpt.wait()


def _read_records(path: str) -> list[dict[str, Any]]:
    from jaxopt_lab.experiment.metrics import read_metrics

    return read_metrics(path)


def run_seed(name: str, sim, setup: Mapping[str, Any], cfg: Mapping[str, Any], eval_every: int, seed: int,
             method_dir: str | None = None) -> SeedRun:
    """Runs one method with one simulation seed, in chunks of ``chunk_steps`` server steps, until ``sim_time``.

    With ``method_dir``, the evaluation records are appended to ``method_dir/metrics.jsonl`` as
    they come, and the simulator state with the host-side counters is checkpointed (orbax, in
    ``method_dir/seed_<seed>/checkpoints``) at the end of the first chunk at or past every
    ``checkpoint_every`` server steps and at the end; a seed already checkpointed continues from its
    last checkpoint (the records after it are dropped first), so a killed run resumes bit-identically.
    """
    import jax

    from jaxopt_lab.experiment.checkpoint import Checkpointer

    fed = cfg["federated"]
    chunk, every = fed["chunk_steps"], fed["checkpoint_every"]
    fresh = sim.init(setup["params"], seed=seed)
    state, ckpt, metrics = fresh, None, None
    t0 = time.perf_counter()
    progress = {"steps": 0, "applied": 0, "stale_sum": 0.0, "num_records": 0, "done": False, "wall_seconds": 0.0}
    if method_dir is not None:
        metrics = os.path.join(method_dir, "metrics.jsonl")
        ckpt = Checkpointer(os.path.join(method_dir, SEED_DIR.format(seed)), keep=fed["checkpoint_keep"])
        last = ckpt.latest_step()
        if last is not None:
            state, meta = ckpt.restore(last, fresh)
            progress = meta["progress"]
            from jaxopt_lab.experiment.config import differing_keys

            differ = differing_keys(meta["config"], json.loads(json.dumps(cfg)), ignore=("run.name", "run.out_dir"))
            if differ:
                raise ConfigError(f"cannot resume: {ckpt.path(last)} was checkpointed with another config "
                                  f"(differs in {', '.join(differ)})")
        on_disk = _read_records(metrics)
        records = [r for r in on_disk if r["seed"] == seed][: progress["num_records"]]
        if not progress["done"]:  # keep the earlier seeds' records and this seed's up to its checkpoint
            tmp = metrics + ".tmp"  # (a kill may have left more; later seeds start after this one is done)
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in on_disk if r["seed"] < seed)
                f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in records)
            os.replace(tmp, metrics)
    else:
        records = []
    if progress["done"]:
        ckpt.close()
        return SeedRun(seed, records, progress["steps"], progress["applied"],
                       progress["stale_sum"] / max(progress["applied"], 1), progress["wall_seconds"])
    if not records:
        e0 = setup["eval_jit"](state.params)
        first = {"seed": seed, "step": 0, "version": 0, "sim_time": 0.0, "client_updates": 0, "mean_staleness": 0.0,
                 **{k: float(v) for k, v in e0.items()}}
        if not np.isfinite(first["eval_loss"]):
            raise FederatedDivergence(f"method {name}, seed {seed}: eval_loss is {first['eval_loss']} at server step 0", [])
        records.append(first)
        if metrics is not None:
            _append_records(metrics, [first])
    stale_sum, applied, steps = progress["stale_sum"], progress["applied"], progress["steps"]
    wall0 = progress["wall_seconds"]
    where = "" if ckpt is None else f" (run dir {method_dir})"
    while True:
        before = int(state.step)
        state, rec = sim.run(state, chunk, setup["eval_fn"], eval_every)
        rec = jax.device_get(rec)
        new = []
        for i in range(len(rec.time)):
            if rec.time[i] > fed["sim_time"]:
                break
            steps += 1
            m = rec.mask[i]
            applied += int(m.sum())
            stale_sum += float(rec.staleness[i][m].sum())
            acc = rec.metrics["eval_accuracy"][i]
            loss = rec.metrics["eval_loss"][i]
            if not np.isnan(acc) and not np.isfinite(loss):
                if metrics is not None:
                    _append_records(metrics, new)
                raise FederatedDivergence(
                    f"method {name}, seed {seed}: eval_loss is {float(loss)} at server step {steps} "
                    f"(simulated time {float(rec.time[i]):.1f} s){_last_checkpoint(ckpt)}", records + new)
            if not np.isnan(acc):
                new.append({
                    "seed": seed, "step": steps, "version": int(rec.version[i]), "sim_time": float(rec.time[i]),
                    "client_updates": applied, "mean_staleness": stale_sum / max(applied, 1),
                    "eval_loss": float(loss), "eval_accuracy": float(acc)})
        records += new
        if metrics is not None:
            _append_records(metrics, new)
        bad = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(state.params)
               if not np.isfinite(np.asarray(x)).all()]
        if bad:
            raise FederatedDivergence(f"method {name}, seed {seed}: the server parameters {', '.join(bad[:3])} are "
                                      f"not finite after server step {int(state.step)}{_last_checkpoint(ckpt)}",
                                      records)
        finished = float(rec.time[-1]) > fed["sim_time"]
        if not finished and not np.isfinite(float(rec.time[-1])):
            raise ValueError(f"method {name}: the simulated clock stopped (no client in flight){where}")
        if ckpt is not None and (finished or (before + chunk) // every > before // every):
            progress = {"steps": steps, "applied": applied, "stale_sum": stale_sum, "num_records": len(records),
                        "done": finished, "wall_seconds": wall0 + time.perf_counter() - t0}
            _save_checkpoint(ckpt, int(state.step), state, {"config": dict(cfg), "progress": progress})
        if finished:
            break
    if ckpt is not None:
        ckpt.close()
    return SeedRun(seed, records, server_steps=steps, client_updates=applied, mean_staleness=stale_sum / max(applied, 1),
                   wall_seconds=wall0 + time.perf_counter() - t0)


def _last_checkpoint(ckpt) -> str:
    if ckpt is None:
        return ""
    last = ckpt.latest_step()
    return (f"; last checkpoint (finite parameters and evaluations): {ckpt.path(last)} (server step {last})"
            if last is not None else "; no checkpoint saved yet")


class FederatedDivergence(NonFiniteLossError):
    """A method's evaluation loss or server parameters became NaN or inf; carries the records so far."""

    def __init__(self, message: str, records: list[dict[str, Any]]):
        super().__init__(message)
        self.records = records


def run_method(name: str, sim, setup: Mapping[str, Any], cfg: Mapping[str, Any], eval_every: int,
               method_dir: str | None = None) -> MethodResult:
    """Runs one method for every simulation seed (one compile: only the state's key differs);
    with ``method_dir``, checkpointed and resumable (see :func:`run_seed`)."""
    first = cfg["run"]["seed"]
    runs = []
    for i in range(cfg["federated"]["num_seeds"]):
        try:
            runs.append(run_seed(name, sim, setup, cfg, eval_every, first + i, method_dir))
        except FederatedDivergence as e:  # with the records of the seeds before it
            raise FederatedDivergence(str(e), [r for run in runs for r in run.records] + e.records) from None
    return MethodResult(name, runs, wall_seconds=sum(r.wall_seconds for r in runs))


def to_target(records: list[dict[str, Any]], target: float) -> tuple[float | None, int | None]:
    """(simulated time, client updates) of the first evaluation at or above ``target``."""
    for r in records:
        if r["eval_accuracy"] >= target:
            return r["sim_time"], r["client_updates"]
    return None, None


def _median(values: list[float | None]) -> float | None:
    """Median with "not reached" (None) counted as +inf; None when that median is not finite."""
    med = float(np.median([np.inf if v is None else v for v in values]))
    return med if np.isfinite(med) else None


def summarize(result: MethodResult, target: float) -> dict[str, Any]:
    """Medians over seeds of the time and client updates to ``target``, and final/best accuracy."""
    hits = [to_target(r.records, target) for r in result.runs]
    times = [t for t, _ in hits]
    return {
        "time": _median(times),
        "time_range": (min((t for t in times if t is not None), default=None),
                       max((t for t in times if t is not None), default=None)),
        "reached": sum(t is not None for t in times),
        "updates": _median([u for _, u in hits]),
        "final": float(np.mean([r.records[-1]["eval_accuracy"] for r in result.runs])),
        "best": float(np.mean([max(x["eval_accuracy"] for x in r.records) for r in result.runs])),
        "steps": float(np.mean([r.server_steps for r in result.runs])),
        "staleness": float(np.mean([r.mean_staleness for r in result.runs])),
    }


def format_table(results: list[MethodResult], cfg: Mapping[str, Any]) -> str:
    """Markdown: time and client updates to the target accuracy (median over seeds), accuracies, staleness."""
    target = cfg["federated"]["target_accuracy"]
    seeds = cfg["federated"]["num_seeds"]
    sums = {r.name: summarize(r, target) for r in results}
    base = next((sums[r.name]["time"] for r in results if cfg["methods"][r.name]["trigger"] == "sync"), None)
    over = f" (median of {seeds} seeds [min-max])" if seeds > 1 else ""
    header = (f"| method | rule / trigger | sim time to {target:.0%}{over} | speed-up vs sync | client updates to "
              f"{target:.0%} | best acc | final acc | server steps | mean staleness | wall s |")
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        m, x = cfg["methods"][r.name], sums[r.name]
        if x["time"] is None:
            t = f"not reached ({x['reached']}/{seeds})"
        else:
            t = f"{x['time']:.1f}"
            if seeds > 1:
                t += f" [{x['time_range'][0]:.0f}-{x['time_range'][1]:.0f}]"
            if x["reached"] < seeds:
                t += f" ({x['reached']}/{seeds} reached)"
        speed = f"{base / x['time']:.2f}x" if (x["time"] and base) else "-"
        updates = f"{x['updates']:.0f}" if x["updates"] is not None else "-"
        lines.append(f"| {r.name} | {m['rule']} / {m['trigger']} | {t} | {speed} | {updates} | {x['best']:.4f} "
                     f"| {x['final']:.4f} | {x['steps']:.0f} | {x['staleness']:.2f} | {r.wall_seconds:.1f} |")
    return "\n".join(lines)


def plot(results: list[MethodResult], cfg: Mapping[str, Any], out: str) -> str:
    """Test accuracy against simulated wall-clock and against client updates (one PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, r in enumerate(results):
        for i, run in enumerate(r.runs):
            xs_t = [x["sim_time"] for x in run.records]
            xs_u = [x["client_updates"] for x in run.records]
            ys = [x["eval_accuracy"] for x in run.records]
            style = dict(color=colors[j % len(colors)], lw=1.0, alpha=0.9 if i == 0 else 0.35,
                         label=r.name if i == 0 else None)
            axes[0].plot(xs_t, ys, **style)
            axes[1].plot(xs_u, ys, **style)
    target = cfg["federated"]["target_accuracy"]
    axes[1].set_xscale("symlog", linthresh=100)  # FedAsync applies 10x more (single) updates than the rest
    for ax, xlabel in zip(axes, ("simulated wall-clock (s)", "client updates applied (symlog)")):
        ax.axhline(target, color="gray", lw=0.8, ls="--")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.set_ylim(max(0.0, min(0.5, target - 0.4)), 1.0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fed = cfg["federated"]
    fig.suptitle(f"{fed['num_clients']} clients, Dirichlet({fed['dirichlet_alpha']}), speeds {fed['speeds']} "
                 f"(sigma {fed['speed_sigma']}, spread <= {fed['max_speed_spread']}x); "
                 f"{fed['num_seeds']} seed(s), seed {cfg['run']['seed']} opaque", fontsize="medium")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _check_methods(cfg: Mapping[str, Any]) -> None:
    n = cfg["federated"]["num_clients"]
    dry = {"local_update": lambda p, c, q, k: p, "sizes": np.ones(n), "local_steps": np.ones(n, np.int64)}
    for name, method in cfg["methods"].items():  # every method's values, checked before loading anything
        try:
            build_method(cfg, method, dry)
        except ValueError as e:
            raise ConfigError(f"methods.{name}: {e}") from None
        every = method.get("eval_every", 1)
        if not (isinstance(every, int) and not isinstance(every, bool) and every >= 1):
            raise ConfigError(f"methods.{name}.eval_every must be an int >= 1, got {every!r}")


def run(path: str, overrides: Iterable[str] = (), run_dir: str | None = None, only: Iterable[str] | None = None
        ) -> tuple[str, list[MethodResult]]:
    """Validates the whole config, builds every method (errors before any compute), runs them.

    ``only``: run just these ``[methods.NAME]`` (names, or comma-separated names); the run's
    ``config.toml`` then holds only them.

    Each method's seeds are checkpointed every ``federated.checkpoint_every`` server steps:
    :func:`resume` continues a killed run.

    Returns:
      The printed summary table and the per-method results.
    """
    import tomli_w

    raw = apply_overrides(read_toml(path), overrides)
    if only is not None:
        names = [n.strip() for item in only for n in item.split(",") if n.strip()]
        methods = raw.get("methods") if isinstance(raw.get("methods"), Mapping) else {}
        for n in names or [""]:
            if n not in methods:
                raise ConfigError(f"--only {n!r}: {path} has no [methods.{n or 'NAME'}]{_suggest(n, methods)}")
        raw["methods"] = {n: m for n, m in methods.items() if n in names}
    cfg = validate(raw)
    run_dir = run_dir or os.path.join(cfg["run"]["out_dir"], cfg["run"]["name"])
    check_not_a_file(run_dir)
    if os.path.exists(os.path.join(run_dir, "config.toml")):  # results are never overwritten
        raise RunDirError(f"{run_dir} already holds a run: `jaxopt-lab resume {run_dir}` continues it if it was "
                          "interrupted; or remove it, or choose another run.name or --run-dir")
    _check_methods(cfg)
    setup = build_setup(cfg)
    sims = {name: build_method(cfg, method, setup) for name, method in cfg["methods"].items()}
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.toml"), "w") as f:
        f.write(tomli_w.dumps(copy.deepcopy(cfg)))
    return _run_all(cfg, setup, sims, run_dir)


def resume(run_dir: str, overrides: Iterable[str] = ()) -> tuple[str, list[MethodResult]]:
    """Continue a killed federated run from its checkpoints: finished methods and seeds are read
    back from disk, an interrupted seed continues from its last checkpoint (bit-identically), the
    rest run; then the table, plot and summary are written as by :func:`run`."""
    overrides = list(overrides)
    if overrides:
        flag = f"--unset {overrides[0][1:]}" if overrides[0].startswith("-") else f"--set {overrides[0]}"
        raise ConfigError(f"a federated run resumes with its own config; {flag!r} does not apply "
                          "(run it again into a new directory to change it)")
    cfg = validate(read_toml(os.path.join(run_dir, "config.toml")))
    _check_methods(cfg)
    for name in cfg["methods"]:
        for i in range(cfg["federated"]["num_seeds"]):
            _check_checkpoint_config(os.path.join(run_dir, name, SEED_DIR.format(cfg["run"]["seed"] + i)), cfg)
    if all(_seed_done(os.path.join(run_dir, name, SEED_DIR.format(cfg["run"]["seed"] + i)))
           for name in cfg["methods"] for i in range(cfg["federated"]["num_seeds"])):
        print(f"{run_dir} already finished: every method ran to federated.sim_time = {cfg['federated']['sim_time']} "
              "for every seed; nothing to resume (the results below are read back)")
    setup = build_setup(cfg)
    sims = {name: build_method(cfg, method, setup) for name, method in cfg["methods"].items()}
    return _run_all(cfg, setup, sims, run_dir)


def _last_meta(seed_dir: str) -> dict[str, Any] | None:
    """What the seed's last checkpoint records beside its state (config, progress), or None."""
    ckpts = os.path.join(seed_dir, "checkpoints")
    steps = sorted(int(n) for n in os.listdir(ckpts) if n.isdigit()) if os.path.isdir(ckpts) else []
    if not steps:
        return None
    meta_path = os.path.join(ckpts, str(steps[-1]), "config", "metadata")
    if not os.path.exists(meta_path):
        return None
    with open(meta_path) as f:
        return json.load(f)


def _seed_done(seed_dir: str) -> bool:
    meta = _last_meta(seed_dir)
    return bool(meta and meta.get("progress", {}).get("done"))


def _check_checkpoint_config(seed_dir: str, cfg: Mapping[str, Any]) -> None:
    """ConfigError if the seed's last checkpoint was made with another config than the run's."""
    from jaxopt_lab.experiment.config import differing_keys

    meta = _last_meta(seed_dir)
    if meta is None:
        return
    saved = meta["config"]
    differ = differing_keys(saved, json.loads(json.dumps(cfg)), ignore=("run.name", "run.out_dir"))
    if differ:
        raise ConfigError(f"cannot resume: {seed_dir} was checkpointed with another config "
                          f"(differs in {', '.join(differ)})")


def _run_all(cfg: Mapping[str, Any], setup, sims, run_dir: str) -> tuple[str, list[MethodResult]]:
    print(setup["partition"].summary())
    results = []
    for name, sim in sims.items():
        method_dir = os.path.join(run_dir, name)
        os.makedirs(method_dir, exist_ok=True)
        try:
            res = run_method(name, sim, setup, cfg, cfg["methods"][name].get("eval_every", 1), method_dir)
        except FederatedDivergence as e:  # its finite records are already in metrics.jsonl
            raise NonFiniteLossError(f"{e}; its finite evaluations so far are in "
                                     f"{os.path.join(method_dir, 'metrics.jsonl')}") from None
        x = summarize(res, cfg["federated"]["target_accuracy"])
        print(f"{name}: {x['steps']:.0f} server steps, final acc {x['final']:.4f}, time to target "
              f"{'%.1f' % x['time'] if x['time'] is not None else 'not reached'} ({res.wall_seconds:.1f} s)")
        results.append(res)
    table = format_table(results, cfg)
    png = plot(results, cfg, os.path.join(run_dir, "accuracy.png"))
    with open(os.path.join(run_dir, "summary.md"), "w") as f:
        f.write(table + "\n")
    return table + f"\n\nplot: {png}\nrun dir: {run_dir}", results
