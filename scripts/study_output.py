"""What every study script writes: ``results.json``, ``summary.md`` (its table) and a plot.

``scripts/`` is on ``sys.path`` when a script runs (and the scripts' tests put
it there), so a study does ``from study_output import write_study``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable


def write_study(results: dict, out: str, table: str, plot: Callable[[dict, str], None] | None, plot_name: str) -> dict:
    """Write ``out/results.json``, ``out/summary.md`` (``table``) and, unless ``plot`` is None, ``out/plot_name``.

    Prints the table and the wall time (``results["wall_time"]``) and returns ``results``.
    """
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"wall time {results['wall_time']:.1f} s")
    if plot is not None:
        plot(results, os.path.join(out, plot_name))
    return results
