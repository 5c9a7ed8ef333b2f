"""Compile once: variants share the model init and eval step, validation compiles nothing, the
CLI's persistent compilation cache and its --no-compile-cache flag, time to first step."""

import collections
import json
import os
import subprocess
import sys

import jax
import pytest

from jaxopt_lab.experiment import build as build_lib
from jaxopt_lab.experiment.cli import main
from jaxopt_lab.experiment.compilation import CompileCounter, default_cache_dir

CONFIG = (
    '[run]\nname = "{name}"\nout_dir = "{out}"\n[data]\nname = "digits"\n'
    '[model]\nname = "mlp"\nhidden = [8]\n[method]\nname = "sgd"\nlearning_rate = 0.3\n'
    '[train]\nsteps = 1\nbatch_size = 8\neval_every = 1\neval_batches = 1\n'
    '[logging]\nprogress = false\ntensorboard = false\n'
)
VARIANTS = (
    '[variants.ddp]\nworkers = { count = 2 }\nmethod = { name = "data_parallel", inner = { name = "sgd", learning_rate = 0.3 } }\n'
    '[variants.local]\nworkers = { count = 2 }\n'
    'method = { name = "local_sgd", sync_every = 1, inner = { name = "sgd", learning_rate = 0.3 } }\n'
)


def test_variants_build_and_compile_the_model_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(build_lib, "_MODEL_INITS", collections.OrderedDict())  # nothing from earlier tests
    jax.clear_caches()  # nor their compiled eval programs (shared by every run of a process)
    path = tmp_path / "v.toml"
    path.write_text(CONFIG.format(name="v", out=tmp_path / "runs") + VARIANTS)
    with CompileCounter() as c:
        assert main(["run", str(path)]) == 0
    # validating both variants compiled nothing; their runs share one init and one eval program
    # (before: the init compiled 4 times, each variant built twice; the eval step once per variant)
    assert c.by_name["jit(init_model)"] == 1, dict(c.by_name)
    assert c.by_name["jit(_eval_program)"] == 1, dict(c.by_name)
    out = capsys.readouterr().out
    assert "first step s" in out.splitlines()[0]
    for name in ("ddp", "local"):
        with open(tmp_path / "runs" / "v" / name / "summary.json") as f:
            summary = json.load(f)
        assert 0 < summary["time_to_first_step"] < 600


def test_validate_compiles_nothing_and_checks_like_build(tmp_path):
    from jaxopt_lab.experiment import config as config_lib

    path = tmp_path / "c.toml"
    path.write_text(CONFIG.format(name="c", out=tmp_path / "runs"))
    cfg = config_lib.load(str(path))
    with CompileCounter() as c:
        resolved = build_lib.validate(cfg)
    assert c.count == 0, dict(c.by_name)
    assert resolved == build_lib.build(cfg).config
    bad = config_lib.load(str(path), ["model.hidden=[-1]"])
    with pytest.raises(config_lib.ConfigError, match="model"):
        build_lib.validate(bad)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("JAXOPT_LAB_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == str(tmp_path / "xdg" / "jaxopt_lab" / "xla")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "jaxopt_lab", "xla")
    monkeypatch.setenv("JAXOPT_LAB_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == str(tmp_path / "mine")


def test_cli_fills_the_cache_unless_told_not_to(tmp_path):
    """In fresh processes (JAX opens its cache once per process): `run` writes compiled programs
    to $JAXOPT_LAB_CACHE_DIR; with --no-compile-cache nothing is written."""
    path = tmp_path / "s.toml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_PERSISTENT_CACHE")}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the test session's own cache (conftest)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for flag, name in ((["--no-compile-cache"], "off"), ([], "on")):
        path.write_text(CONFIG.format(name=name, out=tmp_path / "runs"))
        env["JAXOPT_LAB_CACHE_DIR"] = str(tmp_path / f"cache_{name}")
        proc = subprocess.run([sys.executable, "-m", "jaxopt_lab.experiment.cli", "run", str(path), *flag],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "first step after" in proc.stdout
        cache = tmp_path / f"cache_{name}"
        entries = os.listdir(cache) if cache.exists() else []
        assert bool(entries) == (name == "on"), entries
