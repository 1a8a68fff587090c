"""XLA compile options for cnnlab's jitted programs (`jax.jit(..., compiler_options=...)`).

On the CPU, cnnlab compiles its steps with XLA's elemental IR emitters instead of its newer
MLIR fusion emitters (`xla_cpu_use_fusion_emitters=False`). The programs compute the same values
(LeNet-5's training bit for bit; with BatchNorm a reduction differs in float32 rounding) and run
at least as fast, but they compile in about half the time and with far less memory, and the
compiler's memory sets a CPU training process's peak. Measured on a 2-core CPU, one core each,
alternating, cold compilation cache (JAX 0.10.2, 2026-12-02): LeNet-5 on Fashion-MNIST, first
step 2.3-3.2 s instead of 4.9-5.5 s and peak resident memory 390-444 MB instead of 489-519 MB;
AlexNet-lite on Fashion-MNIST 6.1-6.5 s instead of 10.2-10.6 s and 452 MB instead of 645 MB; on
CIFAR-10 8.6-9.2 s instead of 11.2-12.0 s and 564 MB instead of 773 MB. Steady-state speed, the
two compiled steps alternating in one process: 1.05x (LeNet-5), 1.09x and 0.99x (AlexNet-lite).

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
# Programs that run once (the initialization) compile without LLVM's optimizations, in less than
# a fifth of the time: each truncated-normal initializer cost about 0.45 s of compilation at the
# default level on a 2-core AVX2 CPU, and LeNet-5's initialization 6.8 s, most of its start-up
# (1.3 s at level 0; 2026-12-06). The initial values differ in the last bit of a few percent of
# the weights (the inverse error function's polynomial is evaluated in another order).
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
