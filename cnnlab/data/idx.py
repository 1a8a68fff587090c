"""MNIST-format IDX files (gzipped or raw) and folders of them.

An IDX file is two zero bytes, a dtype byte, a byte with the number of dims, one big-endian uint32
per dim, then the values in C order (big-endian). Glossary: N examples, H, W spatial.
"""

import gzip
import zlib
from pathlib import Path

import numpy as np

from cnnlab.data.splits import Split, aligned, aligned_empty
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
    """The array stored in one IDX file, in native byte order, read straight into a read-only
    aligned array (`cnnlab.data.splits.aligned`): the payload is never held twice."""
    try:
        with path.open("rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
        with (gzip.open if gzipped else open)(path, "rb") as f:
            return _read_idx(f, path)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read IDX file ({e}); download it again") from e


def _read_idx(f, path: Path) -> np.ndarray:
    magic = f.read(4)
    if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in DTYPES:
        raise DataError(
            f"{path}: not an IDX file (bad magic number {magic.hex()}); expected MNIST-format data"
        )
    dtype, ndim = DTYPES[magic[2]], magic[3]
    dims = f.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise DataError(f"{path}: truncated IDX header; download the file again")
    shape = tuple(int(d) for d in np.frombuffer(dims, ">u4"))
    out = aligned_empty(shape, dtype)
    got = f.readinto(memoryview(out.reshape(-1)).cast("B"))
    header, expected = 4 + 4 * ndim, out.nbytes
    extra = len(f.read()) if got == expected else 0  # bytes after the payload
    if got != expected or extra:
        size = header + got + extra
        raise DataError(
            f"{path}: IDX payload is {size} bytes but shape {shape} needs {header + expected}; "
            "the file is truncated or corrupt, download it again"
        )
    if not dtype.isnative:
        out = out.astype(dtype.newbyteorder("="))
    return aligned(out)


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
