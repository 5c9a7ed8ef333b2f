"""The low-rank LM comparison's config, shrunk: AdamW and GaLore run and the table shows state bytes and step time."""

import os

from jaxopt_lab.experiment.compare import format_table
from jaxopt_lab.experiment.config import load_variants
from jaxopt_lab.experiment.trainer import run

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "lowrank_lm.toml")


def test_lowrank_lm_variants_run_small(tmp_path):
    configs = load_variants(CONFIG, [
        f"run.out_dir={tmp_path}", "train.steps=2", "train.batch_size=4", "train.eval_every=0", "train.eval_batches=1",
        "data.context=16", "model.layers=1", "model.width=64", "logging.progress=false", "logging.tensorboard=false",
        "checkpoint.every=0",
    ])
    assert list(configs) == ["adamw", "adamw_lr1e-3", "galore", "fira", "q_galore", "galore_dct", "apollo",
                             "stable_spam"]
    results = {name: run(configs[name]) for name in ("adamw", "galore")}
    for result in results.values():
        assert result.final["step"] == 2 and result.final["steps_per_sec"] > 0 and "eval_loss" in result.final
    assert 0 < results["galore"].final["opt_state_bytes"] < results["adamw"].final["opt_state_bytes"]
    table = format_table(results)
    assert "opt state × adamw" in table and "step time × adamw" in table
    ratio = results["galore"].final["opt_state_bytes"] / results["adamw"].final["opt_state_bytes"]
    assert f"| {ratio:.2f} |" in table.splitlines()[-1]
