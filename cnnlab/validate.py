"""Every check a config must pass before data is loaded or anything compiles, in one place.

Each failure is a ConfigError whose one-line message names the key, the bad value and the fix.
Nothing here imports JAX, Flax or optax (cnnlab-train checks its config before they load, and a
mistake answers in a fraction of a second), so the names of the losses, optimizers, schedules,
precisions and the like are the Enums of `cnnlab.config`, which key the training code's tables
(tests/test_config.py checks that every name has an implementation). An unknown name is answered
with the closest valid one, as an unknown layer is.
"""

import math
import sys

from cnnlab import geometry, memory
from cnnlab.architecture import Architecture, resolve
from cnnlab.config import (
    Config,
    DataConfig,
    DataSource,
    DistributedConfig,
    LoggerMode,
    LossName,
    Missing,
    Normalize,
    OnInvalid,
    OptimizerName,
    Precision,
    ScheduleName,
    SeedsStrategy,
    TrainConfig,
)
from cnnlab.data import DATASETS, PATH_REQUIRED, Dataset, DataShape, data_shape
from cnnlab.errors import ConfigError, GeometryError, check_choice, choose


def _require(ok: bool, key: str, value, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is out of range: {rule}")


def _in_unit(value, *, closed_high=False) -> bool:
    return 0.0 <= value <= 1.0 if closed_high else 0.0 <= value < 1.0


def validate(cfg: Config, data_given: bool = False) -> Architecture | None:
    """Raise ConfigError for unknown names, out-of-range values and impossible geometry; return
    the network's resolved layers (None for a module of one's own), which the caller passes on.
    `data_given`: the data comes as a Dataset (`cnnlab.train.run.prepare(cfg, data=...)`), so
    `data.name` names it rather than a loader, and its shape is checked once it is known."""
    arch = None
    if cfg.model._target_:  # a module of one's own: its import and fields (JAX loads here)
        from cnnlab.models.user import check_config

        check_config(cfg.model)
    else:
        arch = resolve(cfg.model)  # layer names, knobs and their ranges
    data, opt, train = cfg.data, cfg.optimizer, cfg.train
    _validate_data(data, data_given)
    choose("optimizer.name", opt.name, OptimizerName)
    choose("optimizer.schedule", opt.schedule, ScheduleName)
    _require(opt.lr > 0 and math.isfinite(opt.lr), "optimizer.lr", opt.lr, "use a rate > 0")
    _require(_in_unit(opt.momentum), "optimizer.momentum", opt.momentum, "use [0, 1)")
    for key in ("b1", "b2"):
        _require(_in_unit(getattr(opt, key)), f"optimizer.{key}", getattr(opt, key), "use [0, 1)")
    _require(opt.eps > 0, "optimizer.eps", opt.eps, "use a value > 0")
    _require(opt.weight_decay >= 0, "optimizer.weight_decay", opt.weight_decay, "use >= 0")
    _require(opt.warmup_epochs >= 0, "optimizer.warmup_epochs", opt.warmup_epochs, "use >= 0")
    _require(
        _in_unit(opt.end_lr_factor, closed_high=True),
        "optimizer.end_lr_factor", opt.end_lr_factor, "use [0, 1]",
    )  # fmt: skip
    _validate_cadence(cfg)
    clip = opt.grad_clip_norm
    _require(clip is None or clip > 0, "optimizer.grad_clip_norm", clip, "use null or a norm > 0")
    skip = opt.skip_nonfinite
    _require(skip >= 0, "optimizer.skip_nonfinite", skip, "use 0 (stop) or a count >= 1")
    ckpt = cfg.checkpoint
    every = ckpt.every_steps
    _require(every is None or every >= 1, "checkpoint.every_steps", every, "use null or >= 1")
    _require(ckpt.keep >= 1, "checkpoint.keep", ckpt.keep, "use a count >= 1")
    choose("loss.name", cfg.loss.name, LossName)
    smoothing = cfg.loss.label_smoothing
    _require(_in_unit(smoothing), "loss.label_smoothing", smoothing, "use [0, 1)")
    for key in ("epochs", "batch_size", "eval_batch_size", "log_every_steps", "eval_every_epochs"):
        value = getattr(train, key)
        _require(value >= 1, f"train.{key}", value, "use a whole number >= 1")
    choose("train.precision", train.precision, Precision)
    choose("logger.mode", cfg.logger.mode, LoggerMode)
    timeout = cfg.logger.init_timeout
    _require(timeout > 0, "logger.init_timeout", timeout, "use seconds > 0")
    samples = cfg.logger.num_sample_predictions
    _require(samples >= 0, "logger.num_sample_predictions", samples, "use a count >= 0")
    _require(cfg.seed >= 0, "seed", cfg.seed, "use a whole number >= 0")
    _validate_seeds(cfg.seeds, cfg.seeds_strategy)
    arenas = cfg.malloc_arenas
    _require(arenas is None or arenas >= 1, "malloc_arenas", arenas, "use a count >= 1 or null")
    choose("sweep.on_invalid", cfg.sweep.on_invalid, OnInvalid)
    _validate_distributed(cfg.distributed)
    shape = None if data_given else data_shape(data)
    if shape is not None:  # otherwise checked once the data is loaded
        _validate_size(cfg, arch, shape)
    return arch


def _validate_cadence(cfg: Config) -> None:
    """The keys of training on small sets: the plateau schedule, the batch cap, the saves."""
    factor, patience = cfg.optimizer.plateau_factor, cfg.optimizer.plateau_patience
    _require(0 < factor < 1, "optimizer.plateau_factor", factor, "use a factor in (0, 1)")
    _require(patience >= 1, "optimizer.plateau_patience", patience, "use epochs >= 1")
    cap = cfg.train.batch_size_cap_fraction
    rule = "use null or a share in (0, 1]"
    _require(cap is None or 0 < cap <= 1, "train.batch_size_cap_fraction", cap, rule)
    epochs = cfg.checkpoint.every_epochs
    _require(epochs >= 1, "checkpoint.every_epochs", epochs, "use a whole number >= 1")


def _validate_data(data: DataConfig, given: bool) -> None:
    if data.source is not None:  # an archive's dataset name, checked when it is read
        choose("data.source", data.source, DataSource)
    elif not given:  # a loader's name, and what it reads
        check_choice("data.name", data.name, DATASETS)
        if data.name in PATH_REQUIRED and not data.path:
            raise ConfigError(f"data.path is required for data.name={data.name}: set data.path=...")
    normalize = choose("data.normalize", data.normalize, Normalize)
    choose("data.missing", data.missing, Missing)
    if normalize == Normalize.series and data.source != DataSource.ucr:
        raise ConfigError(
            f"data.normalize=series z-normalizes series of data.source=ucr, not data.name="
            f"{data.name}; use data.normalize=dataset (the per-channel mean and std)"
        )
    _require(_in_unit(data.val_fraction), "data.val_fraction", data.val_fraction, "use [0, 1)")
    for key in ("train_limit", "test_limit"):
        value = getattr(data, key)
        _require(value is None or value >= 1, f"data.{key}", value, "use null or a count >= 1")
    crop = data.augment.crop_padding
    _require(crop >= 0, "data.augment.crop_padding", crop, "use 0 (off) or pixels >= 1")
    shift, scale = data.augment.shift, data.augment.scale
    _require(shift >= 0, "data.augment.shift", shift, "use 0 (off) or steps >= 1")
    _require(_in_unit(scale), "data.augment.scale", scale, "use 0 (off) or a fraction in (0, 1)")


def check_series(cfg: Config, arch: Architecture | None, data: Dataset) -> None:
    """Series of unequal lengths (padded, with a mask): the network must mask them, which a
    module of one's own does not, and the shortest must keep a step through every layer (the
    geometry checked the padded length); each refusal names the dataset and the lengths."""
    splits = [s.lengths for s in (data.train, data.val, data.test) if s.lengths is not None]
    if not any(len(lengths) for lengths in splits):
        return
    shortest = int(min(lengths.min(initial=data.image_shape[0]) for lengths in splits))
    padded = f"{shortest}..{data.image_shape[0]} steps, padded to the longest with a mask"
    if cfg.model._target_:
        raise ConfigError(
            f"data.name={data.name} holds series of unequal lengths ({padded}), which only the "
            "layer-language nets (model.layers) mask; use one, or an equal-length version "
            f"such as data.name={data.name}_eq where the archive has one"
        )
    try:
        geometry.layers(cfg.model, (shortest, *data.image_shape[1:]), data.num_classes, arch)
    except GeometryError as e:
        raise GeometryError(
            f"data.name={data.name}: its shortest series ({padded}) is too short for the "
            f"network: {e}", e.rows, e.sized,
        ) from e  # fmt: skip


def _validate_size(cfg: Config, arch: Architecture | None, shape: DataShape) -> None:
    """The geometry, then the memory of a training step against this machine's: JAX is not loaded
    yet, so an accelerator's memory is checked later (`cnnlab.train.run.prepare`), and on a GPU
    machine the host's memory only refuses what fits nowhere."""
    rows = geometry.layers(cfg.model, shape.example_shape, shape.num_classes, arch)
    est = memory.estimate(cfg, rows, memory.dataset_bytes(cfg.data, shape))
    memory.check(est, memory.host_available())


def _validate_seeds(seeds: list[int], strategy: str) -> None:
    choose("seeds_strategy", strategy, SeedsStrategy)
    seeds_text = f"[{','.join(map(str, seeds))}]"
    _require(all(s >= 0 for s in seeds), "seeds", seeds_text, "use whole numbers >= 0")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        unique = ",".join(map(str, dict.fromkeys(seeds)))
        raise ConfigError(
            f"seeds={seeds_text} repeats seed {repeated[0]}, which would train the same model "
            f"twice; use seeds=[{unique}]"
        )


def _validate_distributed(dist: DistributedConfig) -> None:
    n, rank, address = dist.num_processes, dist.process_id, dist.coordinator_address
    values = {"coordinator_address": address, "num_processes": n, "process_id": rank}
    given = [key for key, value in values.items() if value is not None]
    if given and not dist.enabled:
        raise ConfigError(f"distributed.{given[0]} is set but unused: add distributed.enabled=true")
    _require(n is None or n >= 1, "distributed.num_processes", n, "use null or a count >= 1")
    if rank is not None:
        rule = f"use null or a rank in [0, {n})" if n else "use null or a rank >= 0"
        _require(0 <= rank < (n or math.inf), "distributed.process_id", rank, rule)
    if address is not None:
        host, _, port = address.rpartition(":")
        ok = bool(host) and port.isdigit()
        _require(ok, "distributed.coordinator_address", address, "use host:port, e.g. node001:1234")


def check_devices(train: TrainConfig, num_devices: int, backend: str) -> None:
    """The checks that need the started JAX runtime (so not `validate`, which the pre-flight runs
    on the submitting machine): each step splits its batch evenly over every device."""
    b = train.batch_size
    if b % num_devices:
        lower, upper = b // num_devices * num_devices, -(-b // num_devices) * num_devices
        fix = " or ".join(f"train.batch_size={v}" for v in (lower, upper) if v)
        raise ConfigError(
            f"train.batch_size={b} does not split evenly over the {num_devices} devices; use {fix}"
        )
    if train.precision == Precision.bfloat16 and backend == "cpu":
        print(
            "cnnlab: warning: train.precision=bfloat16 is meant for GPUs and TPUs; "
            "on the CPU it is slower than float32",
            file=sys.stderr,
        )
