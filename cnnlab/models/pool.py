"""Max pooling as an elementwise maximum of strided views, with a gradient XLA's CPU runs fast.

`nn.max_pool` is `lax.reduce_window`, whose gradient JAX writes with `select_and_scatter_add`,
which the XLA CPU backend runs several times slower than this. Here the forward pass is the
maximum of the window's k*k strided views of the input, and the gradient sends each output's
cotangent to the first input (in row-major window order, as `select_and_scatter_add` does) that
equals the maximum, by padding the masked cotangent back into place: elementwise work that XLA
fuses. Same values and gradients as `nn.max_pool` with "VALID" padding, and no scatter, so the
gradient is deterministic. It follows every convolution, a first layer's multiply-adds too
(`cnnlab.models.conv._written` makes XLA write them once instead of computing them again in each
view). cnnlab uses it for float32 on the CPU where oneDNN does not apply
(`cnnlab.models.layers.max_pool`); in bfloat16 `nn.max_pool` is faster. The figures are in
docs/xla-formulations.md.

Where `cnnlab.kernels` apply, float32 on one CPU device, `max_pool_onednn` is used instead:
oneDNN's pooling primitives, whose forward pass keeps where each maximum was (one byte per output)
so that the backward pass only reads it, where XLA computes this module's map of taps again
inside the gradient's fusion, for each window an input belongs to. Same values and gradients,
ties included; a NaN, though, does not pass on: oneDNN's maximum skips it (a window of NaNs gives
-3.4e38), where `nn.max_pool` and this module give NaN.

Glossary: `B` batch, `H, W` spatial, `C` channels, `k` window side, `s` stride.
"""

import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from cnnlab import kernels


def _views(x: jax.Array, window: int, stride: int) -> Iterator[tuple[int, int, jax.Array]]:
    """(row offset, column offset, [B, H', W', C] view) for each of the window's k*k taps."""
    h, w = x.shape[1:3]
    ho, wo = (h - window) // stride + 1, (w - window) // stride + 1
    for i in range(window):
        for j in range(window):
            rows = slice(i, i + stride * (ho - 1) + 1, stride)
            cols = slice(j, j + stride * (wo - 1) + 1, stride)
            yield i, j, x[:, rows, cols, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
    """[B, H, W, C] -> [B, H', W', C]: the maximum of each k x k window, every s pixels."""
    return _forward(x, window, stride)[0]  # under jit, XLA drops the unused map of taps


def _forward(x, window, stride):
    # The first maximum's tap, as `select_and_scatter_add` picks it, from a running comparison of
    # the views: elementwise work that XLA fuses into one loop (an argmax over the stacked views
    # is many times slower). The backward pass reads only this map, not the views of `x` again.
    views = _views(x, window, stride)
    _, _, best = next(views)
    first = jnp.zeros(best.shape, jnp.int8)  # [B, H', W', C]
    for tap, (_, _, view) in enumerate(views, start=1):
        first = jnp.where(view > best, jnp.int8(tap), first)  # strictly: a tie keeps the earlier
        best = jnp.maximum(best, view)  # as `max_pool`, NaN included
    return best, (first, x.shape)


def _backward(window, stride, residuals, g):
    first, (_, h, w, _) = residuals
    ho, wo = first.shape[1:3]
    zero = jnp.zeros((), g.dtype)
    dx = 0.0
    for tap, (i, j, _) in enumerate(_views(jnp.zeros((1, h, w, 1)), window, stride)):
        # Place [B, H', W', C] back at rows i, i + s, ... and columns j, j + s, ... of [B, H, W, C].
        rows = (i, h - i - stride * (ho - 1) - 1, stride - 1)
        cols = (j, w - j - stride * (wo - 1) - 1, stride - 1)
        masked = jnp.where(first == tap, g, zero)
        dx = dx + jax.lax.pad(masked, zero, ((0, 0, 0), rows, cols, (0, 0, 0)))
    return (dx,)


max_pool.defvjp(_forward, _backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def max_pool_onednn(x: jax.Array, window: int, stride: int) -> jax.Array:
    """`max_pool` by oneDNN's primitives (`cnnlab.kernels`), float32 on the CPU: its forward pass
    keeps where each maximum was, so the backward pass does not compare the views again."""
    return kernels.max_pool_forward(x, window, stride)[0]


def _forward_onednn(x, window, stride):
    y, workspace = kernels.max_pool_forward(x, window, stride)
    return y, (workspace, x.shape)


def _backward_onednn(window, stride, residuals, g):
    workspace, shape = residuals
    return (kernels.max_pool_backward(g, workspace, window, stride, shape),)


max_pool_onednn.defvjp(_forward_onednn, _backward_onednn)
