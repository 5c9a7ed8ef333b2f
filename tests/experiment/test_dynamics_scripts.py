"""The training-dynamics study scripts, shrunk: they run end to end and their bookkeeping holds.

scripts/large_batch_gap.py, scripts/lr_vs_batch.py, scripts/instability_proxies.py and
scripts/opposing_signals.py (the figures of README's "Training dynamics" section).
"""

import json
import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))


@pytest.fixture(scope="module", autouse=True)
def fast_compile():
    # tiny programs run a few steps: XLA's optimizations would cost more compile time than they save
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


@pytest.mark.slow  # the CNN's compiles: about 70 s of the shared 2-core machine (32 s CPU for this and the next two)
def test_large_batch_gap(tmp_path):
    import large_batch_gap as script

    out = script.main(["--out", str(tmp_path), "--epochs", "0.5", "--small", "16", "--large", "64",
                       "--seeds", "0", "--evals", "1", "--only", "sb", "lb_ra", "--no-plot"])
    sb, ra = out["settings"]["sb"], out["settings"]["lb_ra"]
    # regime adaptation: 4x the epochs at 4x the batch is the small batch's number of updates
    assert ra["epochs"] == 4 * sb["epochs"] and ra["steps"] == sb["steps"]
    assert ra["lr"] == pytest.approx(2 * sb["lr"]) and ra["ghost"] == 16  # sqrt(64/16) lr, ghost batches of 16
    assert 0 <= sb["test_acc_mean"] <= 1
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["settings"].keys() == {"sb", "lb_ra"}


def test_lr_vs_batch(tmp_path):
    import lr_vs_batch as script

    lrs = script.np.array([0.1, 0.2, 0.4, 0.8])
    assert script.max_stable(lrs, script.np.array([1.0, 1.5, 3.0, 0.5]), 2.0) == 0.2  # below the first unstable
    assert script.max_stable(lrs, script.np.array([1.0, 1.0, 1.0, float("nan")]), 2.0) == 0.4
    out = script.main(["--out", str(tmp_path), "--steps", "3", "--batches", "4", "16", "--points-per-octave", "1",
                       "--hessian-batches", "1", "--no-plot"])
    sgd, adam = out["optimizers"]["sgd"], out["optimizers"]["adam"]
    b0 = sgd["rows"][0]["max_stable_lr"]
    assert sgd["rows"][1]["predicted_linear"] == 4 * b0  # linear from B=4 to 16
    assert adam["rows"][1]["predicted_sqrt"] == 2 * adam["rows"][0]["max_stable_lr"]  # sqrt(16/4)
    assert sgd["rows"][0]["predicted_2_over_lambda"] == 2 / sgd["rows"][0]["lambda_max"]


def test_instability_proxies(tmp_path):
    import instability_proxies as script

    out = script.main(["--out", str(tmp_path), "--widths", "8", "--layers", "1", "--steps", "3", "--lrs", "1e-3", "10",
                       "--val-windows", "2", "--batch", "2", "--context", "4", "--no-plot"])
    base, mit = out["runs"]["baseline/w8"], out["runs"]["qk_ln+z/w8"]
    for r in (base, mit):
        assert len(r["final_losses"]) == 2 and len(r["attn_logit_max"]) == 2
        assert r["lr_sensitivity"] == script.lr_sensitivity(r["final_losses"], r["initial_loss"])
    # qk-layernorm bounds |logit| by sqrt(head_dim) * (LN scale)^2 = 2 * scale^2; at lr 1e-3 the scales stay near 1
    assert mit["attn_logit_max"][0] < 2 * 1.02
    assert base["attn_logit_max"][1] > mit["attn_logit_max"][1]  # lr 10: the logits grow far more without it


def test_opposing_signals(tmp_path):
    import opposing_signals as script

    out = script.main(["--out", str(tmp_path), "--steps", "6", "--identify-at", "3", "--sharpness-every", "3",
                       "--k", "3", "--hidden", "8", "--no-plot"])
    assert len(out["positive"]) == len(out["negative"]) == 3
    assert not set(out["positive"]) & set(out["negative"])
    assert -1 <= out["group_cosine"] <= 1 and len(out["sharpness"]) == 2
    assert len(out["group_losses"]) == 6


def test_opposing_signals_text(tmp_path):
    import opposing_signals as script

    out = script.main(["--data", "text", "--out", str(tmp_path), "--steps", "6", "--identify-at", "3",
                       "--sharpness-every", "3", "--k", "3", "--windows", "4", "--context", "8", "--width", "8",
                       "--layers", "1", "--grad-tokens", "12", "--no-plot"])
    pos, neg = out["positive"], out["negative"]
    assert len(pos) == len(neg) == 3 and not set(pos) & set(neg)
    assert all(0 <= i < 4 * 8 for i in pos + neg + out["rose"] + out["fell"])  # tokens of the 4 windows of 8
    assert len(out["group_losses"]) == 6 and len(out["sharpness"]) == 2 and -1 <= out["group_cosine"] <= 1
    # each group member's label is the byte its context line says it predicts
    for name in ("positive", "negative"):
        labels = out[f"{name}_labels"]
        assert [c.rsplit(" -> ", 1)[1] for c in out["contexts"][name]] == [repr(b) for b in labels[:5]]
    with pytest.raises(SystemExit, match="grad-tokens"):
        script.main(["--data", "text", "--out", str(tmp_path), "--k", "3", "--windows", "2", "--context", "2",
                     "--grad-tokens", "5", "--no-plot"])
