"""The training loop: epochs of jitted steps, periodic validation, metrics through a callback.

Randomness is explicit and derived from the seed alone: epoch `e` visits the training examples in
the order `np.random.default_rng([seed, e]).permutation(N)` (the last partial batch is dropped),
and step `s` draws its dropout and augmentation from `fold_in(train_key, s)`. Metrics stay on the
device and are fetched only every `log_every_steps` steps.

The same loop trains several models at once ("lanes", one per seed) when the state and the step
are vmapped (`fit_lanes`, used by `cnnlab.train.seeds`); one model is one lane (`fit`).

Glossary: `N` examples in a split, `B` batch, `K` classes, `S` lanes (models trained at once).
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
class FitResult:
    state: TrainState
    status: str  # ok | diverged | preempted
    message: str = ""
    epochs: int = 0  # epochs completed
    best_val_accuracy: float = float("nan")
    best_epoch: int = 0
    compile_seconds: float = 0.0  # the first step, compilation included
    images_per_second: float = 0.0  # training throughput after the first step
    last: dict[str, float] = field(default_factory=dict)  # the last logged train metrics


def evaluate(eval_step, model_vars, images, labels, batch_size: int) -> EvalResult:
    """Loss, accuracy and probabilities over a device-resident split, in fixed-size batches;
    `model_vars` as `cnnlab.train.step.variables` gives them."""
    n = int(labels.shape[0])
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


class Saver(Protocol):
    """Where the loop's checkpoints go (`cnnlab.train.run` wraps `cnnlab.checkpoint`)."""

    def due(self, step: int) -> bool:
        """Whether a checkpoint is due after `step` within an epoch (epoch ends always save)."""

    def save(self, step: int, state: TrainState, meta: dict, lanes: list[int] | None) -> bool:
        """Save the state after `step` with the loop's `meta`; False when it was refused (a
        non-finite state, of the live `lanes` of stacked models)."""


def fit(
    state: TrainState,
    train_step,
    eval_step,
    train: tuple[jax.Array, jax.Array],
    val: tuple[jax.Array, jax.Array],
    cfg: TrainConfig,
    seed: int,
    train_key: jax.Array,
    log: LogFn,
    schedule: Callable[[int], float],
    progress: Progress | None = None,
    **resumable,
) -> FitResult:
    """Train for `cfg.epochs` epochs; `train` and `val` are (images, labels) on the device.
    `resumable`: the `resume`, `saver` and `stop` of `fit_lanes`."""
    (result,) = fit_lanes(
        state, train_step, eval_step, train, val, cfg, [seed], train_key, [log], schedule,
        progress, stacked=False, **resumable,
    )  # fmt: skip
    return result


def fit_lanes(
    state: TrainState,
    train_step,
    eval_step,
    train: tuple[jax.Array, jax.Array],
    val: tuple[jax.Array, jax.Array],
    cfg: TrainConfig,
    seeds: list[int],
    train_key: jax.Array,
    logs: list[LogFn],
    schedule: Callable[[int], float],
    progress: Progress | None = None,
    stacked: bool = True,
    resume: dict | None = None,
    saver: Saver | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> list[FitResult]:
    """Train S models ("lanes") with one step program, one `FitResult` each.

    With `stacked`, the leaves of `state` and `train_key` have a leading axis S and `train_step`
    is vmapped over it (`make_train_step(lanes=True)`); without it there is one lane, as it is
    (what `fit` does). Lane i visits the data in the order of `seeds[i]` and logs through
    `logs[i]` at the steps a single run logs; a lane that diverges stops logging while the others
    go on. Validation runs lane by lane on the same `eval_step`.

    Checkpoints: after every step that `saver.due` names, at every epoch end (after validation)
    and when `stop()` turns true, the state goes to `saver` with the loop's `meta` (the step, each
    lane's record, the metrics not yet logged). Passing that `meta` back as `resume`, with the
    state saved beside it, continues exactly where the loop was: the data order and the keys are
    functions of the seed, epoch and step, so the run ends bit-identical to an uninterrupted one.
    When `stop()` turns true the loop saves and returns with status `preempted`.
    """
    n = int(train[1].shape[0])
    steps_per_epoch = n // cfg.batch_size
    progress = progress or Progress(steps_per_epoch * cfg.epochs)
    lane = _pick if stacked else lambda tree, i: tree  # lane i of a (stacked) tree
    results = [FitResult(state, "ok") for _ in seeds]
    live = list(range(len(seeds)))  # the lanes still training
    pending: list[dict] = []  # metrics of the steps since the last log
    step, first, train_seconds = 0, 0, 0.0
    if resume:
        step, live, pending = resume["step"], resume["live"], _unpack(resume["pending"])
        for r, saved in zip(results, resume["lanes"], strict=True):
            vars(r).update(saved)
        first = step
        progress.advance(step)

    def checkpoint() -> bool:
        """Save after `step`, unless a live lane went non-finite since the last log."""
        nonlocal pending
        pending = jax.device_get(pending)
        if any(not _finite(lane(m, s)) for m in pending for s in live):
            return False  # the next log stops those lanes; the last good checkpoint stays
        meta = {"step": step, "live": live, "pending": _pack(pending)}
        meta["lanes"] = [{k: v for k, v in vars(r).items() if k != "state"} for r in results]
        return saver.save(step, state, meta, live if stacked else None)

    def finished(status: str, seconds: float) -> list[FitResult]:
        """The live lanes' results; `seconds` of training (validation excluded) so far."""
        steady, steps = seconds - results[0].compile_seconds, step - first - 1
        for s in live:
            r = results[s]
            r.state, r.status = lane(state, s), status
            r.images_per_second = steps * cfg.batch_size / steady if steady > 0 else 0.0
            if status == "preempted":
                r.message = (
                    f"stopped by a signal after step {step}; rerun in the same run directory"
                )
        return results

    try:
        for epoch in range(step // steps_per_epoch + 1, cfg.epochs + 1):
            orders = [epoch_order(seed, epoch, n) for seed in seeds]
            t_epoch = time.perf_counter()
            for i in range(step - (epoch - 1) * steps_per_epoch, steps_per_epoch):
                batch = slice(i * cfg.batch_size, (i + 1) * cfg.batch_size)
                idx = np.stack([o[batch] for o in orders]) if stacked else orders[0][batch]
                state, metrics = train_step(state, *train, idx, train_key)  # idx [S, B] or [B]
                step += 1
                if step == first + 1:
                    jax.block_until_ready(metrics)
                    for r in results:
                        r.compile_seconds = time.perf_counter() - t_epoch
                pending.append(metrics)
                progress.advance()
                epoch_end = i == steps_per_epoch - 1
                if step % cfg.log_every_steps == 0 or epoch_end:
                    fetched, pending = jax.device_get(pending), []  # the only sync point
                    records = {}
                    for s in live:
                        ms = [lane(m, s) for m in fetched]
                        record = _mean(ms)
                        record.update({"train/lr": float(schedule(step - 1)), "epoch": epoch})
                        results[s].last = records[s] = record
                        logs[s](record, step)
                    progress.report(step, epoch, _across(records))
                    for s in list(live):
                        bad = [j for j, m in enumerate(fetched) if not _finite(lane(m, s))]
                        if bad:
                            r = results[s]
                            r.state, r.status = lane(state, s), "diverged"
                            at = step - len(fetched) + 1 + bad[0]
                            r.message = f"loss or gradient became non-finite at step {at}"
                            live.remove(s)
                    if not live:
                        return results
                if not epoch_end:
                    stopping = stop()  # once: a signal between two calls would skip the save
                    if saver and (stopping or saver.due(step)):
                        checkpoint()
                    if stopping:
                        return finished("preempted", train_seconds + time.perf_counter() - t_epoch)
            train_seconds += time.perf_counter() - t_epoch
            if (epoch % cfg.eval_every_epochs == 0 or epoch == cfg.epochs) and len(val[1]):
                records = {}
                for s in live:
                    r = results[s]
                    ev = evaluate(eval_step, variables(lane(state, s)), *val, cfg.eval_batch_size)
                    if not ev.accuracy <= r.best_val_accuracy:  # also replaces the initial NaN
                        r.best_val_accuracy, r.best_epoch = ev.accuracy, epoch
                    record = {"val/loss": ev.loss, "val/accuracy": ev.accuracy, "epoch": epoch}
                    logs[s](record, step)
                    records[s] = record
                progress.report(step, epoch, _across(records))
            for s in live:
                results[s].epochs = epoch
            if saver:
                checkpoint()
            if stop() and epoch < cfg.epochs:
                return finished("preempted", train_seconds)
    finally:
        progress.close()
    return finished("ok", train_seconds)


# Metrics that count since the start (the newest value is logged, not the mean).
CUMULATIVE = ("train/skipped_updates",)


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


def _pack(pending: list[dict]) -> list[dict]:
    """Host metrics as JSON: {key: [dtype, values]}; `_unpack` gives back the same bits."""
    return [{k: [str(v.dtype), np.asarray(v).tolist()] for k, v in m.items()} for m in pending]


def _unpack(packed: list[dict]) -> list[dict]:
    return [{k: np.asarray(v, dtype=dtype) for k, (dtype, v) in m.items()} for m in packed]


def _finite(metrics: dict) -> bool:
    """Whether one step's metrics (or a record) show a finite model: with skipped non-finite
    updates (`optimizer.skip_nonfinite`) the parameters' norm, else the loss and gradient."""
    keys = ("train/param_norm",) if "train/param_norm" in metrics else _WATCHED
    return all(math.isfinite(float(metrics[k])) for k in keys)


_WATCHED = ("train/loss", "train/grad_norm")


def _pick(tree, i: int):
    """Lane i of a tree whose leaves have a leading lane axis."""
    return jax.tree.map(lambda x: x[i], tree)


def _across(records: dict[int, dict[str, float]]) -> dict[str, float]:
    """What the progress output shows: the one lane's record, or the mean over the lanes."""
    if len(records) == 1:
        return next(iter(records.values()))
    return {
        k: float(np.mean([r[k] for r in records.values()])) for k in next(iter(records.values()))
    }
