"""The README table and figure of a fine-tuning comparison (experiments/finetune_*.toml) from its runs.

A run folder is a config's variants folder (``runs/finetune_gpt_code``: ``variants.toml`` and one
folder per variant), or a folder of such folders, one per seed (``runs/finetune_gpt_code/seed0``,
``seed1``, ...: what ``--set run.name=finetune_gpt_code/seedS`` writes). Per variant, over the
seeds (mean ± sample standard deviation; a value equal in every seed, or one seed: the value): eval loss at step 0 and at the last
step, eval accuracy, trainable parameters, optimizer-state bytes, peak training memory (the
compiled step's ``memory_analysis()``, ``peak_memory_bytes``) and steps/s, from each variant's
``summary.json`` and first ``metrics.jsonl`` line. A variant without ``trainable_params`` (full
fine-tuning, GaLore: no fine-tuning route) trains every parameter: its count is read from its
last checkpoint.

    python scripts/finetune_table.py runs/finetune_gpt_code                   # the table
    python scripts/finetune_table.py runs/finetune_gpt_code --plot docs/finetune_gpt_code.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tomllib

ORDER = ("full", "galore", "lora", "lora_pro", "lora_ggpo", "eva", "svfit", "welore", "ist", "snella")


class MissingRun(Exception):
    """The run outputs the table is made from are not there."""


def seed_folders(base: str) -> list[str]:
    """``[base]`` for a variants folder, else its sub-folders that are (the seeds), sorted."""
    if os.path.isfile(os.path.join(base, "variants.toml")):
        return [base]
    subs = sorted(os.path.join(base, d) for d in os.listdir(base)) if os.path.isdir(base) else []
    subs = [d for d in subs if os.path.isfile(os.path.join(d, "variants.toml"))]
    if not subs:
        raise MissingRun(os.path.join(base, "variants.toml"))
    return subs


def _variants(folder: str) -> list[str]:
    with open(os.path.join(folder, "variants.toml"), "rb") as f:
        return list(tomllib.load(f)["variants"])


def _all_params(run_dir: str) -> int | None:
    try:
        from jaxopt_lab.finetune.pretrained import restore_params

        return sum(int(math.prod(x.shape)) for x in restore_params(run_dir).values())
    except Exception:  # noqa: BLE001 - no checkpoint: the count is left out
        return None


def _run(run_dir: str) -> dict:
    path = os.path.join(run_dir, "summary.json")
    if not os.path.isfile(path):
        raise MissingRun(path)
    with open(path) as f:
        s = json.load(f)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    trainable = s.get("trainable_params")
    return {"loss0": records[0]["eval_loss"], "loss": s["eval_loss"], "acc": s.get("eval_accuracy"),
            "trainable": trainable if trainable is not None else _all_params(run_dir), "full": trainable is None,
            "opt": s.get("opt_state_bytes"), "peak": s.get("peak_memory_bytes"), "rate": s.get("steps_per_sec"),
            "step": s["step"], "curve": [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]}


def collect(base: str) -> tuple[list[str], dict[str, list[dict]]]:
    """``(variants in order, {variant: [one dict per seed]})``; every variant of every seed finished."""
    folders = seed_folders(base)
    names = []
    for folder in folders:
        names += [v for v in _variants(folder) if v not in names]
    names = [v for v in ORDER if v in names] + [v for v in names if v not in ORDER]
    runs = {v: [_run(os.path.join(folder, v)) for folder in folders if v in _variants(folder)] for v in names}
    return names, runs


def _stat(values: list, fmt: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    mean = sum(values) / len(values)
    if len(values) == 1 or all(v == values[0] for v in values):  # one seed, or the same in every seed
        return format(mean, fmt)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{format(mean, fmt)} ± {format(std, fmt)}"


def _mib(values: list) -> list:
    return [None if v is None else v / 2 ** 20 for v in values]


def table(base: str) -> str:
    names, runs = collect(base)
    steps = sorted({r["step"] for rs in runs.values() for r in rs})
    seeds = max(len(rs) for rs in runs.values())
    end = f"step {steps[0]}" if len(steps) == 1 else "the last step"
    lines = [f"| variant | eval loss at step 0 | eval loss at {end} | eval acc | trainable params "
             f"| opt state (MiB) | peak memory (MiB) | steps/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for v in names:
        rs = runs[v]
        col = lambda key: [r[key] for r in rs]  # noqa: E731
        trainable = col("trainable")[0]
        tp = "–" if trainable is None else f"{trainable:,}" + (" (all)" if rs[0]["full"] else "")
        lines.append(f"| {v} | {_stat(col('loss0'), '.4f')} | {_stat(col('loss'), '.4f')} | {_stat(col('acc'), '.4f')} "
                     f"| {tp} | {_stat(_mib(col('opt')), '.3f')} | {_stat(_mib(col('peak')), '.2f')} "
                     f"| {_stat(col('rate'), '.2f')} |")
    note = f"({seeds} seed{'s' if seeds > 1 else ''}: mean ± sample std)" if seeds > 1 else "(one seed)"
    return "\n".join(lines) + f"\n\n{note}"


def plot(base: str, out: str) -> str:
    """Eval loss against step, one line per variant (mean over seeds, shaded min–max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, runs = collect(base)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in names:
        curves = [dict(r["curve"]) for r in runs[v]]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        vals = [[c[s] for c in curves] for s in steps]
        mean = [sum(x) / len(x) for x in vals]
        (line,) = ax.plot(steps, mean, marker="o", markersize=3, label=v)
        if len(curves) > 1:
            ax.fill_between(steps, [min(x) for x in vals], [max(x) for x in vals], color=line.get_color(), alpha=0.15)
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss (target domain)")
    seeds = max(len(rs) for rs in runs.values())
    ax.set_title(f"{os.path.basename(os.path.normpath(base))}: eval loss per method"
                 + (f" (mean of {seeds} seeds, min–max shaded)" if seeds > 1 else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("base", nargs="?", default="runs/finetune_gpt_code", help="the run folder (variants or seeds)")
    ap.add_argument("--plot", default=None, help="also draw eval loss vs step to this PNG")
    args = ap.parse_args(argv)
    try:
        print(table(args.base))
        if args.plot:
            print(f"plot: {plot(args.base, args.plot)}")
    except MissingRun as e:
        print(f"finetune_table: {e} is missing", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
