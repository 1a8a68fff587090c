"""The network's forward pass in evaluation mode, from uint8 images: what the eval step
(`cnnlab.train.step.make_eval_step`), the pictures and `cnnlab-predict` all compute.

Glossary: `N` images, `B` batch, `H, W` spatial, `C` channels, `K` classes.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cnnlab.preprocess import normalize


def logits(
    apply_fn: Callable, model_vars: dict, images: jax.Array, mean, std, dtype=jnp.float32
) -> jax.Array:
    """float32 logits [B, K] of uint8 `images` [B, H, W, C], normalized with the training split's
    `mean` and `std`; the network runs in `dtype` (`model_vars` already cast to it)."""
    x = normalize(images, mean, std)
    x = x if dtype == jnp.float32 else x.astype(dtype)  # float32: no cast in the program at all
    return apply_fn(model_vars, x, train=False).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _probs(model, model_vars: dict, images: jax.Array, mean, std) -> jax.Array:
    return jax.nn.softmax(logits(model.apply, model_vars, images, mean, std))


def predict_probs(
    model, model_vars: dict, images: np.ndarray, mean, std, batch: int = 500
) -> np.ndarray:
    """Softmax outputs [N, K] of uint8 `images` [N, H, W, C] in float32, `batch` images per call
    of one jitted program; `model` is the Flax module, `model_vars` its variables."""
    mean, std = np.float32(mean), np.float32(std)
    return np.concatenate(
        [np.asarray(_probs(model, model_vars, images[i : i + batch], mean, std))
         for i in range(0, len(images), batch)]
    )  # fmt: skip
