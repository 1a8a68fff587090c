"""The small vocabulary both architectures share: convolution, activations and pooling."""

import flax.linen as nn
import jax

from cnnlab import kernels
from cnnlab.models import pool
from cnnlab.models.conv import conv2d, plan


def max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
    """`nn.max_pool` ("VALID"); through oneDNN where `cnnlab.kernels` apply (float32 on one CPU
    device, as the convolutions), whose gradient is several times faster than `nn.max_pool`'s."""
    if jax.default_backend() == "cpu" and kernels.applies(x.dtype, jax.device_count()):
        return pool.max_pool_onednn(x, window, stride)
    return nn.max_pool(x, (window, window), (stride, stride))


def avg_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
    """`nn.avg_pool` ("VALID"), which is fast everywhere."""
    return nn.avg_pool(x, (window, window), (stride, stride))


ACTIVATIONS = {"relu": nn.relu, "tanh": nn.tanh}
POOLS = {"max": max_pool, "avg": avg_pool}


def norm(kind: str, groups: int, name: str, train: bool, dtype=None):
    """The normalization after a conv layer (`ModelConfig.norm`): a module, or identity. Its
    output has `dtype` (the conv's, so bfloat16 stays bfloat16; the statistics are float32).

    "batch": BatchNorm (Ioffe & Szegedy, 2015) with the batch's statistics in training and the
    running averages (momentum 0.9, in the `batch_stats` collection) otherwise; "group":
    GroupNorm over `groups` groups of channels, per example, the same in training and test.
    """
    if kind == "batch":
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=dtype, name=name)
    if kind == "group":
        return nn.GroupNorm(num_groups=groups, dtype=dtype, name=name)
    return lambda x: x


class Conv(nn.Module):
    """A square convolution with the parameters of `nn.Conv` (kernel [k, k, C, F], bias [F]),
    computed by `cnnlab.models.conv.conv2d` the way `cnnlab.models.conv.plan` picks for it."""

    features: int  # F, filters = depth of the output volume
    kernel_size: int  # k
    stride: int
    padding: str | int  # "same", "valid" or pixels per side

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, H', W', F]
        k, s = self.kernel_size, self.stride
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features)
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        if isinstance(self.padding, str):  # "same" / "valid", resolved as XLA does
            padding = jax.lax.padtype_to_pads(x.shape[1:3], (k, k), (s, s), self.padding.upper())
        else:
            padding = ((self.padding, self.padding),) * 2
        how = plan(x.shape[-1], jax.default_backend(), jax.device_count(), x.dtype)
        return conv2d(x, kernel.astype(x.dtype), (s, s), padding, how) + bias.astype(x.dtype)
