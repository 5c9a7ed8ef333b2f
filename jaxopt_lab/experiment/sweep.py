"""Grid sweeps: one run per point of the Cartesian product of ``key=v1,v2`` axes."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Sequence

from jaxopt_lab.experiment import compare
from jaxopt_lab.experiment import config as config_lib
from jaxopt_lab.experiment.plot import plot_runs
from jaxopt_lab.experiment.trainer import RunResult, run


def parse_grid(items: Iterable[str]) -> list[tuple[str, list[str]]]:
    """``["method.learning_rate=1e-3,3e-3", ...]`` -> ``[("method.learning_rate", ["1e-3", "3e-3"]), ...]``;
    commas inside ``[...]``, ``{...}`` or quotes do not split (``model.hidden=[8,8],[4]``)."""
    axes = []
    for item in items:
        if "=" not in item:
            raise config_lib.ConfigError(f"grid axis {item!r} must look like section.key=v1,v2")
        key, values = item.split("=", 1)
        vals = [v.strip() for v in _split_top_level(values) if v.strip()]
        if not vals:
            raise config_lib.ConfigError(f"grid axis {key!r} has no values")
        axes.append((key.strip(), vals))
    return axes


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets, braces and quotes: ``"[8, 8],[4]"`` -> ``["[8, 8]", "[4]"]``."""
    parts, depth, quote, current = [], 0, None, ""
    for ch in text:
        if quote is None and ch == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        if quote is not None:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        current += ch
    return parts + [current]


def grid_points(axes: Sequence[tuple[str, list[str]]]) -> list[list[str]]:
    """Every combination as a list of ``key=value`` overrides."""
    keys = [k for k, _ in axes]
    return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*(v for _, v in axes))]


def sweep(
    config_path: str, grid: Iterable[str], overrides: Iterable[str] = ()
) -> list[tuple[list[str], RunResult]]:
    """Run every grid point into ``out_dir/name/<key=value,...>``; return the results.

    Every point's config is validated before the first run starts, so a bad
    value in the last point does not waste the runs before it. Like ``run`` on a
    config with variants, it writes ``compare.png`` (every point's curves) and
    ``compare.md`` (their final metrics) beside the points' folders.
    """
    overrides = list(overrides)
    points = grid_points(parse_grid(grid))
    configs = []
    for point in points:
        cfg = config_lib.load(config_path, overrides + point)
        label = ",".join(key.split(".")[-1] + "=" + value for key, value in (p.split("=", 1) for p in point))
        label = label.replace("/", "_")
        configs.append((point, cfg, os.path.join(cfg.run.out_dir, cfg.run.name, label)))
    run_dirs = [run_dir for _, _, run_dir in configs]
    for d in run_dirs:
        if run_dirs.count(d) > 1:
            raise config_lib.ConfigError(f"the grid has the point {os.path.basename(d)!r} twice")
    from jaxopt_lab.experiment.build import validate
    from jaxopt_lab.experiment.trainer import check_fresh_run_dir

    for _, _, run_dir in configs:  # every point's folder can be written and holds no run yet
        check_fresh_run_dir(run_dir)
    for _, cfg, _ in configs:  # check data/model/method of every point first (shapes only, nothing built)
        validate(cfg)
    results = [(point, run(cfg, run_dir=run_dir)) for point, cfg, run_dir in configs]
    base = summary_dir(results)
    plot_runs(run_dirs, os.path.join(base, "compare.png"), labels=[os.path.basename(d) for d in run_dirs])
    with open(os.path.join(base, "compare.md"), "w") as f:
        f.write(format_table(results) + "\n")
    return results


def summary_dir(results: Sequence[tuple[list[str], RunResult]]) -> str:
    """The folder of the points' folders (``out_dir/name``), where ``compare.png`` and ``compare.md`` go."""
    return os.path.commonpath([os.path.dirname(r.run_dir) for _, r in results])


def format_table(results: Sequence[tuple[list[str], RunResult]]) -> str:
    """A Markdown table of each grid point's final metrics (the columns of ``run``'s variant table)."""
    return compare.format_table({os.path.basename(r.run_dir): r for _, r in results}, name_header="point")
