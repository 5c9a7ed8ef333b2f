"""Run the ``[variants.NAME]`` of one config side by side: table and plot."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import tomli_w

from jaxopt_lab.experiment import config as config_lib
from jaxopt_lab.experiment.build import validate
from jaxopt_lab.experiment.plot import plot_runs
from jaxopt_lab.experiment.trainer import (
    DIVERGED_FILE,
    SUMMARY_FILE,
    RunResult,
    check_fresh_run_dir,
    has_checkpoints,
    resume,
    run,
    run_dir_of,
)

COLUMNS = (("eval_loss", "final eval loss", "{:.4f}"), ("eval_accuracy", "eval acc", "{:.4f}"),
           ("bytes_communicated", "payload bytes/worker", "{:.3e}"), ("wire_bytes", "wire bytes/worker", "{:.3e}"), ("opt_state_bytes", "opt state bytes", "{:.3e}"),
           ("steps_per_sec", "steps/s", "{:.2f}"), ("time_to_first_step", "first step s", "{:.1f}"),
           ("wall_time", "wall-clock s", "{:.0f}"))
# Columns relative to the first variant: (key, header, whether the ratio is of the inverse)
RELATIVE = (("opt_state_bytes", "opt state × {}", False), ("steps_per_sec", "step time × {}", True))


MANIFEST = "variants.toml"  # in the variants' common folder: their names, in order, and configs


def select_variants(configs: dict[str, config_lib.ExperimentConfig], only: Iterable[str] | None, path: str
                    ) -> dict[str, config_lib.ExperimentConfig]:
    """The variants ``only`` names (``run --only a,b``), in the config's order; all when None. A name
    that is not a variant is a ConfigError naming it and the valid ones."""
    if only is None:
        return configs
    names = [n.strip() for item in only for n in item.split(",") if n.strip()]
    if set(configs) == {""}:
        raise config_lib.ConfigError(f"--only selects variants, and {path} has no [variants.NAME] tables")
    if not names:
        raise config_lib.ConfigError(f"--only needs variant names; {path} has {', '.join(configs)}")
    for n in names:
        if n not in configs:
            raise config_lib.ConfigError(f"--only {n!r}: {path} has no variant {n!r}{config_lib._suggest(n, configs)}")
    return {n: c for n, c in configs.items() if n in names}


def run_variants(path: str, overrides: Iterable[str] = (), only: Iterable[str] | None = None
                 ) -> tuple[dict[str, RunResult], str]:
    """Run every variant of ``path`` (validating all of them first); return results and the plot path.

    ``only``: run just these variants (names, or comma-separated names). The variants' folder
    (``run.out_dir/run.name``) gets ``variants.toml``, the configs of the variants run there so
    far (this call's added to an earlier ``--only`` call's), before the first one starts, so
    ``jaxopt-lab resume`` on that folder can finish a run killed part-way
    (:func:`resume_variants`); the comparison covers every finished variant it lists.
    """
    every = config_lib.load_variants(path, overrides)
    configs = select_variants(every, only, path)
    base = os.path.dirname(run_dir_of(next(iter(configs.values()))))
    for name, cfg in configs.items():  # every variant's folder can be written and holds no run yet
        check_fresh_run_dir(run_dir_of(cfg), resume_hint=base)
    for name, cfg in configs.items():  # every variant's data/model/method is checked before any training
        try:
            validate(cfg)  # shapes only: each variant's model is built once, by its run
        except config_lib.ConfigError as e:
            raise config_lib.with_prefix(e, f"variant {name!r}: ") from None
    earlier = _manifest(base) if is_variants_dir(base) else {}
    listed = {**earlier, **configs}  # in the config's order, then any earlier ones it no longer has
    listed = {**{n: listed[n] for n in every if n in listed}, **listed}
    os.makedirs(base, exist_ok=True)
    _write_manifest(base, listed)
    results = {name: run(cfg) for name, cfg in configs.items()}
    shown = {}  # every finished variant of the folder, those of an earlier --only included
    for name, cfg in listed.items():
        done = results.get(name) or _finished(os.path.join(base, name), cfg.train.steps)
        if done is not None:
            shown[name] = done
    return results, write_comparison(base, shown)


def _write_manifest(base: str, configs: dict[str, config_lib.ExperimentConfig]) -> None:
    from jaxopt_lab.experiment.launch import is_primary

    if not is_primary():  # process 0 writes a multi-process run's files
        return
    with open(os.path.join(base, MANIFEST), "w") as f:
        f.write(tomli_w.dumps({"variants": list(configs), "config": {n: c.to_dict() for n, c in configs.items()}}))


def is_variants_dir(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, MANIFEST))


def _finished(run_dir: str, steps: int) -> RunResult | None:
    summary = os.path.join(run_dir, SUMMARY_FILE)
    if not os.path.isfile(summary) or os.path.exists(os.path.join(run_dir, DIVERGED_FILE)):
        return None
    with open(summary) as f:
        final = json.load(f)
    return RunResult(run_dir, final) if final.get("step") == steps else None


def _manifest(base: str) -> dict[str, config_lib.ExperimentConfig]:
    raw = config_lib.read_toml(os.path.join(base, MANIFEST))
    return {name: config_lib.from_dict(raw["config"][name]) for name in raw["variants"]}


def resume_variants(base: str, overrides: Iterable[str] = ()) -> tuple[dict[str, RunResult], str]:
    """Finish a variants run: skip the finished variants, resume the interrupted ones from their
    last checkpoint, run the ones never started; then rewrite ``compare.md`` and ``compare.png``.

    ``overrides`` are those ``jaxopt-lab resume`` allows (logging, checkpoint, ``train.steps``
    and the evaluation keys, the method's hyperparameters), applied to every unfinished variant;
    ``train.steps=N`` extends the finished ones too.
    """
    overrides = list(overrides)
    configs = _manifest(base)
    results: dict[str, RunResult] = {}
    targets, listed, skipped = {}, {}, []
    for name, cfg in configs.items():  # every variant's changes are checked before any runs
        after = config_lib.apply_overrides(cfg.to_dict(), overrides)
        refused = [k for k in config_lib.differing_keys(cfg.to_dict(), after, ignore=config_lib.RESUME_MAY_DIFFER)
                   if not config_lib.may_change_on_resume(k)]
        if refused:
            raise config_lib.ConfigError(
                f"cannot resume {base} with {', '.join(refused)} changed: a resume may change only "
                f"{', '.join(config_lib.RESUME_EXTEND_KEYS)}, the method's hyperparameters, logging.* and checkpoint.*")
        try:
            targets[name] = config_lib.from_dict(after)
        except config_lib.ConfigError as e:
            raise config_lib.with_prefix(e, f"variant {name!r}: ") from None
    for name, cfg in configs.items():
        run_dir = os.path.join(base, name)
        done = _finished(run_dir, targets[name].train.steps)
        if done is not None:
            print(f"{name}: finished, skipped")
            results[name], listed[name] = done, cfg
            skipped.append(name)
            continue
        listed[name] = targets[name]
        if has_checkpoints(run_dir) or os.path.exists(os.path.join(run_dir, DIVERGED_FILE)):
            print(f"{name}: resuming")
            results[name] = resume(run_dir, overrides)
        else:
            print(f"{name}: not started, running")
            results[name] = run(cfg, overrides, run_dir=run_dir)
    if overrides:  # what each variant now runs with
        _write_manifest(base, listed)
    if len(skipped) == len(configs):
        print(f"{base}: every variant already finished; nothing to resume (`--set train.steps=N` extends them)")
    return results, write_comparison(base, results)


def refresh_comparison(base: str) -> str | None:
    """Rewrite the comparison of a variants folder if every variant is finished (after one of them
    was resumed on its own, perhaps extended by ``--set train.steps``: each variant's own
    ``config.toml`` says how far it goes); None, and nothing written, while some are not."""
    configs = _manifest(base)
    results = {}
    for n, c in configs.items():
        own = os.path.join(base, n, "config.toml")
        steps = config_lib.read_toml(own).get("train", {}).get("steps", c.train.steps) if os.path.isfile(own) \
            else c.train.steps
        results[n] = _finished(os.path.join(base, n), steps)
    if any(r is None for r in results.values()):
        return None
    return write_comparison(base, results)


def write_comparison(base: str, results: dict[str, RunResult]) -> str:
    """``compare.png`` and ``compare.md`` of the variants in ``base``; returns the plot's path."""
    from jaxopt_lab.experiment.launch import is_primary

    if not is_primary():  # process 0 writes a multi-process run's files
        return os.path.join(base, "compare.png")
    out = plot_runs([r.run_dir for r in results.values()], os.path.join(base, "compare.png"), labels=list(results))
    with open(os.path.join(base, "compare.md"), "w") as f:
        f.write(format_table(results) + "\n")
    return out


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
