"""TFDS datasets read through `tfds.data_source` (ArrayRecord; no TensorFlow needed) into numpy.

Glossary: N examples, H, W spatial, C channels.
"""

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
        train, test = tfds.data_source(name, split=["train", "test"], data_dir=data_dir)
    except (
        Exception
    ) as e:  # TFDS fails in many ways offline (DownloadError, ImportError, OSError, ...)
        cause = (str(e).strip().splitlines() or [""])[0][:200]
        where = data_dir or "TFDS's default data dir"
        raise DataError(
            f"TFDS dataset {name} is not prepared in {where} and cannot be downloaded here "
            f"({type(e).__name__}: {cause}); {HINTS.get(name, PREPARE)}"
        ) from e
    class_names = tuple(train.dataset_info.features["label"].names)
    return _to_split(train), _to_split(test), class_names


def _to_split(source) -> Split:
    """Reads every example of a TFDS data source (dicts with "image" [H, W, C] and "label")."""
    # Item by item: tfds.testing.mock_data's stand-in breaks the batched __getitems__.
    examples = [source[i] for i in range(len(source))]
    images = np.stack([np.asarray(ex["image"], np.uint8) for ex in examples])  # [N, H, W, C]
    labels = np.array([ex["label"] for ex in examples], np.int32)  # [N]
    return Split(images, labels)
