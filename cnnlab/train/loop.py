"""The training loop: epochs of jitted steps, periodic validation, metrics through a callback.

Randomness is explicit and derived from the seed alone: epoch `e` visits the training examples in
the order `np.random.default_rng([seed, e]).permutation(N)` (the last partial batch is dropped),
and step `s` draws its dropout and augmentation from `fold_in(train_key, s)`. Metrics stay on the
device and are fetched only every `log_every_steps` steps.

Glossary: `N` examples in a split, `B` batch, `K` classes.
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import numpy as np
from flax.training.train_state import TrainState

from cnnlab.config import TrainConfig
from cnnlab.train.progress import Progress

LogFn = Callable[[dict[str, float], int], None]


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    probs: np.ndarray  # [N, K] softmax outputs


@dataclass
class FitResult:
    state: TrainState
    status: str  # ok | diverged
    message: str = ""
    epochs: int = 0  # epochs completed
    best_val_accuracy: float = float("nan")
    best_epoch: int = 0
    compile_seconds: float = 0.0  # the first step, compilation included
    images_per_second: float = 0.0  # training throughput after the first step
    last: dict[str, float] = field(default_factory=dict)  # the last logged train metrics


def evaluate(eval_step, params, images, labels, batch_size: int) -> EvalResult:
    """Loss, accuracy and probabilities over a device-resident split, in fixed-size batches."""
    n = int(labels.shape[0])
    loss_sum, correct, probs = 0.0, 0, []
    outputs = []
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        mask = idx < n
        outputs.append(eval_step(params, images, labels, np.minimum(idx, n - 1), mask))
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
) -> FitResult:
    """Train for `cfg.epochs` epochs; `train` and `val` are (images, labels) on the device."""
    n = int(train[1].shape[0])
    steps_per_epoch = n // cfg.batch_size
    progress = progress or Progress(steps_per_epoch * cfg.epochs)
    result = FitResult(state, "ok")
    pending: list[dict[str, jax.Array]] = []
    step, train_seconds = 0, 0.0
    try:
        for epoch in range(1, cfg.epochs + 1):
            order = epoch_order(seed, epoch, n)
            t_epoch = time.perf_counter()
            for i in range(steps_per_epoch):
                idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
                state, metrics = train_step(state, *train, idx, train_key)
                step += 1
                if step == 1:
                    jax.block_until_ready(metrics)
                    result.compile_seconds = time.perf_counter() - t_epoch
                pending.append(metrics)
                progress.advance()
                if step % cfg.log_every_steps == 0 or i == steps_per_epoch - 1:
                    fetched, pending = jax.device_get(pending), []  # the only sync point
                    record = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
                    record.update({"train/lr": float(schedule(step - 1)), "epoch": epoch})
                    result.last = record
                    log(record, step)
                    progress.report(step, epoch, record)
                    if not all(math.isfinite(record[k]) for k in ("train/loss", "train/grad_norm")):
                        result.state, result.status = state, "diverged"
                        result.message = f"loss or gradient became non-finite by step {step}"
                        return result
            train_seconds += time.perf_counter() - t_epoch
            if (epoch % cfg.eval_every_epochs == 0 or epoch == cfg.epochs) and len(val[1]):
                ev = evaluate(eval_step, state.params, *val, cfg.eval_batch_size)
                if not ev.accuracy <= result.best_val_accuracy:  # also replaces the initial NaN
                    result.best_val_accuracy, result.best_epoch = ev.accuracy, epoch
                record = {"val/loss": ev.loss, "val/accuracy": ev.accuracy, "epoch": epoch}
                log(record, step)
                progress.report(step, epoch, record)
            result.epochs = epoch
    finally:
        progress.close()
    result.state = state
    steady = train_seconds - result.compile_seconds
    result.images_per_second = (step - 1) * cfg.batch_size / steady if steady > 0 else 0.0
    return result
