"""Compiled CPU kernels: convolution and max pooling through oneDNN, as XLA FFI custom calls.

XLA's CPU backend computes convolutions with Eigen, which runs cnnlab's layers two to five times
slower than oneDNN, the library behind PyTorch's CPU convolutions (the figures are in
docs/xla-formulations.md). `onednn.cc` wraps oneDNN's convolution (forward,
backward-data and backward-weights) and max-pooling (forward and backward) primitives as XLA FFI
handlers; on the CPU `cnnlab.models.conv` and `cnnlab.models.pool` call them through the
functions below.

The source is compiled once per environment, on first use, with the system's C++ compiler against
the oneDNN wheels (`onednn-cpu-gomp`, `onednn-devel-cpu-gomp`, dependencies of cnnlab on x86-64
Linux) and jaxlib's FFI headers, into `CNNLAB_KERNEL_CACHE` (default `~/.cache/cnnlab/kernels`),
named by a hash of everything that goes into it. Where that cannot be done (no compiler, another
platform, no oneDNN), `available()` says why once and cnnlab computes convolutions with XLA, as
it does when `CNNLAB_CONV=xla` is set.

Glossary: `B` batch, `H, W` spatial, `C` input channels, `F` filters, `k` kernel side.
"""

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).with_name("onednn.cc")
# FFI target name -> the handler symbol in the compiled library
TARGETS = {
    "cnnlab_conv_forward": "CnnlabConvForward",
    "cnnlab_conv_backward_data": "CnnlabConvBackwardData",
    "cnnlab_conv_backward_weights": "CnnlabConvBackwardWeights",
    "cnnlab_max_pool_forward": "CnnlabMaxPoolForward",
    "cnnlab_max_pool_backward": "CnnlabMaxPoolBackward",
}
ONEDNN = ("onednn-cpu-gomp", "onednn-devel-cpu-gomp")  # the library and its headers

Pads = tuple[tuple[int, int], tuple[int, int]]


class Unavailable(Exception):
    """The kernels cannot be built or loaded here; the message says why."""


@functools.cache
def available() -> bool:
    """Whether the oneDNN convolutions are built, loaded and registered with JAX (once per
    process; the first call may compile them, about 10 s). Says once why not, if not."""
    if os.environ.get("CNNLAB_CONV", "").lower() == "xla":
        return False
    # oneDNN's OpenMP threads sleep when idle instead of spinning: between its calls XLA's own
    # threads run the step's elementwise work on the same cores (LeNet-5's step about 10% faster
    # on 2 cores). Read when OpenMP loads, with the library; a value set wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        library = ctypes.CDLL(str(build()))
    except (Unavailable, OSError) as e:  # OSError: the library does not load (a broken file)
        warnings.warn(f"cnnlab: convolutions and pooling by XLA, not oneDNN: {e}", stacklevel=2)
        return False
    for target, symbol in TARGETS.items():
        handler = jax.ffi.pycapsule(getattr(library, symbol))
        jax.ffi.register_ffi_target(target, handler, platform="cpu")
    return True


def applies(dtype, devices: int) -> bool:
    """Whether a CPU layer of `dtype` on `devices` devices is computed by these kernels: float32 on
    one device (XLA cannot split a custom call across a mesh), where they are available."""
    return devices == 1 and dtype == jnp.float32 and available()


def build() -> Path:
    """The compiled library: from the cache, or compiled now (atomically: processes that build
    it at the same time each write their own file and rename it into place)."""
    include, lib = _onednn()
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise Unavailable(f"no C++ compiler ({compiler}; set CXX to use another)")
    command = [
        compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w",
        "-I", jax.ffi.include_dir(), "-I", str(include), str(SOURCE),
        "-L", str(lib.parent), f"-l:{lib.name}", f"-Wl,-rpath,{lib.parent}",
    ]  # fmt: skip
    # The source's text, not its path: copies of cnnlab (a worktree, `cnnlab-bench --against`)
    # with the same source share the library.
    key = hashlib.sha256(SOURCE.read_bytes())
    recipe = [part for part in command if part != str(SOURCE)]
    key.update(" ".join([*recipe, *(metadata.version(d) for d in ("jaxlib", *ONEDNN))]).encode())
    cache = Path(os.environ.get("CNNLAB_KERNEL_CACHE", Path.home() / ".cache/cnnlab/kernels"))
    target = cache / f"onednn-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=cache, prefix=".building-", suffix=".so")
    except OSError as e:
        raise Unavailable(f"cannot write the compiled kernels to {cache} ({e.strerror})") from e
    os.close(fd)
    try:
        done = subprocess.run([*command, "-o", partial], capture_output=True, text=True)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["no output"]
            error = next((line for line in lines if "error" in line), lines[-1])
            raise Unavailable(f"compiling {SOURCE.name} with {compiler} failed: {error}")
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)
    return target


def _onednn() -> tuple[Path, Path]:
    """(the include folder, the shared library) of the installed oneDNN wheels."""
    if sys.platform != "linux":
        raise Unavailable(f"the oneDNN wheels are for Linux, not {sys.platform}")
    try:
        lib = _wheel_file(ONEDNN[0], "libdnnl.so.3")
        header = _wheel_file(ONEDNN[1], "oneapi/dnnl/dnnl.hpp")
    except metadata.PackageNotFoundError as e:
        raise Unavailable(f"oneDNN is not installed (pip install {' '.join(ONEDNN)})") from e
    return header.parents[2], lib


def _wheel_file(distribution: str, suffix: str) -> Path:
    for file in metadata.distribution(distribution).files or ():
        if str(file).endswith(suffix):
            return Path(file.locate()).resolve()
    raise Unavailable(f"{distribution} has no {suffix}")


def _attributes(strides: tuple[int, int], pads: Pads) -> dict[str, np.int64]:
    (top, bottom), (left, right) = pads
    values = dict(stride_h=strides[0], stride_w=strides[1], pad_top=top, pad_bottom=bottom)
    return {k: np.int64(v) for k, v in dict(values, pad_left=left, pad_right=right).items()}


def _ffi_call(target: str, out) -> Callable:
    """The custom call `target` with outputs `out`; under vmap (several seeds in one program) it
    runs once per seed."""
    if not available():
        raise Unavailable("the oneDNN kernels are not available here (see the warning above)")
    return jax.ffi.ffi_call(target, out, vmap_method="sequential")


def _call(target: str, shape: tuple, a: jax.Array, b: jax.Array, strides, pads) -> jax.Array:
    out = jax.ShapeDtypeStruct(shape, jnp.float32)
    return _ffi_call(target, out)(a, b, **_attributes(strides, pads))


def forward(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: Pads, out: tuple):
    """[B, H, W, C] * [k, k, C, F] -> `out` [B, H', W', F], float32."""
    return _call("cnnlab_conv_forward", out, x, w, strides, pads)


def backward_data(dy: jax.Array, w: jax.Array, strides, pads, x_shape: tuple) -> jax.Array:
    """The input gradient [B, H, W, C] for the output cotangent `dy` [B, H', W', F]."""
    return _call("cnnlab_conv_backward_data", x_shape, dy, w, strides, pads)


def backward_weights(x: jax.Array, dy: jax.Array, strides, pads, w_shape: tuple) -> jax.Array:
    """The kernel gradient [k, k, C, F] for the output cotangent `dy` [B, H', W', F]."""
    return _call("cnnlab_conv_backward_weights", w_shape, x, dy, strides, pads)


def max_pool_forward(x: jax.Array, window: int, stride: int) -> tuple[jax.Array, jax.Array]:
    """[B, H, W, C] -> the maximum of each window [B, H', W', C] ("VALID"), and oneDNN's
    workspace [B, H', W', C] uint8, where each maximum was, for `max_pool_backward`."""
    b, h, w, c = x.shape
    out = (b, max(0, (h - window) // stride + 1), max(0, (w - window) // stride + 1), c)
    shapes = (jax.ShapeDtypeStruct(out, jnp.float32), jax.ShapeDtypeStruct(out, jnp.uint8))
    call = _ffi_call("cnnlab_max_pool_forward", shapes)
    return call(x, window=np.int64(window), stride=np.int64(stride))


def max_pool_backward(dy: jax.Array, workspace: jax.Array, window: int, stride: int, x_shape):
    """The input gradient [B, H, W, C]: each cotangent of `dy` [B, H', W', C] at its maximum."""
    out = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    call = _ffi_call("cnnlab_max_pool_backward", out)
    return call(dy, workspace, window=np.int64(window), stride=np.int64(stride))
