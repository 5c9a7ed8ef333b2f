"""One training loop for every method: jitted step, accumulation, evaluation, checkpoints.

A run is a pure function of its resolved config: the batch at step ``t`` is
drawn from ``(run.seed, t)`` alone and the whole optimizer state is in the
checkpoint, so a run killed at any point and resumed from its last checkpoint
writes the same metrics, step for step, as one that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxopt_lab.diagnostics import edge_of_stability
from jaxopt_lab.distributed.accounting import ByteCount, CommBytes, communicated_bytes, wire_bytes
from jaxopt_lab.losses import softmax_collapse_fraction
from jaxopt_lab.lowrank.memory import optimizer_state_bytes
from jaxopt_lab.experiment import config as config_lib
from jaxopt_lab.experiment.adaptive_batch import make_norm_test_statistics, next_batch_size
from jaxopt_lab.experiment.build import Experiment, build, per_example
from jaxopt_lab.experiment.checkpoint import Checkpointer
from jaxopt_lab.experiment.methods import learning_rate_schedule
from jaxopt_lab.experiment.metrics import MetricsLog

CONFIG_FILE = "config.toml"
SUMMARY_FILE = "summary.json"


def _is_count(x: Any) -> bool:
    return isinstance(x, (CommBytes, ByteCount))


def _has_consensus(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields") and "consensus" in x._fields


class TrainState(NamedTuple):
    """Everything that changes during training (what a checkpoint holds)."""

    step: jax.Array  # optimizer steps completed
    params: Any  # nnx.State of the model's nnx.Param variables
    opt_state: optax.OptState
    batch_size: jax.Array  # of the next step (changes only with train.norm_test_eta)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf; the message names the step and last good checkpoint."""


class RunDirError(RuntimeError):
    """A run directory that cannot be used as asked (exists already, holds nothing to resume)."""


def check_not_a_file(run_dir: str) -> None:
    """A run directory path that names an existing file is a RunDirError."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise RunDirError(f"the run directory {run_dir} is a file")


@dataclasses.dataclass
class RunResult:
    run_dir: str
    final: dict[str, Any]  # the last metrics record


def make_loss_fn(graphdef: Any, rest: Any, task: str, loss: str = "cross_entropy"):
    """``(params, x, y) -> (mean loss, mean metrics)``; classification also reports the
    softmax-collapse fraction (examples whose softmax cross-entropy gradient is exactly zero)."""

    def loss_fn(params, x, y):
        outputs = nnx.merge(graphdef, params, rest)(x)
        metrics = {k: v.mean() for k, v in per_example(task, outputs, y, loss).items()}
        if task == "classification":
            metrics["softmax_collapse"] = softmax_collapse_fraction(outputs.astype(jnp.float32), y)
        return metrics["loss"], metrics

    return loss_fn


def make_train_step(graphdef: Any, rest: Any, tx: optax.GradientTransformation, task: str, loss: str = "cross_entropy"):
    """``(state, xs, ys) -> (state, metrics)`` for one worker, over ``k`` micro-batches.

    ``xs``/``ys`` have a leading axis of ``train.grad_accum`` micro-batches; the
    transformation (wrapped in ``optax.MultiSteps`` when k > 1) sees each
    micro-batch gradient in turn and applies one update after the k-th.
    """

    loss_fn = make_loss_fn(graphdef, rest, task, loss)

    def micro_step(carry, batch):
        params, opt_state = carry
        grads, metrics = jax.grad(loss_fn, has_aux=True)(params, *batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return (optax.apply_updates(params, updates), opt_state), metrics

    def train_step(state: TrainState, xs, ys):
        (params, opt_state), metrics = jax.lax.scan(micro_step, (state.params, state.opt_state), (xs, ys))
        metrics = jax.tree.map(lambda m: m.mean(axis=0), metrics)
        return TrainState(state.step + 1, params, opt_state, state.batch_size), metrics

    return train_step


def make_eval_step(graphdef: Any, rest: Any, task: str, loss: str = "cross_entropy"):
    """A jitted ``(params, x, y, weight) -> sums of weighted per-example metrics``."""

    def eval_step(params, x, y, weight):
        outputs = nnx.merge(graphdef, params, rest)(x)
        sums = {k: (v * weight).sum() for k, v in per_example(task, outputs, y, loss).items()}
        return sums, weight.sum()

    return jax.jit(eval_step)


def _pad(array: np.ndarray, size: int) -> np.ndarray:
    extra = size - array.shape[0]
    return array if extra == 0 else np.concatenate([array, np.zeros((extra,) + array.shape[1:], array.dtype)])


def evaluate(eval_step, params, data, batch_size: int, max_batches: int) -> dict[str, float]:
    """Mean per-example metrics over the held-out split (ragged last batch padded, masked)."""
    totals: dict[str, float] = {}
    count = 0.0
    for x, y in data.eval_batches(batch_size, max_batches=max_batches or None):
        weight = _pad(np.ones(x.shape[0], np.float32), batch_size)
        sums, n = eval_step(params, _pad(x, batch_size), _pad(y, batch_size), weight)
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
        count += float(n)
    return {f"eval_{k}": v / count for k, v in totals.items()}


class Trainer:
    """Runs one built experiment in ``run_dir`` (fresh, or from its last checkpoint)."""

    def __init__(self, experiment: Experiment, run_dir: str):
        self.exp = experiment
        self.cfg = experiment.config
        self.run_dir = run_dir
        graphdef, params, rest = nnx.split(experiment.model, nnx.Param, ...)
        loss = self.cfg.train.loss
        step = make_train_step(graphdef, rest, experiment.tx, experiment.task, loss)
        self.eval_step = make_eval_step(graphdef, rest, experiment.task, loss)
        self.sharpness = None
        if self.cfg.train.sharpness_every:
            loss_fn = make_loss_fn(graphdef, rest, experiment.task, loss)
            self.sharpness = jax.jit(
                lambda p, x, y, lr, key: edge_of_stability(lambda q: loss_fn(q, x, y)[0], p, lr, key)
            )
        initial = TrainState(
            jnp.zeros((), jnp.int32), params, experiment.tx.init(params), jnp.asarray(self.cfg.train.batch_size, jnp.int32)
        )
        # bytes of one worker's optimizer state, from shapes and dtypes (logged with the final metrics)
        self.opt_state_bytes = optimizer_state_bytes(jax.eval_shape(experiment.tx.init, params))
        self.norm_test = None
        if self.cfg.train.norm_test_eta > 0:
            self.norm_test = make_norm_test_statistics(lambda p, x, y: make_loss_fn(graphdef, rest, experiment.task, loss)(p, x, y)[0])
        self.runner = experiment.runner
        if self.runner is None:
            self.train_step = jax.jit(step)
            self.initial = initial
        else:  # every leaf gains a leading worker axis
            self.train_step = self.runner.map(step)
            self.initial = self.runner.put(self.runner.replicate(initial))
            self._mean_params = jax.jit(lambda p: jax.tree.map(lambda x: x.mean(axis=0), p))
        self.checkpoints = Checkpointer(run_dir, keep=self.cfg.checkpoint.keep)
        self.lr = learning_rate_schedule(self.cfg.method)
        if self.sharpness is not None and self.lr is None:
            raise config_lib.ConfigError("train.sharpness_every needs a method with a learning_rate (the 2/lr threshold)")

    def batch(self, step: int, batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The batch of optimizer step ``step``; with W workers, worker w gets stream index step·W + w."""
        t, k = self.cfg.train, self.cfg.train.grad_accum
        if self.runner is None:
            x, y = self.exp.data.batch(step, batch_size or t.batch_size, self.cfg.run.seed)
            return x.reshape((k, -1) + x.shape[1:]), y.reshape((k, -1) + y.shape[1:])
        w = self.runner.num_workers
        xs, ys = zip(*(self.exp.data.batch(step * w + i, t.batch_size, self.cfg.run.seed) for i in range(w)))
        x, y = np.stack(xs), np.stack(ys)
        return self.runner.put((x.reshape((w, k, -1) + x.shape[2:]), y.reshape((w, k, -1) + y.shape[2:])))

    def evaluate(self, params) -> dict[str, float]:
        """Held-out metrics; with several workers, of the workers' average parameters."""
        t = self.cfg.train
        if self.runner is not None:
            params = self._mean_params(params)
        return evaluate(self.eval_step, params, self.exp.data, t.batch_size, t.eval_batches)

    def adapt_batch_size(self, state: TrainState, batch) -> int:
        """The next step's batch size by the norm test on this step's batch (before its update)."""
        t = self.cfg.train
        spread, grad_norm_sq = self.norm_test(state.params, batch[0][0], batch[1][0])
        return next_batch_size(
            int(state.batch_size), float(spread), float(grad_norm_sq), t.norm_test_eta, t.batch_size, t.max_batch_size
        )

    def edge_of_stability(self, params, step: int) -> dict[str, float]:
        """Top Hessian eigenvalue on this step's (first micro-)batch against 2/lr (Cohen et al. 2021)."""
        x, y = self.batch(step)
        lr = self.lr(step)
        key = jax.random.fold_in(jax.random.key(self.cfg.run.seed), step)
        out = self.sharpness(params, x[0], y[0], jnp.float32(lr), key)
        return {"sharpness": float(out["sharpness"]), "sharpness_ratio": float(out["ratio"])}

    def step_metrics(self, state: TrainState, metrics: dict) -> dict[str, float]:
        """Host-side metrics of one step (averaged over workers; bytes each worker sent).

        ``bytes_communicated``: payload bytes; ``wire_bytes``: wire bytes per worker
        under the model of :mod:`jaxopt_lab.distributed.accounting`.
        """
        if self.runner is None:
            return {k: float(v) for k, v in metrics.items()}
        counts = [n for n in jax.tree.leaves(state.opt_state, is_leaf=_is_count) if _is_count(n)]
        consensus = [n.consensus for n in jax.tree.leaves(state.opt_state, is_leaf=_has_consensus) if _has_consensus(n)]
        metrics, counts, consensus = self.runner.get((metrics, counts, consensus))
        out = {k: float(np.mean(v)) for k, v in metrics.items()}
        out["bytes_communicated"] = float(np.mean(communicated_bytes(counts)))
        out["wire_bytes"] = float(np.mean(wire_bytes(counts)))
        if consensus:  # decentralized methods: distance of the workers from their mean
            out["consensus_distance"] = float(np.mean(consensus[0]))
        return out

    def restore(self) -> TrainState:
        """The state of the last checkpoint, after checking it was made with this config."""
        step = self.checkpoints.latest_step()
        state, saved = self.checkpoints.restore(step, self.initial)
        differ = config_lib.differing_keys(saved, self.cfg.to_dict(), ignore=config_lib.RESUME_MAY_DIFFER)
        if differ:
            fa, fb = config_lib.flatten(saved), config_lib.flatten(self.cfg.to_dict())
            detail = "; ".join(f"{k}: checkpoint {fa.get(k, '<absent>')!r} vs now {fb.get(k, '<absent>')!r}" for k in differ)
            raise config_lib.ConfigError(
                f"cannot resume {self.run_dir}: the config differs from the checkpoint's in {', '.join(differ)} ({detail})"
            )
        return state

    def fit(self, resume: bool = False) -> RunResult:
        cfg = self.cfg
        t = cfg.train
        start = self.checkpoints.latest_step() if resume else None
        state = self.restore() if start is not None else self.initial
        start = start or 0
        log = MetricsLog(self.run_dir, start_step=start, tensorboard=cfg.logging.tensorboard)
        elapsed = (log.last or {}).get("wall_time", 0.0)
        if start == 0:
            log.write({"step": 0, **self.evaluate(state.params), "wall_time": 0.0})
        bar = _progress(cfg.logging.progress, total=t.steps, initial=start, desc=cfg.run.name)
        t0 = time.perf_counter() - elapsed
        step_times = []  # seconds of each train step (its metrics read back), for the final steps_per_sec
        try:
            for step in range(start, t.steps):
                batch = self.batch(step, int(state.batch_size) if self.norm_test is not None else None)
                grown = self.adapt_batch_size(state, batch) if self.norm_test is not None else None
                t_step = time.perf_counter()
                state, metrics = self.train_step(state, *batch)
                record = {"step": step + 1, **self.step_metrics(state, metrics)}
                step_times.append(time.perf_counter() - t_step)
                if grown is not None:
                    record["batch_size"] = int(state.batch_size)
                    state = state._replace(batch_size=jnp.asarray(grown, jnp.int32))
                if not math.isfinite(record["loss"]):
                    self.checkpoints.wait()
                    last = self.checkpoints.latest_step()
                    where = f"{self.checkpoints.path(last)} (step {last})" if last is not None else "none (no checkpoint saved yet)"
                    raise NonFiniteLossError(
                        f"training loss is {record['loss']} at step {step + 1}; last good checkpoint: {where}"
                    )
                if self.lr is not None:
                    record["learning_rate"] = float(self.lr(step))
                if self.sharpness is not None and (step + 1) % t.sharpness_every == 0:
                    record.update(self.edge_of_stability(state.params, step))
                done = step + 1
                if done == t.steps or (t.eval_every and done % t.eval_every == 0):
                    record.update(self.evaluate(state.params))
                if done == t.steps:  # median over this process's steps (the first, compiling one, included)
                    record["opt_state_bytes"] = self.opt_state_bytes
                    record["steps_per_sec"] = 1.0 / float(np.median(step_times))
                record["wall_time"] = time.perf_counter() - t0
                log.write(record)
                if done == t.steps or (cfg.checkpoint.every and done % cfg.checkpoint.every == 0):
                    log.flush()  # what a resume from this checkpoint keeps is on disk first
                    self.checkpoints.save(done, state, cfg.to_dict())
                bar.update(1)
                bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "eval_loss") if k in record}, refresh=False)
        finally:
            bar.close()
            log.close()
            self.checkpoints.wait()
        final = log.last or {}
        with open(os.path.join(self.run_dir, SUMMARY_FILE), "w") as f:
            json.dump(final, f, indent=1)
        return RunResult(self.run_dir, final)


def _progress(enabled: bool, total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True)


def run_dir_of(cfg: config_lib.ExperimentConfig) -> str:
    return os.path.join(cfg.run.out_dir, cfg.run.name)


def run(config: str | config_lib.ExperimentConfig, overrides: Iterable[str] = (), run_dir: str | None = None) -> RunResult:
    """Run an experiment from a config (file path or validated config) into a fresh run directory.

    The resolved config is written to ``RUN_DIR/config.toml`` before training.
    A directory that already holds checkpoints is an error (resume it instead).
    """
    cfg = config_lib.load(config, overrides) if isinstance(config, str) else config
    if not isinstance(config, str) and overrides:
        cfg = config_lib.from_dict(config_lib.apply_overrides(cfg.to_dict(), overrides))
    experiment = build(cfg)
    run_dir = run_dir or run_dir_of(cfg)
    check_not_a_file(run_dir)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if os.path.isdir(ckpt_dir) and any(name.isdigit() for name in os.listdir(ckpt_dir)):
        raise RunDirError(
            f"{run_dir} already holds checkpoints: `jaxopt-lab resume {run_dir}` to continue it, "
            f"or choose another run.name"
        )
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, CONFIG_FILE), "w") as f:
        f.write(experiment.config.dumps())
    return Trainer(experiment, run_dir).fit(resume=False)


def resume(run_dir: str, overrides: Iterable[str] = ()) -> RunResult:
    """Continue the run in ``run_dir`` from its last checkpoint, with its own config.

    ``overrides`` may only change keys that do not change the numbers
    (``logging``, ``checkpoint``); anything else is an error naming the keys.
    """
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise RunDirError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    if "federated" in config_lib.read_toml(path):
        raise RunDirError(f"{run_dir} is a federated simulation: those are not checkpointed; run it again "
                          "into a new directory (each method takes seconds to minutes)")
    experiment = build(config_lib.load(path, overrides))
    return Trainer(experiment, run_dir).fit(resume=True)
