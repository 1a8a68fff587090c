"""The UCR/UEA time-series classification archives, and .ts files of one's own, through aeon.

`load_ucr(DataConfig)` reads the archive's train and test split of `data.name` (aeon's bundled
copy, or its download cache), or `<data.path>/<data.name>_TRAIN.ts` and `_TEST.ts`, as series
[N, L, C] float32: C channels as the input's depth. Series of unequal lengths are padded with
zeros to the longest of both splits, and `Split.lengths` keeps each one's own length, which the
network's mask reads (`cnnlab.models.convnet`). NaN are filled as `data.missing` says, then each
series is z-normalized per channel where `data.normalize=series` (the archives' convention).
String labels become class indices into the sorted class names.

aeon is imported on first use: it takes about a second, which an image run need not pay.
`peek(DataConfig)` learns a set's [L, C], classes and split sizes before the series are
normalized and sent to the device, so that geometry and memory are checked first (the
pre-flight of a sweep checks every point so).
Glossary: N series, L length (time steps), C channels.
"""

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnlab.config import DataConfig, Missing, Normalize
from cnnlab.data.splits import DataShape, Split
from cnnlab.errors import DataError, closest

# The classification sets inside aeon's wheel (aeon/datasets/data), which load offline; any other
# archive name is downloaded by aeon from Zenodo once, into its cache.
BUNDLED = (
    "ACSF1", "ArrowHead", "BasicMotions", "GunPoint", "ItalyPowerDemand", "JapaneseVowels",
    "OSULeaf", "PickupGestureWiimoteZ",
)  # fmt: skip
SPLITS = ("TRAIN", "TEST")  # the archive's file suffixes, as aeon's `split` takes them lowercase


@dataclass(frozen=True)
class Raw:
    """One split as aeon reads it."""

    series: list[np.ndarray]  # N arrays [C, L_i], float64, NaN where a value is missing
    labels: np.ndarray  # [N] the class labels as written (strings)
    where: str  # the file or dataset it came from, for messages


def load_ucr(cfg: DataConfig) -> tuple[Split, Split, tuple[str, ...]]:
    """(train, test, class names) of `cfg.name`: aeon's archive, or data.path's .ts files."""
    train, test = _read_folder(cfg.name, cfg.path) if cfg.path else _read_archive(cfg.name)
    _channels(train, test)
    class_names = _class_names(train.labels, test.labels)
    lengths = [s.shape[1] for raw in (train, test) for s in raw.series]
    padded = min(lengths) != max(lengths)
    splits = (_split(raw, max(lengths), padded, class_names, cfg) for raw in (train, test))
    return *splits, class_names


def _channels(train: Raw, test: Raw) -> int:
    """The channels of every series of both splits: one number, else a DataError naming each."""
    channels = {raw.where: {s.shape[0] for s in raw.series} for raw in (train, test)}
    if len(set().union(*channels.values())) > 1:
        found = "; ".join(f"{w}: {', '.join(map(str, sorted(c)))}" for w, c in channels.items())
        raise DataError(f"the series of train and test must have one number of channels: {found}")
    return next(iter(channels[train.where]))


def _read_archive(name: str) -> tuple[Raw, Raw]:
    from aeon.datasets import load_classification
    from aeon.datasets.tsc_datasets import tsc_zenodo

    base = name.removesuffix("_nmv").removesuffix("_eq")  # aeon's variants of one problem
    if base not in BUNDLED and base not in tsc_zenodo:
        raise DataError(
            f"data.name={name} is not a dataset of the UCR/UEA archives"
            f"{closest(name, [*BUNDLED, *tsc_zenodo])} (bundled with aeon, offline: "
            f"{', '.join(BUNDLED)}); for .ts files of your own set data.path=<folder>"
        )
    raws = []
    for split in SPLITS:
        try:  # aeon's defaults of both flags changed between versions: say what cnnlab wants
            x, y = load_classification(
                name, split=split.lower(), load_equal_length=False, load_no_missing=False
            )
        except (OSError, ValueError) as e:  # not bundled, and the download failed
            raise DataError(
                f"data.name={name} is not bundled with aeon and cannot be downloaded "
                f"({_first_line(e)}); offline use one of {', '.join(BUNDLED)}, or "
                f"data.path=<folder with {name}_TRAIN.ts and {name}_TEST.ts>"
            ) from e
        raws.append(Raw(list(x), np.asarray(y), f"data.name={name} ({split.lower()})"))
    return raws[0], raws[1]


def _read_folder(name: str, path: str) -> tuple[Raw, Raw]:
    folder = Path(path).expanduser()
    files = [folder / f"{name}_{split}.ts" for split in SPLITS]
    if not folder.is_dir():
        raise DataError(
            f"data.path={path} is not a folder: point it to one with {files[0].name} and "
            f"{files[1].name}"
        )
    for file in files:
        if not file.is_file():
            raise DataError(f"{file} does not exist: data.path must hold {name}_TRAIN.ts "
                            f"and {name}_TEST.ts (data.name={name})")  # fmt: skip
    return _read_ts(files[0]), _read_ts(files[1])


def _read_ts(path: Path) -> Raw:
    """One .ts file (aeon's reader), its errors as one line naming the file."""
    from aeon.datasets import load_from_ts_file

    try:
        x, y = load_from_ts_file(str(path))
    except (OSError, ValueError, IndexError, KeyError, TypeError) as e:  # aeon's parser's
        raise DataError(f"{path}: not a readable .ts file ({_first_line(e)})") from e
    if y is None or len(y) != len(x) or not len(x):
        raise DataError(f"{path}: expected series with class labels (@classLabel true ...)")
    return Raw(list(x), np.asarray(y), str(path))


def peek(cfg: DataConfig) -> DataShape | None:
    """`cfg.name`'s series shape [L, C] (L the longest, as `load_ucr` pads to it), classes and
    split sizes, read by aeon as `load_ucr` reads them: data.path's files or aeon's bundled copy.
    None for a set aeon has still to download, which only loading may do."""
    if not cfg.path and cfg.name.removesuffix("_nmv").removesuffix("_eq") not in BUNDLED:
        return None
    return _shape(cfg.name, cfg.path)


@functools.cache  # the pre-flight asks once per sweep point, and aeon reads in milliseconds
def _shape(name: str, path: str | None) -> DataShape:
    train, test = _read_folder(name, path) if path else _read_archive(name)
    lengths = [s.shape[1] for raw in (train, test) for s in raw.series]
    classes = {str(v) for raw in (train, test) for v in raw.labels}
    return DataShape(
        (max(lengths), _channels(train, test)), len(classes), len(train.series), len(test.series),
        dtype="float32", padded=min(lengths) != max(lengths),
    )  # fmt: skip


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _class_names(*labels: np.ndarray) -> tuple[str, ...]:
    """The labels of both splits, sorted: by value where they are all numbers (so 2 before 10)."""
    names = sorted({str(v) for split in labels for v in split})
    try:
        return tuple(sorted(names, key=float))
    except ValueError:
        return tuple(names)


def _split(raw: Raw, length: int, padded: bool, class_names: tuple, cfg: DataConfig) -> Split:
    """[N, length, C] float32 zero-padded series, labels [N] and, when `padded`, lengths [N]."""
    channels = raw.series[0].shape[0]
    values = np.zeros((len(raw.series), length, channels), np.float32)  # [N, L, C]
    for i, series in enumerate(raw.series):
        values[i, : series.shape[1]] = _clean(series.T, cfg, f"{raw.where}: series {i}")
    index = {name: k for k, name in enumerate(class_names)}
    labels = np.array([index[str(v)] for v in raw.labels], np.int32)
    lengths = np.array([s.shape[1] for s in raw.series], np.int32) if padded else None
    return Split(values, labels, lengths)


def _clean(series: np.ndarray, cfg: DataConfig, where: str) -> np.ndarray:
    """One series [L, C] with its NaN filled (`data.missing`) and, for `data.normalize=series`,
    each channel to mean 0 and std 1 over time (a constant channel to 0)."""
    if np.isnan(series).any():
        if cfg.missing == Missing.error:
            raise DataError(
                f"{where} has missing values (NaN) and data.missing=error; set "
                "data.missing=interpolate or data.missing=zero"
            )
        if cfg.missing == Missing.interpolate:
            series = fill_missing(series, where)
    if cfg.normalize == Normalize.series:
        mean, std = np.nanmean(series, axis=0), np.nanstd(series, axis=0)  # [C]
        series = (series - mean) / np.where(std > 0, std, 1.0)
    return np.nan_to_num(series, nan=0.0)  # data.missing=zero: what is still NaN


def fill_missing(series: np.ndarray, where: str) -> np.ndarray:
    """[L, C] with each channel's NaN linearly interpolated along time from its neighbours (the
    nearest value before the first or after the last); a channel with no value is an error."""
    out = series.copy()
    steps = np.arange(len(series))
    for c in range(series.shape[1]):
        known = ~np.isnan(series[:, c])
        if not known.any():
            raise DataError(
                f"{where}: channel {c} is missing entirely (all NaN), so there is nothing to "
                "interpolate from; set data.missing=zero, or drop the series"
            )
        out[:, c] = np.interp(steps, steps[known], series[known, c])
    return out
