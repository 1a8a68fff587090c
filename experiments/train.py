"""`cnnlab-train [overrides]`: train one configuration, or a sweep with `-m` or a `sweep=` preset.

Each job writes its run directory (Hydra's `hydra.run.dir`, or `hydra.sweep.dir/<job number>`):
config.yaml, dataset.json, layers.txt, metrics.jsonl, confusion_matrix.csv, summary.json,
checkpoint/ and, unless W&B is disabled, wandb/.
With `seeds=[...]` each seed writes those files to `seed_<s>/`, with its own W&B run, and the
job's summary.json aggregates them (cnnlab.train.seeds).

In a sweep, every job stands alone: an impossible point is recorded as status "invalid" and not
trained, a failing or diverging job records its error and the others go on, and a point whose
config hash already finished under the same `multirun/<name>/` folder is copied, not retrained
(cnnlab.rundir.copy_done).
"""

import dataclasses
import os
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from cnnlab.config import Config, LoggerConfig
from cnnlab.errors import CnnlabError, ConfigError
from experiments.hydra_conf import (
    entry_point,
    exit_on_user_error,
    run_app,
    sweep_group,
    to_config,
)

# JAX, Flax and the training code load inside the functions that use them (a second on start):
# a mistake found while composing the config answers without them.

FAILED = float("nan")  # the objective of a job that did not finish


@dataclasses.dataclass
class Job:
    """The Hydra job being run."""

    run_dir: Path
    num: int  # its number in a sweep
    multirun: bool
    swept: list[str]  # its command-line overrides, W&B tags in a sweep

    @classmethod
    def current(cls) -> "Job":
        hydra = HydraConfig.get()
        run_dir, multirun = Path(hydra.runtime.output_dir), hydra.mode == RunMode.MULTIRUN
        num = hydra.job.num if multirun else 0  # unset outside a sweep
        return cls(run_dir, num, multirun, list(hydra.overrides.task))

    @property
    def name(self) -> str:
        """Its W&B name: `<name>/<run folder>`, or `<name>/<timestamp>/<job>` in a sweep."""
        return str(self.run_dir.relative_to(self.run_dir.parents[1]))


def train(node: DictConfig) -> float:
    """One Hydra job. Returns the best validation accuracy (with `seeds`, its mean over them), the
    objective for sweepers such as Optuna's (NaN for a job that did not finish, which Optuna
    records as a failed trial). A user's mistake ends a single run with one line; in a sweep it
    ends only its job, as does a crash, whose traceback is in the job's summary.json."""
    from cnnlab.rundir import check_run_dir, need_bytes
    from cnnlab.train.preemption import Preemption

    job, preemption = Job.current(), Preemption()
    try:
        cfg = to_config(node, job.swept)
        if not _valid(cfg, job):
            return FAILED
        check_run_dir(job.run_dir, need_bytes(cfg))  # before hours of training, not after
        _start_jax(cfg, job.multirun)  # JAX, Flax and the training code load from here on
        with preemption:  # SIGTERM/SIGUSR1/SIGUSR2 (SLURM's warnings) save and end the run
            summary = _run(cfg, job, preemption)
    except CnnlabError as e:
        if not job.multirun:
            exit_on_user_error(e)
        print(f"cnnlab: error in job {job.num}: {e}", file=sys.stderr)
        return FAILED
    except Exception as e:
        if not job.multirun:
            raise
        print(f"cnnlab: job {job.num} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return FAILED
    if summary["status"] != "ok":
        print(f"cnnlab: {summary['status']}: {summary['error']} ({job.run_dir})", file=sys.stderr)
        preemption.finish()  # after a signal: requeue (submitit) or exit as the signal would
        if not job.multirun:
            sys.exit(1)
        return FAILED
    best = summary.get("val/best_accuracy")  # null without a validation split
    return FAILED if best is None else best  # over seeds: their mean


def _valid(cfg: Config, job: Job) -> bool:
    """Validate `cfg` before W&B starts, so that a bad value leaves no W&B run behind. An invalid
    sweep point is recorded in its folder as status "invalid" and not trained."""
    from cnnlab.rundir import RunDir
    from cnnlab.tracking.local import write_json
    from cnnlab.validate import validate

    try:
        validate(cfg)
    except ConfigError as e:
        if not job.multirun:
            raise
        job.run_dir.mkdir(parents=True, exist_ok=True)
        RunDir(job.run_dir).write_config(cfg)
        write_json(job.run_dir / "summary.json", {"status": "invalid", "error": str(e)})
        print(f"cnnlab: job {job.num} is invalid, not trained: {e}", file=sys.stderr)
        return False
    return True


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
        # programs that compile faster than they load are not worth a file; JAX's own variable
        # sets another threshold (the tests set 0, so that a fast machine caches the same)
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    if cfg.distributed.enabled:  # multi-host: join the other processes before JAX starts
        initialize_distributed(cfg.distributed)
    if cfg.deterministic and (warning := determinism.warning(jax.default_backend(), cfg.model)):
        print(f"cnnlab: warning: {warning}", file=sys.stderr)


def _run(cfg: Config, job: Job, stop) -> dict:
    """Train the job (or copy an identical finished sweep point) and return its summary."""
    import jax

    from cnnlab.rundir import RunDir, copy_done, record_done
    from cnnlab.tracking import MakeTrackers
    from cnnlab.train.run import run
    from cnnlab.train.seeds import run_seeds

    skip_done = job.multirun and cfg.sweep.skip_done
    if skip_done and (summary := copy_done(cfg, job.run_dir)):
        RunDir(job.run_dir).write_config(cfg)
        print(f"cnnlab: job {job.num} already done in {summary['cached_from']}")
        return summary
    config = dataclasses.asdict(cfg)  # for W&B, as the user set it
    cfg = dataclasses.replace(cfg, logger=_logger(cfg.logger, job))
    primary = jax.process_index() == 0  # every process trains; the first one keeps the record
    if cfg.seeds:  # one model per seed, each in its own seed_<s>/ folder and W&B run
        logger = dataclasses.replace(
            cfg.logger, group=cfg.logger.group or job.name, tags=[*cfg.logger.tags[:63], "seeds"]
        )
        trackers = MakeTrackers(logger, config, job.name, primary, seeds=True)
        summary = run_seeds(cfg, job.run_dir, trackers, stop=stop)
    else:
        trackers = MakeTrackers(cfg.logger, config, job.name, primary)
        summary = run(cfg, job.run_dir, trackers(cfg, job.run_dir), stop=stop)
    if skip_done and summary["status"] == "ok" and primary:
        record_done(cfg, job.run_dir)
    if summary["status"] == "ok":
        _print_result(summary, job.run_dir)
    return summary


def _logger(logger: LoggerConfig, job: Job) -> LoggerConfig:
    """In a sweep: one W&B group per sweep, and each job tagged with its values."""
    if not job.multirun:
        return logger
    swept = [o for o in job.swept if not o.startswith(("hydra", "logger"))]
    tags = [tag[:64] for tag in [*logger.tags, *swept][:64]]  # W&B: 64 tags of 64 characters
    return dataclasses.replace(
        logger, group=logger.group or sweep_group(job.run_dir.parent), tags=tags
    )


def _print_result(summary: dict, run_dir: Path) -> None:
    accuracy, seconds = f"{summary['test/accuracy']:.4f}", summary["wall_seconds"]
    if "seeds" in summary:
        spread, n = summary["test/accuracy_std"], len(summary["seeds"])
        accuracy = f"{accuracy} +- {spread:.4f} (mean and std of {n} seeds)"
    print(f"cnnlab: ok: test accuracy {accuracy} in {seconds:.0f}s, run directory {run_dir}")


@entry_point
def main() -> None:
    run_app(train)


if __name__ == "__main__":
    main()
