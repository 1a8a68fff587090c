"""`cnnlab-report SWEEP_DIR [SWEEP_DIR ...]`: summarize Hydra sweeps (multirun folders).

Writes summary.csv, summary.md, accuracy.png, heatmap.png, accuracy_vs_flops.png and a
self-contained report.html at the root of each sweep directory, e.g.
    cnnlab-report multirun/lenet5_fashion_mnist/2026-11-25_13-56-08-123456
"""

import argparse
from pathlib import Path

from cnnlab.errors import CnnlabError
from cnnlab.report import check_sweep_dir, write_report
from experiments.hydra_conf import entry_point, exit_on_user_error


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="cnnlab-report", description=__doc__.split("\n\n")[0].split(": ", 1)[1]
    )
    parser.add_argument(
        "sweep_dirs",
        nargs="+",
        type=Path,
        metavar="SWEEP_DIR",
        help="a multirun folder: multirun.yaml and job folders 0/, 1/, ...",
    )
    args = parser.parse_args(argv)
    try:
        for sweep_dir in args.sweep_dirs:  # all checked before any is written
            check_sweep_dir(sweep_dir)
        for sweep_dir in args.sweep_dirs:
            paths = write_report(sweep_dir)
            print(f"cnnlab: report of {sweep_dir}: {paths['html']}")
    except CnnlabError as e:
        exit_on_user_error(e)


if __name__ == "__main__":
    main()
