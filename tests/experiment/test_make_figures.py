"""scripts/make_figures.py: docs/NAME.png redrawn from run folders; missing or unfinished runs say what is missing."""

import json
import os
import sys

import pytest
import tomli_w

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
import make_figures  # noqa: E402


def variants_run(base, names, finished=True):
    """A config-with-variants run folder as `jaxopt-lab run` leaves it (no training)."""
    base.mkdir(parents=True)
    (base / "variants.toml").write_text("variants = [" + ", ".join(f'"{n}"' for n in names) + "]\n")
    for i, name in enumerate(names):
        d = base / name
        d.mkdir()
        (d / "config.toml").write_text(tomli_w.dumps({"data": {"name": "text"}}))
        records = [{"step": t, "loss": 5.0 / (t + 1 + i), "eval_loss": 5.0 / (t + 1), "wall_time": 0.1 * t}
                   for t in range(4)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        if finished or i == 0:
            (d / "summary.json").write_text(json.dumps({"eval_loss": 1.25}))


def test_variants_figure_written_in_config_order(tmp_path):
    variants_run(tmp_path / "runs" / "lowrank_lm", ["adamw", "galore"])
    log = []
    missing = make_figures.draw(["lowrank_lm"], str(tmp_path / "runs"), str(tmp_path / "docs"), log.append)
    png = tmp_path / "docs" / "lowrank_lm.png"
    assert missing == [] and log[0].startswith("drew      lowrank_lm")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_missing_and_unfinished_runs_are_named_with_their_command(tmp_path, capsys):
    runs = tmp_path / "runs"
    variants_run(runs / "grokking_modular_addition", ["adamw_wd1", "adamw_no_wd"], finished=False)
    log = []
    missing = make_figures.draw(["grokking_modular_addition", "fed_digits"], str(runs), str(tmp_path / "docs"),
                                log.append)
    assert missing == ["grokking_modular_addition", "fed_digits"]
    assert os.path.join("adamw_no_wd", "summary.json") in log[0] and "is missing" in log[0]
    assert "run experiments/grokking_modular_addition.toml" in log[0]
    assert os.path.join("fed_digits", "config.toml") in log[1] and "run experiments/fed_digits.toml" in log[1]
    assert not (tmp_path / "docs").exists()  # nothing half-drawn
    # named figures that cannot be drawn: exit status 1; unknown names: a clear error
    assert make_figures.main(["fed_digits", "--runs", str(runs), "--out", str(tmp_path / "docs")]) == 1
    assert "not drawn fed_digits" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown figure 'nope'; known: diloco_vs_ddp_fast"):
        make_figures.main(["nope", "--runs", str(runs)])


def test_fed_figure_from_per_seed_records(tmp_path):
    base = tmp_path / "runs" / "fed_digits"
    base.mkdir(parents=True)
    cfg = {"run": {"seed": 0}, "federated": {"num_clients": 10, "dirichlet_alpha": 0.3, "speeds": "lognormal",
                                             "speed_sigma": 1.0, "max_speed_spread": 10.0, "num_seeds": 2,
                                             "target_accuracy": 0.9},
           "methods": {"fedavg": {"rule": "fedavg", "trigger": "sync"}}}
    (base / "config.toml").write_text(tomli_w.dumps(cfg))
    (base / "summary.md").write_text("| method |\n|---|\n| fedavg |\n")
    (base / "fedavg").mkdir()
    records = [{"seed": s, "step": t, "sim_time": 10.0 * t, "client_updates": 10 * t, "mean_staleness": 0.0,
                "eval_accuracy": 0.5 + 0.1 * t} for s in (0, 1) for t in range(1, 5)]
    (base / "fedavg" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert make_figures.main(["fed_digits", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "docs")]) == 0
    assert (tmp_path / "docs" / "fed_digits.png").stat().st_size > 10_000


def fed_run(base, methods, alpha, first_accuracy=0.5):
    base.mkdir(parents=True)
    cfg = {"run": {"seed": 0}, "federated": {"num_clients": 10, "dirichlet_alpha": alpha, "speeds": "homogeneous",
                                             "speed_sigma": 1.0, "max_speed_spread": 10.0, "num_seeds": 1,
                                             "target_accuracy": 0.85},
           "methods": {m: {"rule": m, "trigger": "sync"} for m in methods}}
    (base / "config.toml").write_text(tomli_w.dumps(cfg))
    (base / "summary.md").write_text("| method |\n|---|\n")
    for m in methods:
        (base / m).mkdir()
        records = [{"seed": 0, "step": t, "sim_time": 10.0 * t, "client_updates": 10 * t, "mean_staleness": 0.0,
                    "eval_accuracy": first_accuracy + 0.1 * t} for t in range(1, 5)]
        (base / m / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_fed_heterogeneity_figure_needs_and_draws_the_later_runs(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    fed_run(runs / "fed_het_a0.1", ["fedavg", "curriculum", "fedprox"], 0.1)
    log = []
    assert make_figures.draw(["fed_heterogeneity_a0.1"], str(runs), str(tmp_path / "docs"), log.append) == [
        "fed_heterogeneity_a0.1"]
    assert os.path.join("fed_het_a0.1_fedbr", "config.toml") in log[0] and "--only fedbr" in log[0]
    fed_run(runs / "fed_het_a0.1_fedbr", ["fedbr"], 0.1)
    fed_run(runs / "fed_het_a0.1_curricula", ["curriculum"], 0.1, first_accuracy=0.2)
    seen = []
    import jaxopt_lab.experiment.federated_run as fr

    def record(results, cfg, out):
        seen.append([(r.name, r.runs[0].records[0]["eval_accuracy"]) for r in results])
        return out

    monkeypatch.setattr(fr, "plot", record)
    assert make_figures.draw(["fed_heterogeneity_a0.1"], str(runs), str(tmp_path / "docs"), log.append) == []
    # FedBR is added; the curricula rerun replaces the first run's curriculum in place
    assert [name for name, _ in seen[0]] == ["fedavg", "curriculum", "fedprox", "fedbr"]
    assert [acc for _, acc in seen[0]] == pytest.approx([0.6, 0.3, 0.6, 0.6])


def test_dipaco_figure_from_results_json(tmp_path):
    base = tmp_path / "runs" / "dipaco"
    base.mkdir(parents=True)
    curve = [[30, 3.4], [60, 3.1]]
    results = {name: {"curve": curve, "wire_bytes": 1e6 * (i + 1)} for i, name in
               enumerate(["dipaco", "diloco_path", "diloco_total"])}
    results["dipaco"]["val_loss_random_path"] = 3.2
    args = {"grid": [2, 2], "H": 30, "steps": 60, "width": 64, "batch": 16, "context": 64}
    (base / "results.json").write_text(json.dumps({"args": args, "results": results, "table": ""}))
    assert make_figures.main(["dipaco", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "docs")]) == 0
    assert (tmp_path / "docs" / "dipaco.png").stat().st_size > 10_000
