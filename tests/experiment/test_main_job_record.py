"""The main job's numbers, pinned: its config shrunk to 3 steps and 2 variants, against a committed record.

A change that moves what `experiments/diloco_vs_ddp_fast.toml` computes (data,
model init, a method, the trainer, the sync schedule, byte accounting) fails
this test, bit for bit, so the README's tables are regenerated on purpose and
never silently go stale. When the change is meant, rewrite the record and
commit it with the change:

    JAXOPT_LAB_WRITE_RECORDS=1 PYTHONPATH=$PWD python -m pytest tests/experiment/test_main_job_record.py

then rerun the main job and `python scripts/make_tables.py` (README.md).
The record is written under pytest because the environment is part of the
numbers: under tests/conftest.py's settings (8 forced host devices, a
persistent compilation cache) DiLoCo's step-2 loss differed in its last bits
from the same run under plain `python` (5.1545000076 vs 5.1545004845).

Bit-for-bit holds for the JAX/jaxlib version, platform, device count and CPU
vector extensions the record was written with (stored in it): XLA:CPU
vectorizes reductions by the host's ISA, and the same tree on an AVX-512 host
and on another CPU differed in the last bit of the untrained model's eval loss
(5.5586793423 vs 5.5586795807). Elsewhere the values are compared to rtol 1e-4
instead, which still catches a change of method or data.
"""

import json
import math
import os

import jax
import jaxlib
import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
CONFIG = os.path.join(ROOT, "experiments", "diloco_vs_ddp_fast.toml")
RECORD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "records", "diloco_vs_ddp_fast_3steps.json")
VARIANTS = ("ddp", "diloco_h10")
# The main job shrunk: 3 steps, one evaluation of 2 batches after the last step,
# DiLoCo synchronizing every 2 steps (so one outer step is in the record).
OVERRIDES = (
    "train.steps=3", "train.eval_every=0", "train.eval_batches=2", "checkpoint.every=0",
    "logging.progress=false", "logging.tensorboard=false", "variants.diloco_h10.method.sync_every=2",
)


# the host ISA extensions that change how XLA:CPU vectorizes (and so rounds) a reduction
_ISA = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_fp16",
        "avx512_vnni", "amx_tile", "asimd", "sve", "sve2")


def _cpu_isa() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith(("flags", "Features"))), [])
    except OSError:
        return "unknown"
    return " ".join(x for x in _ISA if x in flags)


def _environment() -> dict:
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "platform": jax.default_backend(),
            "devices": jax.device_count(), "cpu_isa": _cpu_isa()}


def run_shrunk_main_job(out_dir: str) -> dict[str, list[dict]]:
    """Metrics of the shrunk main job per variant, timing keys dropped."""
    from jaxopt_lab.experiment.config import load_variants
    from jaxopt_lab.experiment.metrics import read_metrics, without_timing
    from jaxopt_lab.experiment.trainer import run

    configs = load_variants(CONFIG, [f"run.out_dir={out_dir}", *OVERRIDES])
    out = {}
    for name in VARIANTS:
        result = run(configs[name])
        out[name] = list(without_timing(read_metrics(result.run_dir)))  # wall-clock is the machine's, not compared
    return out


def _bits(value):
    """Floats as their exact hex form, so == is bit for bit (and -0.0 != 0.0)."""
    if isinstance(value, float):
        return value.hex()
    if isinstance(value, dict):
        return {k: _bits(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_bits(v) for v in value]
    return value


def _close(a, b, rtol):
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=rtol)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rtol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, rtol) for x, y in zip(a, b))
    return a == b


def _first_difference(expected, got) -> str:
    for name in expected:
        want, have = expected[name], got.get(name, [])
        if len(want) != len(have):
            return f"{name}: {len(want)} records recorded, {len(have)} now"
        for i, (w, h) in enumerate(zip(want, have)):
            for key in sorted(set(w) | set(h)):
                if _bits(w.get(key)) != _bits(h.get(key)):
                    return f"{name}, record {i} (step {w.get('step')}), {key}: recorded {w.get(key)!r}, now {h.get(key)!r}"
    return "no difference"


def test_main_job_matches_its_record(tmp_path):
    if os.environ.get("JAXOPT_LAB_WRITE_RECORDS") == "1":
        write_record(str(tmp_path))
        pytest.skip(f"wrote {os.path.relpath(RECORD)} (JAXOPT_LAB_WRITE_RECORDS=1); commit it with the change")
    with open(RECORD) as f:
        record = json.load(f)
    assert record["config"] == "experiments/diloco_vs_ddp_fast.toml"
    assert record["overrides"] == list(OVERRIDES) and list(record["metrics"]) == list(VARIANTS)
    got = run_shrunk_main_job(str(tmp_path))
    hint = ("the main job's numbers moved; if that is intended, regenerate the record with "
            "`JAXOPT_LAB_WRITE_RECORDS=1 PYTHONPATH=$PWD python -m pytest tests/experiment/test_main_job_record.py` "
            "and the README's "
            "tables (scripts/make_tables.py)")
    if record["environment"] == _environment():
        assert _bits(got) == _bits(record["metrics"]), f"{_first_difference(record['metrics'], got)}; {hint}"
    else:  # another JAX or platform: rounding may differ, a changed computation still shows
        assert _close(got, record["metrics"], rtol=1e-4), (
            f"{_first_difference(record['metrics'], got)} (record from {record['environment']}, "
            f"now {_environment()}); {hint}")


def write_record(out_dir: str) -> None:
    metrics = run_shrunk_main_job(out_dir)
    record = {"config": "experiments/diloco_vs_ddp_fast.toml", "overrides": list(OVERRIDES),
              "environment": _environment(), "metrics": metrics}
    os.makedirs(os.path.dirname(RECORD), exist_ok=True)
    with open(RECORD, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
