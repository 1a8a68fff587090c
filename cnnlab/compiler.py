"""XLA compile options for cnnlab's jitted programs (`jax.jit(..., compiler_options=...)`).

On the CPU, cnnlab compiles its steps with XLA's elemental IR emitters instead of its newer
MLIR fusion emitters (`xla_cpu_use_fusion_emitters=False`). The programs compute the same values
(LeNet-5's training bit for bit; with BatchNorm a reduction differs in float32 rounding) and run
at least as fast, but they compile in about half the time and with far less memory, and the
compiler's memory sets a CPU training process's peak (figures: docs/performance.md, "Compiling
on the CPU").

An XLA_FLAGS entry that names the option wins: `XLA_FLAGS=--xla_cpu_use_fusion_emitters=true`
restores XLA's default. On GPUs and TPUs, and with an XLA that does not know the option, the
options are empty.
"""

import functools
import os
from collections.abc import Callable

import jax
from jax.sharding import Mesh

CPU_OPTIONS = {"xla_cpu_use_fusion_emitters": False}
# Programs that run once (the initialization) compile without LLVM's optimizations, in a fraction
# of the time: each truncated-normal initializer is costly to optimize, and the initialization was
# most of LeNet-5's start-up (docs/performance.md). The initial values differ in the last bit of a
# few percent of the weights (the inverse error function's polynomial is evaluated in another
# order).
ONCE_OPTIONS = {"xla_backend_optimization_level": 0}


def jit(fun: Callable, mesh: Mesh, **kwargs) -> tuple[Callable, Callable]:
    """`jax.jit(fun, **kwargs)` with `compiler_options(mesh)`, and the same jit without them:
    JAX takes compile options on a top-level jit only, so the second is the one to trace inside
    another (`jax.make_jaxpr`, a user's own `jax.jit`)."""
    return jax.jit(fun, compiler_options=compiler_options(mesh), **kwargs), jax.jit(fun, **kwargs)


def compiler_options(mesh: Mesh, once: bool = False) -> dict[str, bool | int]:
    """The compile options for a program that runs on the devices of `mesh`; `once`: a program
    run once, whose compile time matters more than its speed."""
    return _options(mesh.devices.flat[0].platform, once)


@functools.cache
def _options(platform: str, once: bool = False) -> dict[str, bool | int]:
    if platform != "cpu":
        return {}
    flags = os.environ.get("XLA_FLAGS", "")
    wanted = {**CPU_OPTIONS, **(ONCE_OPTIONS if once else {})}
    options = {k: v for k, v in wanted.items() if f"--{k}=" not in flags}
    if options and not supported(options):
        return {}
    return options


def supported(options: dict) -> bool:
    """Whether this XLA compiles a trivial program with `options` (it rejects unknown ones)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=options).lower(1.0).compile()
    except jax.errors.JaxRuntimeError:
        return False
    return True
