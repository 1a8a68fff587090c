"""What both benchmark workers share: the spec they receive, their data and all of the timing.

A worker is started by `experiments/bench.py`, already pinned to the benchmark's CPUs, with a JSON
spec as its only argument. It loads the task's data from the `.npy` files the parent wrote, builds
its `Trainer`, runs one measurement and writes the result as JSON to `spec.result`. The timing is
here, once, so both contenders are measured by the same code; only the `Trainer` differs.

Glossary: `N` training examples, `B` batch.
"""

import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

# The arrays the parent writes for each task: uint8 images [N, H, W, C], int32 labels [N], and the
# training split's per-channel mean and std [C] (pixel scale), all from cnnlab.data.load_dataset.
DATA_FILES = ("train_images", "train_labels", "test_images", "test_labels", "mean", "std")

WINDOWS = 10  # the timed steps of a throughput run are timed in this many windows
OrderFn = Callable[[int, int, int], np.ndarray]  # (seed, epoch, N) -> a permutation of range(N)


@dataclass(frozen=True)
class Spec:
    task: str  # a key of experiments.bench.TASKS
    mode: str  # "throughput" or "target"
    data_dir: str  # the folder with DATA_FILES as .npy
    model: dict  # the task's conf/model preset, as ModelConfig fields
    optimizer: dict  # the conf/optimizer preset, as OptimizerConfig fields
    augment: dict  # the conf/data preset's augmentation, as AugmentConfig fields
    batch_size: int  # B
    eval_batch_size: int
    seed: int  # initialisation, augmentation, dropout and the epoch order
    epochs: int  # the learning-rate schedule's length; "target" trains at most this many
    warmup: int  # "throughput": untimed steps after the first
    steps: int  # "throughput": timed steps
    target: float  # "target": the test accuracy to reach
    threads: int  # the number of CPUs the worker is pinned to
    launched_at: float  # time.time() just before the parent started this process
    result: str  # the JSON file to write


class Trainer(Protocol):
    contender: str  # "cnnlab" or "torch"
    num_params: int

    def step(self, idx: np.ndarray) -> None:
        """One training step on the examples `idx` [B]; may return before it has finished."""

    def sync(self) -> float:
        """Wait for every step issued so far; the last step's training loss."""

    def test_accuracy(self) -> float:
        """Accuracy on the whole test split, in batches of `eval_batch_size`."""

    def info(self) -> dict:
        """Framework, version and thread settings, for the record."""


def main(make_trainer: Callable[[Spec, dict], Trainer], epoch_order: OrderFn) -> None:
    spec = Spec(**json.loads(sys.argv[1]))
    # Memory-mapped (copy on write): each contender makes the one copy its framework needs, and
    # the file's pages, aligned as .npy lays them out, can serve as that copy where a framework
    # uses host memory in place (cnnlab's dataset on the CPU, `cnnlab.parallel.put_dataset`).
    data = {
        name: np.load(Path(spec.data_dir) / f"{name}.npy", mmap_mode="c") for name in DATA_FILES
    }
    n = len(data["train_labels"])
    trainer = make_trainer(spec, data)
    del data  # the trainer holds its own copy in its framework's layout
    measure = throughput if spec.mode == "throughput" else time_to_target
    result = measure(trainer, spec, epoch_order, n)
    result.update(
        contender=trainer.contender,
        mode=spec.mode,
        params=trainer.num_params,
        # ru_maxrss is in KiB on Linux: the largest resident set this process ever had.
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        affinity=sorted(os.sched_getaffinity(0)),
        os_threads=len(os.listdir("/proc/self/task")),
        **trainer.info(),
    )
    Path(spec.result).write_text(json.dumps(result))


def batches(epoch_order: OrderFn, seed: int, n: int, batch_size: int) -> Iterator[np.ndarray]:
    """Batch indices [B] epoch after epoch, in cnnlab's order; the last partial batch is dropped."""
    epoch = 0
    while True:
        epoch += 1
        order = epoch_order(seed, epoch, n)
        for i in range(n // batch_size):
            yield order[i * batch_size : (i + 1) * batch_size]


def first_step(trainer: Trainer, idx: np.ndarray, spec: Spec) -> dict:
    """Time the first step alone: JAX compiles the step there, PyTorch allocates its buffers."""
    setup = time.time() - spec.launched_at  # imports, data, model and optimizer
    start = time.perf_counter()
    trainer.step(idx)
    trainer.sync()
    return {
        "setup_seconds": setup,
        "first_step_seconds": time.perf_counter() - start,
        "startup_seconds": time.time() - spec.launched_at,  # process launch to first step done
    }


def throughput(trainer: Trainer, spec: Spec, epoch_order: OrderFn, n: int) -> dict:
    """Steady-state training speed over `spec.steps` steps after the first and `spec.warmup`.

    The timed steps run in up to WINDOWS windows, and the speed is the median of the windows'
    speeds: on a shared machine another process's burst then spoils a window, not the result.
    The overall speed (all timed images over all timed seconds) is kept beside it.
    """
    order = batches(epoch_order, spec.seed, n, spec.batch_size)
    result = first_step(trainer, next(order), spec)
    for _ in range(spec.warmup):
        trainer.step(next(order))
    trainer.sync()
    windows = min(WINDOWS, spec.steps)
    rates, seconds = [], 0.0
    for w in range(windows):
        size = spec.steps // windows + (w < spec.steps % windows)
        start = time.perf_counter()
        for _ in range(size):
            trainer.step(next(order))
        loss = trainer.sync()
        elapsed = time.perf_counter() - start
        rates.append(size * spec.batch_size / elapsed)
        seconds += elapsed
    result.update(
        images_per_second=statistics.median(rates),
        images_per_second_overall=spec.steps * spec.batch_size / seconds,
        window_rates=rates,
        timed_steps=spec.steps,
        timed_seconds=seconds,
        train_loss=loss,
    )
    return result


def time_to_target(trainer: Trainer, spec: Spec, epoch_order: OrderFn, n: int) -> dict:
    """Train epoch by epoch, testing after each, until the test accuracy reaches `spec.target`.

    The time to target is training wall time from the first step (compilation included) to the
    end of the first epoch whose test accuracy reaches the target; the tests are timed apart and
    not included. At most `spec.epochs` epochs, the length of the learning-rate schedule.
    """
    steps_per_epoch = n // spec.batch_size
    train_seconds, eval_seconds, history, result = 0.0, 0.0, [], {}
    for epoch in range(1, spec.epochs + 1):
        order = epoch_order(spec.seed, epoch, n)
        start = time.perf_counter()
        for i in range(steps_per_epoch):
            idx = order[i * spec.batch_size : (i + 1) * spec.batch_size]
            if epoch == 1 and i == 0:
                result.update(first_step(trainer, idx, spec))
            else:
                trainer.step(idx)
        loss = trainer.sync()
        train_seconds += time.perf_counter() - start
        start = time.perf_counter()
        accuracy = trainer.test_accuracy()
        eval_seconds += time.perf_counter() - start
        history.append(
            {"epoch": epoch, "train_seconds": train_seconds, "test_accuracy": accuracy,
             "train_loss": loss}
        )  # fmt: skip
        if accuracy >= spec.target:
            break
    reached = history[-1]["test_accuracy"] >= spec.target
    result.update(
        target=spec.target,
        time_to_target_seconds=train_seconds if reached else None,
        epochs_to_target=len(history) if reached else None,
        test_accuracy=history[-1]["test_accuracy"],
        train_seconds=train_seconds,
        eval_seconds=eval_seconds,
        history=history,
    )
    return result
