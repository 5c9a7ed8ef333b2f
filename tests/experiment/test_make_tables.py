"""scripts/make_tables.py: marked regions are rewritten from run outputs; missing runs leave them as they are."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
import make_tables  # noqa: E402

DOC = """Intro.

<!-- table:diloco_vs_ddp_fast -->
| old | table |
<!-- /table:diloco_vs_ddp_fast -->

<!-- table:quickstart -->
| kept | because its run is missing |
<!-- /table:quickstart -->
Outro.
"""


def _variants_run(base, finals):
    os.makedirs(base)
    with open(os.path.join(base, "variants.toml"), "w") as f:
        f.write("variants = [" + ", ".join(f'"{n}"' for n in finals) + "]\n")
    for name, final in finals.items():
        os.makedirs(os.path.join(base, name))
        with open(os.path.join(base, name, "summary.json"), "w") as f:
            json.dump(final, f)


def test_regions_rewritten_from_runs_and_missing_runs_kept(tmp_path):
    final = {"eval_loss": 2.80888, "eval_accuracy": 0.30781, "bytes_communicated": 188211200.0, "wire_bytes": 3.2937e8}
    _variants_run(tmp_path / "diloco_vs_ddp_fast", {"ddp": final, "gossip_ring": {**final, "eval_loss": 2.7}})
    log = []
    out = make_tables.rewrite(DOC, str(tmp_path), log.append)
    assert out == DOC.replace("| old | table |\n", (
        "| variant | final eval loss | eval acc | payload bytes/worker | wire bytes/worker |\n"
        "|---|---:|---:|---:|---:|\n"
        "| ddp | 2.8089 | 0.3078 | 1.882e+08 | 3.294e+08 |\n"
        "| gossip_ring | 2.7000 | 0.3078 | 1.882e+08 | 3.294e+08 |\n"))
    assert log[0] == "rewrote   diloco_vs_ddp_fast"
    assert log[1].startswith("kept      quickstart:") and "experiments/quickstart.toml" in log[1]
    log.clear()
    assert make_tables.rewrite(out, str(tmp_path), log.append) == out  # idempotent
    assert log[0] == "unchanged diloco_vs_ddp_fast"


def test_quickstart_rows_and_unknown_marker(tmp_path):
    os.makedirs(tmp_path / "quickstart")
    records = [{"step": 0, "eval_loss": 5.5876, "eval_accuracy": 0.0012, "wall_time": 0.2},
               {"step": 1, "loss": 5.0}, {"step": 100, "eval_loss": 2.9941, "eval_accuracy": 0.2271, "wall_time": 30.4},
               {"step": 300, "eval_loss": 2.6851, "eval_accuracy": 0.2812, "wall_time": 61.6}]
    (tmp_path / "quickstart" / "summary.json").write_text("{}")
    (tmp_path / "quickstart" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert make_tables.quickstart(str(tmp_path)).splitlines()[2:] == [
        "| 0 | 5.588 | 0.001 | 0 s |", "| 100 | 2.994 | 0.227 | 30 s |", "| 300 | 2.685 | 0.281 | 62 s |"]
    with pytest.raises(SystemExit, match="unknown table marker 'nope'"):
        make_tables.rewrite("<!-- table:nope -->\n| x |\n<!-- /table:nope -->\n", str(tmp_path), print)


def test_lowrank_table_relative_to_adamw(tmp_path):
    finals = {"adamw": {"eval_loss": 2.68512, "opt_state_bytes": 3.8e6, "steps_per_sec": 4.0},
              "galore": {"eval_loss": 2.39771, "opt_state_bytes": 1.558e6, "steps_per_sec": 5.0},
              "stable_spam": {"eval_loss": 2.24489, "opt_state_bytes": 3.8e6, "steps_per_sec": 3.2}}
    _variants_run(tmp_path / "lowrank_lm", finals)
    lines = make_tables.lowrank_lm(str(tmp_path)).splitlines()
    assert lines[0] == "| variant | final eval loss | opt state × AdamW | step time × AdamW |"
    assert lines[2:] == ["| AdamW | 2.6851 | 1.00 | 1.00 |",
                         f"| GaLore | 2.3977 | {1.558e6 / 3.8e6:.2f} | {4.0 / 5.0:.2f} |",
                         f"| Stable-SPAM | 2.2449 | 1.00 | {4.0 / 3.2:.2f} |"]
    # one value per column (no "new / old" pairs): the region is the generated table and nothing else
    doc = "<!-- table:lowrank_lm -->\n| hand | typed |\n<!-- /table:lowrank_lm -->\n"
    out = make_tables.rewrite(doc, str(tmp_path), lambda line: None)
    assert "hand" not in out and all(" / " not in line for line in out.splitlines())


def test_fed_digits_table_is_one_runs_summary_relabelled(tmp_path):
    from jaxopt_lab.experiment.federated_run import MethodResult, SeedRun, format_table

    def seed_run(seed, times, staleness):
        records = [{"seed": seed, "step": 10 * (i + 1), "sim_time": t, "client_updates": 100 * (i + 1),
                    "mean_staleness": staleness, "eval_accuracy": acc}
                   for i, (t, acc) in enumerate(zip(times, (0.5, 0.91, 0.93)))]
        return SeedRun(seed, records, server_steps=30, client_updates=300, mean_staleness=staleness)

    cfg = {"federated": {"target_accuracy": 0.9, "num_seeds": 2},
           "methods": {"fedavg": {"rule": "fedavg", "trigger": "sync"},
                       "fedbuff_c10": {"rule": "fedbuff", "trigger": "buffer"}}}
    results = [MethodResult("fedavg", [seed_run(0, (100, 320, 400), 0.0), seed_run(1, (100, 300, 400), 0.0)], 12.3),
               MethodResult("fedbuff_c10", [seed_run(0, (50, 140, 200), 0.9), seed_run(1, (50, 150, 200), 0.9)], 45.6)]
    summary = format_table(results, cfg)
    (tmp_path / "fed_digits").mkdir()
    (tmp_path / "fed_digits" / "summary.md").write_text(summary + "\n")
    table = make_tables.fed_digits(str(tmp_path)).splitlines()
    src = [[c.strip() for c in line.strip("|").split("|")] for line in summary.splitlines()]
    out = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    wall = src[0].index("wall s")
    assert out[0] == src[0][:wall] + src[0][wall + 1:]  # every column of the run's table but its wall-clock
    assert [row[0] for row in out[2:]] == ["FedAvg", "FedBuff, 10 in flight"]
    for got, row in zip(out[2:], src[2:]):
        assert got[1:] == row[1:wall] + row[wall + 1:]  # the run's numbers, untouched
    assert out[3][2] == "145.0 [140-150]" and out[3][3] == f"{310 / 145:.2f}x"  # medians of the two seeds
    (tmp_path / "fed_digits" / "summary.md").write_text("| method | rule |\n|---|---|\n| fedavg | fedavg |\n")
    with pytest.raises(ValueError, match="not the table federated_run.format_table writes"):
        make_tables.fed_digits(str(tmp_path))
