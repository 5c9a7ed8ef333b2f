"""The ``jaxopt-lab`` command: run, resume, sweep and plot experiments."""

from __future__ import annotations

import argparse
import sys

from jaxopt_lab.experiment.config import RESUME_EXTEND_KEYS, ConfigError, unset, unset_hint
from jaxopt_lab.experiment.launch import LaunchError
from jaxopt_lab.experiment.launch import add_flags as add_launch_flags


class _Version(argparse.Action):
    """``--version``: this package's version and those of the libraries its numbers depend on
    (imported only when asked: ``jaxopt-lab --help`` stays fast)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib import metadata

        import jaxopt_lab

        def version(dist: str) -> str:
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                return "not installed"

        print(f"jaxopt-lab {jaxopt_lab.__version__} (jax {version('jax')}, jaxlib {version('jaxlib')}, "
              f"optax {version('optax')}, flax {version('flax')})")
        parser.exit()


def _edit_flags(parser: argparse.ArgumentParser, set_help: str) -> None:
    """``--set KEY=VALUE`` and ``--unset KEY``, kept in one list in the order given."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    parser.add_argument("--unset", dest="overrides", action="append", type=unset, metavar="KEY",
                        help="remove a key from the config (repeatable), e.g. the method's arguments the "
                             "new one does not take after --set method.name=...")


_NO_CACHE_HELP = ("do not use JAX's persistent compilation cache (by default on, in $JAXOPT_LAB_CACHE_DIR or "
                  "~/.cache/jaxopt_lab/xla, or where JAX_COMPILATION_CACHE_DIR says)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxopt-lab", description=__doc__)
    p.add_argument("--version", action=_Version, help="print the versions of jaxopt-lab, jax, optax, flax and exit")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run an experiment config into RUN.out_dir/RUN.name")
    r.add_argument("config", help="a TOML file (see experiments/)")
    _edit_flags(r, "override a config key, e.g. --set method.learning_rate=1e-3 (repeatable)")
    r.add_argument("--run-dir", default=None, help="write here instead of run.out_dir/run.name")
    r.add_argument("--only", action="append", default=None, metavar="NAME[,NAME]",
                   help="run only these [variants.NAME] (or a federated config's [methods.NAME]); a later "
                        "--only run of the others joins the same comparison")
    r.add_argument("--no-compile-cache", action="store_true", help=_NO_CACHE_HELP)
    add_launch_flags(r)

    s = sub.add_parser("resume", help="continue a run from its last checkpoint, or extend a finished one")
    s.add_argument("run_dir")
    _edit_flags(s, f"{', '.join(RESUME_EXTEND_KEYS)} (train.steps=N extends a finished run), logging.*, "
                   "checkpoint.* and, to recover a run, the method's hyperparameters (method.learning_rate, ...); "
                   "recorded in config_history.jsonl")
    s.add_argument("--no-compile-cache", action="store_true", help=_NO_CACHE_HELP)
    add_launch_flags(s)

    w = sub.add_parser("sweep", help="run every point of a grid")
    w.add_argument("config")
    w.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2",
                   help="a grid axis (repeatable; the grid is their Cartesian product)")
    _edit_flags(w, "override a config key for every point (repeatable)")
    w.add_argument("--no-compile-cache", action="store_true", help=_NO_CACHE_HELP)

    pl = sub.add_parser("plot", help="plot runs side by side and print their final metrics")
    pl.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                    help="a run directory, or a folder of runs (a config's variants, a sweep) for all of them")
    pl.add_argument("-o", "--out", required=True, help="output PNG path")
    pl.add_argument("--labels", default=None, metavar="NAME,NAME,...",
                    help="names of the runs, in order (default: folder names, parent folders added where they repeat)")
    p.subcommands = sub.choices  # name -> its parser, for errors in its own usage
    return p


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; an unknown flag is reported with the usage of the subcommand it was given to
    (argparse reports it with the top-level usage, which lists no flag of a subcommand)."""
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parser.parse_known_args(argv)
    if extra:
        before_command = argv.index(extra[0]) < argv.index(args.command) if extra[0] in argv else False
        (parser if before_command else parser.subcommands[args.command]).error(
            f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.command in ("run", "resume"):  # one of several processes: before anything uses a JAX backend
        from jaxopt_lab.experiment import launch

        try:
            launch.from_args(args)
        except LaunchError as e:
            print(f"jaxopt-lab {args.command}: error: {e}", file=sys.stderr)
            return 2
    if args.command in ("run", "resume", "sweep"):
        from jaxopt_lab.experiment.compilation import configure_cache

        configure_cache(enabled=not args.no_compile_cache)
    from jaxopt_lab.experiment import trainer

    try:
        if args.command == "run":
            from jaxopt_lab.experiment import federated_run
            from jaxopt_lab.experiment.config import load_variants, read_toml

            if federated_run.is_federated(read_toml(args.config)):  # a [federated] simulation config
                _one_process("a [federated] simulation")
                table, _ = federated_run.run(args.config, args.overrides, run_dir=args.run_dir, only=args.only)
                print(table)
            elif set(load_variants(args.config)) != {""}:  # a config with [variants.NAME]: run them all
                from jaxopt_lab.experiment.compare import format_table, run_variants

                if args.run_dir:
                    raise ConfigError("--run-dir does not apply to a config with variants (each gets run.name/NAME)")
                results, plot = run_variants(args.config, args.overrides, only=args.only)
                print(format_table(results))
                print(f"plot: {plot}")
            elif args.only is not None:
                raise ConfigError(f"--only selects variants, and {args.config} has no [variants.NAME] tables")
            else:
                _report(trainer.run(args.config, args.overrides, run_dir=args.run_dir))
        elif args.command == "resume":
            import os

            from jaxopt_lab.experiment import compare

            from jaxopt_lab.experiment import federated_run
            from jaxopt_lab.experiment.config import read_toml

            config_path = os.path.join(args.run_dir, trainer.CONFIG_FILE)
            if os.path.isfile(config_path) and federated_run.is_federated(read_toml(config_path)):
                _one_process("a [federated] simulation")
                table, _ = federated_run.resume(args.run_dir, args.overrides)
                print(table)
            elif compare.is_variants_dir(args.run_dir):  # the folder of a config with variants: finish them all
                results, plot = compare.resume_variants(args.run_dir, args.overrides)
                print(compare.format_table(results))
                print(f"plot: {plot}")
            else:
                result = trainer.resume(args.run_dir, args.overrides)
                _report(result)
                if result.note:
                    return 0
                parent = os.path.dirname(os.path.normpath(args.run_dir))
                if compare.is_variants_dir(parent):  # one variant of several: the comparison, once all are done
                    plot = compare.refresh_comparison(parent)
                    print(f"plot: {plot}" if plot else
                          f"{parent}: other variants are unfinished; `jaxopt-lab resume {parent}` finishes them "
                          "and rewrites the comparison")
        elif args.command == "sweep":
            import os

            from jaxopt_lab.experiment.sweep import format_table, summary_dir, sweep

            results = sweep(args.config, args.grid, args.overrides)
            print(format_table(results))
            print(f"plot: {os.path.join(summary_dir(results), 'compare.png')}")
        elif args.command == "plot":
            from jaxopt_lab.experiment.compare import format_table
            from jaxopt_lab.experiment.metrics import read_metrics
            from jaxopt_lab.experiment.plot import plot_runs, resolve_runs

            run_dirs, labels, notes = resolve_runs(args.run_dirs, args.labels)
            for note in notes:
                print(f"jaxopt-lab plot: {note}", file=sys.stderr)
            print(plot_runs(run_dirs, args.out, labels=labels))
            print(format_table({label: trainer.RunResult(d, read_metrics(d)[-1]) for d, label in zip(run_dirs, labels)}))
    except (ConfigError, trainer.NonFiniteLossError, trainer.RunDirError, ValueError) as e:
        hint = unset_hint(e, args.overrides + getattr(args, "grid", [])) if isinstance(e, ConfigError) else ""
        print(f"jaxopt-lab {args.command}: error: {e}{hint}", file=sys.stderr)
        return 2 if isinstance(e, (ConfigError, trainer.RunDirError)) else 1
    except MemoryError as e:  # past the up-front estimate (a lower bound): say which keys size the arrays
        print(f"jaxopt-lab {args.command}: error: out of memory ({type(e).__name__}: {e}); the arrays of this "
              "config do not fit: lower train.batch_size, workers.count or the model size", file=sys.stderr)
        return 1
    return 0


def _one_process(what: str) -> None:
    """ConfigError if this is one of several processes: ``what`` runs in one."""
    import jax

    if jax.process_count() > 1:
        raise ConfigError(f"{what} runs in one process (its clients are simulated), not as one of "
                          f"{jax.process_count()}: drop the launch flags")


def _report(result) -> None:
    if result.note:  # nothing was run (a finished run resumed): say so, and where it stands
        print(result.note)
    final = result.final
    shown = ", ".join(f"{k} {final[k]:.4f}" for k in ("loss", "eval_loss", "eval_accuracy") if k in final)
    first = final.get("time_to_first_step")
    timing = f" (first step after {first:.1f} s)" if first is not None else ""
    print(f"{result.run_dir}: step {final.get('step')}: {shown}{timing}")


if __name__ == "__main__":
    sys.exit(main())
