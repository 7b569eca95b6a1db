"""Test set-up before JAX starts: 4 fake CPU devices, so sharding tests run anywhere, and fast XLA:CPU compiles.

The suite is compile-bound: it builds several hundred small XLA programs and runs most of them a few
times. `--xla_backend_optimization_level=0` skips LLVM's optimisation of the generated CPU code, which
cut the whole suite from 804 s to 519 s on a 2-core AMD EPYC (the CLI smoke run from 87 s to 70 s);
every test passes at both levels. Users' runs keep XLA's default level. Set XLA_FLAGS yourself to
override both flags (subprocess tests inherit the environment).
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# the CLI's persistent compilation cache (on by default for users) stays off: every test run compiles cold,
# as CI on a fresh machine does, and nothing is written under the home directory
os.environ.setdefault("DISTILL_JAX_COMPILATION_CACHE", "off")
