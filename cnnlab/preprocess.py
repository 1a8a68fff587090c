"""What examples go through before the network: normalization, and the training split's random
crops, flips and erasing of images, or shifts and scaling of series. Pure functions of arrays,
traced into the jitted steps (`cnnlab.train.step`) and the prediction function
(`cnnlab.inference`).

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


# The keys of data.augment that augment uint8 images [H, W, C], and those that augment series
# [L, C]: each kind is refused on the other (`check_augment`).
IMAGE_KEYS = ("crop_padding", "flip", "erase")
SERIES_KEYS = ("shift", "scale")


def augmenting(cfg: AugmentConfig) -> bool:
    """Whether `augment` (images) has anything to do."""
    return any(getattr(cfg, key) for key in IMAGE_KEYS)


def augmenting_series(cfg: AugmentConfig) -> bool:
    """Whether `augment_series` has anything to do."""
    return any(getattr(cfg, key) for key in SERIES_KEYS)


def check_augment(cfg: AugmentConfig, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Crops, flips and erasing are defined on uint8 images [H, W, C], shifts and scaling on
    series [L, C] (`shape`, one example's): a key of the other kind is refused rather than
    skipped, so that a run never reports an augmentation that did not happen."""
    dtype = np.dtype(dtype)
    image, series = len(shape) == 3 and dtype == np.uint8, len(shape) == 2
    wrong = [k for k in IMAGE_KEYS if getattr(cfg, k) and not image]
    wrong += [k for k in SERIES_KEYS if getattr(cfg, k) and not series]
    if wrong:
        key, value = wrong[0], getattr(cfg, wrong[0])
        value, off = ("true", "false") if key == "flip" else (value, 0)  # as a command line has it
        what = "uint8 images [H, W, C]" if key in IMAGE_KEYS else "series [L, C]"
        kind = "series [L, C]" if series else "uint8 images" if image else f"{dtype} examples"
        raise ConfigError(
            f"data.augment.{key}={value} augments {what}, but this dataset holds {kind} of shape "
            f"{tuple(shape)}; turn it off: data.augment.{key}={off}"
        )
    if series and cfg.shift >= shape[0]:
        raise ConfigError(
            f"data.augment.shift={cfg.shift} would move whole series of {shape[0]} steps out of "
            f"sight; use fewer steps, e.g. data.augment.shift={max(1, shape[0] // 10)}"
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


def augment_series(
    x: jax.Array, lengths: jax.Array | None, key: jax.Array, cfg: AugmentConfig
) -> jax.Array:
    """Random shift, then random scaling, of normalized series x [B, L, C] float32, each valid
    for its first `lengths` [B] steps (None: all L). Each has its own key, so that turning one on
    leaves the other's draws as they were."""
    shift_key, scale_key = jax.random.split(key)
    if cfg.shift:
        x = shift(x, lengths, shift_key, cfg.shift)
    if cfg.scale:
        b, _, c = x.shape
        low, high = 1.0 - cfg.scale, 1.0 + cfg.scale
        x = x * jax.random.uniform(scale_key, (b, 1, c), x.dtype, low, high)  # [B, 1, C] factors
    return x


def shift(x: jax.Array, lengths: jax.Array | None, key: jax.Array, steps: int) -> jax.Array:
    """Each series of x [B, L, C] moved along time by d steps, d uniform in [-steps, steps] per
    series, within its own length: the image crop after zero padding, in 1-D. Values moved past
    the series' length are dropped rather than moved into its padding, where the network's mask
    would hide them anyway, so the lengths (and the mask) stay as they are. The steps uncovered
    at the other end are 0, the mean once normalized; past the length, 0 as the mask makes it."""
    b, length, _ = x.shape
    d = jax.random.randint(key, (b, 1), -steps, steps + 1)  # [B, 1]
    t = jnp.arange(length)[None, :]  # [1, L]
    source = t - d  # [B, L]: the step whose value lands at t
    end = length if lengths is None else lengths[:, None]  # [B, 1]
    inside = (source >= 0) & (source < end) & (t < end)  # [B, L]
    moved = jnp.take_along_axis(x, jnp.clip(source, 0, length - 1)[..., None], axis=1)
    return jnp.where(inside[..., None], moved, 0.0)
