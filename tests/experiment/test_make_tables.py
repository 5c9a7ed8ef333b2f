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
