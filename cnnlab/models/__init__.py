"""A config's network (`cnnlab.architecture.resolve`) as a Flax module.

`build_model` gives `ConvNet` the resolved layers that `cnnlab.geometry` walks, so the geometry
table and the network agree; a config that names a module of its own (`model._target_`) gets that
module (`cnnlab.models.user`).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnlab.architecture import Architecture, resolve
from cnnlab.config import ModelConfig
from cnnlab.models import user
from cnnlab.models.convnet import ConvNet

__all__ = ["Architecture", "ConvNet", "build_model", "resolve", "variables_like"]


def build_model(model: ModelConfig | Architecture, num_classes: int) -> nn.Module:
    """The Flax module of a config or of its resolved architecture (validate the geometry first
    with cnnlab.geometry): a module of one's own where the config names one (`model._target_`)."""
    if isinstance(model, ModelConfig) and model._target_:
        return user.build(model, num_classes)
    arch = model if isinstance(model, Architecture) else resolve(model)
    return ConvNet(arch.layers, num_classes)


def variables_like(model: nn.Module, input_shape: tuple[int, ...]) -> dict:
    """The model's Flax variables (`params`, and `batch_stats` with BatchNorm) as shapes and
    dtypes, computing nothing: the `like` tree that restores a checkpoint. [*S, C] inputs."""
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *input_shape)))
