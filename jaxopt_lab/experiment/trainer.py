"""One training loop for every method: jitted step, accumulation, evaluation, checkpoints.

A run is a pure function of its resolved config: the batch at step ``t`` is
drawn from ``(run.seed, t)`` alone (token files: from ``(run.seed, worker, t)``,
through a grain iterator whose position is checkpointed too) and the whole
optimizer state is in the checkpoint, so a run killed at any point and resumed from its last checkpoint
writes the same metrics, step for step, as one that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import functools
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

from jaxopt_lab.diagnostics import edge_of_stability, instability_metrics
from jaxopt_lab.distributed.accounting import ByteCount, CommBytes, communicated_bytes, wire_bytes
from jaxopt_lab.losses import softmax_collapse_fraction
from jaxopt_lab.lowrank.memory import optimizer_state_bytes
from jaxopt_lab.experiment import config as config_lib
from jaxopt_lab.experiment.adaptive_batch import make_norm_test_statistics, next_batch_size
from jaxopt_lab.experiment.build import Experiment, build, per_example
from jaxopt_lab.experiment.checkpoint import Checkpointer
from jaxopt_lab.experiment.launch import is_primary, sync
from jaxopt_lab.experiment.methods import learning_rate_schedule, needs_loss_fn
from jaxopt_lab.experiment.metrics import MetricsLog, read_metrics

CONFIG_FILE = "config.toml"
SUMMARY_FILE = "summary.json"
HISTORY_FILE = "config_history.jsonl"  # one line per resume that changed hyperparameters
DIVERGED_FILE = "diverged.json"  # written when a run stops on a non-finite value


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
    """A run directory that cannot be created or written (it, or a folder above it, is a file; a
    folder on its path is not writable) is a RunDirError; nothing is created."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise RunDirError(f"the run directory {run_dir} is a file")
    path = os.path.abspath(run_dir)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    if not os.path.isdir(path):
        raise RunDirError(f"cannot create the run directory {run_dir} (run.out_dir/run.name): {path} is a file")
    import tempfile

    try:  # what os.access cannot tell (root, read-only mounts): try it
        os.rmdir(tempfile.mkdtemp(prefix=".jaxopt-lab-write-test-", dir=path))
    except OSError as e:
        what = "write into" if path == os.path.abspath(run_dir) else "create"
        raise RunDirError(f"cannot {what} the run directory {run_dir} (run.out_dir/run.name): "
                          f"{path} is not writable ({e.strerror})") from None


@dataclasses.dataclass
class RunResult:
    run_dir: str
    final: dict[str, Any]  # the last metrics record
    note: str | None = None  # what a resume found instead of work to do (a run already finished)


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


def make_train_step(graphdef: Any, rest: Any, tx: optax.GradientTransformation, task: str, loss: str = "cross_entropy",
                    pass_loss_fn: bool = False):
    """``(state, xs, ys) -> (state, metrics)`` for one worker, over ``k`` micro-batches.

    ``xs``/``ys`` have a leading axis of ``train.grad_accum`` micro-batches; the
    transformation (wrapped in ``optax.MultiSteps`` when k > 1) sees each
    micro-batch gradient in turn and applies one update after the k-th.
    ``decisions`` (static: ``sync``, ``refresh``) are passed to ``tx.update``:
    the host's decisions for a periodically synchronizing method and for
    low-rank projector refreshes (see ``jaxopt_lab.distributed.sync``).
    ``pass_loss_fn``: ``tx.update`` also gets ``loss_fn=``, the micro-batch's mean training loss
    as a function of the parameters (a method marked ``needs_loss_fn``: IST's importance probes).
    """

    loss_fn = make_loss_fn(graphdef, rest, task, loss)

    def micro_step(carry, batch, **decisions):
        params, opt_state = carry
        grads, metrics = jax.grad(loss_fn, has_aux=True)(params, *batch)
        if pass_loss_fn:
            decisions = {**decisions, "loss_fn": lambda p: loss_fn(p, *batch)[0]}
        updates, opt_state = tx.update(grads, opt_state, params, **decisions)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return (optax.apply_updates(params, updates), opt_state), metrics

    def train_step(state: TrainState, xs, ys, **decisions):
        (params, opt_state), metrics = jax.lax.scan(
            functools.partial(micro_step, **decisions), (state.params, state.opt_state), (xs, ys)
        )
        metrics = jax.tree.map(lambda m: m.mean(axis=0), metrics)
        return TrainState(state.step + 1, params, opt_state, state.batch_size), metrics

    return train_step


@functools.partial(jax.jit, static_argnames=("graphdef", "task", "loss"))
def _eval_program(params, x, y, weight, rest, *, graphdef, task, loss):
    outputs = nnx.merge(graphdef, params, rest)(x)
    sums = {k: (v * weight).sum() for k, v in per_example(task, outputs, y, loss).items()}
    return sums, weight.sum()


def make_eval_step(graphdef: Any, rest: Any, task: str, loss: str = "cross_entropy"):
    """A jitted ``(params, x, y, weight) -> sums of weighted per-example metrics``.

    One jitted program for every model of the same structure (``graphdef`` is static, the
    model's non-parameter state an argument), so runs of one process that evaluate the same
    model on the same shapes (the variants of a config) compile it once.
    """
    return functools.partial(_eval_program, rest=rest, graphdef=graphdef, task=task, loss=loss)


@jax.jit
def _mean_over_workers(params):
    return jax.tree.map(lambda x: x.mean(axis=0), params)


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
    """Runs one built experiment in ``run_dir`` (fresh, or from its last checkpoint).

    ``started``: the ``time.perf_counter()`` the run's time to first step counts from (default:
    now; :func:`run` and :func:`resume` pass the moment they were called, before the build).
    """

    def __init__(self, experiment: Experiment, run_dir: str, started: float | None = None):
        self.started = time.perf_counter() if started is None else started
        self.exp = experiment
        self.cfg = experiment.config
        self.run_dir = run_dir
        graphdef, params, rest = nnx.split(experiment.model, nnx.Param, ...)
        loss = self.cfg.train.loss
        step = make_train_step(graphdef, rest, experiment.tx, experiment.task, loss,
                               pass_loss_fn=needs_loss_fn(self.cfg.method))
        self.eval_step = make_eval_step(graphdef, rest, experiment.task, loss)
        self.sharpness = None
        if self.cfg.train.sharpness_every:
            loss_fn = make_loss_fn(graphdef, rest, experiment.task, loss)
            self.sharpness = jax.jit(
                lambda p, x, y, lr, key: edge_of_stability(lambda q: loss_fn(q, x, y)[0], p, lr, key)
            )
        self.instability = None  # Wortsman et al. 2024's monitors of a GPT (train.instability_every)
        if self.cfg.train.instability_every:
            if not hasattr(experiment.model, "forward_with_attention_logits"):
                raise config_lib.ConfigError(
                    f"train.instability_every needs a GPT (its attention logits); model "
                    f"{self.cfg.model.get('name')!r} is a {type(experiment.model).__name__}")
            self.instability = jax.jit(lambda p, x: instability_metrics(nnx.merge(graphdef, p, rest), x))
        initial = TrainState(
            jnp.zeros((), jnp.int32), params, experiment.tx.init(params), jnp.asarray(self.cfg.train.batch_size, jnp.int32)
        )
        # bytes of one worker's optimizer state, from shapes and dtypes (logged with the final metrics)
        self.opt_state_bytes = optimizer_state_bytes(jax.eval_shape(experiment.tx.init, params))
        self.param_report = None  # a fine-tuning run (model.lora, svfit, ...): its trainable parameters and bytes
        if experiment.trainable is not None:
            from jaxopt_lab.finetune.lora import trainable_report

            self.param_report = trainable_report(params, labels=experiment.trainable)
        self.peak_memory_bytes = None  # of the compiled train step (memory_analysis), set at the first step
        self.norm_test = None
        if self.cfg.train.norm_test_eta > 0:
            self.norm_test = make_norm_test_statistics(lambda p, x, y: make_loss_fn(graphdef, rest, experiment.task, loss)(p, x, y)[0])
        self.runner = experiment.runner
        if self.runner is None:
            self.train_step = jax.jit(step)
            self.initial = initial
        else:  # every leaf gains a leading worker axis
            # a method that synchronizes every few steps: the host picks, from the flags in the
            # state, the compiled step with or without the synchronization (no collective otherwise).
            # The state is donated, so what a step passes through (DiLoCo's anchor and outer
            # momentum between synchronizations) is not copied; orbax copies a checkpoint to the
            # host before save() returns, so the next step may reuse those buffers.
            self.train_step = self.runner.map_sync(step, donate_argnums=(0,))
            self.initial = self.runner.put(self.runner.replicate(initial))
            self._mean_params = _mean_over_workers
        # data read through an iterator (token files): its position is checkpointed with the state
        self.loader = None
        if hasattr(experiment.data, "loader"):
            if self.norm_test is not None:
                raise config_lib.ConfigError(f"train.norm_test_eta needs a batch size that can change; data "
                                             f"{self.cfg.data['name']!r} reads fixed batches of train.batch_size")
            workers = None if self.runner is None else self.runner.local_workers
            self.loader = experiment.data.loader(
                self.cfg.train.batch_size, self.cfg.run.seed,
                num_workers=1 if self.runner is None else self.runner.num_workers,
                workers=None if workers is None else list(workers))
        self.checkpoints = Checkpointer(run_dir, keep=self.cfg.checkpoint.keep)
        self.allowed_changes: set[str] = set()  # config keys this resume changes (may differ from a checkpoint's)
        self.lr = learning_rate_schedule(self.cfg.method)
        if self.sharpness is not None and self.lr is None:
            raise config_lib.ConfigError("train.sharpness_every needs a method with a learning_rate (the 2/lr threshold)")

    def batch(self, step: int, batch_size: int | None = None, loaded=None) -> tuple[np.ndarray, np.ndarray]:
        """The batch of optimizer step ``step``; with W workers, worker w gets stream index step·W + w.

        Data read through a loader (token files): its batch of ``step`` (random access), or
        ``loaded``, what its iterator gave for that step, (local workers, batch, ...).
        """
        t, k = self.cfg.train, self.cfg.train.grad_accum
        if self.loader is not None:
            x, y = self.loader.dataset[step] if loaded is None else loaded
            if self.runner is None:
                return x[0].reshape((k, -1) + x.shape[2:]), y[0].reshape((k, -1) + y.shape[2:])
            n = x.shape[0]  # the loader reads this process's workers only (runner.local_workers)
            return self.runner.put_local((x.reshape((n, k, -1) + x.shape[2:]), y.reshape((n, k, -1) + y.shape[2:])),
                                         batch_axis=2 if self.runner.spans_devices else None)
        if self.runner is None:
            x, y = self.exp.data.batch(step, batch_size or t.batch_size, self.cfg.run.seed)
            return x.reshape((k, -1) + x.shape[1:]), y.reshape((k, -1) + y.shape[1:])
        w, local = self.runner.num_workers, self.runner.local_workers
        # only the workers of this process's devices (all of them in a single-process run)
        xs, ys = zip(*(self.exp.data.batch(step * w + i, t.batch_size, self.cfg.run.seed) for i in local))
        x, y = np.stack(xs), np.stack(ys)
        n = len(local)
        # (W, grad_accum, batch, ...): a worker spanning devices splits its batch over them (axis 2)
        return self.runner.put_local((x.reshape((n, k, -1) + x.shape[2:]), y.reshape((n, k, -1) + y.shape[2:])),
                                     batch_axis=2 if self.runner.spans_devices else None)

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

    def instability_monitors(self, params, step: int) -> dict[str, float]:
        """A GPT's largest attention logit (over blocks and heads) and its output logits' log Z
        (mean, max |.|) on this step's (first micro-)batch, after the step's update
        (:func:`jaxopt_lab.diagnostics.instability_metrics`)."""
        x, _ = self.batch(step)
        return {k: float(v) for k, v in self.instability(params, x[0]).items()}

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

    def restore(self, step: int | None = None) -> TrainState:
        """The state of checkpoint ``step`` (default: the last), after checking it was made with this
        config, up to the hyperparameter changes the run's config history records."""
        step = self.checkpoints.latest_step() if step is None else step
        try:
            state, saved = self.checkpoints.restore(step, self.initial, data=self.loader and self.loader.iterator)
        except Exception as e:  # noqa: BLE001 - orbax raises several kinds for a state that does not fit
            raise config_lib.ConfigError(
                f"cannot resume {self.run_dir}: checkpoint {step} does not fit the optimizer state of "
                f"the method as configured now ({type(e).__name__}: {str(e)[:300]})"
            ) from None
        check_checkpoint_config(self.run_dir, saved, self.cfg.to_dict(), self.allowed_changes)
        if self.loader is not None and self.loader.position != step:
            raise config_lib.ConfigError(f"cannot resume {self.run_dir}: checkpoint {step} holds the data iterator "
                                         f"at step {self.loader.position}, not {step}")
        return state

    def last_good_checkpoint(self, step: int, loss_now: float) -> tuple[int | None, list[str]]:
        """After a non-finite value at ``step``: the newest kept checkpoint whose parameters are all
        finite and whose training loss (the loss the next step computed at them) is finite, and why
        each newer one is not."""
        losses = {r["step"]: r.get("loss") for r in read_metrics(self.run_dir)}
        losses[step] = loss_now
        rejected = []
        for s in sorted(self.checkpoints.all_steps(), reverse=True):
            if s >= step:
                continue
            loss = losses.get(s + 1)
            if loss is None or not math.isfinite(loss):
                rejected.append(f"step {s}: the loss at its parameters is {loss}")
                continue
            state, _ = self.checkpoints.restore(s, self.initial)
            bad = [jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_leaves_with_path(state.params)
                   if jnp.issubdtype(x.dtype, jnp.inexact) and not bool(jnp.isfinite(x).all())]
            if bad:
                rejected.append(f"step {s}: non-finite parameters {', '.join(bad[:3])}")
                continue
            return s, rejected
        return None, rejected

    def stop_non_finite(self, step: int, record: dict[str, Any], keys: list[str]) -> None:
        """Raise NonFiniteLossError naming the value, the step and the last good checkpoint (by
        :meth:`last_good_checkpoint`), and record them in ``diverged.json`` for ``resume``."""
        self.checkpoints.wait()
        good, rejected = self.last_good_checkpoint(step, record["loss"])
        where = (f"{self.checkpoints.path(good)} (step {good}: finite parameters, training loss "
                 f"{_loss_at(self.run_dir, good + 1, record, step):.6g} at them)") if good is not None else \
            "none (no kept checkpoint has finite parameters and a finite loss at them)"
        if is_primary():
            with open(os.path.join(self.run_dir, DIVERGED_FILE), "w") as f:
                json.dump({"step": step, "values": {k: repr(record[k]) for k in keys}, "last_good": good,
                           "rejected": rejected}, f, indent=1)
        values = ", ".join(f"{k} is {record[k]}" for k in keys)
        raise NonFiniteLossError(
            f"{values} at step {step}; last good checkpoint: {where}"
            + (f"; not good: {'; '.join(rejected)}" if rejected else "")
            + f". `jaxopt-lab resume {self.run_dir} --set method.learning_rate=...` continues from "
            + ("it" if good is not None else "step 0")
        )

    def fit(self, resume: bool = False, start: int | None = None) -> RunResult:
        """Train from step 0, or (``resume``) from checkpoint ``start`` (default: the last)."""
        cfg = self.cfg
        t = cfg.train
        if resume and start is None:
            start = self.checkpoints.latest_step()
        state = self.restore(start) if resume and start else self.initial
        if self.runner is not None:  # the steps donate their input state: keep self.initial intact
            # a copy of each buffer, with no program to compile, in place (its own sharding: across
            # processes device_put needs one)
            state = jax.device_put(state, jax.tree.map(lambda x: x.sharding, state), may_alias=False)
        start = start if resume and start else 0
        if self.loader is not None and not (resume and start):
            self.loader.seek(start)
        primary = is_primary()  # process 0 writes the logs; every process takes part in the checkpoints
        log = MetricsLog(self.run_dir, start_step=start, tensorboard=cfg.logging.tensorboard, write=primary)
        elapsed = (log.last or {}).get("wall_time", 0.0)
        if start == 0:
            log.write({"step": 0, **self.evaluate(state.params), "wall_time": 0.0})
        bar = _progress(cfg.logging.progress and primary, total=t.steps, initial=start, desc=cfg.run.name)
        t0 = time.perf_counter() - elapsed
        step_times = []  # seconds of each train step (its metrics read back), for the final steps_per_sec
        first_step = None  # seconds from self.started to the first step's metrics on the host
        try:
            for step in range(start, t.steps):
                if self.loader is not None:
                    batch = self.batch(step, loaded=next(self.loader))
                else:
                    batch = self.batch(step, int(state.batch_size) if self.norm_test is not None else None)
                grown = self.adapt_batch_size(state, batch) if self.norm_test is not None else None
                t_step = time.perf_counter()
                state, metrics = self.train_step(state, *batch)
                record = {"step": step + 1, **self.step_metrics(state, metrics)}
                step_times.append(time.perf_counter() - t_step)
                if first_step is None:
                    first_step = time.perf_counter() - self.started
                    # compiled already: this lowering finds the program in the cache
                    self.peak_memory_bytes = compiled_memory_bytes(self.train_step, state, *batch)
                if grown is not None:
                    record["batch_size"] = int(state.batch_size)
                    state = state._replace(batch_size=jnp.asarray(grown, jnp.int32))
                if self.lr is not None:
                    record["learning_rate"] = float(self.lr(step))
                if self.sharpness is not None and (step + 1) % t.sharpness_every == 0:
                    record.update(self.edge_of_stability(state.params, step))
                if self.instability is not None and (step + 1) % t.instability_every == 0:
                    record.update(self.instability_monitors(state.params, step))
                done = step + 1
                if done == t.steps or (t.eval_every and done % t.eval_every == 0):
                    record.update(self.evaluate(state.params))
                bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
                if bad:  # nothing of this step is logged or checkpointed
                    self.stop_non_finite(step + 1, record, bad)
                if done == t.steps:  # median over this process's steps (the first, compiling one, included)
                    record["opt_state_bytes"] = self.opt_state_bytes
                    record["peak_memory_bytes"] = self.peak_memory_bytes
                    if self.param_report is not None:
                        record.update(self.param_report)
                    record["steps_per_sec"] = 1.0 / float(np.median(step_times))
                    # build, compiles, the step-0 evaluation and the first step, of this process
                    record["time_to_first_step"] = first_step
                record["wall_time"] = time.perf_counter() - t0
                log.write(record)
                if done == t.steps or (cfg.checkpoint.every and done % cfg.checkpoint.every == 0):
                    log.flush()  # what a resume from this checkpoint keeps is on disk first
                    self.checkpoints.save(done, state, cfg.to_dict(), data=self.loader and self.loader.iterator)
                bar.update(1)
                bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "eval_loss") if k in record}, refresh=False)
        finally:
            bar.close()
            log.close()
            self.checkpoints.wait()
        final = log.last or {}
        if primary:
            with open(os.path.join(self.run_dir, SUMMARY_FILE), "w") as f:
                json.dump(final, f, indent=1, allow_nan=False)
        return RunResult(self.run_dir, final)


def compiled_memory_bytes(step: Any, *args: Any) -> int | None:
    """Peak memory of one compiled train step, from XLA's ``memory_analysis()`` of the program for
    ``args``: argument + output + temporary bytes, less the bytes of outputs aliased to (donated)
    arguments. None where the step cannot be lowered or the backend reports nothing.

    The step's program has run already (the jit cache holds it), so lowering it again compiles
    nothing. A multi-worker step (``SyncedStep``): the program of the decisions the states in
    ``args`` call for.
    """
    try:
        if hasattr(step, "program"):
            step = step.program(**step.decisions(*args))
        stats = step.lower(*args).compile().memory_analysis()
    except Exception:  # noqa: BLE001 - a backend or wrapper without AOT lowering: nothing to report
        return None
    if stats is None:
        return None
    total = (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
             - stats.alias_size_in_bytes)
    return int(total) if total > 0 else None


def check_checkpoint_config(run_dir: str, saved: dict[str, Any], now: dict[str, Any], allowed: Iterable[str] = ()
                            ) -> None:
    """ConfigError unless the config ``now`` equals the one a checkpoint of ``run_dir`` was made with
    (``saved``), up to what may differ on a resume and the changes its config history records
    (``allowed``: this resume's own)."""
    changed = recorded_changes(run_dir) | set(allowed)
    differ = [k for k in config_lib.differing_keys(saved, now, ignore=config_lib.RESUME_MAY_DIFFER)
              if not (config_lib.may_change_on_resume(k) and k in changed)]
    if differ:
        fa, fb = config_lib.flatten(saved), config_lib.flatten(now)
        detail = "; ".join(f"{k}: checkpoint {fa.get(k, '<absent>')!r} vs now {fb.get(k, '<absent>')!r}" for k in differ)
        raise config_lib.ConfigError(
            f"cannot resume {run_dir}: the config differs from the checkpoint's in {', '.join(differ)} ({detail})"
        )


def _loss_at(run_dir: str, step: int, record: dict[str, Any], now: int) -> float:
    if step == now:
        return record["loss"]
    return next(r["loss"] for r in read_metrics(run_dir) if r["step"] == step)


def recorded_changes(run_dir: str) -> set[str]:
    """Keys that resumes of ``run_dir`` changed (its config history)."""
    path = os.path.join(run_dir, HISTORY_FILE)
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        return {k for line in f if line.strip() for k in json.loads(line)["changed"]}


def _progress(enabled: bool, total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True)


def run_dir_of(cfg: config_lib.ExperimentConfig) -> str:
    return os.path.join(cfg.run.out_dir, cfg.run.name)


def has_checkpoints(run_dir: str) -> bool:
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    return os.path.isdir(ckpt_dir) and any(name.isdigit() for name in os.listdir(ckpt_dir))


def check_fresh_run_dir(run_dir: str, resume_hint: str | None = None) -> None:
    """RunDirError unless ``run_dir`` can be created and holds no checkpoints (a run to resume)."""
    check_not_a_file(run_dir)
    if has_checkpoints(run_dir):
        raise RunDirError(
            f"{run_dir} already holds checkpoints: `jaxopt-lab resume {resume_hint or run_dir}` to continue it, "
            f"or choose another run.name"
        )


def run(config: str | config_lib.ExperimentConfig, overrides: Iterable[str] = (), run_dir: str | None = None) -> RunResult:
    """Run an experiment from a config (file path or validated config) into a fresh run directory.

    The resolved config is written to ``RUN_DIR/config.toml`` before training.
    A directory that already holds checkpoints is an error (resume it instead).
    """
    started = time.perf_counter()
    cfg = config_lib.load(config, overrides) if isinstance(config, str) else config
    if not isinstance(config, str) and overrides:
        cfg = config_lib.from_dict(config_lib.apply_overrides(cfg.to_dict(), overrides))
    run_dir = run_dir or run_dir_of(cfg)
    check_fresh_run_dir(run_dir)
    experiment = build(cfg)
    if is_primary():
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, CONFIG_FILE), "w") as f:
            f.write(experiment.config.dumps())
    sync("jaxopt_lab_run_dir")  # the other processes start once the run directory exists
    return Trainer(experiment, run_dir, started=started).fit(resume=False)


def resume(run_dir: str, overrides: Iterable[str] = ()) -> RunResult:
    """Continue the run in ``run_dir`` from its last checkpoint, with its own config.

    ``overrides`` (``section.key=value``, or ``-section.key`` to remove a key: see
    :func:`config.apply_overrides`) may change keys that do not change the numbers
    (``logging``, ``checkpoint``); how far the run goes and how it evaluates on the way
    (``train.steps``, ``train.eval_every``, ``train.eval_batches``: a finished run is extended, an
    interrupted one stops elsewhere); and, to recover a run, the method's hyperparameters
    (``method.learning_rate``, ``method.b2``, ...; see :func:`config.is_recovery_key`). Those
    changes are written to the run's ``config.toml`` and appended, with the step they apply from,
    to ``config_history.jsonl``. Anything else is an error naming the keys.

    A run that already reached ``train.steps`` is left as it is: the result's ``note`` says so
    (and that ``train.steps=N`` extends it). A run stopped on a non-finite value
    (``diverged.json``) continues from its last good checkpoint; the checkpoints after it and the
    metrics up to the stop are moved, not deleted, to ``diverged/<step>/``.
    """
    started = time.perf_counter()
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise RunDirError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    if "federated" in config_lib.read_toml(path):
        raise RunDirError(f"{run_dir} is a federated simulation: federated_run.resume continues it "
                          f"(`jaxopt-lab resume {run_dir}` does)")
    overrides = list(overrides)
    before = config_lib.read_toml(path)
    cfg = config_lib.load(path, overrides)
    if overrides:
        after = config_lib.apply_overrides(before, overrides)
        changed = config_lib.differing_keys(before, after, ignore=config_lib.RESUME_MAY_DIFFER)
        refused = [k for k in changed if not config_lib.may_change_on_resume(k)]
        if refused:
            raise config_lib.ConfigError(
                f"cannot resume {run_dir} with {', '.join(refused)} changed: a resume may change only "
                f"{', '.join(config_lib.RESUME_EXTEND_KEYS)}, the method's hyperparameters (method.learning_rate, "
                f"method.b2, ...), logging.* and checkpoint.*"
            )
    else:
        changed = []
    diverged = os.path.join(run_dir, DIVERGED_FILE)
    stop = None
    if os.path.exists(diverged):
        with open(diverged) as f:
            stop = json.load(f)
    reached = latest_checkpoint_step(run_dir)
    steps_before = before.get("train", {}).get("steps", config_lib.TrainConfig.steps)
    if stop is None and reached is not None and reached >= cfg.train.steps:
        if reached > cfg.train.steps:
            raise config_lib.ConfigError(
                f"cannot resume {run_dir} with train.steps = {cfg.train.steps}: it reached step {reached} already")
        # the run's config.toml must still be the one it ran with (a hand edit is caught here too)
        ckpt = Checkpointer(run_dir, keep=cfg.checkpoint.keep)
        try:
            check_checkpoint_config(run_dir, ckpt.saved_config(reached), before)
        finally:
            ckpt.close()
        final = next((r for r in reversed(read_metrics(run_dir)) if r["step"] == reached), {"step": reached})
        ignored = f"; the --set/--unset ({', '.join(changed)}) changed nothing" if changed else ""
        return RunResult(run_dir, final, note=(
            f"{run_dir} already finished: step {reached} of train.steps = {steps_before}; nothing to resume "
            f"(`--set train.steps=N` with N > {reached} extends it){ignored}"))
    experiment = build(cfg)
    start = None
    if stop is not None:
        start = stop["last_good"] or 0
        if start > cfg.train.steps:
            raise config_lib.ConfigError(
                f"cannot resume {run_dir} with train.steps = {cfg.train.steps}: it continues from step {start}")
        if is_primary():
            _set_aside(run_dir, stop["step"], after=start)
        sync("jaxopt_lab_set_aside")  # every process then sees the same checkpoints
    trainer = Trainer(experiment, run_dir, started=started)
    if start is None:
        start = trainer.checkpoints.latest_step() or 0
    trainer.allowed_changes = set(changed)
    if start:
        trainer.restore(start)  # a checkpoint that refuses the changed config fails here, before any write
    if changed and is_primary():
        flat_before, flat_after = config_lib.flatten(before), config_lib.flatten(experiment.config.to_dict())
        record = {"step": start, "changed": {k: [flat_before.get(k), flat_after.get(k)] for k in changed}}
        with open(os.path.join(run_dir, HISTORY_FILE), "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        with open(path, "w") as f:
            f.write(experiment.config.dumps())
    return trainer.fit(resume=True, start=start)


def latest_checkpoint_step(run_dir: str) -> int | None:
    """The step of the newest complete checkpoint in ``run_dir`` (orbax's numbered folders), or None."""
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    steps = [int(n) for n in os.listdir(ckpt_dir) if n.isdigit()] if os.path.isdir(ckpt_dir) else []
    return max(steps, default=None)


def _set_aside(run_dir: str, step: int, after: int) -> None:
    """Move the checkpoints after step ``after`` and the metrics and stop record of a diverged run
    to ``run_dir/diverged/<step>/`` (a resume continues from ``after``; nothing is deleted)."""
    import shutil

    dest = os.path.join(run_dir, "diverged", str(step))
    n = 1
    while os.path.exists(dest):
        dest = os.path.join(run_dir, "diverged", f"{step}.{n}")
        n += 1
    os.makedirs(os.path.join(dest, "checkpoints"))
    ckpts = os.path.join(run_dir, "checkpoints")
    for name in sorted(os.listdir(ckpts)) if os.path.isdir(ckpts) else []:
        if name.isdigit() and int(name) > after:
            os.replace(os.path.join(ckpts, name), os.path.join(dest, "checkpoints", name))
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(metrics):
        shutil.copy2(metrics, os.path.join(dest, "metrics.jsonl"))
    os.replace(os.path.join(run_dir, DIVERGED_FILE), os.path.join(dest, DIVERGED_FILE))
