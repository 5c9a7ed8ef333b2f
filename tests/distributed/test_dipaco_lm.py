"""scripts/dipaco_lm.py at toy size: it runs, its bytes follow the per-module ring model, its table has every row."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
import dipaco_lm as script  # noqa: E402


@pytest.mark.slow  # ~30 s of CPU (six programs to compile), 110 s on the shared machine
def test_toy_run_bytes_and_table(tmp_path):
    steps, H = 4, 2
    results = script.main(["--out", str(tmp_path), "--width", "8", "--heads", "2", "--context", "8", "--prefix", "16",
                           "--batch", "2", "--steps", str(steps), "--H", str(H), "--val-windows", "16",
                           "--runs", "dipaco", "diloco_path"])
    dip, dense = results["dipaco"], results["diloco_path"]
    assert dip["params_per_worker"] == dense["params_per_worker"] < dip["params_total"]
    n = 4 * dip["params_per_worker"]  # float32 bytes of one path
    rounds, W = steps // H, 4
    assert dip["payload_bytes"] == dense["payload_bytes"] == rounds * W * n  # each worker sends its path per round
    assert dense["wire_bytes"] == rounds * W * -(-2 * (W - 1) * n // W)  # ring over 4
    modules = dip["module_bytes"]
    shared = modules["shared"]
    assert shared["wire"] == rounds * W * -(-2 * 3 * (shared["payload"] // (rounds * W)) // 4)
    for key in ("(0, 0)", "(0, 1)", "(1, 0)", "(1, 1)"):  # 2 holders: a ring of 2 sends the module once
        assert modules[key]["workers"] == 2 and modules[key]["wire"] == modules[key]["payload"]
    assert dip["wire_bytes"] == sum(m["wire"] for m in modules.values())
    assert np.isfinite(dip["val_loss"]) and np.isfinite(dip["val_loss_random_path"])
    table = (tmp_path / "results.json").read_text()
    assert "router's path" in table and "a random path per input" in table and "one path's size" in table
