"""`jaxopt-lab plot`: one colour per run in every panel, one legend, units, labels, folders of runs."""

import json

import matplotlib.pyplot as plt
import pytest
import tomli_w

from jaxopt_lab.experiment.cli import main
from jaxopt_lab.experiment.plot import expand_runs, figure, run_labels


def fake_run(run_dir, data="text", loss="cross_entropy", consensus=False, steps=4):
    """A run directory with a config and metrics, as the trainer writes them (no training)."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(tomli_w.dumps({"data": {"name": data}, "train": {"loss": loss}}))
    records = [{"step": 0, "eval_loss": 5.5, "eval_accuracy": 0.0, "wall_time": 0.0}]
    for t in range(1, steps + 1):
        r = {"step": t, "loss": 5.0 / t, "accuracy": 0.1 * t, "wire_bytes": 100.0 * t, "wall_time": 0.5 * t}
        if consensus:
            r["consensus_distance"] = 1.0 / t
        records.append(r)
    records[-1].update(eval_loss=2.0, eval_accuracy=0.4)
    if data == "least_squares":
        for r in records:
            r.pop("accuracy", None), r.pop("eval_accuracy", None)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(run_dir)


def panels(fig):
    """``{(title): {label: colour}}`` of the lines in each panel."""
    return {ax.get_title(): {line.get_label(): line.get_color() for line in ax.get_lines()} for ax in fig.axes}


def test_a_run_keeps_its_colour_in_every_panel_and_one_legend_names_all(tmp_path):
    # ddp has no consensus distance: gossip must not take ddp's colour in that panel
    ddp = fake_run(tmp_path / "ddp")
    gossip = fake_run(tmp_path / "gossip_ring", consensus=True)
    fig = figure([ddp, gossip])
    [legend] = fig.legends
    colour = {text.get_text(): handle.get_color() for text, handle in zip(legend.get_texts(), legend.legend_handles)}
    assert list(colour) == ["ddp", "gossip_ring"] and colour["ddp"] != colour["gossip_ring"]
    by_panel = panels(fig)
    assert by_panel["consensus distance vs step"] == {"gossip_ring": colour["gossip_ring"]}
    for title, lines in by_panel.items():
        assert lines == {label: colour[label] for label in lines}, title
    assert set(by_panel) >= {"train loss vs step", "eval loss vs wall-clock", "eval accuracy vs wire bytes"}
    ylabels = {ax.get_title(): ax.get_ylabel() for ax in fig.axes}
    assert ylabels["eval loss vs step"] == "eval loss (nats/byte)"
    assert ylabels["train loss vs wire bytes"] == "train loss (nats/byte)"
    assert "fraction of next bytes" in ylabels["eval accuracy vs step"]
    plt.close(fig)


def test_units_follow_each_runs_config(tmp_path):
    fig = figure([fake_run(tmp_path / "lsq", data="least_squares")])
    assert {ax.get_title(): ax.get_ylabel() for ax in fig.axes}["eval loss vs step"] == "eval loss (squared error)"
    plt.close(fig)
    # a StableMax run beside a softmax one: the axis says the units differ, the legend gives each
    fig = figure([fake_run(tmp_path / "adamw", data="digits"), fake_run(tmp_path / "perp", data="digits", loss="stable_max")])
    ylabels = {ax.get_title(): ax.get_ylabel() for ax in fig.axes}
    assert "see legend" in ylabels["eval loss vs step"]
    assert "fraction of examples" in ylabels["eval accuracy vs step"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["adamw [nats]", "perp [StableMax, nats]"]
    plt.close(fig)


def test_repeated_folder_names_are_told_apart(tmp_path, capsys):
    a, b = fake_run(tmp_path / "a" / "ddp"), fake_run(tmp_path / "b" / "ddp", steps=6)
    assert run_labels([a, b, str(tmp_path / "c" / "gossip")]) == ["a/ddp", "b/ddp", "gossip"]
    out = tmp_path / "p.png"
    assert main(["plot", a, b, "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "'a/ddp'" in captured.err and "'b/ddp'" in captured.err
    rows = [line for line in captured.out.splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0] for row in rows] == ["| a/ddp", "| b/ddp"]  # two rows, not one merged
    assert main(["plot", a, b, "-o", str(out), "--labels", "lr 1e-3, lr 3e-3"]) == 0
    assert "| lr 1e-3 |" in capsys.readouterr().out
    assert main(["plot", a, b, "-o", str(out), "--labels", "only_one"]) == 1
    assert "--labels has 1 names (only_one) for 2 runs" in capsys.readouterr().err
    assert main(["plot", a, b, "-o", str(out), "--labels", "x,x"]) == 1
    assert "two runs have the label 'x'" in capsys.readouterr().err
    assert main(["plot", a, a, "-o", str(out)]) == 1
    assert "given twice" in capsys.readouterr().err


def test_a_folder_of_variants_and_its_glob(tmp_path, capsys):
    base = tmp_path / "runs" / "cmp"
    runs = [fake_run(base / name) for name in ("ddp", "diloco_h10", "gossip_ring")]
    (base / "compare.md").write_text("| variant |\n")
    (base / "compare.png").write_bytes(b"\x89PNG")
    assert expand_runs([str(base)]) == (runs, [])
    # what the shell passes for runs/cmp/*
    globbed, notes = expand_runs(sorted(str(p) for p in base.iterdir()))
    assert globbed == runs and notes == [f"skipped {base / 'compare.md'}: a file, not a run directory",
                                         f"skipped {base / 'compare.png'}: a file, not a run directory"]
    out = tmp_path / "p.png"
    assert main(["plot", *sorted(str(p) for p in base.iterdir()), "-o", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="holds no runs"):
        expand_runs([str(tmp_path / "runs")])
    with pytest.raises(ValueError, match="does not exist"):
        expand_runs([str(base / "dilcoo_h10")])
