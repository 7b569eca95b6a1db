"""The `distill-jax` command: parses options and a config file, then calls the library.

    distill-jax run [--config FILE] [--workdir DIR] [--dataset SPEC] [--seed N] [--smoke] [--resume]
                    [--set KEY=VALUE ...] [--coordinator HOST:PORT --num-processes N --process-id I]
    distill-jax explain [--workdir DIR]

A mistake the user can fix (bad spec, bad value, unwritable workdir, missing file) prints one
line on stderr and exits with status 2; Ctrl-C or SIGTERM saves a checkpoint and exits with 130.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(ValueError):
    """A problem with the command line or the config that the user must fix."""


def load_config(path: str | None):
    """The ConfigDict of a config file (`get_config()`), or the default config when `path` is None."""
    from distill_jax import config as config_lib

    if path is None:
        return config_lib.default_config()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location("_distill_jax_user_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UsageError(f"config file {path!r} has no get_config() function")
    return module.get_config()


def apply_override(c, assignment: str) -> None:
    """Sets `a.b.c=value` in a ConfigDict; the value is a Python literal or a bare string."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise UsageError(f"--set {assignment!r}: write KEY=VALUE, e.g. --set teacher.epochs=5")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
        if p not in node:
            raise UsageError(f"--set {assignment!r}: the config has no group {p!r}")
        node = node[p]
    if leaf not in node:
        raise UsageError(f"--set {assignment!r}: the config has no key {key!r}")
    try:
        node[leaf] = value
    except TypeError as exc:
        raise UsageError(f"--set {assignment!r}: {exc}") from None


def check_workdir(path: str) -> str:
    """Creates `path` if needed and checks it is writable; returns its absolute path."""
    path = os.path.abspath(path)
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test.{os.getpid()}")  # per process: multi-host runs share the workdir
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise UsageError(f"workdir {path!r} is not writable ({exc.strerror}); choose another with --workdir") from None
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train the teacher, distil the students, explain and evaluate them")
    run.add_argument("--config", help="a config file with get_config() (default: the built-in default config)")
    run.add_argument("--workdir", default="runs/default", help="where metrics, figures, report and checkpoints go")
    run.add_argument("--dataset", help="digits | mnist5k | tfds:NAME[:CONFIG] | folder:PATH[,TEST] | npz:PATH")
    run.add_argument("--seed", type=int, help="random seed for the split, initialisation and data order")
    run.add_argument("--smoke", action="store_true", help="tiny budgets: the whole pipeline in seconds")
    run.add_argument("--resume", action="store_true", help="continue from the latest checkpoints in --workdir")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    run.add_argument("--progress", action="store_true",
                     help="progress bars even when stderr is not a terminal (default: only on a terminal)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--compilation-cache", metavar="DIR",
                     help="persistent XLA compilation cache: repeated runs with the same shapes skip compilation")
    run.add_argument("--coordinator", help="HOST:PORT of process 0 for multi-host runs")
    run.add_argument("--num-processes", type=int)
    run.add_argument("--process-id", type=int)
    ex = sub.add_parser("explain", help="recompute explanations, figures and report of a finished run from its checkpoints")
    ex.add_argument("--workdir", default="runs/default", help="the workdir of a finished `distill-jax run`")
    return parser


def _configure(args):
    from distill_jax import config as config_lib

    c = load_config(args.config)
    if args.smoke:  # before --set, so an explicit --set wins over the smoke budget
        c = config_lib.apply_smoke(c)
    for assignment in args.set:
        apply_override(c, assignment)
    if args.dataset is not None:
        c.dataset = args.dataset
    if args.seed is not None:
        c.seed = args.seed
    c.resume = bool(args.resume)
    config_lib.validate(c)
    return c


def enable_compilation_cache(path: str) -> None:
    """Caches every compiled XLA program under `path` (must run before anything is compiled)."""
    import jax

    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def cmd_run(args) -> int:
    from distill_jax import parallel

    if args.compilation_cache:
        enable_compilation_cache(args.compilation_cache)
    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    c = _configure(args)
    workdir = check_workdir(args.workdir)
    from distill_jax import pipeline

    pipeline.run(c, workdir, show_progress=False if args.no_progress else (True if args.progress else None))
    print(f"wrote {os.path.join(workdir, 'metrics.json')} and {os.path.join(workdir, 'report.html')}")
    return 0


def cmd_explain(args) -> int:
    from distill_jax import pipeline

    workdir = check_workdir(args.workdir)
    pipeline.explain_from_checkpoints(workdir)
    print(f"rewrote {os.path.join(workdir, 'metrics.json')} and {os.path.join(workdir, 'report.html')}")
    return 0


COMMANDS = {"run": cmd_run, "explain": cmd_explain}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from distill_jax.train import Interrupted, NonFiniteError

    try:
        return COMMANDS[args.command](args)
    except Interrupted as exc:
        print(f"distill-jax: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("distill-jax: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, FileNotFoundError, NonFiniteError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"distill-jax: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
