"""The `jaxopt-lab` command line: --version, usage on a bad flag, run --only, resume --set
train.steps (extending a finished run), a finished run resumed, --unset."""

import json
import os
import tomllib

import pytest

import jaxopt_lab
from jaxopt_lab.experiment.cli import main
from jaxopt_lab.experiment.metrics import read_metrics, without_timing

BASE = """
[run]
name = "{name}"
seed = 1
out_dir = "{out}"
[data]
name = "digits"
[model]
name = "mlp"
hidden = [8]
[method]
name = "sgd"
learning_rate = 0.2
momentum = 0.9
[train]
steps = {steps}
batch_size = 16
eval_every = 2
eval_batches = 2
[checkpoint]
every = 2
[logging]
progress = false
tensorboard = false
"""

VARIANTS = """
[variants.slow]
method = { name = "sgd", learning_rate = 0.05 }
[variants.fast]
method = { name = "sgd", learning_rate = 0.3 }
[variants.adam]
method = { name = "adam", learning_rate = 0.01 }
"""


def write(tmp_path, text, name="c.toml", steps=4, run="cli"):
    path = tmp_path / name
    path.write_text(BASE.format(name=run, out=tmp_path / "runs", steps=steps) + text)
    return str(path)


def test_version_prints_this_package_and_its_libraries(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"jaxopt-lab {jaxopt_lab.__version__} (jax ") and "optax" in out


@pytest.mark.parametrize("argv, usage, unknown", [
    (["run", "c.toml", "--bogus"], "usage: jaxopt-lab run [-h]", "--bogus"),
    (["resume", "runs/x", "--sett", "train.steps=9"], "usage: jaxopt-lab resume [-h]", "--sett train.steps=9"),
    (["sweep", "c.toml", "--grid", "method.learning_rate=0.1", "--seed", "3"], "usage: jaxopt-lab sweep [-h]",
     "--seed 3"),
    (["plot", "runs/x", "-o", "x.png", "--colors", "a"], "usage: jaxopt-lab plot [-h]", "--colors a"),
    (["--bogus", "run", "c.toml"], "usage: jaxopt-lab [-h] [--version]", "--bogus"),  # before the subcommand
])
def test_a_bad_flag_prints_the_usage_of_its_subcommand(argv, usage, unknown, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage) and f"error: unrecognized arguments: {unknown}\n" in err


def test_run_only_some_variants_then_the_others_and_resume_extends_them_all(tmp_path, capsys):
    path = write(tmp_path, VARIANTS, steps=2)
    base = tmp_path / "runs" / "cli"
    assert main(["run", path, "--only", "slow,adam"]) == 0
    out = capsys.readouterr().out
    assert sorted(d for d in os.listdir(base) if not d.startswith(("compare.", "variants."))) == ["adam", "slow"]
    assert [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and "variant" not in line] \
        == ["slow", "adam"]
    # a name that is not a variant names itself and the close one; nothing runs
    assert main(["run", path, "--only", "fats"]) == 2
    assert "--only 'fats': " in (err := capsys.readouterr().err) and "did you mean 'fast'" in err
    # the other one later: it joins the comparison, in the config's order
    assert main(["run", path, "--only", "fast"]) == 0
    capsys.readouterr()
    rows = [line.split("|")[1].strip() for line in (base / "compare.md").read_text().splitlines()[2:]]
    assert rows == ["slow", "fast", "adam"]
    # every variant finished: resuming the folder says so; --set train.steps=3 extends them all
    assert main(["resume", str(base)]) == 0
    assert "every variant already finished" in capsys.readouterr().out
    assert main(["resume", str(base), "--set", "train.steps=3"]) == 0
    assert capsys.readouterr().out.count(": resuming") == 3
    assert all(read_metrics(str(base / v))[-1]["step"] == 3 for v in ("slow", "fast", "adam"))
    # --only is for variants
    assert main(["run", write(tmp_path, "", name="plain.toml"), "--only", "a"]) == 2
    assert "has no [variants.NAME] tables" in capsys.readouterr().err


def test_resume_extends_a_finished_run_as_if_it_had_been_that_long(tmp_path, capsys):
    """4 steps, then `resume --set train.steps=8`: the same metrics, step for step, as an 8-step run
    (the batch of a step and the learning rate do not depend on train.steps)."""
    path = write(tmp_path, "")
    short, full = tmp_path / "runs" / "short", tmp_path / "runs" / "full"
    assert main(["run", path, "--run-dir", str(short)]) == 0
    assert main(["run", path, "--run-dir", str(full), "--set", "train.steps=8"]) == 0
    capsys.readouterr()
    before = (short / "metrics.jsonl").read_text()
    assert main(["resume", str(short)]) == 0  # finished: says so, changes nothing
    out = capsys.readouterr().out
    assert f"{short} already finished: step 4 of train.steps = 4; nothing to resume" in out
    assert "--set train.steps=N" in out and (short / "metrics.jsonl").read_text() == before
    # keys that would change the numbers of the steps taken stay refused, naming them
    assert main(["resume", str(short), "--set", "train.steps=8", "--set", "train.batch_size=8"]) == 2
    err = capsys.readouterr().err
    assert "with train.batch_size changed" in err and "train.steps" in err
    assert main(["resume", str(short), "--set", "train.steps=8"]) == 0
    assert "step 8" in capsys.readouterr().out

    def comparable(run_dir):  # the final-step extras are written at the end of each process's run
        return [{k: v for k, v in r.items() if k != "opt_state_bytes"} for r in without_timing(read_metrics(run_dir))]

    extended, uninterrupted = comparable(str(short)), comparable(str(full))
    assert [r["step"] for r in extended] == list(range(9))
    for a, b in zip(extended, uninterrupted):
        assert a.keys() == b.keys() and a == pytest.approx(b, rel=1e-6)
    assert tomllib.loads((short / "config.toml").read_text())["train"]["steps"] == 8
    history = [json.loads(line) for line in (short / "config_history.jsonl").read_text().splitlines()]
    assert history == [{"step": 4, "changed": {"train.steps": [4, 8]}}]
    # shorter than where the run stands: an error, not a truncation
    assert main(["resume", str(short), "--set", "train.steps=6"]) == 2
    assert "it reached step 8 already" in capsys.readouterr().err


def test_unset_drops_a_key_and_switching_the_method_names_it(tmp_path, capsys):
    path = write(tmp_path, "", steps=2)
    assert main(["run", path, "--set", "method.name=adam"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key method.momentum for adam" in err and "`--unset method.momentum` drops it" in err
    assert not os.path.exists(tmp_path / "runs" / "cli")  # refused before anything was written
    assert main(["run", path, "--set", "method.name=adam", "--unset", "method.momentum"]) == 0
    method = tomllib.loads((tmp_path / "runs" / "cli" / "config.toml").read_text())["method"]
    assert method["name"] == "adam" and "momentum" not in method
    # in a sweep over method.name too; a key that is not there is an error naming it
    assert main(["sweep", path, "--grid", "method.name=adam,lion", "--set", "run.name=s"]) == 2
    assert "`--unset method.momentum` drops it" in capsys.readouterr().err
    assert main(["run", path, "--unset", "method.nesterov"]) == 2
    assert "--unset method.nesterov: the config has no key method.nesterov" in capsys.readouterr().err
