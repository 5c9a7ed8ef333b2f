"""Rewrite the results tables of README.md (and BENCHMARKS.md) from run outputs.

Every results table in the docs sits between two markers,

    <!-- table:NAME -->
    | ... the table ... |
    <!-- /table:NAME -->

and NAME is one of ``TABLES`` below, each of which says which run folder it is
read from (``summary.json``, ``metrics.jsonl``, ``summary.md``,
``results.json``) and which command makes that folder. This script replaces
what is between the markers with the table generated from the folder, so the
docs say what the runs printed, and nothing typed by hand. A region whose run
folder is missing is left as it is, and the script says so (and with which
command to make it):

    python scripts/make_tables.py                # rewrite README.md and BENCHMARKS.md
    python scripts/make_tables.py --check        # exit 1 if a table differs from its runs
    python scripts/make_tables.py --runs DIR     # read run folders under DIR (default: runs)

BENCHMARKS.md's tables come from benchmark scripts (timings), not experiment
runs; none of them is generated here.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import tomllib
from collections.abc import Callable

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DOCS = ("README.md", "BENCHMARKS.md")
REGION = re.compile(r"(<!-- table:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /table:(?P=name) -->)", re.S)
CLI = "PYTHONPATH=$PWD python -m jaxopt_lab.experiment.cli"


class MissingRun(Exception):
    """The run outputs a table is made from are not there."""


def _read_json(path: str):
    if not os.path.isfile(path):
        raise MissingRun(path)
    with open(path) as f:
        return json.load(f)


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise MissingRun(path)
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _variants(base: str) -> list[str]:
    """Variant names of a variants folder, in the config's order (its ``variants.toml``)."""
    path = os.path.join(base, "variants.toml")
    if not os.path.isfile(path):
        raise MissingRun(path)
    with open(path, "rb") as f:
        return list(tomllib.load(f)["variants"])


def _finals(base: str) -> dict[str, dict]:
    return {name: _read_json(os.path.join(base, name, "summary.json")) for name in _variants(base)}


def _table(headers: list[str], rows: list[list[str]], align: list[str]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def diloco_vs_ddp_fast(runs: str) -> str:
    finals = _finals(os.path.join(runs, "diloco_vs_ddp_fast"))
    rows = [[name, f"{r['eval_loss']:.4f}", f"{r['eval_accuracy']:.4f}", f"{r['bytes_communicated']:.3e}",
             f"{r['wire_bytes']:.3e}"] for name, r in finals.items()]
    return _table(["variant", "final eval loss", "eval acc", "payload bytes/worker", "wire bytes/worker"], rows,
                  ["---"] + ["---:"] * 4)


def quickstart(runs: str) -> str:
    _read_json(os.path.join(runs, "quickstart", "summary.json"))  # written when the run has finished
    records = _read_jsonl(os.path.join(runs, "quickstart", "metrics.jsonl"))
    evals = {r["step"]: r for r in records if "eval_loss" in r}
    last = max(evals)
    rows = [[str(step), f"{evals[step]['eval_loss']:.3f}", f"{evals[step]['eval_accuracy']:.3f}",
             f"{evals[step].get('wall_time', 0.0):.0f} s"] for step in (0, 100, last) if step in evals]
    return _table(["step", "validation loss (nats/byte)", "next-byte accuracy", "wall-clock"], rows,
                  ["---:"] * 4)


DILOCO_LABELS = {"streaming_p4_e3m0": "streaming_p4_e3m0 (H=100)", "single_worker": "single_worker (1/8 tokens)"}


def diloco_vs_ddp(runs: str) -> str:
    finals = _finals(os.path.join(runs, "diloco_vs_ddp"))
    rows = [[DILOCO_LABELS.get(name, name), f"{r['eval_loss']:.4f}", f"{r['eval_accuracy']:.4f}",
             f"{r.get('bytes_communicated', 0):.3e}" if r.get("bytes_communicated") else "0"]
            for name, r in finals.items()]
    return _table(["variant", "final eval loss", "eval acc", "payload bytes/worker"], rows, ["---"] + ["---:"] * 3)


LOWRANK_LABELS = {"adamw": "AdamW", "adamw_lr1e-3": "AdamW, peak lr 1e-3", "galore": "GaLore", "fira": "Fira",
                  "q_galore": "Q-GaLore", "galore_dct": "GaLore-DCT", "apollo": "APOLLO", "stable_spam": "Stable-SPAM"}


def lowrank_lm(runs: str) -> str:
    """Final eval loss, optimizer state and step time (median) relative to the ``adamw`` variant (else the first)."""
    finals = _finals(os.path.join(runs, "lowrank_lm"))
    first = finals.get("adamw", next(iter(finals.values())))
    rows = [[LOWRANK_LABELS.get(name, name), f"{r['eval_loss']:.4f}",
             f"{r['opt_state_bytes'] / first['opt_state_bytes']:.2f}",
             f"{first['steps_per_sec'] / r['steps_per_sec']:.2f}"] for name, r in finals.items()]
    return _table(["variant", "final eval loss", "opt state × AdamW", "step time × AdamW"], rows,
                  ["---"] + ["---:"] * 3)


GROKKING_LABELS = {"adamw_wd1": "AdamW, weight decay 1.0", "adamw_no_wd": "AdamW, no weight decay",
                   "perp_adamw_stablemax": "⊥AdamW + StableMax, no weight decay"}


def grokking(runs: str) -> str:
    """First step with training-batch accuracy ≥ 0.99 and with test accuracy ≥ 0.99, final test accuracy,
    the largest softmax-collapse fraction logged."""
    base = os.path.join(runs, "grokking_modular_addition")
    _finals(base)  # every variant finished
    rows = []
    for name in _variants(base):
        records = _read_jsonl(os.path.join(base, name, "metrics.jsonl"))
        last_step = max(r["step"] for r in records)

        def first_at(key, records=records, last_step=last_step):
            hits = [r["step"] for r in records if r.get(key, 0.0) >= 0.99]
            if hits:
                return str(min(hits))
            final = [r[key] for r in records if key in r and r["step"] == last_step]
            return f"never ({final[-1]:.2f} at {last_step})" if final else "never"

        final_acc = [r["eval_accuracy"] for r in records if "eval_accuracy" in r][-1]
        collapse = max((r["softmax_collapse"] for r in records if "softmax_collapse" in r), default=0.0)
        rows.append([GROKKING_LABELS.get(name, name), first_at("accuracy"), first_at("eval_accuracy"),
                     f"{final_acc:.3f}", "0" if collapse == 0 else f"{collapse:.3g}"])
    return _table(["variant", "train acc ≥ 0.99 at step", "test acc ≥ 0.99 at step", "final test acc",
                   "max softmax-collapse fraction"], rows, ["---"] + ["---:"] * 4)


def topologies(runs: str) -> str:
    """Not a run: computed from the topologies themselves (W = 8)."""
    from jaxopt_lab.distributed import topology as topo

    rows = []
    for label, t in (("ring", topo.ring(8)), ("torus2d (2×4)", topo.torus2d(8)),
                     ("exponential (one-peer)", topo.exponential(8)), ("complete", topo.complete(8))):
        rows.append([label, f"{t.spectral_gap():.3f}", str(t.messages(0))])
    return _table(["topology", "spectral gap", "messages/step"], rows, ["---", "---:", "---:"])


FED_LABELS = {"fedavg": "FedAvg", "fedbuff": "FedBuff, 20 in flight", "fedbuff_c10": "FedBuff, 10 in flight",
              "fedasync": "FedAsync", "fedfix": "FedFix", "fedcompass": "FedCompass, 20 in flight",
              "fedcompass_all": "FedCompass, all 100 in flight",
              "fedcompass_group": "FedCompass, group-normalized (opt-in)"}
FED_DROP = ("wall s",)  # the shared machine's compute time: not a property of the method


def fed_digits(runs: str) -> str:
    """The table of one federated run's ``summary.md`` (every method of the config, one run), with the
    methods' config names given readable labels and the wall-clock column left out."""
    path = os.path.join(runs, "fed_digits", "summary.md")
    if not os.path.isfile(path):
        raise MissingRun(path)
    with open(path) as f:
        lines = [line.strip() for line in f if line.strip().startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    header, align, body = cells[0], cells[1], cells[2:]
    unknown = [h for h in FED_DROP if h not in header]
    if unknown or any(len(row) != len(header) for row in body):
        raise ValueError(f"{path}: not the table federated_run.format_table writes (header {header})")
    keep = [i for i, h in enumerate(header) if h not in FED_DROP]
    rows = [[FED_LABELS.get(row[0], row[0]) if i == 0 else row[i] for i in keep] for row in body]
    return _table([header[i] for i in keep], rows, [align[i] for i in keep])


FED_HET_NAMES = {"fedavg": "FedAvg", "fedprox": "FedProx, μ = 0.1", "fedspeed": "FedSpeed (official λ 0.1, ρ 0.1)",
                 "fedlex": "FedLEx (10% explorers, 1 epoch, min-max)", "curriculum": "curriculum (easy first)",
                 "anti_curriculum": "anti-curriculum", "random_curriculum": "random curriculum",
                 "local_adam": "local SGD + Adam scaling (lr 0.005)",
                 "fedlex_lr10": "FedLEx, client lr 0.5 (10×)",
                 "fedbr": "FedBR (official μ 0.5, λ 1, FedDecorr 0.1)"}
# methods run alone after the full runs into fed_het_a{alpha}_NAME, the same config and seeds: FedBR (added to
# the config later, --only fedbr) and the three curricula (rerun after their pacing took Wu et al.'s floor,
# --only curriculum,anti_curriculum,random_curriculum); a later run's row replaces the first run's
FED_HET_LATER = ("fedbr", "curricula")


def fed_heterogeneity(runs: str) -> str:
    """The two skews' ``summary.md`` (runs/fed_het_a0.1, runs/fed_het_a1.0) side by side, then the
    rows of the methods run alone later (runs/fed_het_a0.1_fedbr, ..._curricula: the same config and seeds;
    a later row replaces the first run's row of the same method, in place)."""
    rows: dict[str, dict[str, list[str]]] = {}
    for a in ("0.1", "1.0"):
        path = os.path.join(runs, f"fed_het_a{a}", "summary.md")
        if not os.path.isfile(path):
            raise MissingRun(path)
        later = [os.path.join(runs, f"fed_het_a{a}_{m}", "summary.md") for m in FED_HET_LATER]
        for p in [path] + [p for p in later if os.path.isfile(p)]:
            with open(p) as f:
                for line in f.read().strip().splitlines()[2:]:
                    c = [x.strip() for x in line.strip().strip("|").split("|")]
                    rows.setdefault(c[0], {})[a] = c
    out = []
    for name, by in rows.items():
        cells = [FED_HET_NAMES.get(name, name)]
        for a in ("0.1", "1.0"):
            c = by.get(a, ["-"] * 7)
            cells += [c[4], c[2], c[6], c[5]]  # updates to target, sim time to target, final acc, best acc
        out.append(cells)
    headers = ["method", "α = 0.1: client updates to 85%", "sim time to 85%", "final acc", "best acc",
               "α = 1.0: client updates to 85%", "sim time to 85%", "final acc", "best acc"]
    return _table(headers, out, ["---"] + ["---:"] * 8)


def async_script():
    """``scripts/async_local_sgd_lm.py`` as a module (its ``table`` and ``plot``)."""
    if "async_local_sgd_lm" in sys.modules:
        return sys.modules["async_local_sgd_lm"]
    spec = importlib.util.spec_from_file_location("async_local_sgd_lm", os.path.join(ROOT, "scripts",
                                                                                      "async_local_sgd_lm.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def async_local_sgd(runs: str) -> str:
    data = _read_json(os.path.join(runs, "async_local_sgd", "results.json"))
    module = async_script()
    results = data["results"]
    ref_steps = results["diloco"]["inner_steps"] if "diloco" in results else min(
        r["inner_steps"] for r in results.values())
    return module.table(results, data["target"], ref_steps)


def finetune_script():
    """``scripts/finetune_table.py`` as a module (its ``table`` and ``plot``)."""
    if "finetune_table" not in sys.modules:
        spec = importlib.util.spec_from_file_location("finetune_table", os.path.join(ROOT, "scripts", "finetune_table.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["finetune_table"]


def finetune_table(name: str) -> Callable[[str], str]:
    """The table of a fine-tuning comparison ``runs/NAME`` (one variants folder, or one per seed)."""

    def generate(runs: str) -> str:
        module = finetune_script()
        try:
            return module.table(os.path.join(runs, name))
        except module.MissingRun as e:
            raise MissingRun(str(e)) from None

    return generate


FINETUNE_GPT_SEEDS = (f"for s in 0 1 2; do {CLI} run experiments/finetune_gpt_code.toml --set run.seed=$s "
                      "--set run.name=finetune_gpt_code/seed$s; done")


def dipaco(runs: str) -> str:
    return _read_json(os.path.join(runs, "dipaco", "results.json"))["table"]


# name: (how the run folder is made, the generator)
TABLES: dict[str, tuple[str, Callable[[str], str]]] = {
    "diloco_vs_ddp_fast": (f"{CLI} run experiments/diloco_vs_ddp_fast.toml", diloco_vs_ddp_fast),
    "quickstart": (f"{CLI} run experiments/quickstart.toml", quickstart),
    "diloco_vs_ddp": (f"{CLI} run experiments/diloco_vs_ddp.toml", diloco_vs_ddp),
    "topologies": ("(none: computed from jaxopt_lab.distributed.topology)", topologies),
    "grokking_modular_addition": (f"{CLI} run experiments/grokking_modular_addition.toml", grokking),
    "lowrank_lm": (f"{CLI} run experiments/lowrank_lm.toml", lowrank_lm),
    "fed_digits": (f"{CLI} run experiments/fed_digits.toml", fed_digits),
    "async_local_sgd": ("PYTHONPATH=$PWD python scripts/async_local_sgd_lm.py", async_local_sgd),
    "fed_heterogeneity": (f"{CLI} run experiments/fed_heterogeneity.toml --set federated.dirichlet_alpha=0.1 "
                          "--set run.name=fed_het_a0.1 (and 1.0, fed_het_a1.0; FedBR: --only fedbr, "
                          "run.name=fed_het_a0.1_fedbr)", fed_heterogeneity),
    "dipaco": ("PYTHONPATH=$PWD python scripts/dipaco_lm.py", dipaco),
    "finetune_gpt_code": (FINETUNE_GPT_SEEDS, finetune_table("finetune_gpt_code")),
}


def rewrite(text: str, runs: str, log: Callable[[str], None]) -> str:
    """``text`` with every marked table region regenerated from ``runs`` (missing runs: kept)."""

    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in TABLES:
            raise SystemExit(f"unknown table marker {name!r}; known: {', '.join(TABLES)}")
        command, generate = TABLES[name]
        try:
            table = generate(runs)
        except MissingRun as e:
            log(f"kept      {name}: {e} is missing (make it with: {command})")
            return match.group(0)
        changed = table.strip() != match["body"].strip()
        log(f"{'rewrote' if changed else 'unchanged':9s} {name}")
        return f"{match.group(1)}{table}\n{match.group(4)}"

    return REGION.sub(replace, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default=os.path.join(ROOT, "runs"), help="folder holding the run folders")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs from its runs")
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    stale = []
    for doc in DOCS:
        path = os.path.join(ROOT, doc)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new = rewrite(text, args.runs, lambda line, doc=doc: print(f"{doc}: {line}"))
        if new != text:
            stale.append(doc)
            if not args.check:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(new)
    if args.check and stale:
        print(f"out of date: {', '.join(stale)} (run python scripts/make_tables.py)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
