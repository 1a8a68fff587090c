"""Per-example losses on logits. Glossary: `B` batch, `K` classes."""

import jax
import jax.numpy as jnp
import optax

from cnnlab.config import LossName


def _targets(labels: jax.Array, num_classes: int, label_smoothing: float) -> jax.Array:
    """One-hot targets [B, K], smoothed towards the uniform distribution."""
    return optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
    """Softmax cross-entropy, [B, K] logits and [B] labels -> [B]."""
    targets = _targets(labels, logits.shape[-1], label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def squared_error(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
    """The classic "total error" 0.5 * sum_k (target_k - softmax_k)^2, [B, K] -> [B]."""
    targets = _targets(labels, logits.shape[-1], label_smoothing)
    return 0.5 * jnp.sum((targets - jax.nn.softmax(logits)) ** 2, axis=-1)


LOSSES = {LossName.cross_entropy: cross_entropy, LossName.squared_error: squared_error}
