"""The trainer: learning, run outputs, accumulation, resume equality, NaN stop, CLI."""

import json
import os
import shutil
import tomllib

import numpy as np
import pytest

from jaxopt_lab.experiment import config as config_lib
from jaxopt_lab.experiment import trainer
from jaxopt_lab.experiment.build import build
from jaxopt_lab.experiment.cli import main
from jaxopt_lab.experiment.metrics import read_metrics, without_timing


def tiny(**sections):
    raw = {
        "run": {"name": "tiny", "seed": 3},
        "data": {"name": "digits"},
        "model": {"name": "mlp", "hidden": [16]},
        "method": {"name": "sgd", "learning_rate": 0.2, "momentum": 0.9},
        "train": {"steps": 30, "batch_size": 32, "eval_every": 10},
        "checkpoint": {"every": 10, "keep": 2},
        "logging": {"progress": False},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return config_lib.from_dict(raw)


def write_config(cfg, path):
    with open(path, "w") as f:
        f.write(cfg.dumps())
    return str(path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 30-step run that several tests compare against."""
    run_dir = str(tmp_path_factory.mktemp("ref") / "run")
    return trainer.run(tiny(), run_dir=run_dir)


def test_model_learns_and_run_dir_holds_everything(reference):
    records = read_metrics(reference.run_dir)
    assert [r["step"] for r in records] == list(range(31))
    first, last = records[0], records[-1]
    assert last["eval_loss"] < 0.5 * first["eval_loss"]
    assert last["eval_accuracy"] > 0.7 > first["eval_accuracy"]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 10, 20, 30]
    # resolved config, checkpoints (last `keep`), TensorBoard events, summary
    with open(os.path.join(reference.run_dir, "config.toml"), "rb") as f:
        assert tomllib.load(f) == build(tiny()).config.to_dict()
    assert sorted(os.listdir(os.path.join(reference.run_dir, "checkpoints")), key=int) == ["20", "30"]
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(reference.run_dir, "tb")))
    with open(os.path.join(reference.run_dir, "summary.json")) as f:
        assert json.load(f) == records[-1]


def test_gradient_accumulation_equals_the_full_batch(reference, tmp_path):
    """SGD on 4 micro-batches of 8 (optax.MultiSteps) = SGD on the batch of 32."""
    accum = trainer.run(tiny(train={"grad_accum": 4}), run_dir=str(tmp_path / "accum"))
    full = {r["step"]: r for r in read_metrics(reference.run_dir)}
    for r in read_metrics(accum.run_dir):
        for key in ("loss", "eval_loss"):
            if key in r:
                assert r[key] == pytest.approx(full[r["step"]][key], rel=2e-5, abs=1e-6), (r["step"], key)


def test_resume_after_a_crash_reproduces_the_run(reference, tmp_path):
    """Crash after step 30's metrics but before its checkpoint, mid-write of a line."""
    run_dir = str(tmp_path / "crashed")
    shutil.copytree(reference.run_dir, run_dir)
    shutil.rmtree(os.path.join(run_dir, "checkpoints", "30"))
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 31, "loss": 0.1')  # a line the kill cut short
    result = trainer.resume(run_dir)
    assert list(without_timing(read_metrics(run_dir))) == list(without_timing(read_metrics(reference.run_dir)))
    assert result.final["eval_loss"] == reference.final["eval_loss"]


def test_resume_refuses_a_different_config(reference, tmp_path):
    run_dir = str(tmp_path / "changed")
    shutil.copytree(reference.run_dir, run_dir)
    with pytest.raises(config_lib.ConfigError, match=r"with model\.hidden, train\.batch_size changed: a resume may "
                                                      r"change only train\.steps, .*the method's hyperparameters"):
        trainer.resume(run_dir, ["train.batch_size=16", "model.hidden=[4]"])
    with pytest.raises(config_lib.ConfigError, match=r"method\.name.*changed"):
        trainer.resume(run_dir, ["method.name=adamw"])
    # hand-editing the run's config.toml is caught too (the checkpoint keeps its own copy), a
    # hyperparameter as well: only a change made by `resume --set` is recorded in the history
    path = os.path.join(run_dir, "config.toml")
    with open(path) as f:
        text = f.read()
    for old, new, key in (("seed = 3", "seed = 4", "run.seed"), ("learning_rate = 0.2", "learning_rate = 0.1",
                                                                 "method.learning_rate")):
        with open(path, "w") as f:
            f.write(text.replace(old, new))
        with pytest.raises(config_lib.ConfigError, match=rf"differs from the checkpoint's in {key}"):
            trainer.resume(run_dir)
    # logging may change
    shutil.rmtree(run_dir)
    shutil.copytree(reference.run_dir, run_dir)
    trainer.resume(run_dir, ["logging.tensorboard=false"])
    assert not os.path.exists(os.path.join(run_dir, "config_history.jsonl"))


def test_run_refuses_a_directory_with_checkpoints(reference):
    with pytest.raises(trainer.RunDirError, match="resume"):
        trainer.run(tiny(), run_dir=reference.run_dir)


def _strict(line):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(line, parse_constant=refuse)


def test_divergence_names_the_last_finite_checkpoint_and_resume_recovers_with_a_lower_lr(tmp_path, capsys):
    """least squares with SGD at lr 1 explodes: loss 16, 30, 9e4, 6e14, then inf at step 5.
    Checkpoint 4's parameters are finite but the loss at them (step 5's) is not: the last good one
    is 2 (loss 9e4 at it). `resume --set method.learning_rate=0.001` continues from 2, moves 4 aside
    and records the change."""
    run_dir = tmp_path / "div"
    cfg = tiny(data={"name": "least_squares"}, method={"name": "sgd", "learning_rate": 1.0, "momentum": 0.0},
               train={"steps": 8, "eval_every": 0}, checkpoint={"every": 2, "keep": 5}, logging={"tensorboard": False})
    with pytest.raises(trainer.NonFiniteLossError) as err:
        trainer.run(cfg, run_dir=str(run_dir))
    message = str(err.value)
    assert "loss is inf at step 5; last good checkpoint: " in message
    assert f"{run_dir}/checkpoints/2 (step 2: finite parameters, training loss 8787" in message
    assert "not good: step 4: the loss at its parameters is inf" in message
    diverged = [_strict(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in diverged] == [0, 1, 2, 3, 4]  # nothing logged for the bad step
    assert diverged[4]["loss"] > 1e12
    # a structural change is refused before anything moves
    assert main(["resume", str(run_dir), "--set", "train.batch_size=16"]) == 2
    assert "train.batch_size changed" in capsys.readouterr().err
    assert main(["resume", str(run_dir), "--set", "method.learning_rate=0.001"]) == 0
    records = [_strict(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(9))
    assert records[:3] == diverged[:3]
    assert records[3]["loss"] == pytest.approx(diverged[3]["loss"], rel=1e-6)  # from checkpoint 2's parameters
    assert [r["learning_rate"] for r in records[1:]] == [1.0] * 2 + [0.001] * 6
    assert all(np.isfinite(r["loss"]) for r in records[1:]) and records[-1]["loss"] < records[3]["loss"] / 10
    assert sorted(os.listdir(run_dir / "diverged" / "5" / "checkpoints")) == ["4"]  # moved, not deleted
    assert [_strict(x)["step"] for x in (run_dir / "diverged" / "5" / "metrics.jsonl").read_text().splitlines()] == \
        [0, 1, 2, 3, 4]
    assert _strict((run_dir / "diverged" / "5" / "diverged.json").read_text())["last_good"] == 2
    assert not (run_dir / "diverged.json").exists()
    history = [_strict(line) for line in (run_dir / "config_history.jsonl").read_text().splitlines()]
    assert history == [{"step": 2, "changed": {"method.learning_rate": [1.0, 0.001]}}]
    assert tomllib.loads((run_dir / "config.toml").read_text())["method"]["learning_rate"] == 0.001
    # a later resume accepts the recorded change (the run is complete: nothing more to do), also
    # from a checkpoint made before it, but not once the history is gone
    assert trainer.resume(str(run_dir)).final["step"] == 8
    again = trainer.Trainer(build(config_lib.load(str(run_dir / "config.toml"))), str(run_dir))
    assert int(again.restore(2).step) == 2
    os.rename(run_dir / "config_history.jsonl", run_dir / "elsewhere.jsonl")
    with pytest.raises(config_lib.ConfigError, match=r"differs from the checkpoint's in method\.learning_rate"):
        again.restore(2)


def test_cli_run_sweep_plot_and_errors(tmp_path, capsys):
    cfg_path = write_config(tiny(train={"steps": 4, "eval_every": 2}, run={"out_dir": str(tmp_path / "runs")}), tmp_path / "c.toml")
    assert main(["run", cfg_path, "--set", "run.name=cli"]) == 0
    assert "cli: step 4" in capsys.readouterr().out
    assert main(["sweep", cfg_path, "--grid", "method.learning_rate=0.1,0.05", "--grid", "model.hidden=[4],[8]"]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + 4 and "| learning_rate=0.05,hidden=[8] |" in table
    # like `run` on variants: the table in compare.md, every point's curves in compare.png
    sweep_base = tmp_path / "runs" / "tiny"
    assert (sweep_base / "compare.md").read_text().splitlines() == rows
    assert f"plot: {sweep_base / 'compare.png'}" in table and (sweep_base / "compare.png").read_bytes()[:4] == b"\x89PNG"
    sweep_dirs = sorted(d for d in os.listdir(sweep_base) if not d.startswith("compare."))
    assert len(sweep_dirs) == 4
    out = tmp_path / "plot.png"
    assert main(["plot", str(sweep_base), "-o", str(out)]) == 0  # the sweep's folder: its 4 points
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sum(line.startswith("| learning_rate=") for line in capsys.readouterr().out.splitlines()) == 4
    assert main(["run", cfg_path, "--set", "train.stepz=3"]) == 2
    assert "train.stepz" in capsys.readouterr().err


def test_stable_max_loss_sharpness_and_collapse_are_logged(tmp_path):
    """train.loss = stable_max trains; sharpness is logged every k steps and matches the
    diagnostics function on the same params and batch; collapse fraction is a fraction."""
    import jax
    import numpy as np
    from flax import nnx

    from jaxopt_lab.diagnostics import top_eigenvalue
    from jaxopt_lab.experiment.trainer import Trainer, make_loss_fn

    cfg = tiny(train={"steps": 6, "eval_every": 3, "loss": "stable_max", "sharpness_every": 3},
               method={"name": "sgd", "learning_rate": 0.1, "momentum": 0.0})
    exp = build(cfg)
    records = read_metrics(trainer.run(cfg, run_dir=str(tmp_path / "s")).run_dir)
    assert [r["step"] for r in records if "sharpness" in r] == [3, 6]
    assert all(0.0 <= r["softmax_collapse"] <= 1.0 for r in records[1:])
    assert records[-1]["eval_loss"] < records[0]["eval_loss"]
    # the logged ratio is sharpness * lr / 2
    r = records[3]
    assert r["sharpness_ratio"] == pytest.approx(r["sharpness"] * 0.1 / 2, rel=1e-5)
    # and the sharpness is the top eigenvalue of the stable-max loss at the step's params/batch
    t = Trainer(exp, str(tmp_path / "again"))
    graphdef, _, rest = nnx.split(exp.model, nnx.Param, ...)
    state = t.initial
    for step in range(3):
        state, _ = t.train_step(state, *t.batch(step))
    x, y = t.batch(2)
    loss_fn = make_loss_fn(graphdef, rest, "classification", "stable_max")
    expected = top_eigenvalue(lambda p: loss_fn(p, x[0], y[0])[0], state.params, jax.random.key(0), num_iters=30)
    assert r["sharpness"] == pytest.approx(float(expected), rel=2e-2)
    assert np.isfinite(r["sharpness"])
    with pytest.raises(config_lib.ConfigError, match=r"train\.loss must be one of .* got 'hinge'"):
        tiny(train={"loss": "hinge"})


def test_resume_refuses_a_hyperparameter_the_checkpoint_state_does_not_fit(tmp_path):
    """SGD without momentum keeps no trace; `--set method.momentum=0.9` would need one: refused on
    restore, before config.toml or the history are written. (On the finished run alone it changes
    nothing: the resume says the run is finished.)"""
    raw = {"run": {"name": "plain", "out_dir": str(tmp_path)}, "data": {"name": "digits"},
           "model": {"name": "mlp", "hidden": [4]}, "method": {"name": "sgd", "learning_rate": 0.1},
           "train": {"steps": 2, "batch_size": 8, "eval_every": 0}, "checkpoint": {"every": 1},
           "logging": {"progress": False, "tensorboard": False}}
    run_dir = trainer.run(config_lib.from_dict(raw)).run_dir
    config_text = open(os.path.join(run_dir, "config.toml")).read()
    with pytest.raises(config_lib.ConfigError, match=r"checkpoint 2 does not fit the optimizer state"):
        trainer.resume(run_dir, ["train.steps=3", "method.momentum=0.9"])  # extended: it has steps to take
    assert open(os.path.join(run_dir, "config.toml")).read() == config_text
    assert not os.path.exists(os.path.join(run_dir, "config_history.jsonl"))
    note = trainer.resume(run_dir, ["method.momentum=0.9"]).note
    assert "already finished: step 2 of train.steps = 2" in note and "(method.momentum) changed nothing" in note
    assert open(os.path.join(run_dir, "config.toml")).read() == config_text
