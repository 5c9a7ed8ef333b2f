"""Run the ``[variants.NAME]`` of one config side by side: table and plot."""

from __future__ import annotations

import os
from collections.abc import Iterable

from jaxopt_lab.experiment import config as config_lib
from jaxopt_lab.experiment.build import build
from jaxopt_lab.experiment.plot import plot_runs
from jaxopt_lab.experiment.trainer import RunResult, run

COLUMNS = (("eval_loss", "final eval loss", "{:.4f}"), ("eval_accuracy", "eval acc", "{:.4f}"),
           ("bytes_communicated", "payload bytes/worker", "{:.3e}"), ("wire_bytes", "wire bytes/worker", "{:.3e}"), ("opt_state_bytes", "opt state bytes", "{:.3e}"),
           ("steps_per_sec", "steps/s", "{:.2f}"), ("wall_time", "wall-clock s", "{:.0f}"))
# Columns relative to the first variant: (key, header, whether the ratio is of the inverse)
RELATIVE = (("opt_state_bytes", "opt state × {}", False), ("steps_per_sec", "step time × {}", True))


def run_variants(path: str, overrides: Iterable[str] = ()) -> tuple[dict[str, RunResult], str]:
    """Run every variant of ``path`` (validating all of them first); return results and the plot path."""
    configs = config_lib.load_variants(path, overrides)
    for name, cfg in configs.items():  # every variant's data/model/method is checked before any training
        try:
            build(cfg)
        except config_lib.ConfigError as e:
            raise config_lib.ConfigError(f"variant {name!r}: {e}") from None
    results = {name: run(cfg) for name, cfg in configs.items()}
    base = os.path.dirname(next(iter(results.values())).run_dir)
    out = plot_runs([r.run_dir for r in results.values()], os.path.join(base, "compare.png"), labels=list(results))
    with open(os.path.join(base, "compare.md"), "w") as f:
        f.write(format_table(results) + "\n")
    return results, out


def format_table(results: dict[str, RunResult], name_header: str = "variant") -> str:
    """A Markdown table of each variant's final metrics (``name_header``: the header of the name column)."""
    cols = [c for c in COLUMNS if any(c[0] in r.final for r in results.values())]
    first_name, first = next(iter(results.items()))
    relative = [c for c in RELATIVE if first.final.get(c[0])] if len(results) > 1 else []
    headers = [c[1] for c in cols] + [header.format(first_name) for _, header, _ in relative]
    lines = [f"| {name_header} | " + " | ".join(headers) + " |", "|---|" + "---:|" * len(headers)]
    for name, r in results.items():
        cells = [fmt.format(r.final[key]) if key in r.final else "-" for key, _, fmt in cols]
        for key, _, inverse in relative:
            ratio = r.final[key] / first.final[key] if r.final.get(key) else None
            cells.append("-" if ratio is None else f"{1 / ratio if inverse else ratio:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
