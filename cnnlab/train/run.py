"""One experiment from config to summary: data, geometry check, model, training, test, checkpoint.

`run` is what `cnnlab-train` calls for each Hydra job; it takes a plain `Config`, a run directory
and a tracker, and always finishes the tracker with a summary whose `status` says how it ended
(ok, diverged, preempted, failed, interrupted), so a failed run still leaves its record.
`train_lanes` is the one path from a prepared config to trained, tested models: one run is one
lane; the stacked seeds of `cnnlab.train.seeds` are several. Each part returns its piece of the
summary, which the caller that owns the record adds to it.
"""

import sys
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from cnnlab import checkpoint, geometry, memory
from cnnlab.architecture import Architecture
from cnnlab.checkpoint import Checkpoints
from cnnlab.config import CheckpointConfig, Config
from cnnlab.data import Dataset, data_shape, load_dataset
from cnnlab.errors import ConfigError
from cnnlab.models import build_model
from cnnlab.parallel import data_mesh, put, put_dataset, replicated
from cnnlab.preprocess import check_augment
from cnnlab.rundir import RunDir, TrainedModel
from cnnlab.tracking import Tracker
from cnnlab.train.loop import (
    FitResult,
    Hooks,
    Lanes,
    LoopState,
    batch_size,
    evaluate,
    fit,
    never,
)
from cnnlab.train.losses import LOSSES
from cnnlab.train.optim import build_optimizer
from cnnlab.train.progress import Progress
from cnnlab.train.step import (
    StepSettings,
    TrainState,
    make_eval_step,
    make_init,
    make_train_step,
    variables,
)
from cnnlab.validate import check_devices, check_series, validate


@dataclass
class Prepared:
    """What the seeds of one config share: the data, on the host and on the device, the model, the
    optimizer and the jitted steps (built once, so later seeds recompile no step). It is the
    loop's `cnnlab.train.loop.Task`."""

    data: Dataset
    rows: list[geometry.Layer]  # the per-layer table
    model: nn.Module
    tx: optax.GradientTransformation
    schedule: Callable[[int], float]
    mesh: Mesh
    train_step: Callable
    eval_step: Callable
    train: tuple[jax.Array, jax.Array]  # (images, labels) on the device
    val: tuple[jax.Array, jax.Array]
    test: tuple[jax.Array, jax.Array]
    init: Callable[[jax.Array], TrainState]  # key(s) -> the initial state (`make_init`)
    stacked: bool = False  # the train step trains stacked models (`make_train_step(lanes=True)`)
    arch: Architecture | None = None  # the network's resolved layers; None for one's own module


def prepare(cfg: Config, lanes: bool = False, data: Dataset | None = None) -> Prepared:
    """Validate, load the data, check the geometry and build the steps; `lanes` vmaps the train
    step over stacked models (`make_train_step`). `data`: a Dataset built in code (series
    [N, L, C] too) to train on as it is, instead of loading `cfg.data.name` (so the hold-out and
    limits of `cfg.data` do not apply)."""
    arch = validate(cfg, data_given=data is not None)  # and the geometry where the shape is known
    check_devices(cfg.train, jax.device_count(), jax.default_backend())
    data = load_dataset(cfg.data) if data is None else data
    check_augment(cfg.data.augment, data.image_shape, data.train.images.dtype)
    batch = batch_size(cfg.train, len(data.train))
    if len(data.train) < batch:
        raise ConfigError(
            f"train.batch_size={batch} is more than the {len(data.train)} "
            "training examples; lower it, or raise data.train_limit"
        )
    rows = geometry.layers(cfg.model, data.image_shape, data.num_classes, arch)
    check_series(cfg, arch, data)  # the shortest of unequal lengths, too
    _check_memory(cfg, rows, data)
    model = build_model(arch or cfg.model, data.num_classes)
    steps_per_epoch = len(data.train) // batch
    tx, schedule = build_optimizer(cfg.optimizer, steps_per_epoch, cfg.train.epochs)
    mesh = data_mesh()  # every device; the batch is split over them (cnnlab.parallel)
    loss_fn = LOSSES[cfg.loss.name]
    mean, std = data.mean.astype(np.float32), data.std.astype(np.float32)
    precision = cfg.train.precision
    settings = StepSettings(
        loss_fn, cfg.loss.label_smoothing, mean, std, cfg.data.augment, precision
    )
    train_step = make_train_step(settings, mesh, lanes)
    eval_step = make_eval_step(model.apply, loss_fn, mean, std, precision, mesh)
    device = lambda split: put_dataset((split.examples, split.labels), mesh)  # Padded too
    init = make_init(model, tx, data.image_shape, mesh, lanes)
    return Prepared(
        data, rows, model, tx, schedule, mesh, train_step, eval_step,
        device(data.train), device(data.val), device(data.test), init, lanes, arch,
    )  # fmt: skip


def _check_memory(cfg: Config, rows: list[geometry.Layer], data: Dataset) -> None:
    """A training step's memory against the first device's, before anything compiles. On the CPU
    `validate` checked the whole against the machine's memory where the input shape is known;
    otherwise the loaded dataset is already in the memory that is left (the device shares it), so
    only the model's part is checked."""
    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    if on_cpu and data_shape(cfg.data) is not None:
        return
    held = 0 if on_cpu else memory.loaded_bytes(data)
    est = memory.estimate(cfg, rows, held, jax.device_count())
    if on_cpu:
        memory.check(est, memory.host_available())
    else:
        memory.check(est, memory.device_available(device), f"{device.platform} device 0")


def new_summary(cfg: Config) -> dict:
    """A run's summary before it starts: `failed` until it ends otherwise."""
    summary: dict = {"status": "failed", "model": cfg.model.name, "dataset": cfg.data.name}
    summary.update(seed=cfg.seed, backend=jax.default_backend(), devices=jax.device_count())
    summary.update(processes=jax.process_count())
    return summary


@contextmanager
def recording(summary: dict, finish: Callable[[dict], None]):
    """Whatever happens inside, `summary` gets the wall time and any error and goes to `finish`
    (a tracker's), so a failed or interrupted run still leaves its record."""
    start = time.perf_counter()
    try:
        yield summary
    except KeyboardInterrupt:
        summary.update(status="interrupted", error="interrupted by the user")
        raise
    except Exception as e:
        summary.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        raise
    finally:
        summary["wall_seconds"] = round(time.perf_counter() - start, 3)
        finish(summary)


@dataclass
class Lane:
    """One model of `train_lanes`: its config, run directory, tracker, and the summary that its
    `recording` will finish."""

    cfg: Config
    folder: Path
    tracker: Tracker
    summary: dict = field(default_factory=dict)


def run(
    cfg: Config,
    run_dir: Path,
    tracker: Tracker,
    progress: Progress | None = None,
    prepared: Prepared | None = None,
    stop: Callable[[], bool] = never,
) -> dict:
    """Train and test one configuration; returns the summary written to `summary.json`.

    A run directory that already holds checkpoints resumes from the newest good one. `stop`
    (e.g. `cnnlab.train.preemption.Preemption`) turning true saves a checkpoint and ends the run
    with status `preempted`. `prepared` (from `prepare(cfg)` of a config that differs at most in
    its seed) reuses the data and the compiled steps of an earlier run.
    """
    run_dir = Path(run_dir)
    with recording(new_summary(cfg), tracker.finish) as summary:
        prepared = prepared or prepare(cfg)
        train_lanes(cfg, run_dir, [Lane(cfg, run_dir, tracker, summary)], prepared, stop, progress)
    return summary


def train_lanes(
    cfg: Config,
    run_dir: Path,
    lanes: list[Lane],
    prepared: Prepared,
    stop: Callable[[], bool] = never,
    progress: Progress | None = None,
) -> None:
    """Train and test one model per lane (stacked when `prepared.stacked`, else one), adding
    each part of their records to their summaries as it comes. The training state's checkpoints
    are in `<run_dir>/checkpoints/`, with each lane's tracker history."""
    for lane in lanes:
        lane.summary.update(start_run(lane.cfg, lane.folder, lane.tracker, prepared))
    state, train_key = initial_state(prepared, [lane.cfg.seed for lane in lanes])
    primary = jax.process_index() == 0
    checkpoints = Checkpoints(run_dir / "checkpoints", cfg.checkpoint.keep, cfg, primary)
    marks = LaneTrackers([lane.tracker for lane in lanes]) if prepared.stacked else lanes[0].tracker
    try:
        start = starting_state(cfg, checkpoints, state, prepared.mesh, marks)
        for lane in lanes:
            lane.summary.update(start.summary)
        saver = CheckpointSaver(checkpoints, cfg.checkpoint, marks)
        hooks = Hooks([lane.tracker.log for lane in lanes], saver, stop, progress)
        seeds = [lane.cfg.seed for lane in lanes]
        lanes_fit = Lanes(seeds, train_key, prepared.stacked)
        results = fit(start.state, prepared, cfg.train, lanes_fit, hooks, start.loop)
        checkpoints.wait()
    finally:
        checkpoints.close()
    for result, lane in zip(results, lanes, strict=True):
        lane.summary.update(end_run(result, prepared, lane.cfg, lane.folder, lane.tracker))


def initial_state(prepared: Prepared, seeds: list[int]) -> tuple[TrainState, jax.Array]:
    """The state each seed initializes (stacked when `prepared.stacked`) and the train key(s)
    on the mesh: the two halves of `jax.random.key(seed)`."""
    if prepared.stacked:
        keys = jnp.stack([jax.random.split(jax.random.key(seed)) for seed in seeds])  # [S, 2]
        init_key, train_key = keys[:, 0], keys[:, 1]  # [S]
    else:
        (seed,) = seeds
        init_key, train_key = jax.random.split(jax.random.key(seed))
    return prepared.init(init_key), put(train_key, replicated(prepared.mesh))


def start_run(cfg: Config, run_dir: Path, tracker: Tracker, prepared: Prepared) -> dict:
    """The files and records of a run that come before training; returns its geometry summary."""
    if jax.process_index() == 0:  # the processes of a multi-host run share the run directory
        RunDir(run_dir).write(cfg, prepared.data)
    tracker.log_layers(prepared.rows)
    return geometry.summarize(prepared.rows)


def end_run(
    result: FitResult, prepared: Prepared, cfg: Config, run_dir: Path, tracker: Tracker
) -> dict:
    """Test a trained model, save its variables, draw its pictures (`logger.pictures`); returns
    its part of the summary (a diverged one only gets its error)."""
    lane, model_vars, step = result.record, variables(result.state), int(result.state.step)
    part = {
        "status": lane.status,
        "epochs": lane.epochs,
        "steps": step,
        "compile_seconds": round(lane.compile_seconds, 3),
        "images_per_second": round(lane.images_per_second, 1),
        "val/best_accuracy": lane.best_val_accuracy,
        "val/best_epoch": lane.best_epoch,
        **{k: v for k, v in lane.last.items() if k.startswith("train/")},
    }
    if lane.status != "ok":
        return {**part, "error": lane.message}
    test = evaluate(prepared.eval_step, model_vars, *prepared.test, cfg.train.eval_batch_size)
    tracker.log({"test/loss": test.loss, "test/accuracy": test.accuracy}, step)
    part.update({"test/accuracy": test.accuracy, "test/loss": test.loss})
    # CI compares it between two runs of one config: equal exactly when bit-identical
    part["params_sha256"] = checkpoint.tree_sha256(jax.device_get(result.state.params))
    data = prepared.data
    tracker.log_predictions(data.test.images, data.test.labels, test.probs, data.class_names)
    checkpoint.save_variables(run_dir / "checkpoint", model_vars)  # replaces a stale one
    if cfg.logger.pictures and jax.process_index() == 0:
        model = TrainedModel(cfg.model, prepared.model, jax.device_get(model_vars), prepared.arch)
        part.update(draw_pictures(model, data, test.probs, run_dir, tracker))
    return part


def draw_pictures(
    model: TrainedModel, data: Dataset, probs: np.ndarray, run_dir: Path, tracker: Tracker
) -> dict[str, float]:
    """The pictures of `cnnlab.report.pictures` in `<run_dir>/pictures/`, logged to the trackers;
    returns the summary's `pictures_seconds`. A picture that cannot be drawn costs a warning, never
    the trained run."""
    from cnnlab.report import pictures  # matplotlib: only runs that draw load it

    start = time.perf_counter()
    try:
        records = RunDir(run_dir).metrics()
        pics = pictures.run_pictures(model, data, probs, records)
        paths = pictures.draw_run(pics, Path(run_dir) / "pictures")
    except Exception as e:
        print(f"cnnlab: warning: pictures not drawn ({type(e).__name__}: {e})", file=sys.stderr)
        return {}
    tracker.log_pictures(paths)
    return {"pictures_seconds": round(time.perf_counter() - start, 3)}


class CheckpointSaver:
    """The loop's checkpoints (`cnnlab.train.loop.Saver`): the training state, the loop's position
    and the trackers' (how much of metrics.jsonl belongs to the history up to that step)."""

    def __init__(self, checkpoints: Checkpoints, cfg: CheckpointConfig, tracker: Tracker):
        self.checkpoints, self.cfg, self.tracker = checkpoints, cfg, tracker

    def due(self, step: int) -> bool:
        return bool(self.cfg.every_steps) and step % self.cfg.every_steps == 0

    def due_after_epoch(self, epoch: int) -> bool:
        return epoch % self.cfg.every_epochs == 0

    def save(self, state: TrainState, loop: LoopState, lanes: list[int] | None) -> bool:
        meta = {"loop": loop.to_json(), "trackers": self.tracker.mark()}
        return self.checkpoints.save(loop.step, state_tree(state), meta, lanes)


class LaneTrackers:
    """Stacked lanes' trackers as the one tracker a checkpoint marks and a resume rewinds."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def mark(self) -> dict:
        return {str(i): t.mark() for i, t in enumerate(self.trackers)}

    def rewind(self, mark: dict) -> None:
        for i, t in enumerate(self.trackers):
            t.rewind(mark[str(i)])


def state_tree(state: TrainState) -> dict:
    """What a training checkpoint holds of `state`: the step, parameters, optimizer state and,
    for a model with batch normalization, its running statistics."""
    return {"step": state.step, "opt_state": state.opt_state, **variables(state)}


@dataclass
class Start:
    """Where training starts: the state, the loop's position when resuming, and the summary's
    record of it (`resumed_from_step` or `init_from`)."""

    state: TrainState
    loop: LoopState | None = None
    summary: dict = field(default_factory=dict)


def starting_state(
    cfg: Config, checkpoints: Checkpoints, state: TrainState, mesh: Mesh, tracker
) -> Start:
    """The newest good checkpoint of this run directory (`tracker`'s history rewound to it), else
    `state`, with the parameters of `checkpoint.init_from` where it is set."""
    ckpt = cfg.checkpoint
    if checkpoints.steps() and not ckpt.resume:
        raise ConfigError(
            f"{checkpoints.directory} already holds checkpoints and checkpoint.resume=false: "
            "give this run a new directory (hydra.run.dir=...), or resume it"
        )
    restored = checkpoints.restore(state_tree(state)) if ckpt.resume else None
    if restored is not None:
        tracker.rewind(restored.meta["trackers"])
        print(f"cnnlab: resuming from step {restored.step} ({checkpoints.directory})")
        loop = LoopState.from_json(restored.meta["loop"])
        state = state.replace(**put(restored.state, replicated(mesh)))
        return Start(state, loop, {"resumed_from_step": restored.step})
    if ckpt.init_from:
        loaded = checkpoint.load_init_variables(Path(ckpt.init_from), variables(state), cfg)
        return Start(state.replace(**loaded), None, {"init_from": str(ckpt.init_from)})
    return Start(state)
