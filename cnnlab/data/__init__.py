"""Datasets as numpy arrays: `load_dataset(DataConfig) -> Dataset` with train/val/test splits.

`DATASETS` maps each legal `data.name` to the function that reads its (train, test, class names);
`load_dataset` then holds out the validation split, applies the limits and builds the `Dataset`
(`Dataset.from_splits`), which computes the per-channel mean/std of the training examples that the
training step uses to normalize inside jit. The named datasets are uint8 images [N, H, W, C]; a
`Dataset` built in code may also hold float32 series [N, L, C] (`cnnlab.train.run.prepare` takes
one), which train through the same path.
Glossary: N examples, H, W spatial, L length, C channels (1 grayscale, 3 RGB), K classes.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnlab.config import DataConfig, DataSource, Normalize
from cnnlab.data.idx import load_idx_split
from cnnlab.data.image_folder import load_image_folder
from cnnlab.data.splits import DataShape, Padded, Split, aligned, hold_out, limit
from cnnlab.data.tfds_source import load_tfds
from cnnlab.data.ucr import load_ucr, peek
from cnnlab.errors import ConfigError, DataError, check_choice

__all__ = [
    "DATASETS",
    "INPUT_SHAPES",
    "DataShape",
    "PATH_REQUIRED",
    "SPLIT_SIZES",
    "Dataset",
    "Padded",
    "Split",
    "data_shape",
    "load_dataset",
]

# Debian's dataset-fashion-mnist package; read directly, because TFDS's checksums refuse Debian's
# recompressed files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
DIGITS = tuple(str(d) for d in range(10))


@dataclass(frozen=True, eq=False)
class Dataset:
    name: str  # the data.name it was loaded as
    train: Split  # after the validation hold-out and data.train_limit
    val: Split  # data.val_fraction of the original train split; empty when it is 0
    test: Split
    class_names: tuple[str, ...]  # [K], label k is class_names[k]
    mean: np.ndarray  # [C] float32, per-channel mean of the train examples, in their scale
    std: np.ndarray  # [C] float32, per-channel standard deviation, same scale

    @classmethod
    def from_splits(
        cls, name: str, train: Split, val: Split, test: Split, class_names: tuple[str, ...]
    ) -> "Dataset":
        """The dataset of splits already held out and limited: labels checked against the
        classes, arrays aligned (`cnnlab.data.splits.aligned`), statistics of `train`."""
        for split_name, split in (("train", train), ("val", val), ("test", test)):
            low, high = split.labels.min(initial=0), split.labels.max(initial=0)
            if low < 0 or high >= len(class_names):
                raise DataError(
                    f"data.name={name}: {split_name} labels span {low}..{high}, "
                    f"outside the {len(class_names)} classes {class_names}"
                )
        train, val, test = (
            Split(
                aligned(s.images),
                aligned(s.labels),
                s.lengths if s.lengths is None else aligned(s.lengths),
            )
            for s in (train, val, test)
        )
        mean, std = _channel_stats(train.images, train.lengths)
        return cls(name, train, val, test, tuple(class_names), mean, std)

    @property
    def image_shape(self) -> tuple[int, ...]:  # (H, W, C) of images, (L, C) of series
        return tuple(self.train.images.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _path(cfg: DataConfig, example: str) -> Path:
    """`cfg.path`, which must be set (`example` shows what it should point to) and exist."""
    if not cfg.path:
        raise ConfigError(
            f"data.path is required for data.name={cfg.name}: set data.path={example}"
        )
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise DataError(f"data.path={cfg.path} does not exist: point it to {example}")
    return path


def _idx_folder(folder: Path, class_names: tuple[str, ...]) -> tuple[Split, Split, tuple[str, ...]]:
    return load_idx_split(folder, "train"), load_idx_split(folder, "test"), class_names


def _fashion_mnist(cfg: DataConfig) -> tuple[Split, Split, tuple[str, ...]]:
    if cfg.path:
        return _idx_folder(_path(cfg, "/folder/with/idx/files"), FASHION_MNIST_CLASSES)
    if DEBIAN_FASHION_MNIST.is_dir():
        return _idx_folder(DEBIAN_FASHION_MNIST, FASHION_MNIST_CLASSES)
    return load_tfds("fashion_mnist", cfg.tfds_data_dir)


def _mnist(cfg: DataConfig) -> tuple[Split, Split, tuple[str, ...]]:
    if cfg.path:
        return _idx_folder(_path(cfg, "/folder/with/idx/files"), DIGITS)
    return load_tfds("mnist", cfg.tfds_data_dir)


def _cifar10(cfg: DataConfig) -> tuple[Split, Split, tuple[str, ...]]:
    if cfg.path:
        return load_image_folder(_path(cfg, "/path/to/cifar10 (an image folder or .zip)"))
    return load_tfds("cifar10", cfg.tfds_data_dir)


def _idx(cfg: DataConfig) -> tuple[Split, Split, tuple[str, ...]]:
    folder = _path(cfg, "/folder/with/idx/files")
    train, test = load_idx_split(folder, "train"), load_idx_split(folder, "test")
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    return train, test, tuple(str(k) for k in range(num_classes))


def _image_folder(cfg: DataConfig) -> tuple[Split, Split, tuple[str, ...]]:
    return load_image_folder(
        _path(cfg, "/folder/or/archive.zip with train/<class>/ and test/<class>/")
    )


DATASETS = {
    "fashion_mnist": _fashion_mnist,
    "mnist": _mnist,
    "cifar10": _cifar10,
    "idx": _idx,
    "image_folder": _image_folder,
}

# Datasets that exist only as the user's own files, so data.path must be set.
PATH_REQUIRED = ("idx", "image_folder")

# Input shape (H, W, C) and class count of the named datasets, known without reading them, so that
# geometry is checked before any data is loaded.
INPUT_SHAPES = {
    "fashion_mnist": ((28, 28, 1), 10),
    "mnist": ((28, 28, 1), 10),
    "cifar10": ((32, 32, 3), 10),
}

# (train, test) sizes of the named datasets, for compute estimates before loading anything.
SPLIT_SIZES = {
    "fashion_mnist": (60_000, 10_000),
    "mnist": (60_000, 10_000),
    "cifar10": (50_000, 10_000),
}


def data_shape(cfg: DataConfig) -> DataShape | None:
    """What the checks before loading need of `cfg`'s dataset (its example shape and dtype,
    classes, split sizes): the tables above for the named image sets, the .ts files' text for an
    archive's set (`cnnlab.data.ucr.peek`); None where only reading the data tells (image
    folders, IDX files, an archive's set still to be downloaded)."""
    if cfg.source == DataSource.ucr:
        return peek(cfg)
    if cfg.name not in INPUT_SHAPES:
        return None
    shape, num_classes = INPUT_SHAPES[cfg.name]
    return DataShape(shape, num_classes, *SPLIT_SIZES[cfg.name])


def load_dataset(cfg: DataConfig) -> Dataset:
    """Reads `cfg.name`'s data; same cfg -> identical arrays."""
    if cfg.source == DataSource.ucr:
        full_train, test, class_names = load_ucr(cfg)
    else:
        check_choice("data.name", cfg.name, DATASETS)
        full_train, test, class_names = DATASETS[cfg.name](cfg)
    train, val = hold_out(full_train, cfg.val_fraction, cfg.split_seed)
    train = limit(train, cfg.train_limit, "data.train_limit")
    if not len(train):
        raise ConfigError(
            f"data.val_fraction={cfg.val_fraction} leaves no training examples; lower it"
        )
    test = limit(test, cfg.test_limit, "data.test_limit")
    data = Dataset.from_splits(cfg.name, train, val, test, class_names)
    if (
        cfg.normalize == Normalize.series
    ):  # z-normalized on loading: the step keeps them as they are
        mean, std = np.zeros_like(data.mean), np.ones_like(data.std)
        data = dataclasses.replace(data, mean=mean, std=std)
    return data


def _channel_stats(
    examples: np.ndarray, lengths: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std [C] over every axis but the last, of uint8 images or float32
    series (padded series: over their `lengths` only); a constant channel keeps its scale (std 1)
    rather than dividing by zero."""
    if examples.dtype == np.uint8:
        return _pixel_stats(examples)
    if lengths is not None:  # the padding is no measurement
        examples = examples[np.arange(examples.shape[1]) < lengths[:, None]]  # [sum(lengths), C]
    values = examples.reshape(-1, examples.shape[-1]).astype(np.float64)  # [N * L, C]
    mean, std = values.mean(axis=0), values.std(axis=0)
    return mean.astype(np.float32), np.where(std > 0, std, 1.0).astype(np.float32)


def _pixel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std [C] of uint8 images [N, H, W, C], from exact integer sums."""
    channels = images.shape[-1]
    rows = images.reshape(len(images), -1)  # [N, H*W*C]; summing rows is fast, channels strided not
    total, squares = np.zeros(rows.shape[1], np.uint64), np.zeros(rows.shape[1], np.uint64)
    for start in range(0, len(rows), 2048):
        chunk = rows[start : start + 2048].astype(np.uint32)  # [2048, H*W*C]
        total += chunk.sum(axis=0, dtype=np.uint64)
        squares += (chunk * chunk).sum(axis=0, dtype=np.uint64)
    count = rows.size // channels
    mean = total.reshape(-1, channels).sum(axis=0) / count  # [C]
    std = np.sqrt(squares.reshape(-1, channels).sum(axis=0) / count - mean**2)  # [C]
    # A constant channel would divide by zero; one pixel level is the smallest meaningful spread.
    return mean.astype(np.float32), np.maximum(std, 1.0).astype(np.float32)
