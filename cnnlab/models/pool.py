"""Max pooling by oneDNN's primitives (`cnnlab.kernels`), for float32 on one CPU device.

`nn.max_pool` is `lax.reduce_window`, whose gradient JAX writes with `select_and_scatter_add`,
which XLA's CPU backend runs slowly. oneDNN's forward pass keeps where each maximum was (one byte
per output), so that the backward pass only reads it. Same values and gradients as `nn.max_pool`
with "VALID" padding, ties included; a NaN, though, does not pass on: oneDNN's maximum skips it (a
window of NaNs gives -3.4e38), where `nn.max_pool` gives NaN.

Everywhere else (no oneDNN, bfloat16, several devices, GPUs and TPUs) cnnlab pools with
`nn.max_pool` (`cnnlab.models.layers.max_pool`): a max pool of strided views with its own gradient
did not make a whole step clearly faster there (docs/xla-formulations.md).

Glossary: `B` batch, `H, W` spatial, `C` channels, `k` window side, `s` stride.
"""

import functools

import jax

from cnnlab import kernels


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def max_pool_onednn(x: jax.Array, window: int, stride: int) -> jax.Array:
    """[B, H, W, C] -> [B, H', W', C]: the maximum of each k x k window, every s pixels."""
    return kernels.max_pool_forward(x, window, stride)[0]


def _forward_onednn(x, window, stride):
    y, workspace = kernels.max_pool_forward(x, window, stride)  # workspace: where each maximum was
    return y, (workspace, x.shape)


def _backward_onednn(window, stride, residuals, g):
    workspace, shape = residuals
    return (kernels.max_pool_backward(g, workspace, window, stride, shape),)


max_pool_onednn.defvjp(_forward_onednn, _backward_onednn)
