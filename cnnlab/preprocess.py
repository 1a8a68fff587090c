"""What examples go through before the network: normalization, and the training split's random
crops, flips and erasing of images. Pure functions of arrays, traced into the jitted steps
(`cnnlab.train.step`) and the prediction function (`cnnlab.inference`).

Glossary: `B` batch, `H, W` spatial, `L` length, `C` channels.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cnnlab.config import AugmentConfig
from cnnlab.errors import ConfigError


def normalize(images: jax.Array, mean: np.ndarray, std: np.ndarray) -> jax.Array:
    """uint8 images [B, H, W, C] or float32 series [B, L, C] -> float32 with the training split's
    per-channel mean and std [C] (broadcast over every axis but the last)."""
    return (images.astype(jnp.float32) - mean) / std


def augmenting(cfg: AugmentConfig) -> bool:
    return cfg.crop_padding > 0 or cfg.flip or cfg.erase > 0


def check_augment(cfg: AugmentConfig, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Crops, flips and erasing are defined on uint8 images [H, W, C] (`shape`, one example's):
    on other examples, such as series [L, C], they are refused rather than skipped, so that a run
    never reports an augmentation that did not happen."""
    if not augmenting(cfg) or (len(shape) == 3 and np.dtype(dtype) == np.uint8):
        return
    on = {"crop_padding": cfg.crop_padding, "flip": cfg.flip, "erase": cfg.erase}
    key, value = next((k, v) for k, v in on.items() if v)
    value, off = ("true", "false") if key == "flip" else (value, 0)  # as a command line has it
    kind = "series [L, C]" if len(shape) == 2 else f"{np.dtype(dtype)} examples"
    raise ConfigError(
        f"data.augment.{key}={value} augments uint8 images [H, W, C], but this dataset holds "
        f"{kind} of shape {tuple(shape)}; turn it off: data.augment.{key}={off}"
    )


def augment(images: jax.Array, key: jax.Array, cfg: AugmentConfig) -> jax.Array:
    """Random crop after zero padding, random horizontal flip and random erasing, per example, in
    that order. [B, H, W, C] uint8."""
    b, h, w, c = images.shape
    crop_key, flip_key = jax.random.split(key)
    if cfg.crop_padding:
        p = cfg.crop_padding
        padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))  # [B, H + 2p, W + 2p, C]
        offsets = jax.random.randint(crop_key, (b, 2), 0, 2 * p + 1)  # [B, 2]
        crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))
        images = jax.vmap(crop)(padded, offsets)
    if cfg.flip:
        flip = jax.random.bernoulli(flip_key, 0.5, (b, 1, 1, 1))
        images = jnp.where(flip, images[:, :, ::-1], images)
    if cfg.erase > 0:  # its own key, so that turning it on leaves the crops and flips as they were
        images = erase(
            images, jax.random.fold_in(key, 2), cfg.erase, cfg.erase_scale, cfg.erase_ratio
        )
    return images


def erase(
    images: jax.Array, key: jax.Array, probability: float, scale: Sequence[float], ratio: float
) -> jax.Array:
    """Random erasing (Zhong et al., 2017, arXiv:1708.04896): with `probability`, an image gets
    one rectangle of `scale` (min, max) of its area, aspect ratio (height / width) log-uniform in
    [ratio, 1 / ratio], at a uniform position, filled with uniform noise. The paper redraws a
    rectangle that does not fit; here its sides are clipped to the image. [B, H, W, C] uint8."""
    b, h, w, _ = images.shape
    keys = jax.random.split(key, 6)
    area = jax.random.uniform(keys[0], (b,), minval=scale[0], maxval=scale[1]) * (h * w)
    log_ratio = abs(math.log(ratio))
    aspect = jnp.exp(jax.random.uniform(keys[1], (b,), minval=-log_ratio, maxval=log_ratio))
    eh = jnp.clip(jnp.round(jnp.sqrt(area * aspect)), 1, h).astype(jnp.int32)  # [B]
    ew = jnp.clip(jnp.round(jnp.sqrt(area / aspect)), 1, w).astype(jnp.int32)
    top = jax.random.randint(keys[2], (b,), 0, h - eh + 1)
    left = jax.random.randint(keys[3], (b,), 0, w - ew + 1)
    rows = jnp.arange(h)[None, :, None]  # [1, H, 1]
    cols = jnp.arange(w)[None, None, :]  # [1, 1, W]
    inside = (rows >= top[:, None, None]) & (rows < (top + eh)[:, None, None])
    inside &= (cols >= left[:, None, None]) & (cols < (left + ew)[:, None, None])  # [B, H, W]
    inside &= jax.random.bernoulli(keys[4], probability, (b, 1, 1))
    noise = jax.random.bits(keys[5], images.shape, images.dtype)
    return jnp.where(inside[..., None], noise, images)
