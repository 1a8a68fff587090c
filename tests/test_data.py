"""cnnlab.data on real files: IDX files and image trees written here, Debian's Fashion-MNIST, the
shared CIFAR-10 zip, and TFDS through its own mock_data."""

import gzip
import os
import re
import socket
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from cnnlab.config import DataConfig
from cnnlab.data import DATASETS, DEBIAN_FASHION_MNIST, INPUT_SHAPES, image_folder, load_dataset
from cnnlab.data.idx import read_idx
from cnnlab.data.splits import Split
from cnnlab.data.tfds_source import load_tfds
from cnnlab.errors import ConfigError, DataError

CIFAR_ZIP = Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.zip"
needs_fashion = pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.is_dir(),
    reason=f"{DEBIAN_FASHION_MNIST} missing: apt-get install dataset-fashion-mnist",
)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    """Keeps every test's decoded-image cache out of ~/.cache."""
    monkeypatch.setenv("CNNLAB_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def rows(*splits: Split) -> np.ndarray:
    """Each example (pixels and label) as one sortable row, in a canonical order."""
    images = np.concatenate([s.images.reshape(len(s), -1) for s in splits])  # [N, H*W*C]
    labels = np.concatenate([s.labels for s in splits]).astype(np.uint8)  # [N]
    keys = np.ascontiguousarray(np.concatenate([images, labels[:, None]], axis=1))  # [N, H*W*C + 1]
    return np.sort(keys.view(np.dtype((np.void, keys.shape[1])))[:, 0])


# ---------------------------------------------------------------------------------------- IDX


def write_idx(path: Path, array: np.ndarray, code: int = 0x08) -> Path:
    header = bytes([0, 0, code, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_idx_folder(folder: Path, suffix: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Random 5x4 uint8 images with labels 0..3, named like MNIST's files."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, n in (("train", 20), ("t10k", 7)):
        arrays[f"{prefix}_images"] = rng.integers(0, 256, (n, 5, 4), np.uint8)  # [N, H, W]
        arrays[f"{prefix}_labels"] = rng.integers(0, 4, n).astype(np.uint8)  # [N]
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", arrays[f"{prefix}_images"])
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", arrays[f"{prefix}_labels"])
    return arrays


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_idx_round_trip(tmp_path, suffix):
    arrays = write_idx_folder(tmp_path, suffix)
    data = load_dataset(DataConfig(name="idx", path=str(tmp_path), val_fraction=0.0))
    np.testing.assert_array_equal(data.train.images, arrays["train_images"][..., None])
    np.testing.assert_array_equal(data.train.labels, arrays["train_labels"])
    np.testing.assert_array_equal(data.test.images, arrays["t10k_images"][..., None])
    assert data.train.images.dtype == np.uint8 and data.train.labels.dtype == np.int32
    assert data.image_shape == (5, 4, 1) and data.val.images.shape == (0, 5, 4, 1)
    num_classes = max(arrays["train_labels"].max(), arrays["t10k_labels"].max()) + 1
    assert data.class_names == tuple(str(k) for k in range(num_classes))


@pytest.mark.parametrize("dtype, code", [(np.int32, 0x0C), (np.float32, 0x0D), (np.int16, 0x0B)])
def test_read_idx_wider_dtypes(tmp_path, dtype, code):
    array = np.arange(24, dtype=dtype).reshape(2, 3, 4) - 5
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "x.idx", array, code)), array)


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_truncated_idx_names_the_file(tmp_path, suffix):
    write_idx_folder(tmp_path, suffix)
    path = tmp_path / f"train-images-idx3-ubyte{suffix}"
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(DataError, match=path.name):
        load_dataset(DataConfig(name="idx", path=str(tmp_path)))


@pytest.mark.parametrize(
    "change, size", [(lambda b: b[:-50], 16 + 400 - 50), (lambda b: b + bytes(7), 16 + 400 + 7)]
)
def test_an_idx_file_of_the_wrong_size_says_its_size_and_the_size_needed(tmp_path, change, size):
    path = tmp_path / "images.idx"
    path.write_bytes(change(b"\0\0\x08\x03" + np.array([4, 10, 10], ">u4").tobytes() + bytes(400)))
    with pytest.raises(
        DataError, match=f"payload is {size} bytes but shape \\(4, 10, 10\\) needs 416"
    ):
        read_idx(path)


def test_loaded_splits_are_aligned_read_only_and_the_cpu_device_uses_them_in_place(tmp_path):
    from cnnlab.parallel import data_mesh, put_dataset

    write_idx_folder(tmp_path, ".gz")
    for fraction in (0.0, 0.25):  # without and with a held-out (copied) validation split
        data = load_dataset(DataConfig(name="idx", path=str(tmp_path), val_fraction=fraction))
        for split in (data.train, data.test):
            for array in (split.images, split.labels):
                assert array.ctypes.data % 64 == 0 and not array.flags.writeable
            images, labels = put_dataset((split.images, split.labels), data_mesh())
            assert images.unsafe_buffer_pointer() == split.images.ctypes.data  # no copy
            assert labels.unsafe_buffer_pointer() == split.labels.ctypes.data
            np.testing.assert_array_equal(np.asarray(images), split.images)


def test_bad_magic_idx_names_the_file(tmp_path):
    path = tmp_path / "bad.idx"
    path.write_bytes(b"\x12\x34\x08\x01" + bytes(8))
    with pytest.raises(DataError, match=r"bad\.idx.*magic"):
        read_idx(path)


def test_limits_keep_the_first_examples(tmp_path):
    write_idx_folder(tmp_path, ".gz")
    full = load_dataset(DataConfig(name="idx", path=str(tmp_path), val_fraction=0.25))
    small = load_dataset(
        DataConfig(name="idx", path=str(tmp_path), val_fraction=0.25, train_limit=4, test_limit=3)
    )
    assert (len(full.train), len(full.val), len(full.test)) == (15, 5, 7)
    assert (len(small.train), len(small.val), len(small.test)) == (4, 5, 3)
    np.testing.assert_array_equal(small.train.images, full.train.images[:4])
    np.testing.assert_array_equal(small.test.labels, full.test.labels[:3])


@pytest.mark.parametrize(
    "cfg, error, match",
    [
        (
            DataConfig(name="imagenet"),
            ConfigError,
            "fashion_mnist, mnist, cifar10, idx, image_folder",
        ),
        (DataConfig(name="idx"), ConfigError, "data.path is required for data.name=idx"),
        (DataConfig(name="image_folder"), ConfigError, "data.path is required"),
        (DataConfig(name="idx", path="/no/such/folder"), DataError, "/no/such/folder"),
        (DataConfig(name="cifar10", path="/no/such.zip"), DataError, "/no/such.zip"),
    ],
)
def test_config_mistakes_are_one_line_errors(cfg, error, match):
    with pytest.raises(error, match=match) as info:
        load_dataset(cfg)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "change, match",
    [({"val_fraction": 1.0}, "data.val_fraction"), ({"train_limit": 0}, "data.train_limit")],
)
def test_bad_split_settings(tmp_path, change, match):
    write_idx_folder(tmp_path, "")
    with pytest.raises(ConfigError, match=match):
        load_dataset(DataConfig(name="idx", path=str(tmp_path), **change))


def test_datasets_registry_keys():
    assert set(DATASETS) == {"fashion_mnist", "mnist", "cifar10", "idx", "image_folder"}


# ------------------------------------------------------------------------------ Fashion-MNIST


@pytest.fixture(scope="module")
def fashion():
    return load_dataset(DataConfig(name="fashion_mnist", val_fraction=0.1, split_seed=0))


@needs_fashion
def test_fashion_mnist_shapes_and_stats(fashion):
    assert (len(fashion.train), len(fashion.val), len(fashion.test)) == (54_000, 6_000, 10_000)
    assert (fashion.image_shape, fashion.num_classes) == INPUT_SHAPES["fashion_mnist"]
    assert fashion.class_names[0] == "T-shirt/top" and fashion.class_names[9] == "Ankle boot"
    for split in (fashion.train, fashion.val, fashion.test):
        assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
        assert split.labels.min() == 0 and split.labels.max() == 9
    assert np.bincount(fashion.test.labels).tolist() == [1000] * 10
    # The published statistics are 0.2860 and 0.3530 on the 0..1 scale.
    assert fashion.mean.shape == fashion.std.shape == (1,) and fashion.mean.dtype == np.float32
    np.testing.assert_allclose(fashion.mean, 0.2860 * 255, atol=1.0)
    np.testing.assert_allclose(fashion.std, 0.3530 * 255, atol=1.0)


@needs_fashion
def test_hold_out_is_deterministic_disjoint_and_complete(fashion):
    again = load_dataset(DataConfig(name="fashion_mnist", val_fraction=0.1, split_seed=0))
    np.testing.assert_array_equal(again.val.images, fashion.val.images)
    np.testing.assert_array_equal(again.train.labels, fashion.train.labels)
    full = load_dataset(DataConfig(name="fashion_mnist", val_fraction=0.0))
    assert len(full.val) == 0 and full.val.images.shape == (0, 28, 28, 1)
    # train + val is exactly the original train split: no example lost, none in both.
    np.testing.assert_array_equal(rows(fashion.train, fashion.val), rows(full.train))
    other = load_dataset(DataConfig(name="fashion_mnist", val_fraction=0.1, split_seed=1))
    assert not np.array_equal(other.val.labels, fashion.val.labels)


# ------------------------------------------------------------------------------- image folder

CLASSES = ("dog", "ant", "cat")  # written unsorted; labels follow the sorted names


def write_tree(root: Path, mode: str = "RGB", size: tuple[int, int] = (6, 4)) -> list[Path]:
    """PNG files train/<class>/{0,1,2}.png and test/<class>/{0,1}.png; size is (W, H)."""
    rng = np.random.default_rng(0)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    paths = []
    for split, count in (("train", 3), ("test", 2)):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                paths.append(root / split / name / f"{i}.png")
                Image.fromarray(rng.integers(0, 256, shape, np.uint8), mode).save(paths[-1])
    return paths


def expected_split(root: Path, split: str) -> Split:
    files = [
        (p, k) for k, c in enumerate(sorted(CLASSES)) for p in sorted((root / split / c).iterdir())
    ]
    images = np.stack([np.asarray(Image.open(p)) for p, _ in files])
    return Split(images.reshape(*images.shape[:3], -1), np.array([k for _, k in files], np.int32))


def zip_tree(root: Path, archive: Path, top: str = "wrap") -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(root.rglob("*.png")):
            zf.write(path, f"{top}/{path.relative_to(root).as_posix()}")
    return archive


def folder_cfg(path: Path, **kwargs) -> DataConfig:
    return DataConfig(name="image_folder", path=str(path), val_fraction=0.0, **kwargs)


@pytest.mark.parametrize("mode, channels", [("RGB", 3), ("L", 1)])
def test_image_folder_and_its_zip(tmp_path, mode, channels):
    write_tree(tmp_path / "tree", mode)
    data = load_dataset(folder_cfg(tmp_path / "tree"))
    assert data.class_names == ("ant", "cat", "dog") and data.image_shape == (4, 6, channels)
    assert data.mean.shape == (channels,)
    np.testing.assert_array_equal(
        rows(data.train), rows(expected_split(tmp_path / "tree", "train"))
    )
    np.testing.assert_array_equal(rows(data.test), rows(expected_split(tmp_path / "tree", "test")))
    zipped = load_dataset(folder_cfg(zip_tree(tmp_path / "tree", tmp_path / "tree.zip")))
    for a, b in ((data.train, zipped.train), (data.test, zipped.test)):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)


@pytest.mark.parametrize("content", ["garbage", "truncated"])
def test_corrupt_image_names_the_file(tmp_path, content):
    bad = write_tree(tmp_path)[4]
    bad.write_bytes(b"not an image" if content == "garbage" else bad.read_bytes()[:40])
    with pytest.raises(DataError, match=re.escape(str(bad))) as info:
        load_dataset(folder_cfg(tmp_path))
    assert "\n" not in str(info.value)


def test_mismatched_image_size_or_mode_names_the_file(tmp_path):
    paths = write_tree(tmp_path)
    Image.new("RGB", (5, 4)).save(paths[7])
    with pytest.raises(
        DataError, match=re.escape(f"{paths[7]}: image is 5x4 RGB but ") + ".* 6x4 RGB"
    ):
        load_dataset(folder_cfg(tmp_path))
    Image.new("RGB", (6, 4)).save(paths[7])
    Image.new("L", (6, 4)).save(paths[2])
    with pytest.raises(DataError, match=re.escape(f"{paths[2]}: image is 6x4 grayscale")):
        load_dataset(folder_cfg(tmp_path))


def test_test_classes_must_match_train(tmp_path):
    write_tree(tmp_path)
    (tmp_path / "test" / "cat").rename(tmp_path / "test" / "cow")
    with pytest.raises(DataError, match="test/ has classes"):
        load_dataset(folder_cfg(tmp_path))


def test_second_load_reads_the_cache(tmp_path, cache_dir):
    write_tree(tmp_path / "tree")
    archive = zip_tree(tmp_path / "tree", tmp_path / "tree.zip")
    first = load_dataset(folder_cfg(archive))
    [cache] = cache_dir.iterdir()  # one .npz, no temp file left behind
    assert cache.suffix == ".npz"
    again = load_dataset(folder_cfg(archive))
    np.testing.assert_array_equal(again.train.images, first.train.images)
    # Proof that the cache, not the zip, is read: an edited cache file comes back as edited.
    with np.load(cache) as z:
        arrays = dict(z)
    arrays["train_images"] = 255 - arrays["train_images"]
    np.savez(cache, **arrays)
    np.testing.assert_array_equal(
        load_dataset(folder_cfg(archive)).train.images, 255 - first.train.images
    )


def test_changed_folder_gets_a_new_cache_entry(tmp_path, cache_dir):
    paths = write_tree(tmp_path / "tree")
    load_dataset(folder_cfg(tmp_path / "tree"))
    Image.new("RGB", (6, 4), (9, 9, 9)).save(paths[0])
    os.utime(paths[0], ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    data = load_dataset(folder_cfg(tmp_path / "tree"))
    assert len(list(cache_dir.glob("*.npz"))) == 2
    assert (data.train.images == 9).all(axis=(1, 2, 3)).sum() == 1


@pytest.mark.skipif(not CIFAR_ZIP.is_file(), reason=f"{CIFAR_ZIP} missing")
def test_cifar10_zip_decodes_once_then_loads_from_cache(cache_dir, monkeypatch):
    cfg = DataConfig(name="cifar10", path=str(CIFAR_ZIP), val_fraction=0.0)
    decoded = []  # the names of the JPEGs decoded, by the real decoder
    real_decode = image_folder._decode

    def counting_decode(name, read, where):
        decoded.append(name)
        return real_decode(name, read, where)

    monkeypatch.setattr(image_folder, "_decode", counting_decode)
    data = load_dataset(cfg)
    assert len(decoded) == 60_000 and len(list(cache_dir.glob("*.npz"))) == 1
    decoded.clear()
    cached = load_dataset(cfg)
    assert decoded == []  # read from the cache, no JPEG decoded again
    assert (len(data.train), len(data.test)) == (50_000, 10_000)
    assert (data.image_shape, data.num_classes) == INPUT_SHAPES["cifar10"] == ((32, 32, 3), 10)
    assert data.class_names[:2] == ("airplane", "automobile") and data.class_names[-1] == "truck"
    assert np.bincount(data.train.labels).tolist() == [5000] * 10
    assert np.bincount(data.test.labels[:2000], minlength=10).min() > 100  # classes are mixed
    np.testing.assert_allclose(data.mean, [125.3, 123.0, 113.9], atol=1.5)
    np.testing.assert_array_equal(cached.test.images, data.test.images)
    np.testing.assert_array_equal(cached.train.labels, data.train.labels)


# ------------------------------------------------------------------------------------- TFDS


# TFDS's cifar10 only learns its label names when it prepares the data, so mock_data has "0".."9".
@pytest.mark.parametrize("name, shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_source_through_mock_data(name, shape):
    with tfds.testing.mock_data(num_examples=10):
        data = load_dataset(DataConfig(name=name, val_fraction=0.2))
    assert (len(data.train), len(data.val), len(data.test)) == (8, 2, 10)
    assert (data.image_shape, data.num_classes) == INPUT_SHAPES[name] == (shape, 10)
    assert data.class_names == tuple("0123456789")
    assert data.train.images.dtype == np.uint8 and data.train.labels.dtype == np.int32
    assert data.train.labels.max() < 10 and data.mean.shape == (shape[-1],)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize(
    "name, hint", [("cifar10", "data.path="), ("fashion_mnist", "apt-get install")]
)
def test_unavailable_tfds_dataset_is_one_line_data_error(tmp_path, no_network, name, hint):
    start = time.monotonic()
    with pytest.raises(DataError, match=hint) as info:
        load_tfds(name, str(tmp_path / "tfds"))
    assert name in str(info.value) and "\n" not in str(info.value)
    assert time.monotonic() - start < 30
