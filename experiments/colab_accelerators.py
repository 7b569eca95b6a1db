"""Runs a distill_jax experiment on every TPU/GPU core of a Colab (or any) machine; CPU works unchanged.

On Colab (Runtime > Change runtime type > TPU or GPU), in a cell:

    !git clone <your copy of this repository> distill_jax      # or upload the folder / a zip of it
    %cd distill_jax
    !pip install -q .                 # the package and its dependencies (jax[tpu] / jax[cuda12] as Colab has it)
    !python experiments/colab_accelerators.py --dataset tfds:mnist --workdir /content/runs/mnist

(`pip install git+https://...` works too when the repository is reachable from the notebook.)
The script needs no flags for the devices: JAX sees every core of the runtime (8 on a TPU v2-8/v3-8,
1 on a T4 GPU), builds a mesh with a `data` axis over all of them, and every train and eval batch is
split over that axis while parameters and optimizer state are replicated. Batch sizes are rounded up
to a multiple of the device count (the global batch must divide evenly). On a preempted runtime, run
the same command with `--resume` to continue from the last checkpoint in --workdir.

It prints the devices, the command it runs, the per-model accuracies, and where the report went:

    backend tpu: 8 devices (TPU v2 x 8), 1 process
    distill-jax run --dataset tfds:mnist --workdir /content/runs/mnist --set teacher.batch_size=64 ...
    teacher seed_cnn: test accuracy ...
    ...
    wrote /content/runs/mnist/metrics.json and /content/runs/mnist/report.html

Without an accelerator, `--cpu-devices 4` fakes four CPU devices (before JAX starts), so the same
sharded code path runs on a laptop. Checked on the project's 2-core CPU machine, which cannot
download tfds MNIST, with the bundled digits and the smoke budget:

    python experiments/colab_accelerators.py --cpu-devices 4 --dataset digits --smoke --workdir /tmp/colab_cpu

`--smoke` keeps every stage but trains for one epoch; `--set KEY=VALUE` passes overrides through.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys

from distill_jax.app import cli

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="tfds:mnist", help="any distill-jax dataset spec (default tfds:mnist)")
    p.add_argument("--workdir", default="runs/colab")
    p.add_argument("--data_dir", help="tfds data directory (default: tfds's own)")
    p.add_argument("--smoke", action="store_true", help="one epoch per model, small explanation budget")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --workdir")
    p.add_argument("--batch_size", type=int, default=64, help="global batch; rounded up to a multiple of the devices")
    p.add_argument("--checkpoint_every", type=int, default=200, help="steps between checkpoints")
    p.add_argument("--cpu-devices", type=int, default=0, help="fake this many CPU devices (no accelerator)")
    p.add_argument("--install", action="store_true", help="first `pip install` the checkout this script is in")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    return p.parse_args(argv)


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n."""
    return max(multiple, math.ceil(n / multiple) * multiple)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.install:
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", ROOT])
    if args.cpu_devices:  # must happen before JAX starts
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.cpu_devices}").strip()
    if ROOT not in sys.path:  # run from a checkout even when the package is not installed
        sys.path.insert(0, ROOT)
    from distill_jax import parallel

    parallel.initialize_distributed()  # TPU pods / SLURM / JAX_* variables; a no-op on one machine
    import jax  # noqa: PLC0415

    n = jax.device_count()
    kinds = sorted({d.device_kind for d in jax.devices()})
    print(f"backend {jax.default_backend()}: {n} devices ({', '.join(kinds)} x {n}), "
          f"{jax.process_count()} process{'es' if jax.process_count() > 1 else ''}", flush=True)
    bs = round_up(args.batch_size, n)
    command = ["run", "--dataset", args.dataset, "--workdir", args.workdir, "--no-progress",
               "--set", f"teacher.batch_size={bs}", "--set", f"student.batch_size={bs}",
               "--set", f"eval_batch_size={round_up(256, n)}", "--set", f"checkpoint_every={args.checkpoint_every}"]
    if args.data_dir:
        command += ["--set", f"data_dir={args.data_dir}"]
    if args.smoke:
        command.append("--smoke")
    if args.resume:
        command.append("--resume")
    for assignment in args.set:
        command += ["--set", assignment]
    print("distill-jax " + " ".join(command), flush=True)
    return cli.main(command)


if __name__ == "__main__":
    sys.exit(main())
