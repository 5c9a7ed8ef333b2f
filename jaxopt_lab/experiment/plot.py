"""Plot runs side by side: loss and accuracy against step, wall-clock and bytes communicated.

Each run keeps one colour (and line style) in every panel and one legend, above
the panels, names them all. Y-axis labels carry units read from each run's
``config.toml`` (``eval loss (nats/byte)`` for byte-level text).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any

from jaxopt_lab.experiment.metrics import METRICS_FILE, read_metrics

# (x key, axis label, short name for panel titles); a panel row appears only when some run records
# that key. Bytes: wire bytes per worker (jaxopt_lab.distributed.accounting), or payload bytes for
# runs that predate them.
_AXES = (("step", "step", "step"), ("wall_time", "wall-clock (s)", "wall-clock"),
         ("wire_bytes", "wire bytes per worker", "wire bytes"),
         ("bytes_communicated", "payload bytes communicated per worker", "payload bytes"))
# (metric key, name in titles and labels); a panel column appears only when some run records it.
_METRICS = (("loss", "train loss"), ("eval_loss", "eval loss"), ("accuracy", "train accuracy"),
            ("eval_accuracy", "eval accuracy"), ("softmax_collapse", "softmax collapse"),
            ("consensus_distance", "consensus distance"), ("sharpness", "sharpness"))
_LINE_STYLES = ("-", "--", ":", "-.")


def _read_config(run_dir: str) -> dict[str, Any]:
    path = os.path.join(run_dir, "config.toml")
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        return tomllib.load(f)


def _units(config: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The unit of each metric of one run, from its resolved config (empty where it cannot tell)."""
    data = config.get("data", {}).get("name")
    if not data:
        return {}
    text = data == "text"  # byte-level: losses and accuracies are per next byte
    classifies = text or any("accuracy" in r or "eval_accuracy" in r for r in records)
    if not classifies:  # regression: the mean squared error of the scalar output
        loss = "squared error"
    else:
        stable_max = config.get("train", {}).get("loss") == "stable_max"
        loss = ("StableMax, " if stable_max else "") + ("nats/byte" if text else "nats")
    accuracy = "fraction of next bytes" if text else "fraction of examples"
    return {"loss": loss, "eval_loss": loss, "accuracy": accuracy, "eval_accuracy": accuracy,
            "softmax_collapse": "fraction of examples", "consensus_distance": r"RMS $\|x_i - \bar{x}\|$ over workers",
            "sharpness": "top Hessian eigenvalue"}


def expand_runs(paths: Sequence[str]) -> tuple[list[str], list[str]]:
    """The run directories ``paths`` name, and notes on what was skipped.

    A directory with a ``metrics.jsonl`` is a run; a directory without one whose
    subdirectories hold runs (a config's variants, a sweep) stands for those runs,
    in name order; a file (the ``compare.md`` beside the variants that
    ``runs/NAME/*`` matches) is skipped with a note. Anything else is an error.
    """
    run_dirs, notes = [], []
    for path in paths:
        if not os.path.exists(path):
            raise ValueError(f"{path} does not exist")
        if not os.path.isdir(path):
            notes.append(f"skipped {path}: a file, not a run directory")
            continue
        if os.path.exists(os.path.join(path, METRICS_FILE)):
            run_dirs.append(path)
            continue
        if "federated" in _read_config(path):
            raise ValueError(f"{path} is a federated simulation (several seeds per method): "
                             f"its plot is {os.path.join(path, 'accuracy.png')}")
        inner = sorted(os.path.join(path, n) for n in os.listdir(path)
                       if os.path.exists(os.path.join(path, n, METRICS_FILE)))
        if not inner:
            raise ValueError(f"{path} holds no runs: no {METRICS_FILE} in it or in its subdirectories")
        run_dirs.extend(inner)
    for d in run_dirs:
        if sum(os.path.samefile(d, e) for e in run_dirs) > 1:
            raise ValueError(f"the run {d} is given twice")
    return run_dirs, notes


def run_labels(run_dirs: Sequence[str]) -> list[str]:
    """Each run's folder name; runs whose folder names repeat (``a/ddp``, ``b/ddp``) are named by
    as many trailing path components as tell them apart."""
    parts = [os.path.normpath(os.path.abspath(d)).split(os.sep) for d in run_dirs]
    labels = [p[-1] for p in parts]
    for k in range(2, max(map(len, parts)) + 1):
        clashing = [i for i, label in enumerate(labels) if labels.count(label) > 1]
        if not clashing:
            break
        for i in clashing:
            labels[i] = "/".join(parts[i][-k:])
    return labels


def resolve_runs(paths: Sequence[str], labels: str | None = None) -> tuple[list[str], list[str], list[str]]:
    """What ``jaxopt-lab plot PATH... [--labels A,B,...]`` plots: run directories, their labels,
    and notes for the user (files skipped, repeated folder names told apart)."""
    run_dirs, notes = expand_runs(paths)
    if labels is None:
        names = run_labels(run_dirs)
        for label, d in zip(names, run_dirs):
            if label != os.path.basename(os.path.normpath(d)):
                notes.append(f"runs share the folder name {os.path.basename(os.path.normpath(d))!r}: "
                             f"{d} is labelled {label!r} (--labels names them)")
        return run_dirs, names, notes
    names = [n.strip() for n in labels.split(",")]
    if len(names) != len(run_dirs):
        raise ValueError(f"--labels has {len(names)} names ({', '.join(names)}) for {len(run_dirs)} runs: "
                         f"{', '.join(run_dirs)}")
    return run_dirs, names, notes


def _axis_label(name: str, units: Sequence[str | None]) -> tuple[str, bool]:
    """``name (unit)`` when every run has the same unit; else ``(name, True)``: units go in the legend."""
    known = set(units) - {None}
    if not known:
        return name, False
    if len(known) == 1 and None not in units:
        return f"{name} ({known.pop()})", False
    return f"{name} (unit per run: see legend)", True


def plot_runs(run_dirs: Sequence[str], out: str, labels: Sequence[str] | None = None) -> str:
    """Write a PNG comparing the runs in ``run_dirs`` (:func:`figure`); return its path."""
    import matplotlib.pyplot as plt

    fig = figure(run_dirs, labels)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def figure(run_dirs: Sequence[str], labels: Sequence[str] | None = None):
    """A matplotlib figure comparing the runs in ``run_dirs``.

    Columns: train and eval loss, train and eval accuracy, and the diagnostics
    some run records (softmax collapse, consensus distance, sharpness). Rows:
    against step, and against wall-clock and bytes communicated where runs
    record them. Each run has one colour in every panel; one legend names them.

    Args:
      run_dirs: run directories (each with a ``metrics.jsonl``).
      labels: a name for each run; default: folder names, with parent folders
        added where those repeat (:func:`run_labels`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    if not run_dirs:
        raise ValueError("plot needs at least one run directory")
    labels = list(labels) if labels is not None else run_labels(run_dirs)
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels ({', '.join(labels)}) for {len(run_dirs)} runs")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"two runs have the label {repeated[0]!r}: each run needs its own")
    runs = []
    for run_dir, label in zip(run_dirs, labels):
        records = read_metrics(run_dir)
        if not records:
            raise ValueError(f"{run_dir} has no metrics (expected {os.path.join(run_dir, METRICS_FILE)})")
        runs.append((label, records, _units(_read_config(run_dir), records)))
    present = lambda key: any(key in r for _, recs, _ in runs for r in recs)  # noqa: E731
    rows = [a for a in _AXES if present(a[0]) and not (a[0] == "bytes_communicated" and present("wire_bytes"))]
    cols = [m for m in _METRICS if present(m[0])]

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = [dict(color=colors[i % len(colors)], linestyle=_LINE_STYLES[i // len(colors) % len(_LINE_STYLES)])
              for i in range(len(runs))]
    legend_units = {}  # run index -> units that differ between runs, named in its legend entry
    ylabels = {}
    for metric, name in cols:
        ylabels[metric], per_run = _axis_label(name, [u.get(metric) for _, recs, u in runs
                                                      if any(metric in r for r in recs)])
        if per_run:
            for i, (_, recs, u) in enumerate(runs):
                if any(metric in r for r in recs):
                    unit = u.get(metric, "unit unknown")
                    if unit not in legend_units.setdefault(i, []):
                        legend_units[i].append(unit)

    fig, axes = plt.subplots(len(rows), len(cols), figsize=(4.2 * len(cols), 3.4 * len(rows)), squeeze=False,
                             layout="constrained")
    for r, (xkey, xlabel, xname) in enumerate(rows):
        for c, (metric, name) in enumerate(cols):
            ax = axes[r][c]
            positive = []  # x values above 0, for the bytes axes
            for (label, records, _), style in zip(runs, styles):
                pts = [(rec[xkey], rec[metric]) for rec in records if xkey in rec and metric in rec]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, label=label, marker="." if len(pts) < 30 else None, **style)
                    positive += [x for x in xs if x > 0]
            ax.set_title(f"{name} vs {xname}", fontsize="medium")
            ax.set_xlabel(xlabel)
            ylabel = ylabels[metric]
            ax.set_ylabel(ylabel if len(ylabel) <= 32 else ylabel.replace(" (", "\n(", 1))  # unit on a line of its own
            if xkey in ("wire_bytes", "bytes_communicated"):
                # 0 (before a method's first exchange) at the origin, then logarithmic
                ax.set_xscale("symlog", linthresh=min(positive, default=1.0))
                ax.set_xlim(left=0)
            ax.grid(alpha=0.3)
    handles = [Line2D([], [], lw=2, **style) for style in styles]
    names = [label + (f" [{'; '.join(legend_units[i])}]" if i in legend_units else "") for i, (label, _, _) in enumerate(runs)]
    fig.legend(handles, names, loc="outside upper center", ncols=min(len(runs), 5),
               fontsize="small", frameon=False)
    return fig
