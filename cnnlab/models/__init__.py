"""The model registry: a config's architecture (`cnnlab.architecture.resolve`) as a Flax module.

`build_model` passes the resolved per-layer values to the module, so the geometry table and the
network agree.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnlab.architecture import Architecture, Conv, resolve
from cnnlab.config import ModelConfig
from cnnlab.models.alexnet_lite import AlexNetLite
from cnnlab.models.lenet5 import LeNet5

__all__ = ["MODELS", "Architecture", "Conv", "build_model", "resolve", "variables_like"]

MODELS = {"lenet5": LeNet5, "alexnet_lite": AlexNetLite}


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The Flax module for this config (validate the geometry first with cnnlab.geometry)."""
    arch = resolve(cfg)
    return MODELS[arch.name](
        features=tuple(c.features for c in arch.convs),
        kernel_size=arch.kernels,
        strides=tuple(c.stride for c in arch.convs),
        padding=tuple(c.padding for c in arch.convs),
        dense=arch.dense,
        num_classes=num_classes,
        activation=arch.activation,
        pool=arch.pool,
        pool_size=arch.pool_size,
        pool_stride=arch.pool_stride,
        dropout=arch.dropout,
        norm=arch.norm,
        norm_groups=arch.norm_groups,
    )


def variables_like(model: nn.Module, image_shape: tuple[int, ...]) -> dict:
    """The model's Flax variables (`params`, and `batch_stats` with BatchNorm) as shapes and
    dtypes, computing nothing: the `like` tree that restores a checkpoint. [H, W, C] images."""
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_shape)))
