"""`ConvNet`: the one Flax module of every network written in the layer language.

It applies the resolved layers of `cnnlab.architecture` in order, then a dense layer of one unit
per class (`logits`; the softmax is in the loss). Layers with parameters are submodules named as
the architecture names them (conv1, norm1, dense1, res1, ...), so a network's parameter tree
reads like its layer list; dropout layers are Flax's automatically named `Dropout_0`, ... .
Each layer's output is also put in the `maps` collection, as the tuple `outputs` in the order of
the layers, which the pictures read (`apply(..., mutable=["maps"])`); otherwise nothing is kept.

Glossary: `B` batch, `S` spatial axes (H, W for images, L for series), `C` channels, `K` classes.
"""

import dataclasses

import flax.linen as nn
import jax

from cnnlab.architecture import (
    Act,
    Conv,
    Dense,
    Dropout,
    Flatten,
    GlobalPool,
    Norm,
    Pool,
)  # fmt: skip
from cnnlab.geometry import shortcut_stride
from cnnlab.models import layers as nl


def _apply(module: nn.Module, layers: tuple, x: jax.Array, train: bool) -> jax.Array:
    """`layers` applied to x inside `module`'s compact method (their submodules become its)."""
    for layer in layers:
        x = _one(layer, x, train)
        if not module.is_initializing():  # init makes every collection mutable: keep none
            module.sow("maps", "outputs", x)  # a tuple, one output per layer
    return x


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
    return ResidualBlock(layer.layers, name=layer.name)(x, train)


class ResidualBlock(nn.Module):
    """`layers` plus a shortcut: the input, or its 1x1 projection (`cnnlab.geometry` gives the
    stride) followed by the branch's normalization where the shapes differ."""

    layers: tuple

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:  # [B, *S, C]
        y = _apply(self, self.layers, x, train)
        if y.shape == x.shape:
            return y + x
        stride = shortcut_stride(x.shape[1:-1], y.shape[1:-1])
        branch_norm = next((layer for layer in self.layers if isinstance(layer, Norm)), None)
        shortcut = nl.Conv(y.shape[-1], 1, stride, "valid", use_bias=branch_norm is None,
                           name="shortcut")(x)  # fmt: skip
        if branch_norm is not None:
            named = dataclasses.replace(branch_norm, name="shortcut_norm")
            shortcut = nl.norm(named, train, x.dtype)(shortcut)
        return y + shortcut


class ConvNet(nn.Module):
    layers: tuple  # of cnnlab.architecture layers, resolved and named
    num_classes: int = 10  # K

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:  # [B, *S, C] -> [B, K]
        x = _apply(self, self.layers, x, train)
        return nn.Dense(self.num_classes, name="logits")(x)  # [B, K], softmax is in the loss
