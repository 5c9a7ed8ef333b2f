"""Compilation in the main job: how many XLA compiles, their seconds, and the job's wall time.

    python scripts/bench_compile.py [--config experiments/diloco_vs_ddp_fast.toml]
        [--tree NAME=PATH ...] [--cache cold|warm|off ...] [--rounds 1] [--set KEY=VALUE ...]

Each measurement is one fresh process running ``jaxopt-lab run CONFIG`` (the
CLI's ``main``, into a temporary ``run.out_dir``) with the jaxopt_lab source of
``PATH`` first on ``PYTHONPATH``; so a tree of an older commit (``git archive``
into a folder) is the baseline, measured in the same invocation as this tree,
the processes taking turns. In each process a ``jax.monitoring`` listener counts
``/jax/core/compile/backend_compile_duration`` events (every XLA compile, or
persistent-cache load, of a jitted program, eager ops included), their seconds
and the names of what was compiled; ``/jax/compilation_cache/cache_hits`` counts
what came from the persistent cache.

``--cache``: ``off`` passes ``--no-compile-cache`` (trees that do not know the
flag have no cache anyway); ``cold`` uses a fresh, empty cache folder; ``warm``
the folder a previous ``cold`` process of the same tree filled (so list ``cold``
before ``warm``). Prints one row per process and, per tree and cache, the
median over ``--rounds``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import collections, json, os, sys, time
import jaxopt_lab
print("TREE " + os.path.dirname(os.path.dirname(os.path.abspath(jaxopt_lab.__file__))))
t0 = time.perf_counter()
import jax
from jax import monitoring
compiles = collections.Counter()
name_s = collections.Counter()
seconds = [0.0]
hits = [0]
def on_duration(event, duration, **kw):
    if event == "/jax/core/compile/backend_compile_duration":
        compiles[kw.get("fun_name", "?")] += 1
        name_s[kw.get("fun_name", "?")] += duration
        seconds[0] += duration
def on_event(event, **kw):
    if event == "/jax/compilation_cache/cache_hits":
        hits[0] += 1
monitoring.register_event_duration_secs_listener(on_duration)
monitoring.register_event_listener(on_event)
from jaxopt_lab.experiment import cli
args = json.loads(sys.argv[1])
with open(os.devnull, "w") as null:
    stdout, sys.stdout = sys.stdout, null
    try:
        rc = cli.main(args)
    finally:
        sys.stdout = stdout
wall = time.perf_counter() - t0
print("RESULT " + json.dumps({"rc": rc, "wall": wall, "compiles": sum(compiles.values()),
                              "compile_s": seconds[0], "cache_hits": hits[0], "by_name": dict(compiles),
                              "name_s": dict(name_s)}))
"""


def first_steps(out_dir: str) -> dict[str, float]:
    """time_to_first_step of every run under ``out_dir`` (where the summary has it)."""
    found = {}
    for root, _, files in os.walk(out_dir):
        if "summary.json" in files:
            with open(os.path.join(root, "summary.json")) as f:
                summary = json.load(f)
            if "time_to_first_step" in summary:
                found[os.path.basename(root)] = summary["time_to_first_step"]
    return found


def measure(tree: str, config: str, cache: str, cache_dir: str, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_compile_") as out:
        args = ["run", os.path.abspath(config), "--set", f"run.out_dir={out}", "--set", "logging.progress=false"]
        for o in overrides:
            args += ["--set", o]
        with open(os.path.join(tree, "jaxopt_lab", "experiment", "cli.py")) as f:
            knows_flag = "--no-compile-cache" in f.read()
        if cache == "off" and knows_flag:
            args.append("--no-compile-cache")
        elif cache != "off" and not knows_flag:
            raise SystemExit(f"{tree} has no compile cache to measure (--cache off only)")
        env = dict(os.environ, PYTHONPATH=os.path.abspath(tree) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env["JAXOPT_LAB_CACHE_DIR"] = cache_dir  # where the trees that have a cache put it
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        t0 = time.perf_counter()
        # run from the output folder: `python -c` puts the working directory first on sys.path,
        # which would shadow the tree's jaxopt_lab with the one here
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], env=env, capture_output=True, text=True,
                              cwd=out)
        elapsed = time.perf_counter() - t0
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            raise SystemExit(f"{tree} ({cache}) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        result = json.loads(line[-1][len("RESULT "):])
        result["process_s"] = elapsed
        tree_line = [ln for ln in proc.stdout.splitlines() if ln.startswith("TREE ")]
        assert os.path.samefile(tree_line[0][5:], tree), (tree_line, tree)  # the tree asked for, not another
        result["first_step"] = first_steps(out)
        return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="experiments/diloco_vs_ddp_fast.toml")
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                    help="a source tree to measure (default: this=.)")
    ap.add_argument("--cache", nargs="+", default=["off"], choices=["off", "cold", "warm"])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="config overrides (key=value)")
    ap.add_argument("--names", type=int, default=0, help="print the N most compiled names per process")
    args = ap.parse_args(argv)
    trees = [t.split("=", 1) for t in (args.tree or ["this=."])]
    import jax

    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  JAX {jax.__version__}  "
          f"config {args.config} {' '.join(args.set)}  cpus {os.cpu_count()}")
    caches = {name: tempfile.mkdtemp(prefix=f"bench_compile_cache_{name}_") for name, _ in trees}
    rows: dict[tuple[str, str], list[dict]] = {}
    print(f"\n{'tree':10s} {'cache':6s} {'compiles':>8s} {'compile s':>9s} {'hits':>5s} {'wall s':>7s} "
          f"{'process s':>9s}  time to first step s (per run)")
    for _ in range(args.rounds):
        for name, path in trees:
            for cache in args.cache:
                if cache == "cold":  # empty the tree's cache folder
                    for f in os.listdir(caches[name]):
                        p = os.path.join(caches[name], f)
                        (os.remove if os.path.isfile(p) else __import__("shutil").rmtree)(p)
                r = measure(path, args.config, cache, caches[name], args.set)
                rows.setdefault((name, cache), []).append(r)
                firsts = " ".join(f"{k} {v:.1f}" for k, v in r["first_step"].items()) or "-"
                print(f"{name:10s} {cache:6s} {r['compiles']:8d} {r['compile_s']:9.1f} {r['cache_hits']:5d} "
                      f"{r['wall']:7.1f} {r['process_s']:9.1f}  {firsts}", flush=True)
                if args.names:
                    top = sorted(r["by_name"].items(), key=lambda kv: -kv[1])[: args.names]
                    print("    " + ", ".join(f"{k} x{v} ({r['name_s'].get(k, 0):.1f} s)" for k, v in top))
    if args.rounds > 1:
        print(f"\nmedians over {args.rounds} rounds")
        for (name, cache), rs in rows.items():
            med = {k: statistics.median(r[k] for r in rs) for k in ("compiles", "compile_s", "wall", "process_s")}
            print(f"{name:10s} {cache:6s} {med['compiles']:8.0f} {med['compile_s']:9.1f} {'':5s} {med['wall']:7.1f} "
                  f"{med['process_s']:9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
