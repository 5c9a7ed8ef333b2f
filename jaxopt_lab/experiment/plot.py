"""Plot runs side by side: loss and accuracy against step, wall-clock and bytes communicated."""

from __future__ import annotations

import os
from collections.abc import Sequence

from jaxopt_lab.experiment.metrics import read_metrics

# (x key, x label); a panel row appears only when some run records that key. Bytes: wire bytes per
# worker (jaxopt_lab.distributed.accounting), or payload bytes for runs that predate them.
_AXES = (("step", "step"), ("wall_time", "wall-clock (s)"), ("wire_bytes", "wire bytes per worker"),
         ("bytes_communicated", "payload bytes communicated per worker"))
_METRICS = ("loss", "eval_loss", "accuracy", "eval_accuracy", "softmax_collapse", "consensus_distance", "sharpness")


def plot_runs(run_dirs: Sequence[str], out: str, labels: Sequence[str] | None = None) -> str:
    """Write a PNG comparing the runs in ``run_dirs``; return its path.

    Columns: train loss, eval loss, eval accuracy (those present). Rows: against
    step, and against wall-clock and bytes communicated where runs record them.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not run_dirs:
        raise ValueError("plot needs at least one run directory")
    runs = {}
    for i, run_dir in enumerate(run_dirs):
        records = read_metrics(run_dir)
        if not records:
            raise ValueError(f"{run_dir} has no metrics (expected {os.path.join(run_dir, 'metrics.jsonl')})")
        runs[labels[i] if labels else os.path.basename(os.path.normpath(run_dir))] = records
    present = lambda key: any(key in r for recs in runs.values() for r in recs)  # noqa: E731
    rows = [a for a in _AXES if present(a[0]) and not (a[0] == "bytes_communicated" and present("wire_bytes"))]
    cols = [m for m in _METRICS if present(m)]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(4.2 * len(cols), 3.2 * len(rows)), squeeze=False)
    for r, (xkey, xlabel) in enumerate(rows):
        for c, metric in enumerate(cols):
            ax = axes[r][c]
            for name, records in runs.items():
                pts = [(rec[xkey], rec[metric]) for rec in records if xkey in rec and metric in rec]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, label=name, marker="." if len(pts) < 30 else None)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(metric)
            if xkey in ("wire_bytes", "bytes_communicated"):
                ax.set_xscale("symlog")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
