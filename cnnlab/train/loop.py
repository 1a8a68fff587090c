"""The training loop: epochs of jitted steps, periodic validation, metrics through a callback.

Randomness is explicit and derived from the seed alone: epoch `e` visits the training examples in
the order `np.random.default_rng([seed, e]).permutation(N)` (the last partial batch is dropped),
and step `s` draws its dropout and augmentation from `fold_in(train_key, s)`. Metrics stay on the
device and are fetched only every `log_every_steps` steps.

The loop trains S models at once ("lanes", one per seed) when the state and the step are vmapped
(`Lanes.stacked`, used by `cnnlab.train.seeds`); one model is one lane, unstacked. Its position
is a `LoopState`, which is also what a checkpoint stores beside the training state: passing it
back continues exactly where the loop was.

Glossary: `N` examples in a split, `B` batch, `K` classes, `S` lanes (models trained at once).
"""

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import jax
import numpy as np

from cnnlab.config import TrainConfig
from cnnlab.train.progress import Progress
from cnnlab.train.step import TrainState, variables

LogFn = Callable[[dict[str, float], int], None]


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    probs: np.ndarray  # [N, K] softmax outputs


@dataclass
class LaneRecord:
    """How one lane's training went: what its summary reports."""

    status: str = "ok"  # ok | diverged | preempted
    message: str = ""
    epochs: int = 0  # epochs completed
    best_val_accuracy: float = float("nan")
    best_epoch: int = 0
    compile_seconds: float = 0.0  # the first step, compilation included
    images_per_second: float = 0.0  # training throughput after the first step
    last: dict[str, float] = field(default_factory=dict)  # the last logged train metrics


@dataclass
class LoopState:
    """The loop's position, saved with each checkpoint (`to_json`) and resumed from (`from_json`):
    the steps done, the lanes still training, the metrics not yet logged, and each lane's record.
    """

    step: int
    live: list[int]  # the lanes still training
    pending: list[dict]  # metrics of the steps since the last log (device or host arrays)
    lanes: list[LaneRecord]

    @classmethod
    def start(cls, num_lanes: int) -> "LoopState":
        return cls(0, list(range(num_lanes)), [], [LaneRecord() for _ in range(num_lanes)])

    def to_json(self) -> dict:
        """`{"step", "live", "pending", "lanes"}`, the layout of checkpoint format 1; the pending
        metrics must be on the host."""
        pending = [{k: [str(v.dtype), np.asarray(v).tolist()] for k, v in m.items()}
                   for m in self.pending]  # fmt: skip
        lanes = [asdict(lane) for lane in self.lanes]
        return {"step": self.step, "live": list(self.live), "pending": pending, "lanes": lanes}

    @classmethod
    def from_json(cls, meta: dict) -> "LoopState":
        """What `to_json` wrote (the pending metrics with the same bits)."""
        pending = [{k: np.asarray(v, dtype=dtype) for k, (dtype, v) in m.items()}
                   for m in meta["pending"]]  # fmt: skip
        lanes = [LaneRecord(**lane) for lane in meta["lanes"]]
        return cls(int(meta["step"]), list(meta["live"]), pending, lanes)


@dataclass
class FitResult:
    state: TrainState  # the lane's final state (where it diverged, for a diverged one)
    record: LaneRecord


class Task(Protocol):
    """What the loop runs (`cnnlab.train.run.Prepared` is one): the jitted steps of
    `cnnlab.train.step`, the splits on the device as (images, labels), and the lr schedule."""

    train_step: Callable
    eval_step: Callable
    train: tuple[jax.Array, jax.Array]
    val: tuple[jax.Array, jax.Array]
    schedule: Callable[[int], float]


@dataclass
class Lanes:
    """The models the loop trains, one per seed. `stacked`: the state's leaves and `key` have a
    leading axis S and the train step is vmapped over it (`make_train_step(lanes=True)`); else
    there is one lane, as it is."""

    seeds: list[int]  # lane i visits the data in the order of seeds[i]
    key: jax.Array  # the train key (one per lane when stacked)
    stacked: bool = False

    def pick(self, tree, i: int):
        """Lane i of a (stacked) tree."""
        return jax.tree.map(lambda x: x[i], tree) if self.stacked else tree


class Saver(Protocol):
    """Where the loop's checkpoints go (`cnnlab.train.run` wraps `cnnlab.checkpoint`)."""

    def due(self, step: int) -> bool:
        """Whether a checkpoint is due after `step` within an epoch."""

    def due_after_epoch(self, epoch: int) -> bool:
        """Whether a checkpoint is due at the end of `epoch` (the last epoch always saves)."""

    def save(self, state: TrainState, loop: LoopState, lanes: list[int] | None) -> bool:
        """Save the state after `loop.step` with `loop`; False when it was refused (a non-finite
        state, of the live `lanes` of stacked models)."""


def never() -> bool:
    return False


@dataclass
class Hooks:
    """What the loop calls out to: each lane's metrics logger, the checkpoints, the stop request
    (polled after every step) and the progress output (default: a `Progress` of the run)."""

    log: Sequence[LogFn]  # one per lane: (record, step)
    save: Saver | None = None
    stop: Callable[[], bool] = never
    progress: Progress | None = None


@dataclass
class _Fit:
    """What the loop's functions share during one `fit`."""

    task: Task
    cfg: TrainConfig
    lanes: Lanes
    hooks: Hooks
    progress: Progress
    first: int  # the step this attempt started at
    train_seconds: float = 0.0  # training so far, validation excluded
    frozen: dict[int, TrainState] = field(default_factory=dict)  # diverged lanes' states

    @property
    def batch_size(self) -> int:
        return batch_size(self.cfg, int(self.task.train[1].shape[0]))

    @property
    def steps_per_epoch(self) -> int:
        return int(self.task.train[1].shape[0]) // self.batch_size


def batch_size(cfg: TrainConfig, n: int) -> int:
    """The training batch for `n` examples: `cfg.batch_size`, capped at `batch_size_cap_fraction`
    of them, rounded down and at least 1 (min(16, N/10) of the time-series baselines)."""
    if cfg.batch_size_cap_fraction is None:
        return cfg.batch_size
    share = math.floor(cfg.batch_size_cap_fraction * n + 1e-9)  # 0.29 * 100 is 28.999...
    return max(1, min(cfg.batch_size, share))


def evaluate(eval_step, model_vars, images, labels, batch_size: int) -> EvalResult:
    """Loss, accuracy and probabilities over a device-resident split, in fixed-size batches;
    `model_vars` as `cnnlab.train.step.variables` gives them. A split smaller than `batch_size`
    is one batch of its own size: padded to 1000, 5 series would cost 200 times their forward."""
    n = int(labels.shape[0])
    batch_size = max(1, min(batch_size, n))
    loss_sum, correct, probs = 0.0, 0, []
    outputs = []
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        mask = idx < n
        outputs.append(eval_step(model_vars, images, labels, np.minimum(idx, n - 1), mask))
    for out, start in zip(jax.device_get(outputs), range(0, n, batch_size), strict=False):
        loss_sum += float(out["loss_sum"])
        correct += int(out["correct"])
        probs.append(out["probs"][: n - start])
    return EvalResult(loss_sum / n, correct / n, np.concatenate(probs))


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of training examples in `epoch`: a function of the seed and epoch alone."""
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)


def fit(
    state: TrainState,
    task: Task,
    cfg: TrainConfig,
    lanes: Lanes,
    hooks: Hooks,
    resume: LoopState | None = None,
) -> list[FitResult]:
    """Train `lanes` for `cfg.epochs` epochs with one step program, one `FitResult` each.

    Lane i logs through `hooks.log[i]` at the steps a single run logs; a lane that diverges stops
    logging while the others go on. Validation runs lane by lane on the same eval step.

    Checkpoints: after every step that `hooks.save.due` names, at the epoch ends that
    `hooks.save.due_after_epoch` names and the last (after validation), and when `hooks.stop()`
    turns true, the state goes to `hooks.save` with the `LoopState`. Passing that back as
    `resume`, with the state saved beside it, continues exactly where the loop was: the data
    order and the keys are functions of the seed, epoch and step, so the run ends bit-identical
    to an uninterrupted one. When `hooks.stop()` turns true the loop saves and returns with
    status `preempted`.
    """
    loop = resume or LoopState.start(len(lanes.seeds))
    n = int(task.train[1].shape[0])
    total = n // batch_size(cfg, n) * cfg.epochs
    run = _Fit(task, cfg, lanes, hooks, hooks.progress or Progress(total), first=loop.step)
    if resume:
        run.progress.advance(loop.step)
    try:
        for epoch in range(loop.step // run.steps_per_epoch + 1, cfg.epochs + 1):
            state, stopped = train_epoch(run, loop, state, epoch)
            if stopped == "diverged":
                return _results(run, loop, state)
            if stopped == "preempted":
                return finish(run, loop, state, "preempted")
            if (epoch % cfg.eval_every_epochs == 0 or epoch == cfg.epochs) and len(task.val[1]):
                validate(run, loop, state, epoch)
            for s in loop.live:
                loop.lanes[s].epochs = epoch
            if hooks.save and (hooks.save.due_after_epoch(epoch) or epoch == cfg.epochs):
                checkpoint(run, loop, state)
            if hooks.stop() and epoch < cfg.epochs:
                return finish(run, loop, state, "preempted")
    finally:
        run.progress.close()
    return finish(run, loop, state, "ok")


def train_epoch(run: _Fit, loop: LoopState, state: TrainState, epoch: int):
    """The steps of `epoch` from `loop.step` on, each window of them logged; returns the state
    and why the epoch ended early: "diverged" (no lane left), "preempted", or None."""
    orders = [epoch_order(seed, epoch, int(run.task.train[1].shape[0])) for seed in run.lanes.seeds]
    start, spe = time.perf_counter(), run.steps_per_epoch
    for i in range(loop.step - (epoch - 1) * spe, spe):
        batch = slice(i * run.batch_size, (i + 1) * run.batch_size)
        idx = np.stack([o[batch] for o in orders]) if run.lanes.stacked else orders[0][batch]
        state = train_step(run, loop, state, idx, start)  # idx [S, B] or [B]
        epoch_end = i == spe - 1
        if loop.step % run.cfg.log_every_steps == 0 or epoch_end:
            log_window(run, loop, state, epoch)
            if not loop.live:
                return state, "diverged"
        if not epoch_end:
            stopping = run.hooks.stop()  # once: a signal between two calls would skip the save
            if run.hooks.save and (stopping or run.hooks.save.due(loop.step)):
                checkpoint(run, loop, state)
            if stopping:
                run.train_seconds += time.perf_counter() - start
                return state, "preempted"
    run.train_seconds += time.perf_counter() - start
    return state, None


def train_step(run: _Fit, loop: LoopState, state: TrainState, idx, epoch_start: float):
    """One step; the first of this attempt is timed, compilation included."""
    state, metrics = run.task.train_step(state, *run.task.train, idx, run.lanes.key)
    loop.step += 1
    if loop.step == run.first + 1:
        jax.block_until_ready(metrics)
        for record in loop.lanes:
            record.compile_seconds = time.perf_counter() - epoch_start
    loop.pending.append(metrics)
    run.progress.advance()
    return state


def log_window(run: _Fit, loop: LoopState, state: TrainState, epoch: int) -> None:
    """Log each live lane's mean metrics since the last log (the loop's only sync point), then
    stop the lanes that went non-finite in that window."""
    fetched, loop.pending = jax.device_get(loop.pending), []
    records = {}
    for s in loop.live:
        record = _mean([run.lanes.pick(m, s) for m in fetched])
        lr = float(run.task.schedule(loop.step - 1)) * record.pop("train/lr_scale", 1.0)
        record.update({"train/lr": lr, "epoch": epoch})
        loop.lanes[s].last = records[s] = record
        run.hooks.log[s](record, loop.step)
    run.progress.report(loop.step, epoch, _across(records))
    for s in list(loop.live):
        bad = [j for j, m in enumerate(fetched) if not _finite(run.lanes.pick(m, s))]
        if bad:
            at = loop.step - len(fetched) + 1 + bad[0]
            loop.lanes[s].status = "diverged"
            loop.lanes[s].message = f"loss or gradient became non-finite at step {at}"
            run.frozen[s] = run.lanes.pick(state, s)
            loop.live.remove(s)


def validate(run: _Fit, loop: LoopState, state: TrainState, epoch: int) -> None:
    """Evaluate each live lane on the validation split, log it and keep its best epoch."""
    records = {}
    for s in loop.live:
        lane = loop.lanes[s]
        model_vars = variables(run.lanes.pick(state, s))
        ev = evaluate(run.task.eval_step, model_vars, *run.task.val, run.cfg.eval_batch_size)
        if not ev.accuracy <= lane.best_val_accuracy:  # also replaces the initial NaN
            lane.best_val_accuracy, lane.best_epoch = ev.accuracy, epoch
        record = {"val/loss": ev.loss, "val/accuracy": ev.accuracy, "epoch": epoch}
        run.hooks.log[s](record, loop.step)
        records[s] = record
    run.progress.report(loop.step, epoch, _across(records))


def checkpoint(run: _Fit, loop: LoopState, state: TrainState) -> bool:
    """Save after `loop.step`, unless a live lane went non-finite since the last log (the next log
    stops those lanes; the last good checkpoint stays)."""
    loop.pending = jax.device_get(loop.pending)
    if any(not _finite(run.lanes.pick(m, s)) for m in loop.pending for s in loop.live):
        return False
    return run.hooks.save.save(state, loop, loop.live if run.lanes.stacked else None)


def finish(run: _Fit, loop: LoopState, state: TrainState, status: str) -> list[FitResult]:
    """The live lanes end with `status` and their training throughput."""
    steady, steps = run.train_seconds - loop.lanes[0].compile_seconds, loop.step - run.first - 1
    for s in loop.live:
        lane = loop.lanes[s]
        lane.status = status
        lane.images_per_second = steps * run.batch_size / steady if steady > 0 else 0.0
        if status == "preempted":
            lane.message = (
                f"stopped by a signal after step {loop.step}; rerun in the same run directory"
            )
    return _results(run, loop, state)


def _results(run: _Fit, loop: LoopState, state: TrainState) -> list[FitResult]:
    return [
        FitResult(run.frozen.get(s, run.lanes.pick(state, s)), lane)
        for s, lane in enumerate(loop.lanes)
    ]


# Metrics whose newest value is logged, not the mean: counters since the start, and the factor
# the plateau schedule has reached.
CUMULATIVE = ("train/skipped_updates", "train/lr_scale")


def _mean(metrics: list[dict]) -> dict[str, float]:
    """One log record from the metrics of several steps: their mean, the newest for counters.
    Where non-finite updates are skipped (`train/param_norm` is there), the mean is over the
    steps that were not."""
    skipping = "train/param_norm" in metrics[0]
    record = {}
    for k in metrics[0]:
        values = np.array([m[k] for m in metrics], dtype=np.float64)
        finite = values[np.isfinite(values)]
        if k in CUMULATIVE:
            record[k] = float(values[-1])
        else:
            record[k] = float(np.mean(finite if skipping and len(finite) else values))
    return record


def _finite(metrics: dict) -> bool:
    """Whether one step's metrics (or a record) show a finite model: with skipped non-finite
    updates (`optimizer.skip_nonfinite`) the parameters' norm, else the loss and gradient."""
    keys = ("train/param_norm",) if "train/param_norm" in metrics else _WATCHED
    return all(math.isfinite(float(metrics[k])) for k in keys)


_WATCHED = ("train/loss", "train/grad_norm")


def _across(records: dict[int, dict[str, float]]) -> dict[str, float]:
    """What the progress output shows: the one lane's record, or the mean over the lanes."""
    if len(records) == 1:
        return next(iter(records.values()))
    return {
        k: float(np.mean([r[k] for r in records.values()])) for k in next(iter(records.values()))
    }
