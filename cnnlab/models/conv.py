"""2-D convolution whose forward pass and each gradient pick the fastest formulation per shape.

XLA's CPU convolution (Eigen) is slow for the layers of LeNet-sized networks: LeNet-5's first
layer (1 input channel) takes ~6 ms forward at batch 128, while the same convolution written as
25 shifted multiply-adds, which XLA fuses into one loop, takes ~0.6 ms; AlexNet-lite's first layer
on CIFAR-10 (3 channels, 32x32, 24 filters) takes ~67 ms against ~7.5 ms. So `conv2d` is a
`jax.custom_vjp` whose forward pass, kernel gradient (dW) and input gradient (dX) are each
computed by one of four formulations, chosen by `plan` from the layer's shape and the backend:

- "onednn": oneDNN's convolution primitives, the library behind PyTorch's CPU convolutions, as
  XLA custom calls (`cnnlab.kernels`), for every pass of every float32 layer on one CPU device
  where the kernels are built: two to five times faster than XLA's convolution per pass. The
  three formulations below are what the CPU uses without them (`CNNLAB_CONV=xla`), with
  bfloat16, and over several devices (XLA cannot split a custom call across a mesh).
- "xla": `lax.conv_general_dilated` (and its autodiff). Always used on GPU and TPU.
- "taps": a sum over the kh*kw kernel taps of a shifted input slice times that tap's weights
  (for an image's few channels, each channel's slice times its weights).
- "chunks": `lax.conv_general_dilated` over a few images at a time. Its kernel gradient is the
  sum of the chunks' kernel gradients. XLA computes a kernel gradient as a convolution whose
  "kernel" is the output cotangent, Ho x Wo x batch large. On the CPU that runs several times
  faster in chunks of at most `DW_PIXELS` output pixels (B * Ho * Wo), for layers large enough
  (`DW_MIN_MACS`) that the extra operations do not cost more than they save: measured alone at batch
  128 on one core, AlexNet-lite's conv1 on CIFAR-10 50 -> 17 ms, on Fashion-MNIST (28x28 padded
  to 32x32) 347 -> 63 ms, its conv2 88 -> 28 ms.

Each gradient is the autodiff of its formulation (oneDNN's: its backward-data and
backward-weights primitives), so every plan computes the same function; the tests compare every
formulation and gradient with `lax.conv_general_dilated`. The choice is a fixed rule of the
shapes, dtype and devices (never a timing), so a run is bit-identical when repeated.

Glossary: `B` batch, `H, W` spatial, `C` input channels, `F` filters, `k` kernel side.
"""

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from cnnlab import kernels

Pads = tuple[tuple[int, int], tuple[int, int]]
Plan = tuple[str, str, str]  # formulation of (forward, dW, dX)

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


# Up to this many input channels (an image's 1 or 3), `taps` multiplies each channel's view by
# its weights and sums the kh*kw*C products: XLA fuses that into one loop. With more channels
# the per-tap matrix products below are the form (and XLA's convolution is faster than both).
FEW_CHANNELS = 4


def _taps(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: Pads) -> jax.Array:
    if w.shape[2] <= FEW_CHANNELS:
        # Broadcast multiplies and their sum, which XLA fuses into one loop.
        views = [
            view[..., c : c + 1] * w[i, j, c]  # [B, H', W', 1] * [F]
            for i, j, view in _slices(x, w, strides, pads)
            for c in range(w.shape[2])
        ]
        return _written(jnp.sum(jnp.stack(views), axis=0))  # [B, H', W', F]
    out = 0.0
    for i, j, view in _slices(x, w, strides, pads):
        out = out + view @ w[i, j]  # [B, H', W', F]
    return out


# Output pixels (images x Ho x Wo) of one chunk of "chunks": the kernel gradient of a chunk this
# size ran fastest on the CPU for every layer of AlexNet-lite, from 7x7 to 32x32 maps (2048 and
# 8192 were slower for the whole step, 8192 by 15% on Fashion-MNIST).
DW_PIXELS = 4096
# A layer whose kernel gradient takes fewer multiply-adds than this stays one convolution: there
# the chunks' extra operations cost more than they save (LeNet-5's layers, 15M and 31M at batch
# 128: its step ran 4% slower in chunks). AlexNet-lite's layers take 79M to 1.1G.
DW_MIN_MACS = 50_000_000


def _chunks(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: Pads) -> jax.Array:
    ho, wo = _out_size(x, w, strides, pads)
    size = max(1, DW_PIXELS // (ho * wo))  # images per chunk
    if size >= x.shape[0] or x.shape[0] * ho * wo * math.prod(w.shape) < DW_MIN_MACS:
        return _xla(x, w, strides, pads)
    parts = [_xla(x[i : i + size], w, strides, pads) for i in range(0, x.shape[0], size)]
    return jnp.concatenate(parts)


def _written(y: jax.Array) -> jax.Array:
    """`y`, which XLA writes to memory once instead of computing it again in each consumer.

    XLA's CPU backend fuses the multiply-add loop of `_taps` into every consumer of its result and
    computes it again there: BatchNorm's two reductions and its normalization, each strided view
    of the max pool after it. A matrix product is never fused into its consumers, so the result
    goes through one with the identity (exact for finite values: y * 1 + 0s; a non-finite value
    makes its pixel NaN in every channel). Its cost, ~1 ms at batch 128, saves far more: measured
    on one loaded core, whole gradient, alternating in one process, AlexNet-lite with BatchNorm
    on CIFAR-10 751 -> 448 ms, on Fashion-MNIST 503 -> 481 ms, and it lets the faster
    `cnnlab.models.pool` follow (431 and 453 ms; LeNet-5 33.1 -> 27.9 ms, bit for bit).
    """
    return y @ jnp.eye(y.shape[-1], dtype=y.dtype)


def _onednn(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: Pads) -> jax.Array:
    out = (x.shape[0], *_out_size(x, w, strides, pads), w.shape[3])  # [B, H', W', F]
    return kernels.forward(x, w, strides, pads, out)


FORMULATIONS: dict[str, Callable[..., jax.Array]] = {
    "xla": _xla, "taps": _taps, "chunks": _chunks, "onednn": _onednn,
}  # fmt: skip


def plan(x_shape: tuple, w_shape: tuple, backend: str, devices: int = 1, dtype=jnp.float32) -> Plan:
    """Which formulation computes the forward pass, dW and dX of one layer of `dtype`, on
    `devices` devices of `backend` (over several, a chunk of the batch would gather onto one
    device, and XLA cannot split a custom call: neither chunks nor oneDNN)."""
    if backend != "cpu":
        return ("xla", "xla", "xla")
    if kernels.applies(dtype, devices):
        return ("onednn", "onednn", "onednn")
    forward = "taps" if w_shape[2] <= FEW_CHANNELS else "xla"
    return (forward, "chunks" if devices == 1 else "xla", "xla")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(x: jax.Array, w: jax.Array, strides: tuple, pads: Pads, how: Plan) -> jax.Array:
    """[B, H, W, C] * [kh, kw, C, F] -> [B, H', W', F], with `how` = (forward, dW, dX)."""
    return FORMULATIONS[how[0]](x, w, strides, pads)


def _forward(x, w, strides, pads, how):
    return conv2d(x, w, strides, pads, how), (x, w)


def _backward(strides, pads, how, residuals, g):
    x, w = residuals
    if how[1] == "onednn":  # oneDNN's own gradient primitives: its calls have no autodiff
        dw = kernels.backward_weights(x, g, strides, pads, w.shape)
    else:
        dw = jax.vjp(lambda w: FORMULATIONS[how[1]](x, w, strides, pads), w)[1](g)[0]
    if how[2] == "onednn":
        dx = kernels.backward_data(g, w, strides, pads, x.shape)
    else:
        dx = jax.vjp(lambda x: FORMULATIONS[how[2]](x, w, strides, pads), x)[1](g)[0]
    return dx, dw


conv2d.defvjp(_forward, _backward)
