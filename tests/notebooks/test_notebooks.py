"""Every notebook runs top to bottom (on a tiny setting)."""

import os

import nbformat
import numpy as np
from nbclient import NotebookClient

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def execute(name, env):
    path = os.path.join(ROOT, "notebooks", name)
    nb = nbformat.read(path, as_version=4)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return nb


def outputs(nb):
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def tables(nb):
    """The Markdown tables the notebook displayed (``show_table``), each a list of {column: cell} rows."""
    out = []
    for c in nb.cells:
        for o in c.get("outputs", []) if c.cell_type == "code" else []:
            text = o.get("data", {}).get("text/markdown")
            if text is None:
                continue
            lines = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in text.splitlines()]
            # a '|' inside a column name or cell would split it: every row must have the header's cell count
            assert all(len(row) == len(lines[0]) for row in lines[1:]), text
            out.append([dict(zip(lines[0], row)) for row in lines[2:]])
    return out


def test_quickstart_trains_and_plots():
    # 36 steps: the 30 warmup steps (min(30, STEPS)) and a few of the cosine decay, which needs STEPS > 30
    nb = execute("00_quickstart.ipynb", {"QUICKSTART_STEPS": "36", "MPLBACKEND": "Agg"})
    [rows] = tables(nb)
    assert [int(r["step"]) for r in rows][::len(rows) - 1] == [0, 36], rows
    before, after = (float(r["validation loss (nats/byte)"]) for r in (rows[0], rows[-1]))
    assert after < before - 0.5, rows  # bytes: ln 256 = 5.5 at start


def test_diloco_notebook_compares_methods():
    nb = execute("01_diloco.ipynb", {"DILOCO_STEPS": "50", "MPLBACKEND": "Agg"})
    [rows] = tables(nb)
    assert len(rows) == 4 and all(float(r["final test loss"]) < 2.3 for r in rows), rows  # ln 10 = 2.30 at chance
    sent = {r["method"]: float(r["bytes/worker"]) for r in rows}
    assert sent["data parallel"] == 10 * sent["DiLoCo H=10"] > 0  # 1/H of the bytes


def test_02_federated_notebook():
    nb = execute("02_federated.ipynb", {"NB02_SIM_TIME": "100", "MPLBACKEND": "Agg"})
    text = outputs(nb)
    results, to_target = tables(nb)
    rows = {r["method"]: r for r in results}
    assert set(rows) == {"FedAvg", "FedBuff", "FedAsync"}, results
    acc = {k: float(r["final test accuracy"]) for k, r in rows.items()}
    updates = {k: int(r["client updates"]) for k, r in rows.items()}
    stale = {k: float(r["mean staleness"]) for k, r in rows.items()}
    assert all(a > 0.4 for a in acc.values()), text  # 10 classes: chance is 0.1
    assert stale["FedAvg"] == 0 < stale["FedBuff"] < stale["FedAsync"], text  # synchronous rounds are never stale
    # same simulated time: the asynchronous servers, never waiting for stragglers, apply more client updates
    assert updates["FedBuff"] > 2 * updates["FedAvg"] and updates["FedAsync"] > 2 * updates["FedAvg"], text
    [column] = [c for c in to_target[0] if c.startswith("simulated seconds to apply the first")]
    times = {r["method"]: r[column] for r in to_target}
    assert set(times) == {"FedAvg", "FedBuff", "FedAsync"}, to_target
    assert float(times["FedBuff"]) < float(times["FedAvg"]) <= 100, text  # the same client updates, sooner


def test_03_lowrank_notebook():
    nb = execute("03_lowrank.ipynb", {"NB03_STEPS": "30", "MPLBACKEND": "Agg"})
    text = outputs(nb)
    projectors, trained, memory = tables(nb)
    assert len(trained) == 4 and all(0 <= float(r["final test accuracy"]) <= 1 for r in trained), trained
    svd_cos = float(next(r for r in projectors if r["projector"] == "svd")["cos(PPᵀG, G)"])
    best = float(text.split("cos(PPᵀG, G) = ")[1].split()[0])
    assert abs(svd_cos - best) < 1e-3, projectors  # the SVD projector keeps the best rank-r subspace
    ratios = [float(r["× Adam"]) for r in memory if r["model"].startswith("LLaMA-")]
    assert len(ratios) == 8 and all(0 < r < 1 for r in ratios), memory  # every method holds less than Adam

def test_05_optimizers_and_sharpness_notebook():
    nb = execute("05_optimizers_and_sharpness.ipynb", {"NB05_STEPS": "20", "MPLBACKEND": "Agg"})
    [rows] = tables(nb)
    assert len(rows) == 5, rows
    for r in rows:
        acc, sharp = float(r["final test accuracy"]), float(r["sharpness"])
        assert 0.0 <= acc <= 1.0, r
        assert np.isfinite(sharp) and sharp > 0, r


def test_06_federated_heterogeneity_notebook():
    nb = execute("06_federated_heterogeneity.ipynb", {"NB06_ROUNDS": "5", "NB06_PER_ROUND": "4", "NB06_ALPHAS": "0.1",
                                                      "NB06_FAST_COMPILE": "1", "MPLBACKEND": "Agg"})
    skew, results = tables(nb)
    classes = {r["alpha"]: float(r["classes per client (mean)"]) for r in skew}
    assert classes["0.1"] < classes["1"] < classes["100"] <= 10, skew  # smaller alpha: fewer classes per client
    assert [r["method"] for r in results] == ["FedAvg", "FedProx (mu 0.1)", "FedSpeed", "local Adam scaling",
                                              "curriculum", "FedBR"], results
    for r in results:  # 5 rounds from chance (0.1): every method learns something
        assert 0.15 < float(r["final test accuracy"]) <= float(r["best"]) <= 1.0, r


def test_04_kernels_notebook():
    nb = execute("04_kernels.ipynb", {"MPLBACKEND": "Agg"})
    text = outputs(nb)
    found = tables(nb)
    grkan = next(t for t in found if "grkan" in t[0])
    assert [r["grkan"] for r in grkan] == ["float32", "bfloat16"], grkan
    for r in grkan:
        errs = {k.removeprefix("max rel err "): float(v) for k, v in r.items() if k != "grkan"}
        assert set(errs) == {"y", "dx", "da", "db"}, r
        assert all(e < (1e-5 if r["grkan"] == "float32" else 1e-2) for e in errs.values()), r
    assert "timing skipped" in text or any(r.get("kernel") == "grkan bwd" for t in found for r in t), text
    fused = next(t for t in found if "fira step" in t[0])
    assert [r["fira step"] for r in fused] == ["float32", "bfloat16"], fused  # the fused low-rank step
    for r in fused:
        errs = [float(v) for k, v in r.items() if k != "fira step"]
        assert len(errs) == 3 and all(e < (1e-5 if r["fira step"] == "float32" else 1e-2) for e in errs), r


def test_committed_notebooks_are_the_generators_with_badge_install_and_outputs():
    """notebooks/ is what scripts/make_notebooks.py writes (cell for cell), each opens with its
    Colab badge, installs from the repository URL of pyproject.toml with no edit, and is
    committed with its outputs (`python scripts/make_notebooks.py --execute`)."""
    import importlib.util
    import tomllib

    spec = importlib.util.spec_from_file_location("make_notebooks", os.path.join(ROOT, "scripts", "make_notebooks.py"))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        urls = tomllib.load(f)["project"]["urls"]
    assert gen.REPOSITORY_URL == urls["Repository"].rstrip("/")
    for name, cells in gen.NOTEBOOKS.items():
        committed = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
        expected = gen.notebook(name, cells())
        assert [c.source for c in committed.cells] == [c.source for c in expected.cells], \
            f"{name} differs from scripts/make_notebooks.py: run it with --execute"
        assert committed.cells[0].source.startswith("[![Open In Colab]"), name
        assert f"notebooks/{name})" in committed.cells[0].source, name
        assert f'"git+{gen.REPOSITORY_URL}"' in committed.cells[1].source, name
        code = [c for c in committed.cells if c.cell_type == "code"]
        assert all(c.get("execution_count") for c in code), f"{name} is committed without its outputs"


def test_07_systems_notebook():
    nb = execute("07_systems.ipynb", {"NB07_JOBS": "20", "NB07_ATTACK_STEPS": "300", "NB07_IMAGES": "2",
                                      "NB07_DADAO_T": "60", "NB07_DIPACO_STEPS": "60", "MPLBACKEND": "Agg"})
    text = outputs(nb)
    codes, runtime, attack, [dadao], dipaco, modules = tables(nb)
    assert float(dadao["relative error at the end"]) < 1e-2, dadao  # DADAO converges on the least squares
    for r in codes:  # every straggler pattern up to s decoded to the full gradient
        ok, total = r["patterns decoded exactly"].split(" / ")
        assert ok == total and int(total) > 0, r
    assert [r["scheme"] for r in runtime][0] == "wait for all" and all(r["jobs late"] == "0" for r in runtime), runtime
    assert "dense bytes: 9640" in text and "sketch 0.25 bytes: 2412" in text, text
    mse = {r["what is sent"].split(" (")[0]: float(r["reconstruction MSE"]) for r in attack}
    assert mse["sketch 0.25"] < mse["guess: mean digit"] < mse["sketch + DP"], attack  # leaks; noise stops it
    dip = {r["run"]: r for r in dipaco}  # DiPaCo: paths specialize; a module's wire bytes stay among its 2 holders
    routed, rand, dense = (dip[k] for k in ("DiPaCo 2x2, the router's path", "DiPaCo 2x2, a random path",
                                            "dense DiLoCo, one path's size"))
    assert float(routed["val MSE"]) < float(rand["val MSE"]) and float(routed["val MSE"]) < float(dense["val MSE"]), dipaco
    assert int(routed["wire bytes"]) < int(dense["wire bytes"]), dipaco
    assert [int(m["workers"]) for m in modules] == [4, 2, 2, 2, 2], modules
    assert all(m["wire bytes"] == m["payload bytes"] for m in modules[1:]), modules  # a ring of 2 sends it once


def test_09_dynamics_notebook():
    nb = execute("09_dynamics.ipynb", {"NB09_EPOCHS": "1", "NB09_STEPS": "30", "MPLBACKEND": "Agg"})
    tract, sso, tp, gns, gbn, inst, lrs, [opp] = tables(nb)
    assert len(tract) == 4 and all(0.1 < float(r["epoch 1"]) <= 1 for r in tract), tract  # chance is 0.1
    gaps = {r["method"]: float(r[next(c for c in r if c.startswith("L − L*"))]) for r in sso}
    assert all(g >= -1e-6 for g in gaps.values()), sso  # L* is the minimum (float64 Newton)
    assert gaps["SSO m=20, η=0.125/n"] < gaps["GD, step 1/L"], sso  # inner steps buy progress per gradient
    assert [r["method"].split(",")[0] for r in tp] == ["backprop SGD", "tpSGD", "tpSGD"], tp
    losses = {r["method"]: float(r["final loss"]) for r in gns}
    assert all(np.isfinite(v) for v in losses.values()) and losses["Newton"] < 10, gns  # from 2057 at the start
    assert [r["steps"] for r in gbn][-1] == [r["steps"] for r in gbn][0], gbn  # regime adaptation: as many updates
    assert len(inst) == 8 and len(lrs) == 2, inst
    attn = {(r["variant"], r["lr"]): float(r["max attention logit"]) for r in inst}
    assert attn[("baseline", "1")] > attn[("qk-layernorm + z-loss 1e-4", "1")], inst  # qk-layernorm bounds the logits
    log_z = [(float(r["max abs log Z"]), abs(float(r["mean log Z"]))) for r in inst]
    assert all(m >= a for m, a in log_z if np.isfinite(m) and np.isfinite(a)), inst  # max |log Z| >= |mean log Z|
    assert -1 <= float(opp["corr(Δ loss +, Δ loss −) after"]) <= 1 and float(opp["2/lr"]) == 4.0, opp


def test_08_finetuning_notebook():
    nb = execute("08_finetuning.ipynb", {"NB08_PRESET": "micro", "NB08_PRETRAIN_STEPS": "20", "NB08_FINETUNE_STEPS": "10",
                                         "MPLBACKEND": "Agg"})
    text = outputs(nb)
    [pre], [report], variants, [merge] = tables(nb)
    merged, unmerged = (float(merge[c]) for c in ("max abs(merged − adapter) output",
                                                    "max abs(unmerged − original) kernel"))
    assert "the outputs equal the pretrained model's: True" in text, text  # B = 0 at the start
    assert 0 < int(report["trainable (adapters)"].replace(",", "")) < int(report["parameters"].replace(",", "")), report
    rows = {r["variant"].split(" (")[0]: r for r in variants}
    assert set(rows) == {"LoRA", "LoRA-Pro", "LoRA-GGPO", "full fine-tuning"}, variants
    state = {k: int(r["optimizer state bytes"].replace(",", "")) for k, r in rows.items()}
    trainable = int(rows["LoRA"]["trainable params"].replace(",", ""))
    assert 8 * trainable <= state["LoRA"] < state["full fine-tuning"], state  # Adam: two f32 moments per trained param
    assert state["LoRA-Pro"] > state["LoRA"], state  # its AdamW form keeps moments of the full-size gradient
    assert all(np.isfinite(float(r["code val loss"])) for r in variants), variants
    assert merged < 1e-4, merge  # merging does not change the function
    assert unmerged < 1e-5, merge
