"""A training step's memory, estimated from the config before anything is built or compiled.

What it counts, in bytes, for the configured batch (split over the devices of a data-parallel
run, whose state and dataset every device holds whole):
- parameters: every parameter of the geometry table, float32 (also under bfloat16 precision,
  whose forward pass casts a copy it does not keep);
- optimizer state: the same again per slot, from the optimizer config (SGD with momentum 1, plain
  SGD 0, AdamW 2: its first and second moments);
- gradients: one float32 value per parameter;
- activations kept for the backward pass: each layer's output (each row of `cnnlab.geometry`'s
  table but flatten's, the normalized input included) x batch x bytes per element of
  `train.precision`;
- the dataset held on the device for the whole run (`cnnlab.train.step`): train, validation and
  test examples in their own dtype (uint8 images, float32 series: `cnnlab.data.DataShape`),
  their labels as int32 and, for series of unequal lengths, their lengths as int32.
Models trained side by side (`seeds` with any `seeds_strategy` but sequential) multiply the
model's parts, not the dataset.

What it does not count: XLA's temporaries (a conv's pre-activation where it is not fused,
im2col buffers, the backward pass's transient gradients of activations), the augmented copy of a
batch, the evaluation batch, the runtime itself (Python, JAX and XLA's compiled code: a few
hundred MB of a CPU process's memory, docs/performance.md) and the allocator's slack. So the
estimate is a floor: a run it exceeds cannot fit, one under it may still not, and `check` refuses
only the first. Glossary: `B` batch, `H, W` spatial, `C` channels.
"""

import math
import os
from dataclasses import dataclass

import numpy as np

from cnnlab.config import Config, DataConfig, OptimizerConfig
from cnnlab.data import Dataset, DataShape
from cnnlab.errors import ConfigError

PRECISION_BYTES = {"float32": 4, "bfloat16": 2}  # per activation element, by train.precision
PARAM_BYTES = 4  # float32 master parameters, gradients and optimizer slots
LABEL_BYTES = 4  # int32 class indices
LENGTH_BYTES = 4  # int32 length of each series of unequal lengths


@dataclass(frozen=True)
class Estimate:
    """Bytes of each part of one training step's memory."""

    params: int
    optimizer: int
    gradients: int
    activations: int
    dataset: int
    batch: int  # examples per device in one step
    slots: int  # optimizer state per parameter, in parameters
    models: int  # models trained side by side (`seeds`), each with its own parameters

    @property
    def total(self) -> int:
        return self.params + self.optimizer + self.gradients + self.activations + self.dataset

    def text(self) -> str:
        """Two lines of figures, for under the layer table."""
        slots = f"{self.slots} slot{'s' * (self.slots != 1)}"
        models = f" of {self.models} models" if self.models > 1 else ""
        return (
            f"memory per training step{models} at batch {self.batch}: about {size(self.total)} "
            "(XLA's temporaries not counted)\n"
            f"  parameters {size(self.params)}, optimizer state {size(self.optimizer)} ({slots}), "
            f"gradients {size(self.gradients)}, activations {size(self.activations)}, "
            f"dataset {size(self.dataset)}"
        )


def optimizer_slots(opt: OptimizerConfig) -> int:
    """Values the optimizer keeps per parameter: optax.sgd's momentum trace, AdamW's two moments."""
    if opt.name == "adamw":
        return 2
    return 1 if opt.momentum else 0


def dataset_bytes(data: DataConfig, shape: DataShape | None) -> int:
    """Bytes of the train, validation and test examples of `shape` (`cnnlab.data.data_shape`)
    after `val_fraction` and the limits, as `cnnlab.data.load_dataset` takes them, each in its
    own dtype with its label (and its length, for padded series); 0 where the shape is known only
    once the data is read."""
    if shape is None:
        return 0
    val = round(shape.train * data.val_fraction)
    train = min(shape.train - val, data.train_limit or shape.train)
    examples = train + val + min(shape.test, data.test_limit or shape.test)
    values = math.prod(shape.example_shape) * np.dtype(shape.dtype).itemsize
    return examples * (values + LABEL_BYTES + LENGTH_BYTES * shape.padded)


def loaded_bytes(data: Dataset) -> int:
    """Bytes of a loaded dataset's arrays: what the device holds of it."""
    splits = (data.train, data.val, data.test)
    return sum(a.nbytes for s in splits for a in (s.images, s.labels, s.lengths) if a is not None)


def estimate(cfg: Config, rows: list, dataset: int, devices: int = 1) -> Estimate:
    """The estimate for `cfg` whose geometry table is `rows` (`cnnlab.geometry.layers`), with
    `dataset` bytes held on each device (`dataset_bytes`, `loaded_bytes`) and the batch split
    over `devices`."""
    params = sum(row.params for row in rows)
    slots = optimizer_slots(cfg.optimizer)
    batch = -(-cfg.train.batch_size // devices)
    models = 1 if cfg.seeds_strategy == "sequential" else max(1, len(cfg.seeds))
    # the input row included; a flatten is a view of the map before it
    per_example = sum(math.prod(row.out_shape) for row in rows if row.kind != "flatten")
    return Estimate(
        params=models * params * PARAM_BYTES,
        optimizer=models * slots * params * PARAM_BYTES,
        gradients=models * params * PARAM_BYTES,
        activations=models * batch * per_example * PRECISION_BYTES[cfg.train.precision],
        dataset=dataset,
        batch=batch,
        slots=slots,
        models=models,
    )


def host_available() -> int | None:
    """Bytes of memory this machine can still give a process: Linux's MemAvailable (free memory
    and the caches it can drop), else the free pages; None where neither can be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def device_available(device) -> int | None:
    """Bytes a JAX device can still allocate (`memory_stats`' limit less what is in use); None on
    the CPU, whose devices report no limit."""
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0)


def check(est: Estimate, available: int | None, where: str = "this machine") -> None:
    """Raise ConfigError, with the figures and a fix, when `est` exceeds `available` bytes."""
    if available is None or est.total <= available:
        return
    raise ConfigError(
        f"a training step needs at least {size(est.total)} (parameters {size(est.params)}, "
        f"optimizer state {size(est.optimizer)}, gradients {size(est.gradients)}, activations "
        f"{size(est.activations)} at batch {est.batch}, dataset {size(est.dataset)}) but "
        f"{where} has {size(available)} available; lower train.batch_size or model.depth"
    )


def size(n: float, unit: str = "B") -> str:
    """A count in decimal units, bytes by default: 61.7 KB, 2.1 GB, 2,666,669 PB, 4.4 PFLOP."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {prefix}{unit}"
    return f"{n:,.0f} {unit}"


__all__ = [
    "Estimate", "check", "dataset_bytes", "device_available", "estimate", "loaded_bytes",
]  # fmt: skip
