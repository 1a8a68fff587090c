"""Image-folder datasets: train/<class>/*.png|jpg|jpeg|bmp and test/<class>/..., from a folder or a
.zip, optionally wrapped in one top folder (cifar10-jpeg/train/airplane/0000.jpg).

Classes are the sorted sub-folder names of train/. Decoding is done once, by a small thread pool,
and the arrays are cached as one .npz in $CNNLAB_CACHE_DIR (default ~/.cache/cnnlab/datasets),
keyed by the source's absolute path, size and mtime (for a folder: every image file's).
Glossary: N examples, H, W spatial, C channels (1 grayscale, 3 RGB).
"""

import hashlib
import io
import os
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from cnnlab.data.splits import Split
from cnnlab.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
FORMATS = ("JPEG", "PNG", "BMP")  # PIL decoders to try; skips probing every other format
CACHE_VERSION = 1  # part of the cache key: bump it when the decoded arrays would change
# Folders list their images class by class; one fixed shuffle mixes the classes so that
# data.train_limit and data.test_limit keep examples of every class.
SHUFFLE_SEED = 0
CHUNK = 500  # images per thread-pool task


def cache_dir() -> Path:
    return Path(os.environ.get("CNNLAB_CACHE_DIR") or "~/.cache/cnnlab/datasets").expanduser()


def load_image_folder(path: Path) -> tuple[Split, Split, tuple[str, ...]]:
    """(train, test, class names) of the image folder or .zip at `path`; cached after one call."""
    path = path.resolve()
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            stat = path.stat()
            cache = _cache_path(path, [("", stat.st_size, stat.st_mtime_ns)])
            if (cached := _read_cache(cache)) is not None:
                return cached
            names = [info.filename for info in zf.infolist() if not info.is_dir()]
            result = _decode_tree(names, zf.read, lambda name: f"{path}:{name}", path)
    elif path.is_dir():
        names = sorted(
            Path(root, f).relative_to(path).as_posix()
            for root, _, files in os.walk(path, followlinks=True)
            for f in files
        )
        images = [n for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
        stats = [(n, s.st_size, s.st_mtime_ns) for n in images for s in [(path / n).stat()]]
        cache = _cache_path(path, stats)
        if (cached := _read_cache(cache)) is not None:
            return cached
        result = _decode_tree(
            names, lambda name: (path / name).read_bytes(), lambda name: str(path / name), path
        )
    else:
        raise DataError(
            f"{path}: not a folder or a .zip file; "
            "expected train/<class>/*.png|jpg and test/<class>/..."
        )
    _write_cache(cache, *result)
    return result


def _decode_tree(
    names: list[str], read: Callable[[str], bytes], where: Callable[[str], str], root: Path
) -> tuple[Split, Split, tuple[str, ...]]:
    """Finds train/<class>/<image> and test/<class>/<image> among `names` and decodes them."""
    tree = _find_splits(names, root)
    classes = tuple(sorted(tree["train"]))
    if sorted(tree["test"]) != list(classes):
        raise DataError(
            f"{root}: test/ has classes {sorted(tree['test'])} but train/ has {list(classes)}; "
            "they must match"
        )
    files = {
        s: [(n, k) for k, c in enumerate(classes) for n in sorted(tree[s][c])]
        for s in ("train", "test")
    }
    members = [n for s in ("train", "test") for n, _ in files[s]]
    arrays = _decode_all(members, read, where)  # N x [H, W] or [H, W, 3]
    first = arrays[0]
    for name, array in zip(members, arrays, strict=True):
        if array.shape != first.shape:
            raise DataError(
                f"{where(name)}: image is {_describe(array)} but {where(members[0])} is "
                f"{_describe(first)}; all images must share one size and mode"
            )
    images = np.stack(arrays).reshape(len(arrays), *first.shape[:2], -1)  # [N, H, W, C]
    num_train, rng = len(files["train"]), np.random.default_rng(SHUFFLE_SEED)
    splits = []
    for s, imgs in (("train", images[:num_train]), ("test", images[num_train:])):
        order = rng.permutation(len(imgs))  # [N]
        labels = np.array([k for _, k in files[s]], np.int32)  # [N]
        splits.append(Split(imgs[order], labels[order]))
    return splits[0], splits[1], classes


def _decode_all(
    members: list[str], read: Callable[[str], bytes], where: Callable[[str], str]
) -> list[np.ndarray]:
    """Decodes `members` in order with a small thread pool (PIL's decoders release the GIL)."""

    def decode_chunk(chunk: list[str]) -> list[np.ndarray]:
        return [_decode(name, read, where) for name in chunk]

    chunks = [members[i : i + CHUNK] for i in range(0, len(members), CHUNK)]
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        # On an error, map cancels the chunks not yet started.
        return [array for arrays in pool.map(decode_chunk, chunks) for array in arrays]


def _find_splits(names: list[str], root: Path) -> dict[str, dict[str, list[str]]]:
    """{"train": {class: [member, ...]}, "test": {...}} of the image files among `names`."""
    parts = [
        n.split("/")
        for n in names
        if not any(p.startswith((".", "__MACOSX")) for p in n.split("/"))
    ]
    tops = {p[0] for p in parts if len(p) > 1}
    skip = 1 if "train" not in tops and len(tops) == 1 else 0  # one wrapping top folder
    tree: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for p in parts:
        split, *rest = p[skip:] or [""]
        if split in tree and len(rest) == 2 and rest[1].lower().endswith(IMAGE_SUFFIXES):
            tree[split].setdefault(rest[0], []).append("/".join(p))
    for split, classes in tree.items():
        if not classes:
            raise DataError(
                f"{root}: no {split}/<class>/<image> files found; expected "
                "train/<class>/*.png|jpg|jpeg|bmp and test/<class>/..., maybe in one top folder"
            )
    return tree


def _decode(name: str, read: Callable[[str], bytes], where: Callable[[str], str]) -> np.ndarray:
    """One image as [H, W] (grayscale) or [H, W, 3] (RGB) uint8."""
    try:
        with Image.open(io.BytesIO(read(name)), formats=FORMATS) as img:
            if img.mode not in ("L", "RGB"):
                raise DataError(
                    f"{where(name)}: image mode {img.mode} is not supported; "
                    "convert it to grayscale (L) or RGB"
                )
            return np.asarray(img)
    except (OSError, SyntaxError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(
            f"{where(name)}: cannot decode image ({e}); replace or delete the file"
        ) from e


def _describe(array: np.ndarray) -> str:
    return f"{array.shape[1]}x{array.shape[0]} {'RGB' if array.ndim == 3 else 'grayscale'}"


def _cache_path(source: Path, stats: list[tuple[str, int, int]]) -> Path:
    key = hashlib.sha256(repr((CACHE_VERSION, str(source), stats)).encode()).hexdigest()[:16]
    return cache_dir() / f"{source.stem}-{key}.npz"


def _read_cache(cache: Path) -> tuple[Split, Split, tuple[str, ...]] | None:
    if not cache.is_file():
        return None
    try:
        with np.load(cache, allow_pickle=False) as z:
            train, test = (
                Split(z["train_images"], z["train_labels"]),
                Split(z["test_images"], z["test_labels"]),
            )
            return train, test, tuple(str(c) for c in z["class_names"])
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
        warnings.warn(
            f"{cache}: unreadable dataset cache ({e}); decoding the images again", stacklevel=3
        )
        return None


def _write_cache(cache: Path, train: Split, test: Split, class_names: tuple[str, ...]) -> None:
    """Writes a temp file and renames it, so an interrupted write is never read back."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=cache.stem, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f,
                    train_images=train.images,
                    train_labels=train.labels,
                    test_images=test.images,
                    test_labels=test.labels,
                    class_names=np.array(class_names),
                )
            os.replace(tmp, cache)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except OSError as e:
        warnings.warn(
            f"{cache}: cannot write dataset cache ({e}); the next load decodes again", stacklevel=3
        )
