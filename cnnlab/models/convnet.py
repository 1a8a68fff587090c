"""`ConvNet`: the one Flax module of every network written in the layer language.

It applies the resolved layers of `cnnlab.architecture` in order, then a dense layer of one unit
per class (`logits`; the softmax is in the loss). Layers with parameters are submodules named as
the architecture names them (conv1, norm1, dense1, res1, ...), so a network's parameter tree
reads like its layer list; dropout layers are Flax's automatically named `Dropout_0`, ... .
Each layer's output is also put in the `maps` collection, as the tuple `outputs` in the order of
the layers, which the pictures read (`apply(..., mutable=["maps"])`); otherwise nothing is kept.
Series of unequal lengths come with their `lengths` (`ConvNet.__call__`): every map layer then
keeps each series' valid steps and zeroes the rest (`cnnlab.models.layers.masked`).

Glossary: `B` batch, `S` spatial axes (H, W for images, L for series), `C` channels, `K` classes.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnlab.architecture import (
    Act,
    Conv,
    Dense,
    Dropout,
    Flatten,
    GlobalPool,
    Norm,
    Pool,
    Residual,
)  # fmt: skip
from cnnlab.geometry import shortcut_stride
from cnnlab.models import layers as nl


def _apply(module: nn.Module, layers: tuple, x: jax.Array, train: bool, lengths=None):
    """`layers` applied to x inside `module`'s compact method (their submodules become its);
    returns the output and, for padded series, its valid `lengths` [B] (None: all valid)."""
    for layer in layers:
        if lengths is None:  # images and series of one length: every position counts
            x = _one(layer, x, train)
        else:
            x, lengths = _one_masked(layer, x, train, lengths)
        if not module.is_initializing():  # init makes every collection mutable: keep none
            module.sow("maps", "outputs", x)  # a tuple, one output per layer
    return x, lengths


def _one_masked(layer, x: jax.Array, train: bool, lengths: jax.Array):
    """`layer` on padded series x [B, L, C] of valid `lengths` [B]: (output, its lengths), the
    output zero after them; a vector's lengths are None."""
    if isinstance(layer, Residual):
        return ResidualBlock(layer.layers, name=layer.name)(x, train, lengths)
    if isinstance(layer, GlobalPool):
        return nl.global_pooled(x, layer.kind, lengths), None
    if isinstance(layer, Norm):  # statistics of the valid steps only
        mask = jnp.broadcast_to(nl.positions(lengths, x.shape[1]), x.shape)
        y = nl.norm(layer, train, x.dtype)(x, mask=mask)
    else:
        y = nl.pooled(x, layer, lengths) if isinstance(layer, Pool) else _one(layer, x, train)
    if y.ndim == 2:  # flatten or a dense layer: a vector
        return y, None
    if isinstance(layer, Conv):
        span = layer.dilation * (layer.kernel - 1) + 1
        lengths = nl.valid_lengths(lengths, span, layer.stride, layer.padding, x.shape[1])
    elif isinstance(layer, Pool):
        lengths = nl.valid_lengths(lengths, layer.window, layer.step, layer.padding, x.shape[1])
    return nl.masked(y, lengths), lengths  # an activation of 0 need not be 0 (sigmoid)


def _one(layer, x: jax.Array, train: bool) -> jax.Array:
    if isinstance(layer, Conv):
        return nl.Conv(layer.features, layer.kernel, layer.stride, layer.padding, layer.dilation,
                       layer.bias, name=layer.name)(x)  # fmt: skip
    if isinstance(layer, Norm):
        return nl.norm(layer, train, x.dtype)(x)
    if isinstance(layer, Act):
        return nl.ACTIVATIONS[layer.fn](x)
    if isinstance(layer, Pool):
        return nl.pooled(x, layer)
    if isinstance(layer, GlobalPool):
        return nl.global_pooled(x, layer.kind)
    if isinstance(layer, Dropout):
        return nn.Dropout(layer.rate, deterministic=not train)(x)
    if isinstance(layer, Flatten):
        return x.reshape(x.shape[0], -1)  # [B, prod(S) * C]
    if isinstance(layer, Dense):
        return nn.Dense(layer.units, use_bias=layer.bias, name=layer.name)(x)
    return ResidualBlock(layer.layers, name=layer.name)(x, train)[0]


class ResidualBlock(nn.Module):
    """`layers` plus a shortcut: the input, or its 1x1 projection (`cnnlab.geometry` gives the
    stride) followed by the branch's normalization where the shapes differ. Returns the sum and,
    for padded series of `lengths` [B], the branch's valid lengths (the sum zero after them)."""

    layers: tuple

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, lengths=None):  # [B, *S, C]
        y, y_lengths = _apply(self, self.layers, x, train, lengths)
        if y.shape == x.shape:
            return y + x, y_lengths
        stride = shortcut_stride(x.shape[1:-1], y.shape[1:-1])
        branch_norm = next((layer for layer in self.layers if isinstance(layer, Norm)), None)
        shortcut = nl.Conv(y.shape[-1], 1, stride, "valid", use_bias=branch_norm is None,
                           name="shortcut")(x)  # fmt: skip
        if branch_norm is not None:
            named = dataclasses.replace(branch_norm, name="shortcut_norm")
            mask = None if lengths is None else jnp.broadcast_to(
                nl.positions(y_lengths, y.shape[1]), y.shape)  # fmt: skip
            shortcut = nl.norm(named, train, x.dtype)(shortcut, mask=mask)
        if lengths is None:
            return y + shortcut, None
        return nl.masked(y + shortcut, y_lengths), y_lengths  # the projection's bias, past the end


class ConvNet(nn.Module):
    layers: tuple  # of cnnlab.architecture layers, resolved and named
    num_classes: int = 10  # K

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, lengths=None) -> jax.Array:
        """[B, *S, C] -> [B, K]; `lengths` [B] int: padded series [B, L, C], each valid for its
        first lengths[b] steps (`cnnlab.data.Padded`); None: every position is valid."""
        if lengths is not None:  # the padding as zeros in the network's units, after normalizing
            x = nl.masked(x, lengths)
        x, _ = _apply(self, self.layers, x, train, lengths)
        return nn.Dense(self.num_classes, name="logits")(x)  # [B, K], softmax is in the loss
