"""LeNet-5 (LeCun, Bottou, Bengio & Haffner, 1998), with every conv layer followed by a pool.

C1 conv 5x5 (6) -> S2 pool -> C3 conv 5x5 (16) -> S4 pool -> C5 dense 120 -> F6 dense 84 -> 10.
C3 is fully connected to S2's maps (the paper's sparse table is a 1998 compute saving), C5 is
written as a dense layer (it is a 5x5 conv on a 5x5 map), and the Gaussian RBF output layer is a
dense layer feeding a softmax. On a 32x32x1 input with valid padding, or on 28x28x1 with
padding (2, 0), this has the paper's 61,706 parameters.

Glossary: `B` batch, `H, W` spatial, `C` channels, `K` classes.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax

from cnnlab.models.layers import ACTIVATIONS, POOLS, Conv, norm


class LeNet5(nn.Module):
    features: Sequence[int] = (6, 16)  # filters of each conv layer (C1, C3)
    kernel_size: Sequence[int] = (5, 5)  # kernel side of each conv layer
    strides: Sequence[int] = (1, 1)  # stride of each conv layer
    padding: Sequence[str | int] = (2, 0)  # "same", "valid" or pixels per side, per conv layer
    dense: Sequence[int] = (120, 84)  # hidden dense widths (C5, F6)
    num_classes: int = 10  # K
    activation: str = "relu"  # key of ACTIVATIONS; the paper used a scaled tanh
    pool: str = "max"  # key of POOLS; the paper's subsampling is a trainable average
    pool_size: int = 2  # pooling window side
    pool_stride: int = 2  # pooling stride
    dropout: float = 0.0  # dropout before each hidden dense layer (the paper had none)
    norm: str = "none"  # key of NORMS: after each conv, before its activation (the paper had none)
    norm_groups: int = 8  # GroupNorm's groups, for norm="group"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:  # [B, H, W, C] -> [B, K]
        act, pool = ACTIVATIONS[self.activation], POOLS[self.pool]
        layers = zip(self.features, self.kernel_size, self.strides, self.padding, strict=False)
        for i, (width, k, s, p) in enumerate(layers, start=1):
            x = Conv(width, k, s, p, name=f"conv{i}")(x)
            x = norm(self.norm, self.norm_groups, f"norm{i}", train, x.dtype)(x)
            x = pool(act(x), self.pool_size, self.pool_stride)  # [B, H', W', width]
        x = x.reshape(x.shape[0], -1)  # [B, H' * W' * C']
        for j, width in enumerate(self.dense, start=1):
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
            x = act(nn.Dense(width, name=f"dense{j}")(x))
        return nn.Dense(self.num_classes, name="logits")(x)  # [B, K], softmax is in the loss
