"""Redraw the figures in docs/ (``docs/NAME.png``) from run outputs.

Every results figure of README.md is ``docs/NAME.png`` for a NAME of ``FIGURES``
below, drawn from the run folder ``runs/NAME`` that the same-named table of
``scripts/make_tables.py`` is read from, in the style the runs themselves
draw with today:

* a config with variants (the main job, DiLoCo vs DDP, grokking, low-rank): the
  variants' ``metrics.jsonl`` by :func:`jaxopt_lab.experiment.plot.plot_runs`,
  in the config's order and labelled by variant name, as ``jaxopt-lab run``
  draws ``runs/NAME/compare.png`` (and ``jaxopt-lab plot`` any runs);
* the federated simulation: every method's per-seed ``metrics.jsonl`` by
  :func:`jaxopt_lab.experiment.federated_run.plot` (its ``accuracy.png``);
* federated under heterogeneity (``fed_heterogeneity_a0.1``, ``_a1.0``): the same
  plot over ``runs/fed_het_a{alpha}`` and the methods run alone later into
  ``runs/fed_het_a{alpha}_NAME`` (FedBR; the curricula, rerun, replace the first run's);
* asynchronous Local-SGD: ``results.json`` by ``scripts/async_local_sgd_lm.py``'s
  own ``plot``;
* DiPaCo: ``runs/dipaco/results.json`` by ``scripts/dipaco_lm.py``'s own ``plot``.

A figure whose run is missing or unfinished (a variant without its
``summary.json``) is not drawn; the script says which file is missing and which
command makes the run. Named figures that cannot be drawn make the exit status 1;
with no names, every figure whose run is there is drawn and the rest are reported.

    python scripts/make_figures.py                    # every figure whose run is in runs/
    python scripts/make_figures.py lowrank_lm         # just these (exit 1 if one cannot be drawn)
    python scripts/make_figures.py --runs DIR --out DIR
"""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_tables  # noqa: E402
from make_tables import CLI, ROOT, MissingRun  # noqa: E402


def variants_figure(name: str) -> Callable[[str, str], str]:
    """The figure of a config with variants: every variant finished, in the config's order."""

    def draw(runs: str, out: str) -> str:
        from jaxopt_lab.experiment.plot import plot_runs

        base = os.path.join(runs, name)
        finals = make_tables._finals(base)  # MissingRun unless every variant wrote its summary.json
        return plot_runs([os.path.join(base, v) for v in finals], out, labels=list(finals))

    return draw


def _method_results(base: str, methods) -> list:
    """One :class:`MethodResult` per method of a federated run folder, from its per-seed evaluation records."""
    from jaxopt_lab.experiment.federated_run import MethodResult, SeedRun

    results = []
    for method in methods:
        by_seed: dict[int, list[dict]] = {}
        for r in make_tables._read_jsonl(os.path.join(base, method, "metrics.jsonl")):
            by_seed.setdefault(r["seed"], []).append(r)
        seeds = [SeedRun(seed, recs, server_steps=recs[-1]["step"], client_updates=recs[-1]["client_updates"],
                         mean_staleness=recs[-1]["mean_staleness"]) for seed, recs in sorted(by_seed.items())]
        results.append(MethodResult(method, seeds, wall_seconds=0.0))
    return results


def _finished_config(base: str) -> dict:
    for required in ("config.toml", "summary.md"):  # summary.md: written when every method has finished
        if not os.path.isfile(os.path.join(base, required)):
            raise MissingRun(os.path.join(base, required))
    with open(os.path.join(base, "config.toml"), "rb") as f:
        return tomllib.load(f)


def fed_digits(runs: str, out: str) -> str:
    """The federated run's accuracy figure from its methods' per-seed evaluation records."""
    from jaxopt_lab.experiment.federated_run import plot

    base = os.path.join(runs, "fed_digits")
    cfg = _finished_config(base)
    results = _method_results(base, cfg["methods"])
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    return plot(results, cfg, out)


def fed_heterogeneity(alpha: str) -> Callable[[str, str], str]:
    """The heterogeneity run's accuracy figure at one skew: the methods of ``runs/fed_het_a{alpha}`` and
    those run alone later into ``runs/fed_het_a{alpha}_NAME`` (``make_tables.FED_HET_LATER``: FedBR added,
    the curricula rerun in place of the first run's), the same config and seeds, so the figure has every
    row of the README table."""

    def draw(runs: str, out: str) -> str:
        from jaxopt_lab.experiment.federated_run import plot

        base = os.path.join(runs, f"fed_het_a{alpha}")
        cfg = _finished_config(base)
        results = _method_results(base, cfg["methods"])
        for name in make_tables.FED_HET_LATER:
            later = os.path.join(runs, f"fed_het_a{alpha}_{name}")
            later_cfg = _finished_config(later)
            rerun = {r.name: r for r in _method_results(later, later_cfg["methods"])}
            results = [rerun.pop(r.name, r) for r in results] + list(rerun.values())
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        return plot(results, cfg, out)

    return draw


def dipaco(runs: str, out: str) -> str:
    data = make_tables._read_json(os.path.join(runs, "dipaco", "results.json"))
    import dipaco_lm

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    dipaco_lm.plot(data["results"], data["args"], out)
    return out


def async_local_sgd(runs: str, out: str) -> str:
    data = make_tables._read_json(os.path.join(runs, "async_local_sgd", "results.json"))
    module = make_tables.async_script()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    module.plot(data["results"], out, data["target"])
    return out


def finetune_figure(name: str) -> Callable[[str, str], str]:
    """Eval loss vs step per method of a fine-tuning comparison (``scripts/finetune_table.py``'s plot)."""

    def draw(runs: str, out: str) -> str:
        module = make_tables.finetune_script()
        try:
            module.collect(os.path.join(runs, name))  # every variant of every seed finished
        except module.MissingRun as e:
            raise MissingRun(str(e)) from None
        return module.plot(os.path.join(runs, name), out)

    return draw


def finetune_cnn(runs: str, out: str) -> str:
    """Eval accuracy vs step per method of the CNN digits 0-4 -> 5-9 fine-tuning (scripts/finetune_cnn_table.py)."""
    import finetune_cnn_table

    base = os.path.join(runs, "finetune_cnn_digits59")
    if not os.path.isdir(base) or not finetune_cnn_table.seed_runs(base, "full"):
        raise MissingRun(f"{base} has no finished runs")
    return finetune_cnn_table.plot(base, out)


# name: (how the run folder is made, the drawing function (runs folder, output path) -> path)
FIGURES: dict[str, tuple[str, Callable[[str, str], str]]] = {
    "diloco_vs_ddp_fast": (f"{CLI} run experiments/diloco_vs_ddp_fast.toml", variants_figure("diloco_vs_ddp_fast")),
    "diloco_vs_ddp": (f"{CLI} run experiments/diloco_vs_ddp.toml", variants_figure("diloco_vs_ddp")),
    "grokking_modular_addition": (f"{CLI} run experiments/grokking_modular_addition.toml",
                                  variants_figure("grokking_modular_addition")),
    "lowrank_lm": (f"{CLI} run experiments/lowrank_lm.toml", variants_figure("lowrank_lm")),
    "fed_digits": (f"{CLI} run experiments/fed_digits.toml", fed_digits),
    "async_local_sgd": ("PYTHONPATH=$PWD python scripts/async_local_sgd_lm.py", async_local_sgd),
    "dipaco": ("PYTHONPATH=$PWD python scripts/dipaco_lm.py", dipaco),
    "finetune_gpt_code": (make_tables.FINETUNE_GPT_SEEDS, finetune_figure("finetune_gpt_code")),
    "finetune_cnn_digits59": (f"{CLI} run experiments/finetune_cnn_digits59.toml", finetune_cnn),
}
for _a in ("0.1", "1.0"):
    FIGURES[f"fed_heterogeneity_a{_a}"] = (
        f"{CLI} run experiments/fed_heterogeneity.toml --set federated.dirichlet_alpha={_a} --set run.name=fed_het_a{_a}"
        f" (and, for FedBR, the same with --only fedbr --set run.name=fed_het_a{_a}_fedbr)", fed_heterogeneity(_a))


def draw(names: list[str], runs: str, out_dir: str, log: Callable[[str], None]) -> list[str]:
    """Draw ``out_dir/NAME.png`` for each name from ``runs/NAME``; returns the names that could not be drawn."""
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise SystemExit(f"unknown figure {unknown[0]!r}; known: {', '.join(FIGURES)}")
    missing = []
    for name in names:
        command, draw_one = FIGURES[name]
        try:
            path = draw_one(runs, os.path.join(out_dir, f"{name}.png"))
        except MissingRun as e:
            log(f"not drawn {name}: {e} is missing (make it with: {command})")
            missing.append(name)
            continue
        log(f"drew      {name}: {os.path.relpath(path)}")
    return missing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"figures to draw (default: all): {', '.join(FIGURES)}")
    ap.add_argument("--runs", default=os.path.join(ROOT, "runs"), help="folder holding the run folders")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs"), help="folder the PNGs are written to")
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    missing = draw(args.names or list(FIGURES), args.runs, args.out, print)
    return 1 if (missing and args.names) else 0


if __name__ == "__main__":
    sys.exit(main())

