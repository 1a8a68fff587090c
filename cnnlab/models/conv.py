"""2-D convolution computed, per layer, the way the backend runs fastest.

`conv2d` is a `jax.custom_vjp` computed one of three ways, chosen by `plan` from the layer's input
channels, its dtype, the backend and the devices (a fixed rule, never a timing, so a run is
bit-identical when repeated):

- "onednn": oneDNN's convolution primitives, the library behind PyTorch's CPU convolutions, as
  XLA custom calls (`cnnlab.kernels`): the forward pass and both gradients, for every float32
  layer on one CPU device where the kernels are built.
- "taps": the forward pass of a layer with an image's few input channels as a sum over the
  kh*kw kernel taps and C channels of a shifted input slice times that tap's weights, which XLA
  fuses into one loop, where XLA's CPU convolution (Eigen) is several times slower; its gradients
  are XLA's. For float32 on the CPU where oneDNN does not apply: without a C++ compiler (or with
  `CNNLAB_CONV=xla`) and over several devices (XLA cannot split a custom call across a mesh).
- "xla": `lax.conv_general_dilated` and its autodiff: every other layer, bfloat16 (where the
  taps made the step slower), GPUs and TPUs.

docs/xla-formulations.md has the whole-step figures behind each choice. The gradients of
"onednn" are its backward-data and backward-weights primitives, the others' XLA's autodiff, so
every way computes the same function; the tests compare each with `lax.conv_general_dilated`.

Glossary: `B` batch, `H, W` spatial, `C` input channels, `F` filters, `k` kernel side.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from cnnlab import kernels

Pads = tuple[tuple[int, int], tuple[int, int]]

DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _xla(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: Pads) -> jax.Array:
    return jax.lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=DIMENSIONS)


def _out_size(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: Pads) -> tuple[int, int]:
    """(H', W') of the output; 0 where the window does not fit, as XLA's convolution gives."""
    (kh, kw), (sh, sw), (h, wd) = w.shape[:2], strides, x.shape[1:3]
    return max(0, (h + sum(pads[0]) - kh) // sh + 1), max(0, (wd + sum(pads[1]) - kw) // sw + 1)


def _slices(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: Pads):
    """The kh*kw shifted, strided views of the padded input: each [B, H', W', C]."""
    (kh, kw), (sh, sw) = w.shape[:2], strides
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))  # [B, H + pads, W + pads, C]
    ho, wo = _out_size(x, w, strides, pads)
    for i in range(kh):
        for j in range(kw):
            yield i, j, xp[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :]


# Up to this many input channels (an image's 1 or 3) a layer's forward pass is "taps": kh*kw*C
# broadcast multiply-adds. With more, XLA's convolution is faster.
FEW_CHANNELS = 4


def _taps(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: Pads) -> jax.Array:
    # Broadcast multiplies and their sum, which XLA fuses into one loop.
    views = [
        view[..., c : c + 1] * w[i, j, c]  # [B, H', W', 1] * [F]
        for i, j, view in _slices(x, w, strides, pads)
        for c in range(w.shape[2])
    ]
    return _written(jnp.sum(jnp.stack(views), axis=0))  # [B, H', W', F]


def _written(y: jax.Array) -> jax.Array:
    """`y`, which XLA writes to memory once instead of computing it again in each consumer.

    XLA's CPU backend fuses the multiply-add loop of `_taps` into every consumer of its result and
    computes it again there, in BatchNorm's two reductions and its normalization. A matrix product
    is never fused into its consumers, so the result goes through one with the identity (exact
    for finite values: y * 1 + 0s; a non-finite value makes its pixel NaN in every channel). It
    costs far less than the loops it saves.
    """
    return y @ jnp.eye(y.shape[-1], dtype=y.dtype)


def _onednn(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: Pads) -> jax.Array:
    out = (x.shape[0], *_out_size(x, w, strides, pads), w.shape[3])  # [B, H', W', F]
    return kernels.forward(x, w, strides, pads, out)


FORMULATIONS: dict[str, Callable[..., jax.Array]] = {"xla": _xla, "taps": _taps, "onednn": _onednn}


def plan(channels: int, backend: str, devices: int = 1, dtype=jnp.float32) -> str:
    """How a layer of `channels` input channels and `dtype` on `devices` devices of `backend` is
    computed: a key of `FORMULATIONS`."""
    if backend != "cpu" or dtype != jnp.float32:
        return "xla"
    if kernels.applies(dtype, devices):
        return "onednn"
    return "taps" if channels <= FEW_CHANNELS else "xla"


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(x: jax.Array, w: jax.Array, strides: tuple, pads: Pads, how: str) -> jax.Array:
    """[B, H, W, C] * [kh, kw, C, F] -> [B, H', W', F], computed as `FORMULATIONS[how]`."""
    return FORMULATIONS[how](x, w, strides, pads)


def _forward(x, w, strides, pads, how):
    return conv2d(x, w, strides, pads, how), (x, w)


def _backward(strides, pads, how, residuals, g):
    x, w = residuals
    if how == "onednn":  # oneDNN's own gradient primitives: its calls have no autodiff
        dw = kernels.backward_weights(x, g, strides, pads, w.shape)
        return kernels.backward_data(g, w, strides, pads, x.shape), dw
    return jax.vjp(lambda x, w: _xla(x, w, strides, pads), x, w)[1](g)


conv2d.defvjp(_forward, _backward)
