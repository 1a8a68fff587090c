"""The network's forward pass in evaluation mode, from uint8 images: what the eval step
(`cnnlab.train.step.make_eval_step`), the pictures and `cnnlab-predict` all compute. Series go
wherever images do; series of unequal lengths as `cnnlab.data.Padded` (values and lengths), whose
lengths reach the network as its mask (`model_input`).

Glossary: `N` images, `B` batch, `H, W` spatial, `L` length, `C` channels, `K` classes.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cnnlab.data import Padded
from cnnlab.preprocess import normalize


def gather(examples: jax.Array | Padded, idx: jax.Array) -> jax.Array | Padded:
    """The examples `idx` [B] of a split: images [B, H, W, C], series, or `Padded` series."""
    return jax.tree.map(lambda a: a[idx], examples)


def model_input(batch: jax.Array | Padded) -> tuple[jax.Array, dict]:
    """(x, the model's keyword arguments) of a batch: padded series pass their `lengths`
    (`cnnlab.models.convnet.ConvNet`); images and series of one length pass nothing."""
    if isinstance(batch, Padded):
        return batch.values, {"lengths": batch.lengths}
    return batch, {}


def logits(
    apply_fn: Callable, model_vars: dict, images: jax.Array | Padded, mean, std, dtype=jnp.float32
) -> jax.Array:
    """float32 logits [B, K] of uint8 `images` [B, H, W, C] (or series), normalized with the
    training split's `mean` and `std`; the network runs in `dtype` (`model_vars` already cast)."""
    x, extra = model_input(images)
    x = normalize(x, mean, std)
    x = x if dtype == jnp.float32 else x.astype(dtype)  # float32: no cast in the program at all
    return apply_fn(model_vars, x, train=False, **extra).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _probs(model, model_vars: dict, images: jax.Array | Padded, mean, std) -> jax.Array:
    return jax.nn.softmax(logits(model.apply, model_vars, images, mean, std))


def predict_probs(
    model, model_vars: dict, images: np.ndarray | Padded, mean, std, batch: int = 500
) -> np.ndarray:
    """Softmax outputs [N, K] of uint8 `images` [N, H, W, C] (or series, `Padded` ones too) in
    float32, `batch` images per call of one jitted program; `model` is the Flax module,
    `model_vars` its variables."""
    mean, std = np.float32(mean), np.float32(std)
    n = len(jax.tree.leaves(images)[0])
    return np.concatenate(
        [np.asarray(_probs(model, model_vars, gather(images, slice(i, i + batch)), mean, std))
         for i in range(0, n, batch)]
    )  # fmt: skip
