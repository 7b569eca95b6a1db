"""The `distill-jax` command: parses options and a config file, then calls the library.

    distill-jax run [--config FILE] [--workdir DIR] [--dataset SPEC] [--seed N] [--smoke] [--resume]
                    [--set KEY=VALUE ...] [--coordinator HOST:PORT --num-processes N --process-id I]
    distill-jax explain [--workdir DIR]

Both end by printing the report's verdict: which readable student to trust and which explanation of it
(`distill_jax.verdict`).

Exit statuses: 0 done; 2 a problem with the input that the user can fix (one line on stderr,
``distill-jax: error: ...``, and nothing already saved is changed); 130 Ctrl-C or SIGTERM (a
checkpoint is saved first); 1 a bug in distill_jax (the traceback, then one line saying so, with
the version and where to report it).

What counts as the user's problem, decided here at the boundary rather than in every module:

- `UsageError` (this module: command line, config files, workdirs), and the library's errors for bad
  input: a ValueError raised by distill_jax's own code (its validation of data, config values and
  checkpoints; ValueError is the library's documented error type for bad input), NonFiniteError
  (training diverged), and OSError (a missing, unreadable or unwritable file, a full disk).
- Failures of third-party code on the user's files, at the places where they are read: a config
  file that does not run (SyntaxError, an exception in `get_config`) becomes a UsageError naming the
  file; the loaders turn a truncated or corrupt dataset file into a ValueError naming it.

Everything else is a bug, and so is a ValueError raised inside JAX, NumPy or another library
that distill_jax did not turn into a message of its own: hiding it behind one line would hide
the bug, so its traceback is kept.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import platform
import sys
import traceback

__all__ = [
    "UsageError",
    "load_config",
    "apply_override",
    "check_workdir",
    "check_no_earlier_run",
    "build_parser",
    "check_multihost_args",
    "default_compilation_cache_dir",
    "setup_compilation_cache",
    "enable_compilation_cache",
    "cmd_run",
    "print_verdict",
    "check_finished_run",
    "cmd_explain",
    "is_user_error",
    "main",
]


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


EXIT_BUG = 1


EXIT_USAGE = 2


EXIT_INTERRUPTED = 130


REPORT_BUGS_TO = "the issue tracker of the distill_jax repository"


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # distill_jax/


class UsageError(ValueError):
    """A problem with the command line, the config or the workdir that the user must fix."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as a one-line UsageError instead of usage text and exit."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def load_config(path: str | None):
    """The ConfigDict of a config file (`get_config()`), or the default config when `path` is None.

    Raises:
      FileNotFoundError: `path` does not exist.
      UsageError: `path` is not a Python file that runs and defines `get_config()` returning a ConfigDict.
    """
    import ml_collections

    from distill_jax.app import config as config_lib

    if path is None:
        return config_lib.default_config()
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    if not os.path.isfile(path):
        raise UsageError(f"config file {path!r} is a directory; pass a .py file that defines get_config()")
    spec = importlib.util.spec_from_file_location("_distill_jax_user_config", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise UsageError(f"config file {path!r} has a syntax error at line {exc.lineno}: {exc.msg}") from None
    except Exception as exc:  # the user's own code failed: say where, the traceback is theirs
        raise UsageError(f"config file {path!r} failed to run: {_one_line(exc)}{_line_in(exc, path)}") from None
    if not callable(getattr(module, "get_config", None)):
        raise UsageError(f"config file {path!r} has no get_config() function")
    try:
        c = module.get_config()
    except Exception as exc:
        raise UsageError(f"config file {path!r}: get_config() failed: {_one_line(exc)}{_line_in(exc, path)}") from None
    if not isinstance(c, ml_collections.ConfigDict):
        raise UsageError(f"config file {path!r}: get_config() returned {type(c).__name__}, not an "
                         f"ml_collections.ConfigDict (start from distill_jax.config.default_config())")
    return c


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
        if p not in node or not hasattr(node[p], "keys"):
            raise UsageError(f"--set {assignment!r}: the config has no group {p!r}")
        node = node[p]
    if leaf not in node:
        raise UsageError(f"--set {assignment!r}: the config has no key {key!r}")
    try:
        node[leaf] = value
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--set {assignment!r}: {_one_line(exc, with_type=False)}") from None


def check_workdir(path: str) -> str:
    """Creates `path` if needed and checks it is writable; returns its absolute path."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"workdir {path!r} is a file; choose a directory with --workdir")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test.{os.getpid()}")  # per process: multi-host runs share the workdir
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise UsageError(f"workdir {path!r} is not writable ({exc.strerror}); choose another with --workdir") from None
    return path


def check_no_earlier_run(workdir: str, resume: bool) -> None:
    """Refuses a fresh run in a workdir that holds another run's checkpoints (it would overwrite or mix them)."""
    if resume:
        return
    saved = os.path.join(workdir, "checkpoints")
    if any(files for _, _, files in os.walk(saved)):
        raise UsageError(f"workdir {workdir!r} already holds the checkpoints of an earlier run ({saved}); add --resume "
                         f"to continue it, or choose another --workdir (nothing was changed)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="distill-jax", description=__doc__.splitlines()[0])
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
    _cache_flags(run)
    run.add_argument("--coordinator", help="HOST:PORT of process 0 for multi-host runs")
    run.add_argument("--num-processes", type=int)
    run.add_argument("--process-id", type=int)
    ex = sub.add_parser("explain", help="recompute explanations, figures and report of a finished run from its checkpoints")
    ex.add_argument("--workdir", default="runs/default", help="the workdir of a finished `distill-jax run`")
    _cache_flags(ex)
    return parser


def _cache_flags(parser) -> None:
    parser.add_argument("--compilation-cache", metavar="DIR",
                        help="where the persistent XLA compilation cache lives (default: $DISTILL_JAX_CACHE_DIR, "
                             "else $XDG_CACHE_HOME/distill_jax/xla or ~/.cache/distill_jax/xla); a second run with "
                             "the same shapes loads its programs instead of compiling them")
    parser.add_argument("--no-compilation-cache", action="store_true",
                        help="compile everything afresh and write no cache (DISTILL_JAX_COMPILATION_CACHE=off turns "
                             "the default cache off too)")


def _configure(args):
    from distill_jax.app import config as config_lib

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


def check_multihost_args(args) -> None:
    """The multi-host flags must name a HOST:PORT and a process id in [0, num_processes)."""
    if args.num_processes is not None and args.num_processes < 1:
        raise UsageError(f"--num-processes {args.num_processes}: must be >= 1")
    if args.process_id is not None and args.num_processes is not None and not 0 <= args.process_id < args.num_processes:
        raise UsageError(f"--process-id {args.process_id}: must be in [0, --num-processes={args.num_processes})")
    if args.coordinator is not None:
        host, sep, port = args.coordinator.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise UsageError(f"--coordinator {args.coordinator!r}: write HOST:PORT, e.g. 10.0.0.1:1234")


def default_compilation_cache_dir() -> str:
    """$DISTILL_JAX_CACHE_DIR, else $XDG_CACHE_HOME/distill_jax/xla, else ~/.cache/distill_jax/xla."""
    if os.environ.get("DISTILL_JAX_CACHE_DIR"):
        return os.environ["DISTILL_JAX_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "distill_jax", "xla")


def setup_compilation_cache(args) -> str | None:
    """Turns the persistent compilation cache on (the default) and returns its directory, or None when off.

    An explicit `--compilation-cache DIR` that cannot be created is the user's error; the default
    directory failing (a read-only home, say) only turns the cache off, with a warning.
    """
    if args.no_compilation_cache:
        return None
    if args.compilation_cache:
        enable_compilation_cache(args.compilation_cache)
        return args.compilation_cache
    if os.environ.get("DISTILL_JAX_COMPILATION_CACHE", "").lower() in ("0", "off", "no"):
        return None
    path = default_compilation_cache_dir()
    try:
        enable_compilation_cache(path)
    except UsageError as exc:
        print(f"distill-jax: warning: no compilation cache ({exc})", file=sys.stderr)
        return None
    return path


def enable_compilation_cache(path: str) -> None:
    """Caches every compiled XLA program under `path` (must run before anything is compiled)."""
    import jax

    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--compilation-cache {path!r} cannot be created ({exc.strerror})") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"--compilation-cache {path!r} is not writable")
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def cmd_run(args) -> int:
    from distill_jax import parallel

    check_multihost_args(args)
    setup_compilation_cache(args)
    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    c = _configure(args)
    workdir = check_workdir(args.workdir)
    check_no_earlier_run(workdir, c.resume)
    from distill_jax.app import job

    result = job.run(c, workdir, show_progress=False if args.no_progress else (True if args.progress else None))
    print(f"wrote {os.path.join(workdir, 'metrics.json')} and {os.path.join(workdir, 'report.html')}")
    if parallel.is_main_process():
        print_verdict(result)
    return 0


def print_verdict(result: dict) -> None:
    """Prints the report's verdict (which readable student to trust, which explanation of it) after a blank line."""
    from distill_jax.audit import verdict  # noqa: PLC0415 - the CLI imports the library lazily

    print(f"\n{verdict.as_text(verdict.of(result))}")


def check_finished_run(workdir: str) -> str:
    """The absolute path of a workdir holding a finished run (a readable metrics.json with its config)."""
    workdir = os.path.abspath(workdir)
    run_first = f"run `distill-jax run --workdir {workdir}` first"
    if not os.path.isdir(workdir):
        raise UsageError(f"workdir {workdir!r} does not exist: there is no run to explain; {run_first}")
    path = os.path.join(workdir, "metrics.json")
    if not os.path.isfile(path):
        raise UsageError(f"no finished run in {workdir!r} ({path} is missing; it is written when a run ends); "
                         f"{run_first}")
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path} cannot be read ({_one_line(exc)}); it is rewritten when a run ends") from None
    if not isinstance(result, dict) or not isinstance(result.get("config"), dict):
        raise UsageError(f"{path} holds no run configuration ('config'); it is rewritten when a run ends")
    return workdir


def cmd_explain(args) -> int:
    from distill_jax.app import job

    workdir = check_workdir(check_finished_run(args.workdir))
    setup_compilation_cache(args)
    result = job.explain_from_checkpoints(workdir)
    print(f"rewrote {os.path.join(workdir, 'metrics.json')} and {os.path.join(workdir, 'report.html')}")
    print_verdict(result)
    return 0


COMMANDS = {"run": cmd_run, "explain": cmd_explain}


def is_user_error(exc: BaseException) -> bool:
    """Whether `exc` reports input the user can fix (see the module docstring), rather than a bug."""
    from distill_jax.train import NonFiniteError

    if isinstance(exc, (UsageError, NonFiniteError, OSError)):
        return True
    return isinstance(exc, ValueError) and _raised_by_distill_jax(exc)


def main(argv: list[str] | None = None) -> int:
    from distill_jax.train import Interrupted

    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except Interrupted as exc:
        print(f"distill-jax: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("distill-jax: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if is_user_error(exc):
            print(f"distill-jax: error: {_one_line(exc, with_type=False)}", file=sys.stderr)
            return EXIT_USAGE
        traceback.print_exception(exc, file=sys.stderr)
        print(f"distill-jax: internal error ({type(exc).__name__}): this is a bug in distill_jax {_versions()}, not "
              f"a problem with your input; please report it with the traceback above and the command you ran to "
              f"{REPORT_BUGS_TO}", file=sys.stderr)
        return EXIT_BUG


def _one_line(exc: BaseException, *, with_type: bool = True) -> str:
    message = " ".join(str(exc).split())
    if not with_type:
        return message or type(exc).__name__
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _frames(exc: BaseException) -> list[traceback.FrameSummary]:
    return traceback.extract_tb(exc.__traceback__) if exc.__traceback__ is not None else []


def _raised_by_distill_jax(exc: BaseException) -> bool:
    """Whether the innermost frame of `exc`'s traceback (where it was raised) is distill_jax's own code."""
    frames = _frames(exc)
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(_PACKAGE_DIR + os.sep)




def _line_in(exc: BaseException, path: str) -> str:
    """` (line N)`: the deepest line of the user's file `path` in `exc`'s traceback, or ''."""
    target = os.path.abspath(path)
    lines = [f.lineno for f in _frames(exc) if os.path.abspath(f.filename) == target]
    return f" (line {lines[-1]})" if lines else ""


def _versions() -> str:
    import distill_jax

    try:
        import jax

        jax_version = jax.__version__
    except ImportError:
        jax_version = "not importable"
    return f"{distill_jax.__version__} (python {platform.python_version()}, jax {jax_version})"


if __name__ == "__main__":
    sys.exit(main())
