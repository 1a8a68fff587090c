"""A Flax module of a researcher's own, outside cnnlab, trained through `model._target_`
(tests/test_user_module.py): cnnlab knows nothing of it but its import path and its fields."""

import flax.linen as nn
import jax


class TinyNet(nn.Module):
    """conv (`stride`, same padding) -> batch norm -> relu -> max pool 2x2 -> conv 3x3 valid ->
    relu -> flatten -> dropout -> dense. The second conv does not fit a map under 3x3: it
    comes out 0x0 (stride 8 on 28x28 inputs leaves it a 2x2 map), which JAX builds silently."""

    width: int = 8  # filters of each conv
    stride: int = 1  # the first conv's stride
    dropout: float = 0.0  # before the dense layer, in training (a field named like a cnnlab knob)
    num_classes: int = 10  # K, set by cnnlab from the data

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:  # [B, H, W, C] -> [B, K]
        x = nn.Conv(self.width, (3, 3), self.stride, name="stem")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="norm")(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.Conv(self.width, (3, 3), padding="VALID", name="body")(x)
        x = nn.relu(x).reshape(x.shape[0], -1)  # [B, H' * W' * width]
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="head")(x)  # [B, K]


class NoTrain(nn.Module):
    """A module whose `__call__` lacks the `train` argument that cnnlab passes."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


class NotAModule:
    """A class, but not a Linen module."""
