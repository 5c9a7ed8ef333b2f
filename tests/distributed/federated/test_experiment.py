"""`jaxopt-lab run` on a federated config: validation before compute, and a tiny end-to-end run."""

import json
import os

import pytest

from jaxopt_lab.experiment import cli
from jaxopt_lab.experiment.config import ConfigError
from jaxopt_lab.experiment.federated_run import run

TINY = """
[run]
name = "tiny"
seed = 0

[federated]
num_clients = 12
dirichlet_alpha = 1.0
partition_seed = 0
hidden = []
batch_size = 16
sim_time = 80.0
chunk_steps = 8
target_accuracy = 0.3
speeds = "lognormal"

[methods.buffered]
rule = "fedbuff"
trigger = "buffer"
buffer_size = 2
concurrency = 4
eval_every = 2
"""


def _write(tmp_path, text):
    path = tmp_path / "fed.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("edit, message", [
    (("[run]", "[runs]"), r"unknown config section \[runs\].*did you mean 'run'"),
    (("num_clients = 12", "num_client = 12"), r"unknown config key federated.num_client.*did you mean 'num_clients'"),
    (("buffer_size = 2", "buffer_sise = 2"), r"unknown config key methods.buffered.buffer_sise"),
    (('rule = "fedbuff"', 'rule = "fedbuf"'), r"methods.buffered.rule must be one of .*got 'fedbuf'"),
    (("eval_every = 2", "alpha = 0.5"), r"methods.buffered.alpha is not an argument of rule 'fedbuff'"),
    (("buffer_size = 2", "buffer_size = 0"), r"methods.buffered: buffer size K must be >= 1, got 0"),
    (("concurrency = 4", "concurrency = 1"), r"methods.buffered: concurrency \(1\) must be >= the buffer size K \(2\)"),
    (("sim_time = 80.0", "sim_time = -1.0"), r"federated.sim_time must be > 0, got -1.0"),
    (("sim_time = 80.0", "dropout = 1.5"), r"federated.dropout must be in \[0, 1\], got 1.5"),
    (("dirichlet_alpha = 1.0", "dirichlet_alpha = -1.0"), r"federated.dirichlet_alpha must be > 0, got -1.0"),
    (("hidden = []", 'hidden = ["a"]'), r"federated.hidden must be a list of ints >= 1, got \['a'\]"),
    (("eval_every = 2", "learning_rate = -1.0"), r"methods.buffered.learning_rate must be a number > 0, got -1.0"),
    (('rule = "fedbuff"', 'rule = "fedavg"\nmomentum = 1.5'), r"methods.buffered.momentum must be in \[0, 1\), got 1.5"),
    (('name = "tiny"', 'name = "../x"'), r"run.name must name a folder inside run.out_dir"),
    # rules with their own client, and the plain client's options
    (('rule = "fedbuff"', 'rule = "fedspeed"\nlamb = -1.0'), r"methods.buffered: lamb must be >= 0, got -1.0"),
    (('rule = "fedbuff"', 'rule = "fedspeed"\ncurriculum = "anti"'), r"unknown config key methods.buffered.curriculum"),
    (("eval_every = 2", "lamb = 0.1"), r"unknown config key methods.buffered.lamb"),
    (("eval_every = 2", 'curriculum = "easy"'), r"methods.buffered: ordering must be one of"),
    (("eval_every = 2", "pace_b = 0.5"), r"methods.buffered: pacing, pace_a and pace_b need curriculum"),
    (('rule = "fedbuff"', 'rule = "fedlex"\nexplore_fraction = 2.0'), r"methods.buffered: explore_fraction must be in"),
    (('rule = "fedbuff"', 'rule = "local_scaling"\nscaling = "sgd"'), r"methods.buffered: scaling must be one of"),
    (('rule = "fedbuff"', 'rule = "fedbr"\nnum_pseudo = 0'), r"methods.buffered: num_pseudo must be an int >= 1"),
    (('rule = "fedbuff"', 'rule = "fedbr"\nfedbr_mu = -0.5'), r"methods.buffered: mu must be >= 0, got -0.5"),
    (("eval_every = 2", "client_learning_rate = 0.0"), r"methods.buffered: client_learning_rate must be a number > 0"),
])
def test_bad_federated_config_is_an_error_naming_the_key(tmp_path, edit, message):
    path = _write(tmp_path, TINY.replace(*edit))
    with pytest.raises(ConfigError, match=message):
        run(path, run_dir=str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")  # nothing ran, nothing written


def test_a_run_directory_that_holds_a_run_is_refused_before_compute(tmp_path):
    from jaxopt_lab.experiment.trainer import RunDirError

    out = tmp_path / "out"
    out.mkdir()
    (out / "config.toml").write_text("earlier results")
    with pytest.raises(RunDirError, match="already holds a run"):
        run(_write(tmp_path, TINY), run_dir=str(out))
    assert (out / "config.toml").read_text() == "earlier results"  # nothing overwritten


def test_cli_hands_a_federated_config_to_the_federated_runner(tmp_path, capsys):
    path = _write(tmp_path, TINY.replace("num_clients = 12", "num_clients = 0"))
    assert cli.main(["run", path, "--run-dir", str(tmp_path / "out")]) == 2
    assert "jaxopt-lab run: error: federated.num_clients must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.slow  # ~15 s: data, model, one compile, plot; run with -m slow
def test_cli_runs_a_federated_config_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["run", _write(tmp_path, TINY), "--run-dir", str(out), "--set", "federated.sim_time=70.0"]) == 0
    printed = capsys.readouterr().out
    assert "| buffered | fedbuff / buffer |" in printed
    for name in ("config.toml", "accuracy.png", "summary.md", "buffered/metrics.jsonl"):
        assert os.path.getsize(out / name) > 0
    assert "sim_time = 70.0" in (out / "config.toml").read_text()  # the resolved config, overrides applied
    records = [json.loads(line) for line in (out / "buffered" / "metrics.jsonl").read_text().splitlines()]
    times = [r["sim_time"] for r in records]
    assert times == sorted(times) and times[-1] <= 70.0 and len(records) > 2
    assert [r["step"] for r in records[1:]] == list(range(2, 2 * len(records) - 1, 2))  # eval_every = 2
    assert all(r["client_updates"] == 2 * r["step"] for r in records)  # K = 2 updates per server step
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 for r in records) and records[-1]["mean_staleness"] > 0


def test_a_diverging_method_stops_the_run_and_its_metrics_stay_strict_json(tmp_path, capsys):
    """A client learning rate of 1e38 overflows at the first server step: the run stops with rc 1
    naming the method, seed and step, instead of writing NaN (not JSON) and going on."""
    out = tmp_path / "out"
    path = _write(tmp_path, TINY.replace("sim_time = 80.0", "sim_time = 30.0\nclient_learning_rate = 1e38"))
    assert cli.main(["run", path, "--run-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "error: method buffered, seed 0: eval_loss is nan at server step 2" in err

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    records = [json.loads(line, parse_constant=refuse) for line in (out / "buffered" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0] and records[0]["eval_loss"] < 3  # the evaluations before it, kept
    assert not (out / "summary.md").exists()


def test_run_only_some_methods_writes_only_them(tmp_path, capsys, monkeypatch):
    """`run --only` on a federated config keeps the named [methods.NAME]; its config.toml (what a
    resume continues) holds only them. A name the config lacks is an error naming it, before compute."""
    from jaxopt_lab.experiment import federated_run

    two = TINY + '\n[methods.sync]\nrule = "fedavg"\ntrigger = "sync"\nclients_per_round = 4\n'
    path = _write(tmp_path, two)
    assert cli.main(["run", path, "--run-dir", str(tmp_path / "bad"), "--only", "sunc"]) == 2
    assert "--only 'sunc': " in (err := capsys.readouterr().err) and "did you mean 'sync'" in err
    assert not os.path.exists(tmp_path / "bad")
    ran = []
    monkeypatch.setattr(federated_run, "_run_all", lambda cfg, setup, sims, run_dir: (ran.append(list(sims)) or "", []))
    assert cli.main(["run", path, "--run-dir", str(tmp_path / "out"), "--only", "sync"]) == 0
    assert ran == [["sync"]]
    assert "[methods.buffered]" not in (tmp_path / "out" / "config.toml").read_text()
