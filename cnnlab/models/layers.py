"""The small vocabulary both architectures share: activations, pooling and padding names."""

import flax.linen as nn

ACTIVATIONS = {"relu": nn.relu, "tanh": nn.tanh}
POOLS = {"max": nn.max_pool, "avg": nn.avg_pool}


def flax_padding(padding: str | int) -> str | int:
    """cnnlab's "same" / "valid" / pixels-per-side to what `nn.Conv` takes."""
    return padding.upper() if isinstance(padding, str) else padding
