"""Shared helpers of the paper-reproduction scripts: the paper-vs-ours table, hardware, variants, the CLI.

Every script builds a list of `Row`s (one published number each, next to ours) and calls
`write_table`, which prints the table as markdown and writes `results.md` and `results.json`
into the work directory. Nothing here trains anything.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import shlex
import sys
from typing import Mapping, Sequence

from distill_jax.app import _metadata

VARIANTS = ("full", "local", "smoke")


@dataclasses.dataclass(frozen=True)
class Row:
    """One published result and ours.

    paper/ours are display strings (e.g. "67 errors / 10000 (0.67%)"); paper_value/ours_value the
    comparable number (same unit, e.g. test error in %) so the difference can be computed.
    """

    result: str
    paper: str
    ours: str
    setting: str
    wall_s: float
    paper_value: float | None = None
    ours_value: float | None = None
    unit: str = ""

    @property
    def difference(self) -> float | None:
        """ours_value - paper_value (None when either is missing)."""
        if self.paper_value is None or self.ours_value is None:
            return None
        return self.ours_value - self.paper_value


def hardware() -> str:
    """One line: the accelerator (or CPU model and core count) JAX runs on."""
    import jax  # noqa: PLC0415


    devices = jax.devices()
    if devices[0].platform == "cpu":
        return f"{_metadata.cpu_model()}, {os.cpu_count()} cores (jax cpu, {len(devices)} device(s))"
    return f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform})"


def errors_text(errors: int, n: int) -> str:
    """`"67 / 10000 (0.67%)"`: an error count with its denominator and rate."""
    return f"{errors} / {n} ({100.0 * errors / n:.2f}%)"


def command_line() -> str:
    """`python <script> <arguments>`: how this process was started, shell-quoted, the script relative to the cwd."""
    args = [os.path.relpath(sys.argv[0]) if sys.argv[0] else "python", *sys.argv[1:]]
    return "python " + " ".join(shlex.quote(a) for a in args)


def header(title: str, *, variant: str, hw: str, wall_s: float, command: str, details: Sequence[str] = ()) -> list[str]:
    """The markdown lines above a script's tables: the title with the variant, then the command, hardware, total
    wall time and any `details` as a bullet list, then a blank line."""
    return [f"### {title} ({variant}{' - SCALED DOWN' if variant != 'full' else ''})", "",
            f"- command: `{command}`", f"- hardware: {hw}", f"- total wall time: {wall_s:.1f} s",
            *(f"- {d}" for d in details), ""]


def markdown(title: str, rows: Sequence[Row], *, variant: str, hw: str, wall_s: float, command: str) -> str:
    """The table as markdown, under the `header` naming the variant, hardware, total wall time and command."""
    lines = [*header(title, variant=variant, hw=hw, wall_s=wall_s, command=command),
             "| result | paper | ours | ours - paper | setting | wall time |", "|---|---|---|---|---|---|"]
    for r in rows:
        diff = r.difference
        diff_text = "" if diff is None else f"{diff:+.2f}{r.unit}"
        lines.append(f"| {r.result} | {r.paper} | {r.ours} | {diff_text} | {r.setting} | {r.wall_s:.1f} s |")
    return "\n".join(lines) + "\n"


def write_table(workdir: str, title: str, rows: Sequence[Row], *, variant: str, wall_s: float,
                extra: dict | None = None, echo=print) -> dict:
    """Prints the table and writes `results.md` and `results.json` into `workdir`; returns the JSON dict."""
    os.makedirs(workdir, exist_ok=True)
    hw, command = hardware(), command_line()
    text = markdown(title, rows, variant=variant, hw=hw, wall_s=wall_s, command=command)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(text)
    out = {"title": title, "variant": variant, "hardware": hw, "wall_s": round(wall_s, 2),
           "date": datetime.date.today().isoformat(), "command": command,
           "rows": [{**dataclasses.asdict(r), "difference": r.difference} for r in rows], **(extra or {})}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(out, f, indent=2)
    echo(text)
    return out


def load_config(script_file: str, variant: str):
    """`get_config(variant)` from `experiments/configs/<script name>.py` (next to the script)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not known; use one of {VARIANTS}")
    name = os.path.splitext(os.path.basename(script_file))[0]
    path = os.path.join(os.path.dirname(os.path.abspath(script_file)), "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"experiments_configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def parse_args(argv: Sequence[str] | None, description: str, default_workdir: str, *,
               extra: Mapping[str, Mapping] | None = None) -> argparse.Namespace:
    """`--local | --smoke` (default: the paper's full setting), `--workdir`, `--data_dir`, `--seed`.

    `extra`: a script's own options, config key -> `add_argument` keywords (e.g. {"parts": {"help": ...}});
    each becomes `--<key>`, default None (see `main`).
    """
    p = argparse.ArgumentParser(description=description)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--local", action="store_true", help="scaled-down variant (see the script's docstring)")
    g.add_argument("--smoke", action="store_true", help="seconds-long variant for CI")
    p.add_argument("--workdir", default=default_workdir, help="where results.md and results.json go")
    p.add_argument("--data_dir", default=None, help="data directory (tfds data for the full variant)")
    p.add_argument("--seed", type=int, default=None, help="override the config's seed")
    for key, kwargs in (extra or {}).items():
        p.add_argument(f"--{key}", default=None, **kwargs)
    args = p.parse_args(argv)
    args.variant = "smoke" if args.smoke else "local" if args.local else "full"
    return args


def main(argv: Sequence[str] | None, script_file: str, description: str, default_workdir: str, run, *,
         extra: Mapping[str, Mapping] | None = None) -> dict:
    """A paper script's command line: parses the flags, loads its config and calls `run(config, variant, workdir)`.

    `extra` (see `parse_args`): an option given on the command line overrides the config key of its name.
    """
    args = parse_args(argv, description, default_workdir, extra=extra)
    c = load_config(script_file, args.variant)
    if args.data_dir:
        c.data_dir = args.data_dir
    if args.seed is not None:
        c.seed = args.seed
    for key in extra or {}:
        if getattr(args, key) is not None:
            c[key] = getattr(args, key)
    return run(c, args.variant, args.workdir)
