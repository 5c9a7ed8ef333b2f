"""Config validation and the method registry: errors name the bad key or value."""

import glob
import os

import jax.numpy as jnp
import optax
import pytest

import jaxopt_lab
from jaxopt_lab.experiment import build as build_lib
from jaxopt_lab.experiment import config as config_lib
from jaxopt_lab.experiment.methods import build_method, resolve_method


def base():
    return {
        "run": {"name": "t", "seed": 0},
        "data": {"name": "digits"},
        "model": {"name": "mlp", "hidden": [8]},
        "method": {"name": "sgd", "learning_rate": 0.1},
        "train": {"steps": 2, "batch_size": 8},
    }


def with_(section, **kv):
    raw = base()
    raw.setdefault(section, {}).update(kv)
    return raw


@pytest.mark.parametrize(
    "raw, match",
    [
        (with_("train", stepz=3), r"train\.stepz.*did you mean 'steps'"),
        (with_("train", steps="ten"), r"train\.steps must be int, got 'ten'"),
        (with_("train", steps=0), r"train\.steps must be >= 1, got 0"),
        (with_("train", batch_size=10, grad_accum=3), r"batch_size \(10\).*grad_accum \(3\)"),
        (with_("logging", progress="yes"), r"logging\.progress must be bool"),
        (with_("train", norm_test_eta=float("nan")), r"train\.norm_test_eta must be finite, got nan"),
        (with_("workers", devices_per_worker=0), r"workers\.devices_per_worker must be >= 1, got 0"),
        (with_("workers", count=4, devices_per_worker=2), r"devices_per_worker = 2 needs workers\.mode = 'shard_map'"),
        ({**base(), "optimiser": {}}, r"unknown config section \[optimiser\]"),
        ({k: v for k, v in base().items() if k != "method"}, r"needs a \[method\] table"),
    ],
)
def test_fixed_sections_reject_bad_keys_and_values(raw, match):
    with pytest.raises(config_lib.ConfigError, match=match):
        config_lib.from_dict(raw)


@pytest.mark.parametrize(
    "raw, match",
    [
        (with_("method", name="adamww"), r"unknown method\.name 'adamww'.*adamw"),
        (with_("method", learnin_rate=0.1), r"method\.learnin_rate.*did you mean 'learning_rate'"),
        (with_("method", learning_rate=-1.0), r"learning_rate must be > 0, got -1\.0"),
        (with_("method", learning_rate="abc"), r"method\.learning_rate must be a number, got 'abc'"),
        (with_("method", learning_rate=True), r"method\.learning_rate must be a number, got True"),
        (with_("method", learning_rate=float("inf")), r"method\.learning_rate must be finite, got inf"),
        (with_("method", momentum="0.9"), r"method\.momentum must be a number, got '0\.9'"),
        (with_("method", learning_rate={"schedule": "cosine_decay", "init_value": 1.0}), r"'cosine_decay' is not an optax schedule"),
        (with_("method", learning_rate={"schedule": "cosine_decay_schedule", "init_value": 1.0, "steps": 3}), r"learning_rate\.steps"),
        (with_("data", name="mnist"), r"unknown data\.name 'mnist'"),
        (with_("data", test_frac=0.3), r"data\.test_frac"),
        (with_("model", name="gpt"), r"model 'gpt' does not fit data task 'classification'"),
        (with_("model", hiden=[3]), r"model\.hiden.*did you mean 'hidden'"),
        (with_("model", preset="nano"), r"model\.preset.*no presets"),
        (with_("model", out_features=3), r"model\.out_features = 3 does not fit the data, which needs at least 10"),
        (with_("model", in_features=5), r"model\.in_features = 5 does not fit the data, which needs 64"),
        (with_("model", hiden=[3]), r"model\.hiden for MLP "),
        ({**with_("method", name="local_sgd", sync_every=50, inner={"name": "sgd", "learning_rate": 0.1}),
          "workers": {"count": 2}}, r"method\.sync_every = 50 > train\.steps = \d+: the workers would never synchronize"),
    ],
)
def test_free_sections_checked_against_their_callables(raw, match):
    cfg = config_lib.from_dict(raw)
    with pytest.raises(config_lib.ConfigError, match=match):
        build_lib.build(cfg)


def test_overrides_parse_values_as_toml():
    raw = config_lib.apply_overrides(
        base(), ["method.learning_rate=3e-4", "method.name=adamw", "model.hidden=[4, 4]", "logging.progress=false"]
    )
    assert raw["method"] == {"name": "adamw", "learning_rate": 3e-4}
    assert raw["model"]["hidden"] == [4, 4]
    assert raw["logging"]["progress"] is False
    with pytest.raises(config_lib.ConfigError, match="section.key=value"):
        config_lib.apply_overrides(base(), ["method.learning_rate"])


def test_registry_looks_in_jaxopt_lab_then_optax_then_contrib(monkeypatch):
    assert resolve_method("adamw") is optax.adamw
    assert resolve_method("muon") is optax.contrib.muon

    def adamw(learning_rate):  # a package transform shadows the optax alias of the same name
        return optax.sgd(learning_rate)

    monkeypatch.setattr(jaxopt_lab, "adamw", adamw, raising=False)
    assert resolve_method("adamw") is adamw


def test_schedule_tables_build_the_optax_schedule():
    spec = {"schedule": "linear_schedule", "init_value": 1.0, "end_value": 0.0, "transition_steps": 4}
    tx = build_method({"name": "sgd", "learning_rate": spec})
    params = {"w": jnp.zeros(())}
    state = tx.init(params)
    steps = []
    for _ in range(3):
        updates, state = tx.update({"w": jnp.ones(())}, state)
        steps.append(float(-updates["w"]))
    assert steps == pytest.approx([1.0, 0.75, 0.5])


def test_resolved_config_fills_defaults_and_derived_sizes():
    exp = build_lib.build(config_lib.from_dict(base()))
    cfg = exp.config
    assert cfg.model["in_features"] == 64 and cfg.model["out_features"] == 10
    assert "momentum" not in cfg.method  # a None default is not written
    assert cfg.method["nesterov"] is False  # optax.sgd's default, recorded
    assert cfg.data["test_fraction"] == pytest.approx(0.2)
    # the written TOML reads back to the same config
    again = config_lib.from_dict(__import__("tomllib").loads(cfg.dumps()))
    assert again.to_dict() == cfg.to_dict()


def test_differing_keys():
    a = {"method": {"learning_rate": 1.0, "b1": 0.9}, "logging": {"progress": True}}
    b = {"method": {"learning_rate": 2.0}, "logging": {"progress": False}}
    assert config_lib.differing_keys(a, b, ignore=["logging"]) == ["method.b1", "method.learning_rate"]
    # a run resolved before workers.devices_per_worker / model.tie_embeddings existed resumes
    old = {"workers": {"count": 8, "mode": "vmap"}, "model": {"name": "gpt", "width": 128}}
    new = {"workers": {"count": 8, "mode": "vmap", "devices_per_worker": 1},
           "model": {"name": "gpt", "width": 128, "tie_embeddings": False}}
    assert config_lib.differing_keys(old, new) == []
    assert config_lib.differing_keys(old, {**new, "workers": {**new["workers"], "devices_per_worker": 2}}) == [
        "workers.devices_per_worker"]


ABSTRACT_ONLY = {
    "diloco_gpt_small.toml",  # tests/experiment/test_gpt_small_config.py
    "finetune_gpt_code.toml",  # built for real it would run its pretraining (tests/finetune run it shrunk)
    "finetune_cnn_digits59.toml",  # the same (tests/finetune/test_finetune_cnn.py)
}


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "*.toml"))))
def test_every_shipped_experiment_validates(path, tmp_path):
    from jaxopt_lab.experiment import federated_run

    raw = config_lib.read_toml(path)
    if federated_run.is_federated(raw):  # a federated config: its own schema, a simulator per method
        cfg = federated_run.validate(raw)
        setup = federated_run.build_setup(cfg)
        for method in cfg["methods"].values():
            federated_run.build_method(cfg, method, setup)
        return
    # a config meant for a GPU or a pod is built from shapes (its own test runs it shrunk)
    abstract = os.path.basename(path) in ABSTRACT_ONLY
    overrides = []
    if raw.get("data", {}).get("name") == "tokens":  # token files made elsewhere: a tiny folder stands in
        import numpy as np

        seq_len = raw["data"].get("seq_len", 1024)
        for split in ("train", "val"):
            np.zeros(seq_len + 1, np.uint16).tofile(tmp_path / f"{split}.bin")
        overrides = [f"data.path={tmp_path}"]
    for cfg in config_lib.load_variants(path, overrides).values():
        build_lib.build(cfg, abstract=abstract, check_fit=not abstract)


def test_variants_merge_and_replace_named_tables(tmp_path):
    path = tmp_path / "v.toml"
    path.write_text(
        '[run]\nname = "cmp"\n[data]\nname = "digits"\n[model]\nname = "mlp"\nhidden = [4]\n'
        '[method]\nname = "sgd"\nlearning_rate = 0.1\n[train]\nsteps = 5\nbatch_size = 8\n'
        '[variants.a]\ntrain = { steps = 7 }\n'
        '[variants.b]\nmethod = { name = "adamw", learning_rate = 1e-3 }\n'
    )
    cfgs = config_lib.load_variants(str(path), ["train.batch_size=4"])
    assert list(cfgs) == ["a", "b"]
    assert (cfgs["a"].train.steps, cfgs["a"].train.batch_size, cfgs["a"].run.name) == (7, 4, "cmp/a")
    assert cfgs["b"].method == {"name": "adamw", "learning_rate": 1e-3}  # replaced whole, no stray momentum
    assert cfgs["b"].train.steps == 5
    with pytest.raises(config_lib.ConfigError, match=r"variant 'a'.*train\.stepz"):
        config_lib.load_variants(str(path), ["train.stepz=1"])
    # run.name renames the base, each variant keeps its own folder; variants.NAME.* edits one variant
    cfgs = config_lib.load_variants(str(path), ["run.name=x", "variants.b.method.learning_rate=0.5"])
    assert [c.run.name for c in cfgs.values()] == ["x/a", "x/b"]
    assert cfgs["b"].method["learning_rate"] == 0.5 and cfgs["a"].method["learning_rate"] == 0.1
    from jaxopt_lab.experiment.compare import run_variants

    with pytest.raises(config_lib.ConfigError, match=r"variant 'b': unknown config key method\.learnig_rate"):
        run_variants(str(path), ["variants.b.method.learnig_rate=0.5", f"run.out_dir={tmp_path / 'runs'}"])
    assert not (tmp_path / "runs").exists()  # checked before any training


def test_sweep_refuses_a_point_given_twice_before_any_run(tmp_path):
    import tomli_w

    from jaxopt_lab.experiment.sweep import sweep

    path = tmp_path / "c.toml"
    raw = base()
    raw["run"]["out_dir"] = str(tmp_path / "runs")
    path.write_text(tomli_w.dumps(raw))
    with pytest.raises(config_lib.ConfigError, match="the grid has the point 'learning_rate=0.1' twice"):
        sweep(str(path), ["method.learning_rate=0.1,0.1"])
    assert not (tmp_path / "runs").exists()


def test_method_names_and_schedule_errors_name_their_key(tmp_path):
    with pytest.raises(config_lib.ConfigError, match=r"method\.name 'fedavg' is a federated server rule"):
        build_lib.build(config_lib.from_dict(with_("method", name="fedavg")))
    nested = {**base(), "method": {"name": "lookahead", "fast_optimizer": {"name": "adamz"}, "sync_period": 5,
                                   "slow_step_size": 0.5}}
    with pytest.raises(config_lib.ConfigError, match=r"unknown method\.fast_optimizer\.name 'adamz'"):
        build_lib.build(config_lib.from_dict(nested))
    bad_schedule = with_("method", learning_rate={"schedule": "cosine_decay_schedule", "init_value": 0.1,
                                                  "decay_steps": -5})
    with pytest.raises(config_lib.ConfigError, match=r"method\.learning_rate: "):
        build_lib.build(config_lib.from_dict(bad_schedule))
    with pytest.raises(config_lib.ConfigError, match=r"unknown config section \[variant\].*did you mean 'variants'"):
        config_lib.from_dict({**base(), "variant": {}})


def test_resume_refuses_a_federated_run(tmp_path):
    from jaxopt_lab.experiment.trainer import RunDirError, resume

    (tmp_path / "config.toml").write_text('[federated]\nnum_clients = 4\n[methods.a]\nrule = "fedavg"\n')
    with pytest.raises(RunDirError, match="is a federated simulation"):
        resume(str(tmp_path))


def test_grid_axes_split_at_top_level_commas_only():
    from jaxopt_lab.experiment.sweep import grid_points, parse_grid

    axes = parse_grid(["model.hidden=[8, 8],[4]", "method.learning_rate=1e-3, 3e-3", 'run.name="a,b",c'])
    assert axes == [("model.hidden", ["[8, 8]", "[4]"]), ("method.learning_rate", ["1e-3", "3e-3"]),
                    ("run.name", ['"a,b"', "c"])]
    assert len(grid_points(axes)) == 8
    assert config_lib.apply_overrides(base(), [grid_points(axes)[0][0]])["model"]["hidden"] == [8, 8]
    with pytest.raises(config_lib.ConfigError, match="has no values"):
        parse_grid(["method.learning_rate=,"])


@pytest.mark.parametrize(
    "raw, match",
    [
        (with_("method", name="adam", learning_rate=1e-3, b2=1.5), r"method\.b2 must be in \[0, 1\), got 1\.5"),
        (with_("method", name="adamw", learning_rate=1e-3, weight_decay=-0.1),
         r"method\.weight_decay must be >= 0, got -0\.1"),
        (with_("method", name="adam", learning_rate=1e-3, eps=-1e-8), r"method\.eps must be >= 0, got -1e-08"),
        (with_("method", name="rmsprop", learning_rate=1e-3, decay=1.0), r"method\.decay must be in \[0, 1\), got 1\.0"),
        (with_("method", name="sgd", learning_rate=0.1, momentum=-0.5), r"method\.momentum must be in \[0, 1\)"),
        ({**base(), "method": {"name": "data_parallel", "inner": {"name": "lion", "learning_rate": 1e-3, "b1": 1.0}},
          "workers": {"count": 2}}, r"method\.inner\.b1 must be in \[0, 1\), got 1\.0"),
        (with_("data", name="digits", path="PATH"), r"data\.path = '.*not_npz\.npz'.* is not a \.npz archive"),
        (with_("train", batch_size=1_000_000_000), r"needs at least .* GB of memory.*train\.batch_size = 1000000000"),
        ({**base(), "data": {"name": "text", "context": 16}, "model": {"name": "gpt", "preset": "micro"},
          "method": {"name": "data_parallel", "inner": {"name": "sgd", "learning_rate": 0.1}},
          "workers": {"count": 1_000_000}}, r"needs at least [\d.]+ [GT]B of memory.*workers\.count = 1000000 x"),
        ({**base(), "method": {"name": "data_parallel", "inner": {"name": "sgd", "learning_rate": 0.1}},
          "workers": {"count": 4, "mode": "shard_map", "devices_per_worker": 3}},
         r"workers: devices_per_worker=3 does not divide the 8 devices"),
    ],
)
def test_bad_values_are_refused_before_compute(raw, match, tmp_path):
    if raw["data"].get("path") == "PATH":
        (tmp_path / "not_npz.npz").write_text("x,y\n1,2\n")  # a text file named .npz
        raw["data"]["path"] = str(tmp_path / "not_npz.npz")
    with pytest.raises(config_lib.ConfigError, match=match):
        build_lib.build(config_lib.from_dict(raw))


@pytest.mark.parametrize("name, match", [
    ("", r"run\.name must not be empty"), (".", r"run\.name must name a folder inside run\.out_dir"),
    ("../../x", r"no empty, '\.' or '\.\.' parts\), got '\.\./\.\./x'"), ("a/../../x", r"got 'a/\.\./\.\./x'"),
    ("/tmp/x", r"run\.name must be a relative name inside run\.out_dir, got the absolute path '/tmp/x'"),
])
def test_run_names_stay_inside_out_dir(name, match):
    with pytest.raises(config_lib.ConfigError, match=match):
        config_lib.from_dict(with_("run", name=name))
    assert config_lib.from_dict(with_("run", name="sweeps/a")).run.name == "sweeps/a"  # subfolders are fine


def test_unusable_out_dir_is_refused_before_compute(tmp_path, monkeypatch):
    from jaxopt_lab.experiment import trainer

    monkeypatch.setattr(trainer, "build", lambda cfg: pytest.fail("built before the run dir was checked"))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(trainer.RunDirError, match=r"cannot create the run directory .*a_file/sub/t.*a_file is a file"):
        trainer.run(config_lib.from_dict(with_("run", out_dir=str(tmp_path / "a_file" / "sub"))))
    with pytest.raises(trainer.RunDirError, match=r"/proc/jaxopt_lab_runs/t.* is not writable"):  # even for root
        trainer.run(config_lib.from_dict(with_("run", out_dir="/proc/jaxopt_lab_runs")))
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(trainer.RunDirError, match=r"locked is not writable"):
            trainer.run(config_lib.from_dict(with_("run", out_dir=str(locked))))
    assert sorted(os.listdir(tmp_path)) == ["a_file"] + (["locked"] if os.geteuid() != 0 else [])


def test_variant_overrides_must_name_an_existing_variant(tmp_path):
    path = tmp_path / "v.toml"
    path.write_text('[data]\nname = "digits"\n[model]\nname = "mlp"\n[method]\nname = "sgd"\nlearning_rate = 0.1\n'
                    '[variants.diloco_h10]\ntrain = { steps = 7 }\n[variants.ddp]\ntrain = { steps = 3 }\n')
    with pytest.raises(config_lib.ConfigError, match=r"has no variant 'diloco_h1O' \(did you mean 'diloco_h10'\?\)"):
        config_lib.load_variants(str(path), ["variants.diloco_h1O.train.steps=5"])
    with pytest.raises(config_lib.ConfigError, match=r"must look like variants\.NAME\.section\.key=value"):
        config_lib.load_variants(str(path), ["variants.ddp=5"])
    assert config_lib.load_variants(str(path), ["variants.diloco_h10.train.steps=5"])["diloco_h10"].train.steps == 5
    plain = tmp_path / "p.toml"
    plain.write_text('[data]\nname = "digits"\n[model]\nname = "mlp"\n[method]\nname = "sgd"\nlearning_rate = 0.1\n')
    with pytest.raises(config_lib.ConfigError, match=r"has no \[variants\.NAME\] tables"):
        config_lib.load_variants(str(plain), ["variants.a.train.steps=5"])


@pytest.mark.parametrize("spec, expected", [
    ({"schedule": "exponential_decay", "init_value": 1.0, "transition_steps": 1, "decay_rate": 0.5}, [1.0, 0.5, 0.25]),
    ({"schedule": "piecewise_constant_schedule", "init_value": 1.0, "boundaries_and_scales": {"1": 0.5, "2": 0.1}},
     [1.0, 0.5, 0.05]),
    ({"schedule": "join_schedules", "boundaries": [2], "schedules": [
        {"schedule": "constant_schedule", "value": 1.0},
        {"schedule": "linear_schedule", "init_value": 0.5, "end_value": 0.0, "transition_steps": 2}]}, [1.0, 1.0, 0.5]),
    ({"schedule": "sgdr_schedule", "cosine_kwargs": [{"init_value": 1.0, "peak_value": 1.0, "warmup_steps": 0,
                                                      "decay_steps": 2}]}, [1.0, 0.5, 0.0]),
])
def test_every_optax_schedule_is_accepted(spec, expected):
    tx = build_method({"name": "sgd", "learning_rate": spec})
    state = tx.init({"w": jnp.zeros(())})
    steps = []
    for _ in range(3):
        updates, state = tx.update({"w": jnp.ones(())}, state)
        steps.append(float(-updates["w"]))
    assert steps == pytest.approx(expected)
