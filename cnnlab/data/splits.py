"""`Split` (images and labels of one split) and the validation hold-out and size limits.

`load_dataset` returns splits whose arrays start on a 64-byte boundary (`aligned`): XLA's CPU
client then uses them in place as device arrays (`cnnlab.parallel.put_dataset`) instead of copying
them, so a run holds one copy of its dataset, not two. They are read-only, since a device array may
share their memory.

Glossary: N examples, H, W spatial, L length, C channels (1 grayscale, 3 RGB).
"""

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from cnnlab.errors import ConfigError

ALIGNMENT = 64  # bytes: what XLA's CPU client needs to use a host buffer in place


def aligned(array: np.ndarray) -> np.ndarray:
    """`array` as a read-only, C-contiguous array that starts on an ALIGNMENT-byte boundary:
    itself (made read-only) where it already is one, else a copy."""
    if not (array.flags.c_contiguous and array.ctypes.data % ALIGNMENT == 0):
        out = aligned_empty(array.shape, array.dtype)
        out[...] = array
        array = out
    array.flags.writeable = False
    return array


def aligned_empty(shape: tuple, dtype) -> np.ndarray:
    """An uninitialized C-contiguous array that starts on an ALIGNMENT-byte boundary."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(size + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + size].view(dtype).reshape(shape)


# The examples' dtypes: images as stored (uint8, pixel scale 0..255), or measured values such as
# series (float32, in their own units); both are normalized with the training split's statistics.
DTYPES = (np.uint8, np.float32)


@dataclass(frozen=True)
class DataShape:
    """A dataset as the checks before loading see it (geometry, memory, compute): one example's
    shape and dtype, the classes and the sizes of the source's two splits."""

    example_shape: tuple[int, ...]  # (H, W, C) of images, (L, C) of series (the longest, padded)
    num_classes: int  # K
    train: int  # examples of the source's train split, before the validation hold-out
    test: int
    dtype: str = "uint8"  # as held in memory and on the device: uint8 images, float32 series
    padded: bool = False  # series of unequal lengths: each also holds its length (int32)

    @property
    def rank(self) -> int:
        """Spatial axes: 2 for images, 1 for series."""
        return len(self.example_shape) - 1


class Padded(NamedTuple):
    """Series of unequal lengths as the steps receive them (a JAX pytree, as a NamedTuple is):
    padded with zeros to one length, and each one's own length, which the network's mask reads
    (`cnnlab.models.convnet.ConvNet`)."""

    values: np.ndarray  # [N, L, C] float32, zero after each series' length
    lengths: np.ndarray  # [N] int32, in 1..L


@dataclass(frozen=True, eq=False)
class Split:
    images: np.ndarray  # [N, H, W, C] images or [N, L, C] series, uint8 or float32 (DTYPES)
    labels: np.ndarray  # [N] int32, class indices
    # [N] int32: the steps of each series before its padding, where series have unequal lengths
    # (`images` is zero after them); None where every example fills `images`
    lengths: np.ndarray | None = None

    @property
    def examples(self) -> np.ndarray | Padded:
        """What the steps gather a batch from: the images, or the padded series and lengths."""
        return self.images if self.lengths is None else Padded(self.images, self.lengths)

    def __post_init__(self):
        if self.images.dtype not in DTYPES or self.images.ndim not in (3, 4):
            raise ValueError(
                "images must be [N, H, W, C] or [N, L, C], uint8 or float32, got "
                f"{self.images.shape} {self.images.dtype}"
            )
        if self.labels.dtype != np.int32 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels must be [N] int32, got {self.labels.shape} {self.labels.dtype}"
            )
        if self.lengths is not None and (
            self.lengths.dtype != np.int32 or self.lengths.shape != self.labels.shape
        ):
            raise ValueError(
                f"lengths must be [N] int32, got {self.lengths.shape} {self.lengths.dtype}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: np.ndarray | slice) -> "Split":
        """The examples `indices`: a slice gives views, an index array copies, the images straight
        into aligned memory (the largest array is never copied twice on its way to the device)."""
        lengths = None if self.lengths is None else self.lengths[indices]
        if isinstance(indices, slice):
            return Split(self.images[indices], self.labels[indices], lengths)
        images = aligned_empty((len(indices), *self.images.shape[1:]), self.images.dtype)
        np.take(self.images, indices, axis=0, out=images)
        return Split(images, self.labels[indices], lengths)


def hold_out(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Splits `train` into (train, val) with `fraction` of the examples, picked by `seed`, in val.

    Both keep the original order of their examples; fraction=0 gives an empty val split.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(
            f"data.val_fraction={fraction} must be in [0, 1): set e.g. data.val_fraction=0.1"
        )
    num_val = round(len(train) * fraction)
    if num_val == 0:
        return train, train.take(slice(0, 0))
    order = np.random.default_rng(seed).permutation(len(train))  # [N]
    return train.take(np.sort(order[num_val:])), train.take(np.sort(order[:num_val]))


def limit(split: Split, n: int | None, key: str) -> Split:
    """The first `n` examples of `split` (all of them when `n` is None); `key` names the setting."""
    if n is None:
        return split
    if n < 1:
        raise ConfigError(f"{key}={n} must be a positive number of examples or null (no limit)")
    return split.take(slice(0, n))
