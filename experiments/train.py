"""`cnnlab-train [overrides]`: train one configuration, or a sweep with `-m` or a `sweep=` preset.

Each job writes its run directory (Hydra's `hydra.run.dir`, or `hydra.sweep.dir/<job number>`):
config.yaml, dataset.json, layers.txt, metrics.jsonl, confusion_matrix.csv, summary.json,
checkpoint/ and, unless W&B is disabled, wandb/.
With `seeds=[...]` each seed writes those files to `seed_<s>/`, with its own W&B run, and the
job's summary.json aggregates them (cnnlab.train.seeds).

In a sweep, every job stands alone: an impossible point is recorded as status "invalid" and not
trained, a failing or diverging job records its error and the others go on, and a point whose
config hash already finished under the same `multirun/<name>/` folder is copied, not retrained.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cnnlab.config import Config, LoggerConfig, config_hash, from_omegaconf
from cnnlab.errors import CnnlabError, ConfigError

# JAX, Flax and the training code load inside the functions that use them (a second on start):
# a mistake that Hydra catches while composing the config answers without them.
if TYPE_CHECKING:
    from cnnlab.tracking import Trackers
    from cnnlab.tracking.wandb_run import WandbTracker
    from cnnlab.train.seeds import MakeTracker
from experiments.hydra_conf import (
    conf_dir,
    exit_on_user_error,
    hydra_errors_in_one_line,
    register_schema,
)

FAILED = float("nan")  # the objective of a job that did not finish

# What a finished run leaves that a skipped, identical sweep point copies.
RESULT_FILES = (
    "summary.json",
    "metrics.jsonl",
    "layers.txt",
    "dataset.json",
    "confusion_matrix.csv",
)


def done_index(sweep_dir: Path) -> Path:
    """Where finished sweep points are recorded by config hash: beside the timestamped sweep
    folders of one experiment (multirun/<name>/.done/), so that rerunning a sweep finds them."""
    return sweep_dir.parent / ".done"


def sweep_group(sweep_dir: Path) -> str:
    """The W&B group of a sweep's jobs and its report run: `<name>/<timestamp>`."""
    return str(sweep_dir.relative_to(sweep_dir.parents[1]))


def _start_jax(cfg: Config, multirun: bool) -> None:
    """Process-wide JAX settings, before the first computation."""
    import jax

    from cnnlab import determinism, malloc
    from cnnlab.parallel import initialize_distributed

    malloc.limit_arenas(cfg.malloc_arenas)  # before XLA starts its threads
    if multirun:  # parallel jobs on one GPU must not each take 75% of its memory
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if cfg.deterministic:  # XLA reads its flags when the backend starts, below at the latest
        os.environ["XLA_FLAGS"] = determinism.with_xla_flags(os.environ.get("XLA_FLAGS", ""))
    if cfg.compilation_cache:
        path = Path(cfg.compilation_cache).expanduser()
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    if cfg.distributed.enabled:  # multi-host: join the other processes before JAX starts
        initialize_distributed(cfg.distributed)
    if cfg.deterministic and (warning := determinism.warning(jax.default_backend(), cfg.model)):
        print(f"cnnlab: warning: {warning}", file=sys.stderr)


def _copy_done(cfg: Config, run_dir: Path, index: Path) -> dict | None:
    """The summary of an identical point that already finished, copied into `run_dir`."""
    from cnnlab.tracking.local import write_json

    entry = index / f"{config_hash(cfg)}.json"
    if not entry.is_file():
        return None
    source = Path(json.loads(entry.read_text())["run_dir"])
    if not (source / "summary.json").is_file():
        return None  # the earlier result was deleted: train again
    for name in RESULT_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, run_dir / name)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["cached_from"] = str(source)
    write_json(run_dir / "summary.json", summary)
    return summary


def _record_done(cfg: Config, run_dir: Path, index: Path) -> None:
    from cnnlab.tracking.local import write_json

    index.mkdir(parents=True, exist_ok=True)
    write_json(index / f"{config_hash(cfg)}.json", {"run_dir": str(run_dir)})


def _run_name(run_dir: Path) -> str:
    """A run's W&B name: `<name>/<run folder>`, or `<name>/<timestamp>/<job>` in a sweep."""
    return str(run_dir.relative_to(run_dir.parents[1]))


def _sweep_logger(cfg: Config, hydra_cfg) -> None:
    """In a sweep: one W&B group per sweep, and each job tagged with its values."""
    if hydra_cfg.mode == RunMode.MULTIRUN:
        swept = [o for o in hydra_cfg.overrides.task if not o.startswith(("hydra", "logger"))]
        cfg.logger.group = cfg.logger.group or sweep_group(
            Path(hydra_cfg.runtime.output_dir).parent
        )
        # W&B allows 64 tags of at most 64 characters
        cfg.logger.tags = [tag[:64] for tag in [*cfg.logger.tags, *swept][:64]]


def _wandb_tracker(cfg: Config, node: DictConfig, hydra_cfg, run_dir: Path) -> WandbTracker:
    from cnnlab.tracking.wandb_run import WandbTracker

    _sweep_logger(cfg, hydra_cfg)
    config = OmegaConf.to_container(node, resolve=True)
    return WandbTracker(cfg.logger, run_dir, config, _run_name(run_dir))


def _seed_trackers(cfg: Config, node: DictConfig, hydra_cfg, run_dir: Path) -> MakeTracker:
    """Each seed's tracker: its local files, and a W&B run `<run name>-seed<s>` in one group (the
    logger's, else the sweep's, else `<name>/<run folder>`), tagged `seeds`."""
    import jax

    _sweep_logger(cfg, hydra_cfg)
    name = _run_name(run_dir)
    logger = dataclasses.replace(
        cfg.logger, group=cfg.logger.group or name, tags=[*cfg.logger.tags[:63], "seeds"]
    )
    config = OmegaConf.to_container(node, resolve=True)
    primary = jax.process_index() == 0  # every process trains; the first one keeps the record
    return SeedTrackers(logger, config, name, primary)


@dataclasses.dataclass
class SeedTrackers:
    """`(seed's config, its folder) -> its trackers`; a class, not a closure, so that it pickles
    into the seeds' processes (`seeds_strategy=processes`)."""

    logger: LoggerConfig
    config: dict  # the job's resolved config, for W&B
    name: str  # the job's run name; a seed's W&B run is `<name>-seed<s>`
    primary: bool

    def __call__(self, one: Config, folder: Path) -> Trackers:
        from cnnlab.tracking import Trackers
        from cnnlab.tracking.local import LocalTracker
        from cnnlab.tracking.wandb_run import WandbTracker

        if not self.primary:
            return Trackers()
        wandb = None
        if self.logger.mode != "disabled":
            seed_config = {**self.config, "seed": one.seed, "seeds": []}
            wandb = WandbTracker(
                self.logger, folder, seed_config, f"{self.name}-seed{one.seed}", concurrent=True
            )
        return Trackers(LocalTracker(folder), wandb)


def train(node: DictConfig) -> float:
    """One Hydra job. Returns the best validation accuracy (with `seeds`, its mean over them), the
    objective for sweepers such as Optuna's (NaN for a job that did not finish, which Optuna
    records as a failed trial)."""
    from cnnlab.rundir import check_run_dir, need_bytes
    from cnnlab.tracking.local import write_json
    from cnnlab.train.preemption import Preemption
    from cnnlab.validate import validate

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    run_dir = Path(hydra_cfg.runtime.output_dir)
    summary: dict = {}
    preemption = Preemption()
    try:
        cfg = from_omegaconf(node)
        try:
            validate(cfg)  # before W&B starts: a bad value must not leave a W&B run behind
        except ConfigError as e:
            if not multirun:
                raise
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(node))
            write_json(run_dir / "summary.json", {"status": "invalid", "error": str(e)})
            print(f"cnnlab: job {hydra_cfg.job.num} is invalid, not trained: {e}", file=sys.stderr)
            return FAILED
        # An unwritable folder or a full disk fails now, not at the first checkpoint.
        check_run_dir(run_dir, need_bytes(cfg))  # before hours of training, not after
        _start_jax(cfg, multirun)  # JAX, Flax and the training code load from here on
        import jax

        from cnnlab.tracking import Trackers
        from cnnlab.tracking.local import LocalTracker
        from cnnlab.train.run import run
        from cnnlab.train.seeds import run_seeds

        index = done_index(run_dir.parent)
        skip_done = multirun and cfg.sweep.skip_done and not cfg.seeds  # (seed folders: not yet)
        if skip_done and (summary := _copy_done(cfg, run_dir, index)):
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
            print(f"cnnlab: job {hydra_cfg.job.num} already done in {summary['cached_from']}")
            best = summary.get("val/best_accuracy")  # null without a validation split
            return FAILED if best is None else best
        # Every process of a multi-host run trains; the first one keeps the record.
        primary = jax.process_index() == 0
        # SIGTERM/SIGUSR1/SIGUSR2 (SLURM's warnings) save a checkpoint and end the run cleanly
        with preemption:
            if cfg.seeds:  # one model per seed, each in its own seed_<s>/ folder and W&B run
                trackers = _seed_trackers(cfg, node, hydra_cfg, run_dir)
                summary = run_seeds(cfg, run_dir, trackers, stop=preemption)
            else:
                local = LocalTracker(run_dir) if primary else None
                wandb = (
                    _wandb_tracker(cfg, node, hydra_cfg, run_dir)
                    if primary and cfg.logger.mode != "disabled"
                    else None
                )
                summary = run(cfg, run_dir, Trackers(local, wandb), stop=preemption)
        if skip_done and summary["status"] == "ok" and primary:
            _record_done(cfg, run_dir, index)
    except CnnlabError as e:
        if not multirun:
            exit_on_user_error(e)
        print(f"cnnlab: error in job {hydra_cfg.job.num}: {e}", file=sys.stderr)
        return FAILED
    except Exception as e:  # a bug or a crash: the job's summary.json has the traceback
        if not multirun:
            raise
        print(f"cnnlab: job {hydra_cfg.job.num} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return FAILED
    if summary["status"] != "ok":
        print(f"cnnlab: {summary['status']}: {summary['error']} ({run_dir})", file=sys.stderr)
        preemption.finish()  # after a signal: requeue (submitit) or exit as the signal would
        if not multirun:
            sys.exit(1)
        return FAILED
    accuracy, seconds = summary["test/accuracy"], summary["wall_seconds"]
    if "seeds" in summary:
        spread, n = summary["test/accuracy_std"], len(summary["seeds"])
        accuracy = f"{accuracy:.4f} +- {spread:.4f} (mean and std of {n} seeds)"
    else:
        accuracy = f"{accuracy:.4f}"
    print(f"cnnlab: ok: test accuracy {accuracy} in {seconds:.0f}s, run directory {run_dir}")
    return summary["val/best_accuracy"]  # over seeds: their mean


def main() -> None:
    register_schema()
    app = hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    hydra_errors_in_one_line(app(train))


if __name__ == "__main__":
    main()
