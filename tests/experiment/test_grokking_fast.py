"""The grokking study's config, shrunk: every variant runs and logs what the study plots."""

import os

from jaxopt_lab.experiment.compare import run_variants
from jaxopt_lab.experiment.metrics import read_metrics

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "grokking_modular_addition.toml")


def test_grokking_variants_run_small(tmp_path):
    results, plot = run_variants(CONFIG, [
        f"run.out_dir={tmp_path}", "data.p=11", "train.steps=6", "train.batch_size=16", "train.eval_every=3",
        "model.width=16", "model.heads=2", "logging.progress=false", "logging.tensorboard=false", "checkpoint.every=0",
    ])
    assert list(results) == ["adamw_wd1", "adamw_no_wd", "perp_adamw_stablemax"]
    for name, result in results.items():
        records = read_metrics(result.run_dir)
        assert {"accuracy", "eval_accuracy", "softmax_collapse"} <= set(records[-1])
    with open(os.path.join(results["perp_adamw_stablemax"].run_dir, "config.toml")) as f:
        text = f.read()
    assert 'loss = "stable_max"' in text and 'name = "perp_adamw"' in text
    assert os.path.getsize(plot) > 0
