"""MNIST-format IDX files (gzipped or raw) and folders of them.

An IDX file is two zero bytes, a dtype byte, a byte with the number of dims, one big-endian uint32
per dim, then the values in C order (big-endian). Glossary: N examples, H, W spatial.
"""

import gzip
import zlib
from pathlib import Path

import numpy as np

from cnnlab.data.splits import Split
from cnnlab.errors import DataError

DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
# File-name prefixes of the train and test files: train-images-idx3-ubyte[.gz], t10k-... or test-...
PREFIXES = {"train": ("train",), "test": ("t10k", "test")}


def read_idx(path: Path) -> np.ndarray:
    """The array stored in one IDX file, in native byte order."""
    try:
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read IDX file ({e}); download it again") from e
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in DTYPES:
        raise DataError(
            f"{path}: not an IDX file (bad magic number {data[:4].hex()}); "
            "expected MNIST-format data"
        )
    dtype, ndim = DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header; download the file again")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, offset=4))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(
            f"{path}: IDX payload is {len(data)} bytes but shape {shape} needs {expected}; "
            "the file is truncated or corrupt, download it again"
        )
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def find_idx(folder: Path, split: str, kind: str) -> Path:
    """The one file of `kind` ("images" or "labels") for `split` ("train" or "test") in `folder`."""
    found = sorted(
        p for prefix in PREFIXES[split] for p in folder.glob(f"{prefix}-{kind}*") if p.is_file()
    )
    if len(found) != 1:
        names = " or ".join(
            f"{prefix}-{kind}-idx{1 if kind == 'labels' else 3}-ubyte[.gz]"
            for prefix in PREFIXES[split]
        )
        problem = "no" if not found else f"{len(found)} ({', '.join(p.name for p in found)})"
        raise DataError(
            f"{folder}: found {problem} {split} {kind} files; expected exactly one named {names}"
        )
    return found[0]


def load_idx_split(folder: Path, split: str) -> Split:
    """Images [N, H, W] -> [N, H, W, 1] and labels [N] of one split of an IDX folder."""
    images_path, labels_path = find_idx(folder, split, "images"), find_idx(folder, split, "labels")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or not len(images):
        raise DataError(
            f"{images_path}: expected uint8 images [N, H, W] with N > 0, "
            f"got {images.dtype} {list(images.shape)}"
        )
    if labels.dtype.kind not in "iu" or labels.ndim != 1 or len(labels) != len(images):
        raise DataError(
            f"{labels_path}: expected {len(images)} integer labels to match {images_path.name}, "
            f"got {labels.dtype} {list(labels.shape)}"
        )
    return Split(images[..., None], labels.astype(np.int32))  # [N, H, W, 1], [N]
