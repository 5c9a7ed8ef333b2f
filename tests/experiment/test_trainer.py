"""The trainer: learning, run outputs, accumulation, resume equality, NaN stop, CLI."""

import json
import os
import shutil
import tomllib

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
    with pytest.raises(config_lib.ConfigError, match=r"method\.learning_rate.*0\.2.*0\.5"):
        trainer.resume(run_dir, ["method.learning_rate=0.5"])
    # hand-editing the run's config.toml is caught too (the checkpoint keeps its own copy)
    path = os.path.join(run_dir, "config.toml")
    with open(path) as f:
        text = f.read().replace("seed = 3", "seed = 4")
    with open(path, "w") as f:
        f.write(text)
    with pytest.raises(config_lib.ConfigError, match=r"differs from the checkpoint's in run\.seed"):
        trainer.resume(run_dir)
    # logging may change
    shutil.rmtree(run_dir)
    shutil.copytree(reference.run_dir, run_dir)
    trainer.resume(run_dir, ["logging.tensorboard=false"])


def test_run_refuses_a_directory_with_checkpoints(reference):
    with pytest.raises(trainer.RunDirError, match="resume"):
        trainer.run(tiny(), run_dir=reference.run_dir)


def test_nan_loss_stops_with_step_and_last_good_checkpoint(tmp_path):
    cfg = tiny(
        data={"name": "least_squares"},
        method={"name": "sgd", "learning_rate": 30.0, "momentum": 0.0},
        train={"steps": 200, "eval_every": 0},
        checkpoint={"every": 2, "keep": 1},
    )
    with pytest.raises(trainer.NonFiniteLossError) as err:
        trainer.run(cfg, run_dir=str(tmp_path / "nan"))
    message = str(err.value)
    step = int(message.split(" at step ")[1].split(";")[0])
    saved = int(message.rsplit("(step ", 1)[1].rstrip(")"))
    assert saved < step and saved == 2 * ((step - 1) // 2)
    assert os.path.isdir(os.path.join(str(tmp_path / "nan"), "checkpoints", str(saved)))
    assert read_metrics(str(tmp_path / "nan"))[-1]["step"] == step - 1  # nothing logged for the bad step


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
