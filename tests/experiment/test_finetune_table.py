"""scripts/finetune_table.py: mean ± std over seed folders, hooked into make_tables / make_figures."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
import make_figures  # noqa: E402
import make_tables  # noqa: E402

FT = make_tables.finetune_script()


def _seed(base, seed, variants):
    os.makedirs(base)
    with open(os.path.join(base, "variants.toml"), "w") as f:
        f.write("variants = [" + ", ".join(f'"{n}"' for n in variants) + "]\n")
    for i, name in enumerate(variants):
        os.makedirs(os.path.join(base, name))
        loss = 2.0 + 0.1 * i + 0.01 * seed
        final = {"step": 4, "eval_loss": loss, "eval_accuracy": 0.4 + 0.001 * seed, "opt_state_bytes": 2 ** 20 * (i + 1),
                 "peak_memory_bytes": 2 ** 21 + seed * 2 ** 18, "steps_per_sec": 2.0 + seed, "trainable_params": 100 * (i + 1)}
        with open(os.path.join(base, name, "summary.json"), "w") as f:
            json.dump(final, f)
        with open(os.path.join(base, name, "metrics.jsonl"), "w") as f:
            for r in ({"step": 0, "eval_loss": 2.5}, {"step": 2, "eval_loss": 2.3 + 0.01 * seed}, {"step": 4, **final}):
                f.write(json.dumps(r) + "\n")


def test_mean_and_std_over_seeds_in_method_order(tmp_path):
    base = tmp_path / "finetune_gpt_code"
    for s in range(3):
        _seed(str(base / f"seed{s}"), s, ["snella", "lora", "full", "mine"])
    rows = make_tables.TABLES["finetune_gpt_code"][1](str(tmp_path)).splitlines()
    assert [r.split(" | ")[0] for r in rows[2:6]] == ["| full", "| lora", "| snella", "| mine"]
    cells = rows[3].strip("| ").split(" | ")  # lora: variant index 1
    losses = [2.1 + 0.01 * s for s in range(3)]
    assert cells[2] == f"{np.mean(losses):.4f} ± {np.std(losses, ddof=1):.4f}"
    assert cells[1] == "2.5000" and cells[4] == "200"  # equal in every seed: no ± 0
    peaks = [(2 ** 21 + s * 2 ** 18) / 2 ** 20 for s in range(3)]
    assert cells[6] == f"{np.mean(peaks):.2f} ± {np.std(peaks, ddof=1):.2f}"
    assert rows[-1] == "(3 seeds: mean ± sample std)"
    out = make_figures.FIGURES["finetune_gpt_code"][1](str(tmp_path), str(tmp_path / "f.png"))
    assert os.path.getsize(out) > 0


def test_one_variants_folder_and_a_missing_run(tmp_path):
    _seed(str(tmp_path / "finetune_gpt_code"), 0, ["lora"])
    rows = make_tables.TABLES["finetune_gpt_code"][1](str(tmp_path)).splitlines()
    assert rows[2].startswith("| lora | 2.5000 | 2.0000 | 0.4000 | 100 |") and rows[-1] == "(one seed)"
    os.remove(tmp_path / "finetune_gpt_code" / "lora" / "summary.json")
    with pytest.raises(make_tables.MissingRun, match="summary.json"):
        make_tables.TABLES["finetune_gpt_code"][1](str(tmp_path))
