"""A run's directory: checked before training, written and read back as one `RunDir`.

It must be writable and have room, checked before any training starts: an unwritable folder or a
full disk otherwise shows up when the first checkpoint is written, which can be an hour into a
run. `RunDir` writes a run's files and reads them back (its config, data statistics, metrics,
summary and final model) for the pictures, `cnnlab-predict` and the sweep report.
"""

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cnnlab import geometry
from cnnlab.config import Config, ModelConfig, from_dict, to_yaml
from cnnlab.data import Dataset, data_shape
from cnnlab.errors import CnnlabError, ConfigError

MB = 1_000_000
# What a run writes when nothing better is known: a few LeNet-5 or AlexNet-lite checkpoints, the
# metrics and W&B's offline files, with a margin.
DEFAULT_NEED_BYTES = 50 * MB


def need_bytes(cfg: Config) -> int:
    """About what a run of `cfg` writes: `checkpoint.keep` training states and one being written
    (float32 parameters and up to two optimizer slots each, AdamW's moments), the final
    parameters, per seed, and DEFAULT_NEED_BYTES for the rest. The default alone where the input
    shape is known only once the data is loaded (image folders, IDX files)."""
    shape = data_shape(cfg.data)
    if shape is None:
        return DEFAULT_NEED_BYTES
    rows = geometry.layers(cfg.model, shape.example_shape, shape.num_classes)
    params = sum(row.params for row in rows)
    per_run = ((cfg.checkpoint.keep + 1) * 3 + 1) * params * 4
    return DEFAULT_NEED_BYTES + per_run * max(1, len(cfg.seeds))


def check_run_dir(run_dir: Path, need_bytes: int = DEFAULT_NEED_BYTES) -> None:
    """Raise CnnlabError unless `run_dir` can be created and written (a probe file is written,
    synced and deleted) and its file system has `need_bytes` free."""
    probe = None  # a unique name: the processes of a multi-host run share the run directory
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=run_dir, prefix=".cnnlab-write-probe-")
        with os.fdopen(fd, "wb") as f:
            f.write(b"cnnlab")
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
        free = shutil.disk_usage(run_dir).free
    except OSError as e:
        if probe:
            with contextlib.suppress(OSError):  # the folder is unusable anyway
                os.remove(probe)
        named = e.filename and str(e.filename) not in (str(run_dir), str(probe))
        raise CnnlabError(
            f"cannot write the run directory {run_dir}: {e.strerror or e}"
            + (f" ({e.filename})" if named else "")
            + "; choose a writable folder with hydra.run.dir=... (hydra.sweep.dir=... with -m)"
        ) from e
    if free < need_bytes:
        raise CnnlabError(
            f"only {free / MB:.0f} MB free on {_mount_point(run_dir)} (the file system of "
            f"{run_dir}); this run needs about {need_bytes / MB:.0f} MB (checkpoints, metrics, "
            "W&B files): free some space or choose another folder with hydra.run.dir=..."
        )


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


@dataclass(frozen=True)
class DatasetInfo:
    """A run's dataset.json: what its model needs to read new images as it read its training
    images (their shape, and the training split's per-channel mean and std) and to name classes."""

    name: str  # the data.name the run loaded
    class_names: list[str]  # [K]
    image_shape: tuple[int, int, int]  # (H, W, C)
    mean: np.ndarray  # [C] float32, pixel scale 0..255
    std: np.ndarray  # [C] float32
    sizes: dict[str, int]  # examples per split: train, val, test

    @classmethod
    def of(cls, data: Dataset) -> "DatasetInfo":
        sizes = {"train": len(data.train), "val": len(data.val), "test": len(data.test)}
        return cls(data.name, list(data.class_names), data.image_shape, data.mean, data.std, sizes)

    def to_json(self) -> dict:
        return {"name": self.name, "class_names": self.class_names,
                "image_shape": list(self.image_shape), "mean": self.mean.tolist(),
                "std": self.std.tolist(), "sizes": self.sizes}  # fmt: skip

    def differences(self, other: "DatasetInfo") -> list[str]:
        """The fields that tell `other` (the data read again) from this (what a run trained on):
        class_names, image_shape, mean, std."""
        same = {
            "class_names": list(self.class_names) == list(other.class_names),
            "image_shape": tuple(self.image_shape) == tuple(other.image_shape),
            "mean": np.array_equal(np.float32(self.mean), np.float32(other.mean)),
            "std": np.array_equal(np.float32(self.std), np.float32(other.std)),
        }
        return [name for name, equal in same.items() if not equal]


@dataclass(frozen=True)
class TrainedModel:
    """A run's network: its model config, Flax module and final variables (`{"params": ...}` and
    any running statistics)."""

    config: ModelConfig
    module: Any  # flax.linen.Module
    variables: dict
    arch: Any = None  # the resolved layers (cnnlab.architecture); None for one's own module

    def layers(self):
        """The resolved layers, resolved here where whoever built this had none at hand."""
        from cnnlab.architecture import resolve

        return self.arch or resolve(self.config)


class RunDir:
    """One run's folder, as cnnlab-train writes it and everything after reads it: config.yaml
    (the resolved config), dataset.json, metrics.jsonl, summary.json, layers.txt and checkpoint/
    (the final variables), beside Hydra's .hydra/. A multi-seed run has one per seed_<s>/."""

    # what a finished run holds (what its pictures are drawn from)
    FINISHED = ("config.yaml", "dataset.json", "metrics.jsonl", "checkpoint")

    def __init__(self, path: Path):
        self.path = Path(path)
        self.checkpoint = self.path / "checkpoint"

    def write(self, cfg: Config, data: Dataset) -> None:
        """config.yaml and dataset.json, at the start of a run."""
        self.write_config(cfg)
        info = json.dumps(DatasetInfo.of(data).to_json(), indent=2)
        (self.path / "dataset.json").write_text(info + "\n")

    def write_config(self, cfg: Config) -> None:
        """config.yaml alone: the record of a sweep point that trains nothing."""
        (self.path / "config.yaml").write_text(to_yaml(cfg))

    def config(self) -> Config:
        """The run's config. A key it lacks has its default (it was added to cnnlab since, with a
        default that computes what the run computed); a key cnnlab no longer knows is an error."""
        path = self.path / "config.yaml"
        self.check("config.yaml")
        try:
            return from_dict(yaml.safe_load(path.read_text()) or {})
        except (yaml.YAMLError, ConfigError) as e:
            raise CnnlabError(
                f"cannot read {path}: {str(e).splitlines()[0]} (written by another cnnlab version?)"
            ) from e

    def config_tree(self) -> dict[str, Any]:
        """The config as plain nested values, for a report: config.yaml, else Hydra's copy in
        .hydra/ (a job that failed before writing config.yaml), else {}; unreadable counts as
        absent, and keys are kept whether cnnlab knows them or not."""
        for path in (self.path / "config.yaml", self.path / ".hydra" / "config.yaml"):
            tree = _read_yaml(path)
            if isinstance(tree, dict):
                return tree
        return {}

    def overrides(self) -> list[str]:
        """The job's Hydra overrides, "key=value" (.hydra/overrides.yaml), [] if unrecorded."""
        listed = _read_yaml(self.path / ".hydra" / "overrides.yaml")
        return [str(o) for o in listed] if isinstance(listed, list) else []

    def dataset(self) -> DatasetInfo:
        self.check("dataset.json")
        meta = json.loads((self.path / "dataset.json").read_text())
        return DatasetInfo(
            meta["name"], meta["class_names"], tuple(meta["image_shape"]),
            np.float32(meta["mean"]), np.float32(meta["std"]), meta.get("sizes", {}),
        )  # fmt: skip

    def metrics(self) -> list[dict]:
        """The records of metrics.jsonl, [] without one (a line cut short by a kill is skipped)."""
        path, records = self.path / "metrics.jsonl", []
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def summary(self) -> dict | None:
        """summary.json, None where it is missing or unreadable (a job that did not finish)."""
        try:
            summary = json.loads((self.path / "summary.json").read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        return summary if isinstance(summary, dict) else None

    def layers(self) -> str:
        """layers.txt, the per-layer table; "" if absent."""
        path = self.path / "layers.txt"
        return path.read_text() if path.is_file() else ""

    def check(self, *names: str) -> None:
        """Raise CnnlabError unless the folder holds the files `names`: without config.yaml or
        dataset.json it holds no run, without another one (FINISHED) a run that did not finish."""
        if not self.path.is_dir():
            raise CnnlabError(f"no run directory at {self.path}")
        missing = [n for n in names if not (self.path / n).exists()]
        unstarted = [n for n in missing if n in ("config.yaml", "dataset.json")]
        if unstarted:
            raise CnnlabError(
                f"{self.path} is not a cnnlab run directory (no {' or '.join(unstarted)}): pass "
                "a folder that cnnlab-train wrote (for a multi-seed run, one of its seed_<s>/)"
            )
        if missing:
            raise CnnlabError(
                f"{self.path} holds no finished run (no {' or '.join(missing)}): it is still "
                "running or it ended without status ok (see its summary.json)"
            )

    def load_model(self) -> TrainedModel:
        """The run's network with its final variables: config -> module -> checkpoint/."""
        from cnnlab import checkpoint
        from cnnlab.models import build_model, resolve, variables_like

        self.check("config.yaml", "dataset.json", "checkpoint")
        cfg, info = self.config().model, self.dataset()
        arch = None if cfg._target_ else resolve(cfg)
        module = build_model(arch or cfg, len(info.class_names))
        like = variables_like(module, info.image_shape)
        variables = checkpoint.load_variables(self.checkpoint, like)
        return TrainedModel(cfg, module, variables, arch)


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text()) if path.is_file() else None
    except (yaml.YAMLError, UnicodeDecodeError):
        return None


# The sweep's done-index: finished sweep points recorded by config hash, so that a rerun of a
# sweep copies an identical point instead of training it again (`sweep.skip_done`).

# What a finished run leaves that a skipped, identical sweep point copies.
RESULT_FILES = (
    "summary.json",
    "metrics.jsonl",
    "layers.txt",
    "dataset.json",
    "confusion_matrix.csv",
)


def done_index(job_dir: Path) -> Path:
    """Where the finished points of a sweep job's experiment are recorded: beside the timestamped
    sweep folders of one experiment (multirun/<name>/.done/), so that rerunning a sweep finds
    them. `job_dir` is a job's folder, multirun/<name>/<timestamp>/<job number>."""
    return job_dir.parents[1] / ".done"


def copy_done(cfg: Config, job_dir: Path) -> dict | None:
    """The summary of an identical point that already finished, with its result files copied
    into `job_dir` and `cached_from` naming its folder; None if there is none."""
    import json

    from cnnlab.config import config_hash
    from cnnlab.tracking.local import write_json

    entry = done_index(job_dir) / f"{config_hash(cfg)}.json"
    if not entry.is_file():
        return None
    source = Path(json.loads(entry.read_text())["run_dir"])
    if not (source / "summary.json").is_file():
        return None  # the earlier result was deleted: train again
    _copy_results(source, job_dir, RESULT_FILES)
    for seed in cfg.seeds:  # a seeds job's points are its seed folders (cnnlab.report.collect)
        folder = f"seed_{seed}"
        _copy_results(source / folder, job_dir / folder, ("config.yaml", *RESULT_FILES))
    summary = json.loads((job_dir / "summary.json").read_text())
    summary["cached_from"] = str(source)
    write_json(job_dir / "summary.json", summary)
    return summary


def _copy_results(source: Path, target: Path, names: tuple[str, ...]) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


def record_done(cfg: Config, job_dir: Path) -> None:
    """Record `job_dir` as the finished run of `cfg`'s config hash."""
    from cnnlab.config import config_hash
    from cnnlab.tracking.local import write_json

    index = done_index(job_dir)
    index.mkdir(parents=True, exist_ok=True)
    write_json(index / f"{config_hash(cfg)}.json", {"run_dir": str(job_dir)})
