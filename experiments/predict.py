"""`cnnlab-predict RUN_DIR IMAGE [IMAGE ...]`: class probabilities from a trained run.

Loads the run's config, dataset statistics and final parameters (RUN_DIR/checkpoint), converts
each image to the training images' size and channels, and prints the softmax probabilities,
most likely class first.
"""

import argparse
import json
from pathlib import Path

import jax
import numpy as np
from omegaconf import OmegaConf
from PIL import Image, UnidentifiedImageError

from cnnlab import checkpoint
from cnnlab.config import ModelConfig
from cnnlab.errors import CnnlabError
from cnnlab.models import build_model, variables_like
from cnnlab.train.step import normalize
from experiments.hydra_conf import exit_on_user_error


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
    for name in ("config.yaml", "dataset.json"):
        if not (run_dir / name).is_file():
            raise CnnlabError(f"{run_dir} is not a cnnlab run directory (no {name})")
    model_cfg = OmegaConf.to_object(
        OmegaConf.merge(
            OmegaConf.structured(ModelConfig), OmegaConf.load(run_dir / "config.yaml").model
        )
    )
    meta = json.loads((run_dir / "dataset.json").read_text())
    shape, names = tuple(meta["image_shape"]), meta["class_names"]
    model = build_model(model_cfg, len(names))
    like = variables_like(model, shape)
    model_vars = checkpoint.load_variables(run_dir / "checkpoint", like)
    batch = np.stack([load_image(p, shape) for p in images])  # [N, H, W, C]
    x = normalize(batch, np.float32(meta["mean"]), np.float32(meta["std"]))
    probs = np.asarray(jax.nn.softmax(model.apply(model_vars, x)))  # [N, K]
    return [sorted(zip(names, map(float, p), strict=False), key=lambda t: -t[1]) for p in probs]


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
