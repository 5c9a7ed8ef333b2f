"""Multi-worker methods through the experiment trainer (config [workers])."""


import pytest

from jaxopt_lab.distributed import communicated_bytes
from jaxopt_lab.experiment import build as build_lib
from jaxopt_lab.experiment import config as config_lib
from jaxopt_lab.experiment import trainer
from jaxopt_lab.experiment.metrics import read_metrics

STEPS = 6
MLP_PARAMS = 64 * 8 + 8 + 8 * 10 + 10


def cfg(method, workers=None, batch_size=8, steps=STEPS):
    raw = {
        "run": {"name": "w", "seed": 0},
        "data": {"name": "digits"},
        "model": {"name": "mlp", "hidden": [8]},
        "method": method,
        "train": {"steps": steps, "batch_size": batch_size, "eval_every": 3},
        "checkpoint": {"every": 0},
        "logging": {"progress": False, "tensorboard": False},
    }
    if workers:
        raw["workers"] = workers
    return config_lib.from_dict(raw)


@pytest.fixture(scope="module")
def single_sgd(tmp_path_factory):
    return read_metrics(trainer.run(cfg({"name": "sgd", "learning_rate": 0.3}, batch_size=32),
                                    run_dir=str(tmp_path_factory.mktemp("single"))).run_dir)


@pytest.mark.parametrize("mode", ["vmap", "shard_map"])
def test_data_parallel_on_4_workers_equals_one_worker_on_their_union(single_sgd, tmp_path, mode):
    """4 workers x 8 examples see exactly the 32 examples of the single run's step."""
    method = {"name": "data_parallel", "inner": {"name": "sgd", "learning_rate": 0.3}}
    records = read_metrics(trainer.run(cfg(method, {"count": 4, "mode": mode}), run_dir=str(tmp_path)).run_dir)
    for r, s in zip(records, single_sgd):
        for key in ("loss", "eval_loss"):
            if key in s:
                assert r[key] == pytest.approx(s[key], rel=1e-5), (r["step"], key)
    assert [r["bytes_communicated"] for r in records[1:]] == [4 * MLP_PARAMS * t for t in range(1, STEPS + 1)]
    # ring all-reduce over 4 workers: 2 x 3 chunks of a quarter of the 4 * 610 gradient bytes, sent per step
    assert [r["wire_bytes"] for r in records[1:]] == [6 * MLP_PARAMS * t for t in range(1, STEPS + 1)]


def test_diloco_config_with_nested_optimizers(tmp_path):
    method = {
        "name": "diloco",
        "sync_every": 3,
        "inner": {"name": "adamw", "learning_rate": 1e-3},
        "outer": {"name": "sgd", "learning_rate": 0.7, "momentum": 0.9, "nesterov": True},
    }
    result = trainer.run(cfg(method, {"count": 4}), run_dir=str(tmp_path))
    records = read_metrics(result.run_dir)
    assert [r["bytes_communicated"] for r in records[1:]] == [4 * MLP_PARAMS * (t // 3) for t in range(1, STEPS + 1)]
    assert [r["wire_bytes"] for r in records[1:]] == [6 * MLP_PARAMS * (t // 3) for t in range(1, STEPS + 1)]
    assert records[-1]["eval_loss"] < records[0]["eval_loss"]
    resolved = build_lib.build(cfg(method, {"count": 4})).config.method
    assert resolved["inner"]["b1"] == 0.9 and resolved["outer"]["nesterov"] is True  # defaults recorded


def test_single_worker_method_with_workers_is_an_error():
    with pytest.raises(config_lib.ConfigError, match=r"'adamw' is a single-worker.*workers.count = 4"):
        build_lib.build(cfg({"name": "adamw", "learning_rate": 1e-3}, {"count": 4}))
    with pytest.raises(config_lib.ConfigError, match=r"num_workers=3 does not fit 8 devices"):
        build_lib.build(cfg({"name": "data_parallel", "inner": {"name": "sgd", "learning_rate": 0.1}}, {"count": 3, "mode": "shard_map"}))
    with pytest.raises(config_lib.ConfigError, match=r"method\.inner\.learnin_rate"):
        build_lib.build(cfg({"name": "data_parallel", "inner": {"name": "sgd", "learnin_rate": 0.1}}, {"count": 2}))
    with pytest.raises(config_lib.ConfigError, match=r"axis_name"):
        build_lib.build(cfg({"name": "data_parallel", "axis_name": "x", "inner": {"name": "sgd", "learning_rate": 0.1}}, {"count": 2}))


def test_gossip_logs_consensus_distance(tmp_path):
    method = {"name": "gossip", "topology": "ring", "inner": {"name": "sgd", "learning_rate": 0.3}}
    records = read_metrics(trainer.run(cfg(method, {"count": 4}), run_dir=str(tmp_path)).run_dir)
    assert all(r["consensus_distance"] > 0 for r in records[1:])  # workers see different data
    assert [r["bytes_communicated"] for r in records[1:]] == [2 * 4 * MLP_PARAMS * t for t in range(1, STEPS + 1)]
    assert [r["wire_bytes"] for r in records[1:]] == [2 * 4 * MLP_PARAMS * t for t in range(1, STEPS + 1)]  # 2 messages


def test_trainer_decides_synchronization_on_the_host(tmp_path, monkeypatch):
    """DiLoCo under gradient accumulation: two compiled steps chosen on the host, same numbers as in the graph."""
    from jaxopt_lab.distributed.workers import SyncedStep

    method = {"name": "diloco", "sync_every": 2, "inner": {"name": "adamw", "learning_rate": 1e-3}}
    config = cfg(method, {"count": 4})
    config = config_lib.from_dict(config_lib.apply_overrides(config.to_dict(), ["train.grad_accum=2"]))
    host = trainer.Trainer(build_lib.build(
        config_lib.from_dict(config_lib.apply_overrides(config.to_dict(), ["checkpoint.every=2"]))), str(tmp_path / "host"))
    host.fit()
    assert set(host.train_step._compiled) == {(("sync", -1),), (("sync", 0),)}  # no-sync and sync, nothing else
    # the state is donated step to step: a checkpoint saved before the next step still holds its step's state
    saved, _ = host.checkpoints.restore(4, host.initial)
    assert int(saved.step[0]) == 4 and communicated_bytes(saved.opt_state)[0] == 4 * MLP_PARAMS * 2
    monkeypatch.setattr(SyncedStep, "decisions", lambda self, *args: {})  # the in-graph decision
    graph = trainer.Trainer(build_lib.build(config), str(tmp_path / "graph"))
    graph.fit()
    a, b = read_metrics(str(tmp_path / "host")), read_metrics(str(tmp_path / "graph"))
    assert [r["bytes_communicated"] for r in a[1:]] == [4 * MLP_PARAMS * (t // 2) for t in range(1, STEPS + 1)]
    for r, s in zip(a, b):
        for key in ("loss", "eval_loss", "bytes_communicated"):
            if key in s:
                assert r[key] == pytest.approx(s[key], rel=1e-5), (r["step"], key)
