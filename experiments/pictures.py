"""`python -m experiments.pictures RUN_DIR`: pictures of what a trained run learned.

Draws filters.png, feature_maps.png, confusion_matrix.png, curves.png and confidently_wrong.png
into RUN_DIR/pictures/, and class_activation.png for a net that ends in global average pooling
(see cnnlab.report.pictures; a run on series gets them in 1-D form), e.g.
    python -m experiments.pictures outputs/lenet5_fashion_mnist/2026-11-25_13-56-08
"""

import argparse
from pathlib import Path

from cnnlab.errors import CnnlabError
from cnnlab.report.pictures import draw_all
from experiments.hydra_conf import entry_point, exit_on_user_error


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="cnnlab-pictures", description=__doc__.split("\n\n")[0].split(": ", 1)[1]
    )
    parser.add_argument("run_dir", type=Path, help="a run directory written by cnnlab-train")
    parser.add_argument(
        "--image", type=int, default=0, help="index of the test image whose feature maps to draw"
    )
    parser.add_argument(
        "--wrong", type=int, default=16, help="how many confidently wrong test images to show"
    )
    args = parser.parse_args(argv)
    try:
        paths = draw_all(args.run_dir, image_index=args.image, n_wrong=args.wrong)
    except CnnlabError as e:
        exit_on_user_error(e)
    for path in paths.values():
        print(f"cnnlab: wrote {path}")


if __name__ == "__main__":
    main()
