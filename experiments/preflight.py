"""`cnnlab-preflight [overrides]`: expand a sweep and check every point before anything runs.

Takes the same arguments as `cnnlab-train -m` (ad-hoc `key=a,b` sweeps and `sweep=` presets) and
prints each distinct architecture's per-layer table (feature-map sizes, parameters,
multiply-adds, receptive fields) with the points that use it and the largest of their training
steps' memory (cnnlab.memory), every impossible point with its reason (a feature map that would be
empty, a step that needs more memory than this machine has), the number of jobs and an estimate
of the training compute. `cnnlab-train` runs the same check at the start of every multirun
(experiments/callbacks.py). Exit code 2 if a point is invalid.
"""

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from omegaconf import DictConfig

from cnnlab import geometry, memory
from cnnlab.config import Config
from cnnlab.data import DataShape, data_shape
from cnnlab.errors import CnnlabError, ConfigError
from cnnlab.validate import validate
from experiments.hydra_conf import entry_point, to_config


@dataclass
class Point:
    overrides: list[str]  # the job's swept values (those that differ between jobs)
    error: str = ""  # why the point is impossible; "" if it is valid
    cfg: Config | None = None
    shape: DataShape | None = None  # None where the data's shape is known only once it is read
    rows: list[geometry.Layer] = field(default_factory=list)

    @property
    def label(self) -> str:
        return " ".join(self.overrides) or "(no swept values)"


def check(points: list[list[str]], load: Callable[[list[str]], DictConfig]) -> list[Point]:
    """Compose and validate every point; geometry is computed where the data's shape is known
    before loading it (`cnnlab.data.data_shape`: the named image sets, the archives' series)."""
    varying = [len({p[i] for p in points}) > 1 for i in range(len(points[0]))] if points else []
    checked = []
    for overrides in points:
        point = Point([o for o, swept in zip(overrides, varying, strict=True) if swept])
        try:
            point.cfg = to_config(load(overrides), overrides)
            validate(point.cfg)
            point.shape = known = data_shape(point.cfg.data)
            if known is not None:
                shape, classes = known.example_shape, known.num_classes
                point.rows = geometry.layers(point.cfg.model, shape, classes)
        except ConfigError as e:
            point.error = str(e)
        checked.append(point)
    return checked


def training_flops(point: Point) -> float:
    """Forward and backward (about 3x the forward FLOPs) over every training example and epoch,
    for each of the job's `seeds`."""
    cfg, train = point.cfg, point.shape.train
    examples = min(round(train * (1 - cfg.data.val_fraction)), cfg.data.train_limit or train)
    models = max(1, len(cfg.seeds))
    return 3.0 * geometry.summarize(point.rows)["flops"] * examples * cfg.train.epochs * models


def report(points: list[Point]) -> str:
    """The pre-flight text: tables per distinct architecture, invalid points, totals."""
    lines, tables, largest = [], {}, {}
    for point in points:
        if point.rows:
            table = geometry.format_table(point.rows)
            tables.setdefault(table, []).append(point.label)
            held = memory.dataset_bytes(point.cfg.data, point.shape)
            est = memory.estimate(point.cfg, point.rows, held)
            if table not in largest or est.total > largest[table].total:
                largest[table] = est  # the batch size or optimizer may differ between its jobs
    for i, (table, labels) in enumerate(tables.items(), start=1):
        lines += [f"architecture {i} of {len(tables)}, used by {len(labels)} job(s):"]
        lines += [f"  {label}" for label in labels] + [table]
        lines += [largest[table].text(), ""]
    invalid = [p for p in points if p.error]
    if invalid:
        lines.append(f"{len(invalid)} invalid point(s), not launched:")
        lines += [f"  {p.label}: {p.error}" for p in invalid]
        lines.append("")
    valid = [p for p in points if not p.error]
    flops = sum(training_flops(p) for p in valid if p.rows)
    ranks = {p.shape.rank for p in points if p.shape}
    examples = "series" if ranks == {1} else "images"  # images where the data's shape is unknown
    lines.append(
        f"{len(points)} point(s): {len(valid)} job(s) to run, {len(invalid)} invalid; training "
        f"compute about {memory.size(flops, 'FLOP')} (3x forward FLOPs x {examples} x epochs)"
    )
    return "\n".join(lines)


@entry_point
def main() -> None:
    from experiments.hydra_conf import (
        ContinuousSweep,
        compose_config,
        exit_on_user_error,
        sweep_points,
    )

    parser = argparse.ArgumentParser(prog="cnnlab-preflight", description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="as for cnnlab-train -m")
    parser.add_argument("-m", "--multirun", action="store_true", help="accepted and ignored")
    args = parser.parse_args()
    try:
        checked = check(sweep_points(args.overrides)[1], compose_config)
    except ContinuousSweep as e:
        exit_on_user_error(f"cannot list the points of this sweep in advance: {e}")
    except CnnlabError as e:
        exit_on_user_error(e)
    print(report(checked))
    sys.exit(2 if any(p.error for p in checked) else 0)


if __name__ == "__main__":
    main()
