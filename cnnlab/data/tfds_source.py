"""TFDS datasets read through `tfds.data_source` (ArrayRecord; no TensorFlow needed) into numpy.

Glossary: N examples, H, W spatial, C channels.
"""

import socket
import urllib.parse

import numpy as np

from cnnlab.data.splits import Split
from cnnlab.errors import DataError

# What to do when TFDS has neither a prepared copy nor a way to download one.
PREPARE = (
    "prepare it with TFDS on a machine with internet and copy it here (data.tfds_data_dir=...)"
)
HINTS = {
    "cifar10": f"pass data.path=/path/to/cifar10 (an image folder or .zip) or {PREPARE}",
    "fashion_mnist": "run `apt-get install dataset-fashion-mnist`, "
    f"pass data.path=/folder/with/idx/files or {PREPARE}",
    "mnist": f"pass data.path=/folder/with/mnist/idx/files or {PREPARE}",
}


def load_tfds(name: str, data_dir: str | None) -> tuple[Split, Split, tuple[str, ...]]:
    """(train, test, class names) of the TFDS dataset `name`, downloaded and prepared if needed."""
    import tensorflow_datasets as tfds  # heavy; only the TFDS datasets need it

    try:
        train, test = _open(tfds, name, data_dir)
    except Exception as e:  # TFDS fails offline in many ways (DownloadError, ImportError, ...)
        cause = (str(e).strip().splitlines() or [""])[0][:200]
        where = data_dir or "TFDS's default data dir"
        raise DataError(
            f"TFDS dataset {name} is not prepared in {where} and cannot be downloaded here "
            f"({type(e).__name__}: {cause}); {HINTS.get(name, PREPARE)}"
        ) from e
    class_names = tuple(train.dataset_info.features["label"].names)
    return _to_split(train), _to_split(test), class_names


def _open(tfds, name: str, data_dir: str | None) -> list:
    """The train and test data sources, prepared first if they are not yet."""
    try:  # already prepared (or faked by tfds.testing.mock_data)
        return tfds.data_source(name, split=["train", "test"], data_dir=data_dir, download=False)
    except Exception:
        pass
    # TFDS retries a failed download for about 3.5 minutes; fail in seconds when offline.
    for url in tfds.builder(name, data_dir=data_dir).url_infos or {}:
        parts = urllib.parse.urlsplit(url)
        address = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        try:
            socket.create_connection(address, timeout=5).close()
        except OSError as e:
            raise OSError(f"cannot reach {address[0]}:{address[1]} to download it ({e})") from e
    return tfds.data_source(name, split=["train", "test"], data_dir=data_dir)


def _to_split(source) -> Split:
    """Reads every example of a TFDS data source (dicts with "image" [H, W, C] and "label")."""
    # Item by item: tfds.testing.mock_data's stand-in breaks the batched __getitems__.
    examples = [source[i] for i in range(len(source))]
    images = np.stack([np.asarray(ex["image"], np.uint8) for ex in examples])  # [N, H, W, C]
    labels = np.array([ex["label"] for ex in examples], np.int32)  # [N]
    return Split(images, labels)
