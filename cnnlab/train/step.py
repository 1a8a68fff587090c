"""The jitted train and eval steps: pure functions of arrays.

The dataset lives on the device as uint8 for the whole run; a step receives the full arrays and
the indices of its batch, gathers the batch, augments and normalizes it inside the compiled
program, so the host sends only B int32 indices per step.

Glossary: `N` examples in a split, `B` batch, `H, W` spatial, `C` channels, `K` classes.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState

from cnnlab.config import AugmentConfig

Metrics = dict[str, jax.Array]


def create_state(
    model: nn.Module, tx: optax.GradientTransformation, image_shape: tuple, key: jax.Array
) -> TrainState:
    """Initialize parameters from `key` for images of `image_shape` (H, W, C)."""
    params = model.init(key, jnp.zeros((1, *image_shape), jnp.float32))["params"]
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def normalize(images: jax.Array, mean: np.ndarray, std: np.ndarray) -> jax.Array:
    """uint8 [B, H, W, C] -> float32 with the training split's per-channel mean and std."""
    return (images.astype(jnp.float32) - mean) / std


def augment(images: jax.Array, key: jax.Array, cfg: AugmentConfig) -> jax.Array:
    """Random crop after zero padding, and random horizontal flip, per example. [B, H, W, C]."""
    b, h, w, c = images.shape
    crop_key, flip_key = jax.random.split(key)
    if cfg.crop_padding:
        p = cfg.crop_padding
        padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))  # [B, H + 2p, W + 2p, C]
        offsets = jax.random.randint(crop_key, (b, 2), 0, 2 * p + 1)  # [B, 2]
        crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))  # noqa: E731
        images = jax.vmap(crop)(padded, offsets)
    if cfg.flip:
        flip = jax.random.bernoulli(flip_key, 0.5, (b, 1, 1, 1))
        images = jnp.where(flip, images[:, :, ::-1], images)
    return images


def make_train_step(
    loss_fn: Callable,
    label_smoothing: float,
    mean: np.ndarray,
    std: np.ndarray,
    augment_cfg: AugmentConfig,
) -> Callable[..., tuple[TrainState, Metrics]]:
    """`(state, images, labels, idx, key) -> (state, metrics)`, jitted, with the state donated.

    `images` [N, H, W, C] uint8 and `labels` [N] stay on the device; `idx` [B] picks the batch.
    The step's randomness is `key` folded with the step number: no key travels in the state.
    """
    augmenting = augment_cfg.crop_padding > 0 or augment_cfg.flip

    def train_step(state: TrainState, images, labels, idx, key) -> tuple[TrainState, Metrics]:
        augment_key, dropout_key = jax.random.split(jax.random.fold_in(key, state.step))
        x, y = images[idx], labels[idx]  # [B, H, W, C] uint8, [B]
        if augmenting:
            x = augment(x, augment_key, augment_cfg)
        x = normalize(x, mean, std)

        def loss(params):
            logits = state.apply_fn(
                {"params": params}, x, train=True, rngs={"dropout": dropout_key}
            )  # [B, K]
            return loss_fn(logits, y, label_smoothing).mean(), logits

        (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
        state = state.apply_gradients(grads=grads)
        metrics = {
            "train/loss": value,
            "train/accuracy": jnp.mean(jnp.argmax(logits, -1) == y),
            "train/grad_norm": optax.global_norm(grads),
        }
        return state, metrics

    return jax.jit(train_step, donate_argnums=0)


def make_eval_step(
    apply_fn: Callable, loss_fn: Callable, mean: np.ndarray, std: np.ndarray
) -> Callable[..., dict[str, Any]]:
    """`(params, images, labels, idx, mask) -> sums and probabilities` for one padded batch.

    `mask` [B] is False for the padding that fills the last batch; sums ignore it.
    """

    def eval_step(params, images, labels, idx, mask) -> dict[str, jax.Array]:
        x, y = normalize(images[idx], mean, std), labels[idx]
        logits = apply_fn({"params": params}, x, train=False)  # [B, K]
        losses = loss_fn(logits, y, 0.0)  # [B]
        return {
            "loss_sum": jnp.sum(jnp.where(mask, losses, 0.0)),
            "correct": jnp.sum(mask & (jnp.argmax(logits, -1) == y)),
            "probs": jax.nn.softmax(logits),  # [B, K]
        }

    return jax.jit(eval_step)
