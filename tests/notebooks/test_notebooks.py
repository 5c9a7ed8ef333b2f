"""Every notebook runs top to bottom (on a tiny setting)."""

import os
import re

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


def test_quickstart_trains_and_plots():
    nb = execute("00_quickstart.ipynb", {"QUICKSTART_STEPS": "60", "MPLBACKEND": "Agg"})
    text = outputs(nb)
    before, after = text.split("validation loss ")[1].split(" after")[0].split(" -> ")
    assert float(after) < float(before) - 0.5, text  # bytes: ln 256 = 5.5 at start


def test_diloco_notebook_compares_methods():
    nb = execute("01_diloco.ipynb", {"DILOCO_STEPS": "50", "MPLBACKEND": "Agg"})
    lines = [line for line in outputs(nb).splitlines() if "final test loss" in line]
    assert len(lines) == 4
    sent = {line.split(" final")[0].strip(): float(line.rsplit(" ", 1)[1]) for line in lines}
    assert sent["data parallel"] == 10 * sent["DiLoCo H=10"] > 0  # 1/H of the bytes


def test_02_federated_notebook():
    nb = execute("02_federated.ipynb", {"NB02_SIM_TIME": "100", "MPLBACKEND": "Agg"})
    text = outputs(nb)
    lines = {line.split()[0]: line for line in text.splitlines() if "final test accuracy" in line}
    assert set(lines) == {"FedAvg", "FedBuff", "FedAsync"}, text
    acc = {k: float(v.split("final test accuracy ")[1].split()[0]) for k, v in lines.items()}
    updates = {k: int(v.split("client updates ")[1].split()[0]) for k, v in lines.items()}
    stale = {k: float(v.split("mean staleness ")[1].split()[0]) for k, v in lines.items()}
    assert all(a > 0.4 for a in acc.values()), text  # 10 classes: chance is 0.1
    assert stale["FedAvg"] == 0 < stale["FedBuff"] < stale["FedAsync"], text  # synchronous rounds are never stale
    # same simulated time: the asynchronous servers, never waiting for stragglers, apply more client updates
    assert updates["FedBuff"] > 2 * updates["FedAvg"] and updates["FedAsync"] > 2 * updates["FedAvg"], text
    times = dict(re.findall(r"^  (\w+) +([\d.]+) s$", text.split("simulated time to apply the first")[1],
                             re.MULTILINE))
    assert set(times) == {"FedAvg", "FedBuff", "FedAsync"}, text
    assert float(times["FedBuff"]) < float(times["FedAvg"]) <= 100, text  # the same client updates, sooner


def test_03_lowrank_notebook():
    nb = execute("03_lowrank.ipynb", {"NB03_STEPS": "30", "MPLBACKEND": "Agg"})
    text = outputs(nb)
    assert len([line for line in text.splitlines() if "final test accuracy" in line]) == 4, text
    svd_cos = float(text.split("\nsvd ")[1].split()[0])
    best = float(text.split("cos(PPᵀG, G) = ")[1].split()[0])
    assert abs(svd_cos - best) < 1e-3, text  # the SVD projector keeps the best rank-r subspace
    ratios = [float(line.split()[-1]) for line in text.splitlines() if line.startswith("LLaMA-")]
    assert len(ratios) == 8 and all(0 < r < 1 for r in ratios), text  # every method holds less than Adam

def test_05_optimizers_and_sharpness_notebook():
    nb = execute("05_optimizers_and_sharpness.ipynb", {"NB05_STEPS": "20", "MPLBACKEND": "Agg"})
    lines = [line for line in outputs(nb).splitlines() if "final test accuracy" in line]
    assert len(lines) == 5, outputs(nb)
    for line in lines:
        acc = float(line.split("final test accuracy ")[1].split()[0])
        sharp = float(line.split("sharpness ")[1])
        assert 0.0 <= acc <= 1.0, line
        assert np.isfinite(sharp) and sharp > 0, line


def test_04_kernels_notebook():
    nb = execute("04_kernels.ipynb", {"MPLBACKEND": "Agg"})
    text = outputs(nb)
    lines = [line for line in text.splitlines() if line.startswith("grkan") and "max rel err vs reference" in line]
    assert len(lines) == 2, text  # float32 and bfloat16
    for line in lines:
        errs = dict(zip(*[iter(line.split("reference: ")[1].split())] * 2))
        assert set(errs) == {"y", "dx", "da", "db"}, line
        limit = 1e-5 if "float32" in line else 1e-2
        assert all(float(v) < limit for v in errs.values()), line
    assert "timing skipped" in text or "grkan bwd" in text, text
    fused = [line for line in text.splitlines() if line.startswith("fira step") and "max rel err" in line]
    assert len(fused) == 2, text  # the fused low-rank step, float32 and bfloat16
    for line in fused:
        errs = [float(v) for v in re.findall(r"\d\.\de[-+]\d+", line.split("reference: ")[1])]
        assert len(errs) == 3 and all(e < (1e-5 if "float32" in line else 1e-2) for e in errs), line
