"""AlexNet-lite: AlexNet (Krizhevsky, Sutskever & Hinton, 2012) scaled down for 32x32 inputs.

Five conv layers, overlapping 3x3/2 max-pools after conv1, conv2 and the last conv, and two
hidden dense layers with dropout 0.5, as in AlexNet. Changes for 32x32 images:
- kernels 5, 5, 3, 3, 3 with stride 1 and "same" padding (AlexNet's 11x11/4 first layer would
  reduce a 32x32 image to 6x6 at once);
- widths keep AlexNet's proportions 96:256:384:384:256; the default depth 24 is a quarter of
  AlexNet's (24, 64, 96, 96, 64), and depth=96 gives the original widths;
- dense 512, 512 instead of 4096, 4096 (an eighth; the flattened map is 3x3x64 = 576, not 9,216).
That is 797,290 parameters and about 20M multiply-adds per 32x32x3 image.

Glossary: `B` batch, `H, W` spatial, `C` channels, `K` classes.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax

from cnnlab.architecture import FAMILIES
from cnnlab.models.layers import ACTIVATIONS, POOLS, Conv, norm


class AlexNetLite(nn.Module):
    features: Sequence[int] = (24, 64, 96, 96, 64)  # filters of each conv layer
    kernel_size: Sequence[int] = (5, 5, 3, 3, 3)  # kernel side of each conv layer
    strides: Sequence[int] = (1, 1, 1, 1, 1)  # stride of each conv layer
    padding: Sequence[str | int] = ("same",) * 5  # "same", "valid" or pixels per side, per layer
    dense: Sequence[int] = (512, 512)  # hidden dense widths
    num_classes: int = 10  # K
    activation: str = "relu"  # key of ACTIVATIONS
    pool: str = "max"  # key of POOLS
    pool_size: int = 3  # AlexNet's overlapping pooling: 3x3 windows...
    pool_stride: int = 2  # ...every 2 pixels
    dropout: float = 0.5  # dropout before each hidden dense layer, as in AlexNet
    norm: str = "none"  # key of NORMS: after each conv, before its activation (AlexNet had LRN)
    norm_groups: int = 8  # GroupNorm's groups, for norm="group"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:  # [B, H, W, C] -> [B, K]
        act, pool = ACTIVATIONS[self.activation], POOLS[self.pool]
        layers = zip(self.features, self.kernel_size, self.strides, self.padding, strict=False)
        for i, ((width, k, s, p), pooled) in enumerate(
            zip(layers, FAMILIES["alexnet_lite"].pools(len(self.features)), strict=False)
        ):
            x = Conv(width, k, s, p, name=f"conv{i + 1}")(x)
            x = act(norm(self.norm, self.norm_groups, f"norm{i + 1}", train, x.dtype)(x))
            if pooled:
                x = pool(x, self.pool_size, self.pool_stride)  # [B, H', W', width]
        x = x.reshape(x.shape[0], -1)  # [B, H' * W' * C']
        for j, width in enumerate(self.dense, start=1):
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
            x = act(nn.Dense(width, name=f"dense{j}")(x))
        return nn.Dense(self.num_classes, name="logits")(x)  # [B, K], softmax is in the loss
