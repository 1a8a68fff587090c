"""The small vocabulary both architectures share: convolution, activations and pooling."""

import flax.linen as nn
import jax

from cnnlab.models.conv import conv2d, plan

ACTIVATIONS = {"relu": nn.relu, "tanh": nn.tanh}
POOLS = {"max": nn.max_pool, "avg": nn.avg_pool}


class Conv(nn.Module):
    """A square convolution with the parameters of `nn.Conv` (kernel [k, k, C, F], bias [F]),
    computed by `cnnlab.models.conv.conv2d`, which picks a fast formulation per shape."""

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
        how = plan(x.shape, kernel.shape, jax.default_backend())
        return conv2d(x, kernel.astype(x.dtype), (s, s), padding, how) + bias.astype(x.dtype)
