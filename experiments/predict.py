"""`cnnlab-predict RUN_DIR IMAGE [IMAGE ...]`: class probabilities from a trained run.

Loads the run's config, dataset statistics and final parameters (RUN_DIR/checkpoint), converts
each image to the training images' size and channels, and prints the softmax probabilities,
most likely class first.
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cnnlab.errors import CnnlabError
from cnnlab.inference import predict_probs
from cnnlab.rundir import RunDir
from experiments.hydra_conf import entry_point, exit_on_user_error


def load_image(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """An image file as uint8 [H, W, C], converted to the training data's size and channels."""
    h, w, c = shape
    try:
        with Image.open(path) as img:
            img = img.convert("L" if c == 1 else "RGB")
            if img.size != (w, h):
                img = img.resize((w, h), Image.Resampling.BILINEAR)
            return np.asarray(img, np.uint8).reshape(h, w, c)
    except (OSError, UnidentifiedImageError) as e:
        raise CnnlabError(f"cannot read image {path}: {e}") from e


def predict(run_dir: Path, images: list[Path]) -> list[list[tuple[str, float]]]:
    """For each image, (class name, probability) pairs sorted by probability."""
    run = RunDir(run_dir)
    info, model = run.dataset(), run.load_model()
    batch = np.stack([load_image(p, info.image_shape) for p in images])  # [N, H, W, C]
    probs = predict_probs(model.module, model.variables, batch, info.mean, info.std)  # [N, K]
    names = info.class_names
    return [sorted(zip(names, map(float, p), strict=True), key=lambda t: -t[1]) for p in probs]


@entry_point
def main() -> None:
    parser = argparse.ArgumentParser(prog="cnnlab-predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory written by cnnlab-train")
    parser.add_argument("images", type=Path, nargs="+", help="image files (PNG, JPEG, ...)")
    parser.add_argument("--top", type=int, default=0, help="print only the N most likely classes")
    args = parser.parse_args()
    try:
        results = predict(args.run_dir, args.images)
    except CnnlabError as e:
        exit_on_user_error(e)
    for path, ranked in zip(args.images, results, strict=False):
        print(path)
        for name, p in ranked[: args.top or None]:
            print(f"  {p:8.4f}  {name}")


if __name__ == "__main__":
    main()
