"""Read a Hydra multirun folder back: one `Point` per job folder, whatever state it ended in.

A sweep directory holds `multirun.yaml` and job folders `0/`, `1/`, ... (see README "The run
directory"). A job that failed before training may lack everything but `.hydra/` (its point is
then read from `.hydra/config.yaml` or `.hydra/overrides.yaml`) and has status "missing" when it
has no `summary.json`.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cnnlab.config import Config, flatten, identity
from cnnlab.errors import CnnlabError
from cnnlab.geometry import example_name, input_text
from cnnlab.rundir import RunDir

# The config keys that change what a run computes (`cnnlab.config.identity`, which also names its
# checkpoints). A key outside them (logging, naming, sweep control) counts as swept only where
# the sweep's overrides set it: `name`, say, varies with the model when it interpolates it.
RESULT_KEYS = frozenset(flatten(identity(Config())))
REPLICATE = "seed"  # the replicate axis: rows average over it


@dataclass
class Point:
    """One job of a sweep: its config, how it ended and what it measured."""

    job: str  # the job folder's name, "0", "1", ...
    path: Path
    config: dict[str, Any]  # flattened dotted keys -> values (lists kept as values)
    overrides: list[str]  # the job's Hydra overrides, "key=value"
    status: str  # ok | diverged | failed | interrupted | invalid | missing
    error: str
    summary: dict[str, Any] = field(repr=False)
    final_val_accuracy: float | None  # the last `val/accuracy` in metrics.jsonl
    layers: str  # layers.txt, "" if absent
    input_shape: tuple[int, ...] | None = None  # (*spatial, C) from dataset.json; None: not run

    def metric(self, key: str) -> float | None:
        """A finite number from summary.json (e.g. "test/accuracy"), else None."""
        value = self.summary.get(key)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            return None
        return float(value)


def is_job_dir(path: Path) -> bool:
    return path.is_dir() and path.name.isdigit()


def check_sweep_dir(sweep_dir: Path) -> None:
    """Raise CnnlabError, with a hint, unless `sweep_dir` looks like a multirun folder."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise CnnlabError(f"{sweep_dir} is not a directory")
    if (sweep_dir / "multirun.yaml").is_file() or any(map(is_job_dir, sweep_dir.iterdir())):
        return
    if (sweep_dir / "summary.json").is_file() or (sweep_dir / ".hydra").is_dir():
        raise CnnlabError(f"{sweep_dir} is a single run, not a sweep; pass its sweep folder")
    inner = sorted(p.name for p in sweep_dir.iterdir() if (p / "multirun.yaml").is_file())
    hint = f"; it holds the sweeps {', '.join(inner[-3:])}" if inner else ""
    raise CnnlabError(
        f"{sweep_dir} is not a sweep directory (no multirun.yaml, no job folders 0/, 1/, ...){hint}"
    )


def collect(sweep_dir: Path) -> list[Point]:
    """Every job folder of the sweep, in job order."""
    sweep_dir = Path(sweep_dir)
    check_sweep_dir(sweep_dir)
    jobs = sorted(filter(is_job_dir, sweep_dir.iterdir()), key=lambda p: int(p.name))
    return [point for job in jobs for point in read_points(job)]


def read_points(job: Path) -> list[Point]:
    """A job's points: one per seed where it trained `seeds=[...]`, each with the job's config and
    its own `seed` (so a job's seeds are replicates, like a swept `seed`), else the job itself
    (also a seeds job that stopped before its first seed, or an invalid one)."""
    run = RunDir(job)
    tree = run.config_tree()
    seeds = tree.get("seeds") or []
    if not any((job / f"seed_{s}").is_dir() for s in seeds):
        return [read_point(job)]
    overrides = run.overrides()  # Hydra's files are the job's, not the seeds'
    return [
        read_point(job / f"seed_{s}", overrides, f"{job.name}/seed_{s}", {**tree, "seed": s})
        for s in seeds
    ]


def read_point(
    folder: Path, overrides: list[str] | None = None, name: str = "", tree: dict | None = None
) -> Point:
    """The point of a job folder, or of a seed's folder inside one (its job's `overrides`, its
    `name` and its config `tree`)."""
    run = RunDir(folder)
    overrides = run.overrides() if overrides is None else overrides
    tree = run.config_tree() if tree is None else tree
    summary = run.summary()
    status = str(summary.get("status", "missing")) if summary else "missing"
    error = str(summary.get("error", "")) if summary else "no summary.json (the job did not finish)"
    return Point(
        job=name or folder.name,
        path=folder,
        config=_config(tree, overrides),
        overrides=overrides,
        status=status,
        error=error,
        summary=summary or {},
        final_val_accuracy=_final_val_accuracy(run.metrics()),
        layers=run.layers(),
        input_shape=_input_shape(run),
    )


def _input_shape(run: RunDir) -> tuple[int, ...] | None:
    """The run's input shape from its dataset.json; None without one (an invalid point, a job
    stopped before loading its data) or where it is unreadable (a job killed while writing it)."""
    try:
        return tuple(run.dataset().image_shape)
    except (CnnlabError, OSError, ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class Inputs:
    """The sweep's inputs as its report names them."""

    text: str  # e.g. "ItalyPowerDemand: series of length L=24, 1 channel"; "" where unknown
    example: str  # what costs are per: "series" or "image"


def inputs(points: list[Point]) -> Inputs:
    """The datasets and input shapes of the jobs that loaded their data (dataset.json), each once;
    where none did, an archive's data (`data.source=ucr`) still counts per series."""
    shapes = {(p.config.get("data.name"), p.input_shape): None for p in points if p.input_shape}
    text = "; ".join(f"{name}: {input_text(shape)}" for name, shape in shapes)
    ranks = {len(shape) - 1 for _, shape in shapes}
    if not ranks:
        ranks = {1 if p.config.get("data.source") == "ucr" else 2 for p in points}
    return Inputs(text, example_name(ranks.pop()) if len(ranks) == 1 else "example")


def swept_keys(points: list[Point]) -> list[str]:
    """Dotted config keys whose values differ between jobs (the seed included), in the order of
    the overrides, then of the config."""
    overridden: dict[str, None] = {}
    for point in points:
        overridden.update(dict.fromkeys(o.split("=", 1)[0].lstrip("+~") for o in point.overrides))
    order = dict(overridden)
    for point in points:
        order.update(dict.fromkeys(point.config))
    swept = []
    for key in order:
        if key not in RESULT_KEYS and key not in overridden:
            continue
        values = {repr(p.config[key]) for p in points if key in p.config}
        if len(values) > 1:
            swept.append(key)
    # a list swept through one of its items (model.layers.0.conv=2,4) is that item's column
    return [key for key in swept if not any(k.startswith(f"{key}.") for k in swept)]


def _config(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """The job's config (`RunDir.config_tree`) flattened, with the overrides applied on top."""
    config = flatten(tree)
    for override in overrides:  # Hydra applied them already; they only fill in what is missing
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        if key and key not in config and not any(k.startswith(f"{key}.") for k in config):
            config[key] = _parse_value(value)
    return config


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _final_val_accuracy(records: list[dict]) -> float | None:
    """The last `val/accuracy` of metrics.jsonl's records."""
    found = [r["val/accuracy"] for r in records if isinstance(r.get("val/accuracy"), int | float)]
    return float(found[-1]) if found else None
