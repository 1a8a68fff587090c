"""The layer vocabulary of `cnnlab.architecture` as Flax: convolution, normalization,
activations and pooling over any number of spatial axes ([B, L, C] series, [B, H, W, C] images).

Series of unequal lengths come padded with their `lengths` [B] (`cnnlab.data.Padded`): each
layer's output is valid for the steps that the geometry's output-size formula gives for the
series' own length (`valid_lengths`), and zero after them (`masked`), so that a layer sees past a
series' end what the padding of that series alone would give, and global pooling reads only
valid steps: a series' logits do not depend on how long its batch was padded.

Glossary: `B` batch, `H, W` spatial, `L` length, `C` channels, `F` filters, `k` kernel side.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnlab import geometry, kernels
from cnnlab.architecture import Activation, Norm, NormKind, Pool, PoolKind
from cnnlab.models import pool
from cnnlab.models.conv import conv2d, plan

# One function per name of `cnnlab.architecture.Activation` (tests/test_models.py checks both).
ACTIVATIONS = {name: getattr(nn, name) for name in Activation}


def _window_pads(padding, spatial, window: int, stride: int):
    if isinstance(padding, str):  # "same" / "valid", resolved as XLA does
        return jax.lax.padtype_to_pads(spatial, (window,) * len(spatial), (stride,) * len(spatial),
                                       padding.upper())  # fmt: skip
    return ((padding, padding),) * len(spatial)


def pooled(x: jax.Array, layer: Pool, lengths: jax.Array | None = None) -> jax.Array:
    """Max or average pooling of `layer`'s window over every spatial axis of x [B, *S, C]; of
    padded series [B, L, C] of `lengths` [B], a max over their valid steps only (beyond them
    there is nothing, as `nn.max_pool`'s own padding of -inf has it)."""
    if lengths is not None and layer.kind == PoolKind.max:
        x = masked(x, lengths, jnp.finfo(x.dtype).min)
    rank, window, stride = x.ndim - 2, layer.window, layer.step
    unpadded = layer.padding in ("valid", 0)
    if layer.kind == PoolKind.max and rank == 2 and unpadded and _onednn(x):
        # oneDNN's gradient is several times faster than `nn.max_pool`'s (cnnlab.models.pool)
        return pool.max_pool_onednn(x, window, stride)
    pads = _window_pads(layer.padding, x.shape[1:-1], window, stride)
    fn = nn.max_pool if layer.kind == PoolKind.max else nn.avg_pool
    return fn(x, (window,) * rank, (stride,) * rank, pads)


def global_pooled(x: jax.Array, kind: PoolKind, lengths: jax.Array | None = None) -> jax.Array:
    """[B, *S, C] -> [B, C]: the mean or maximum over every spatial position, or over the first
    `lengths` [B] steps of padded series [B, L, C]."""
    if lengths is not None:
        if kind == PoolKind.max:
            return jnp.max(masked(x, lengths, jnp.finfo(x.dtype).min), axis=1)
        return jnp.sum(masked(x, lengths), axis=1) / lengths[:, None].astype(x.dtype)
    axes = tuple(range(1, x.ndim - 1))
    return jnp.max(x, axis=axes) if kind == PoolKind.max else jnp.mean(x, axis=axes)


def positions(lengths: jax.Array, size: int) -> jax.Array:
    """[B, size, 1] bool: True at the steps before each series' length, of `lengths` [B]."""
    return (jnp.arange(size) < lengths[:, None])[..., None]


def masked(x: jax.Array, lengths: jax.Array, fill: float = 0.0) -> jax.Array:
    """Padded series x [B, L, C] with every step from its series' length on set to `fill`."""
    return jnp.where(positions(lengths, x.shape[1]), x, jnp.asarray(fill, x.dtype))


def valid_lengths(lengths: jax.Array, span: int, stride: int, padding, size: int) -> jax.Array:
    """[B] the valid output steps of a conv or pool (window `span`, input of `size` steps) for
    series of `lengths` [B]: `cnnlab.geometry.out_size` of each one's own length, the output its
    series alone would have ("same": ceil(length / stride)). The steps before it read only the
    series and the zeros after it, which its own padding would be."""
    if padding == "same":
        return -(-lengths // stride)
    pad = geometry.pads(padding, size, span, stride)
    return jnp.maximum(geometry.out_size(lengths, span, stride, pad), 0)


def _onednn(x: jax.Array) -> bool:
    return jax.default_backend() == "cpu" and kernels.applies(x.dtype, jax.device_count())


def norm(layer: Norm, train: bool, dtype=None) -> nn.Module:
    """The normalization module of `layer`. Its output has `dtype` (the conv's, so bfloat16 stays
    bfloat16; the statistics are float32).

    batch: BatchNorm (Ioffe & Szegedy, 2015) with the batch's statistics in training and the
    running averages (momentum 0.9, in the `batch_stats` collection) otherwise; group: GroupNorm
    over `groups` groups of channels, per example; layer: LayerNorm over the channels, per
    position; both the same in training and test.
    """
    if layer.kind == NormKind.batch:
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=dtype,
                            name=layer.name)  # fmt: skip
    if layer.kind == NormKind.group:
        return nn.GroupNorm(num_groups=layer.groups, dtype=dtype, name=layer.name)
    return nn.LayerNorm(dtype=dtype, name=layer.name)


class Conv(nn.Module):
    """A convolution with the parameters of `nn.Conv` (kernel [k, ..., k, C, F], bias [F]) over
    every spatial axis. Images, and series as images one pixel high, are computed by
    `cnnlab.models.conv.conv2d` the way `cnnlab.models.conv.plan` picks for the layer; dilated
    and 3-D kernels by XLA's convolution."""

    features: int  # F, filters = depth of the output volume
    kernel_size: int  # k, along every spatial axis
    stride: int
    padding: str | int  # "same", "valid" or pixels per side
    dilation: int = 1
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, *S, C] -> [B, *S', F]
        rank, k, s = x.ndim - 2, self.kernel_size, self.stride
        shape = (k,) * rank + (x.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape).astype(x.dtype)
        span = self.dilation * (k - 1) + 1
        pads = _window_pads(self.padding, x.shape[1:-1], span, s)
        if self.dilation > 1 or rank not in (1, 2):
            spatial = "DHW"[-rank:] if rank <= 3 else None
            numbers = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
            y = jax.lax.conv_general_dilated(
                x, kernel, (s,) * rank, pads, rhs_dilation=(self.dilation,) * rank,
                dimension_numbers=numbers,
            )  # fmt: skip
        elif rank == 1:  # a series as an image one pixel high
            y = _conv2d(x[:, None], kernel[None], (1, s), ((0, 0), *pads))[:, 0]
        else:
            y = _conv2d(x, kernel, (s, s), pads)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
            y = y + bias.astype(x.dtype)
        return y


def _conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], pads) -> jax.Array:
    how = plan(x.shape[-1], jax.default_backend(), jax.device_count(), x.dtype)
    return conv2d(x, kernel, strides, tuple(map(tuple, pads)), how)
