"""Typed configuration schema: one dataclass per Hydra config group.

Hydra composes YAML from `conf/` on top of these dataclasses (registered in a ConfigStore by the
entry points), the entry point converts the result once (`experiments.hydra_conf.to_config`, on
`from_dict`), and from then on the library only sees these plain dataclasses. Functions take the
part they need (`ModelConfig`, `DataConfig`, ...), never the whole tree.

Fields typed `Any` accept an int/str or a per-layer list; OmegaConf cannot express such unions, so
`cnnlab.validate` checks them instead.
"""

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from cnnlab.errors import ConfigError
from cnnlab.malloc import DEFAULT_ARENAS

# LeNet-5 (LeCun et al., 1998) on 28x28 inputs, the schema's default network (conf/model/lenet5.yaml
# writes the same list): C1 pads 28x28 to the paper's 32x32 field, C5 is a dense layer on S4's
# 5x5x16 map; 61,706 parameters with the 10 logits.
LENET5_LAYERS = [
    {"conv": 6, "kernel": 5, "padding": 2}, "relu", {"pool": "max", "window": 2},
    {"conv": 16, "kernel": 5, "padding": 0}, "relu", {"pool": "max", "window": 2},
    "flatten", {"dense": 120}, "relu", {"dense": 84}, "relu",
]  # fmt: skip


# The closed sets of names a config chooses from, one list each: the training code's tables are
# keyed by them (tests/test_config.py checks that every member has an implementation), and
# `cnnlab.validate` checks a config against them before JAX loads. The schema's fields stay `str`:
# typed as the Enum, OmegaConf would check them while composing and answer a typo with its own
# "Invalid value 'adamx', expected one of [sgd, adamw]" and two more lines, before cnnlab's one
# line that names the closest valid name; `to_yaml` could not write Enum members either.


class LossName(StrEnum):
    """`loss.name`: `cnnlab.train.losses.LOSSES`."""

    cross_entropy = "cross_entropy"
    squared_error = "squared_error"


class OptimizerName(StrEnum):
    """`optimizer.name`: `cnnlab.train.optim.OPTIMIZERS`."""

    sgd = "sgd"
    adamw = "adamw"


class ScheduleName(StrEnum):
    """`optimizer.schedule`: `cnnlab.train.optim.SCHEDULES`."""

    constant = "constant"
    cosine = "cosine"
    warmup_cosine = "warmup_cosine"
    plateau = "plateau"


class Precision(StrEnum):
    """`train.precision`: `cnnlab.train.step.PRECISIONS`."""

    float32 = "float32"
    bfloat16 = "bfloat16"


class DataSource(StrEnum):
    """`data.source`: where `data.name` is looked up besides `cnnlab.data.DATASETS` (null)."""

    ucr = "ucr"


class Normalize(StrEnum):
    """`data.normalize`: how examples are scaled before the network (`cnnlab.data`)."""

    dataset = "dataset"
    series = "series"


class Missing(StrEnum):
    """`data.missing`: what becomes of the NaN of a series (`cnnlab.data.ucr.fill_missing`)."""

    interpolate = "interpolate"
    zero = "zero"
    error = "error"


class LoggerMode(StrEnum):
    """`logger.mode`: W&B's own modes (`cnnlab.tracking.wandb_run`)."""

    online = "online"
    offline = "offline"
    disabled = "disabled"


class OnInvalid(StrEnum):
    """`sweep.on_invalid`: what a multirun does with an impossible point (`SweepConfig`)."""

    skip = "skip"
    refuse = "refuse"


class SeedsStrategy(StrEnum):
    """`seeds_strategy`: `cnnlab.train.seeds.STRATEGIES`, and `auto`, which picks one of them."""

    auto = "auto"
    vmap = "vmap"
    sequential = "sequential"
    processes = "processes"


@dataclass
class ModelConfig:
    """A network as a list of layers (`cnnlab.architecture`, README "Models"), and knobs that
    change every layer of a kind at once (`cnnlab.knobs`): null leaves the layers as written. Or
    a Flax module of one's own (`_target_`), which reads neither."""

    name: str = "lenet5"  # the preset's name, in run names and reports
    layers: list[Any] = field(default_factory=lambda: [*LENET5_LAYERS])
    # Number of filters = depth of each conv layer's output volume. An int scales every conv
    # width so that the first conv has `depth` filters; a list gives each conv its width.
    depth: Any = None
    conv_layers: int | None = None  # keep (or repeat) conv blocks of a plain stack
    kernel_size: Any = None  # conv kernel side; one value or one per conv
    stride: Any = None  # conv stride; one value or one per conv
    padding: Any = None  # "same", "valid" or pixels per side; one value or one per conv
    activation: str | None = None  # every activation layer: relu, gelu, tanh, ... (Activation)
    pool: str | None = None  # every pooling layer: max | avg
    pool_size: int | None = None  # every pooling layer's window side
    pool_stride: int | None = None  # ... and stride (< pool_size: overlapping)
    dense: list[int] | None = None  # the hidden fully connected widths
    dropout: float | None = None  # every dropout layer's rate (one before each dense if none)
    # none | batch | group | layer: the kind of every normalization layer, one after each conv
    # (before its activation) where the layers have none. batch: BatchNorm (Ioffe & Szegedy,
    # 2015), batch statistics in training, running averages in evaluation. group: GroupNorm (Wu &
    # He, 2018), each example on its own, the same in both.
    norm: str | None = None
    norm_groups: int | None = None  # GroupNorm's channel groups; they must divide its channels
    # A researcher's own Flax Linen module instead of the layers (README, "Your own module"): its
    # import path, e.g. my_package.nets.MyNet, and the values of its fields (cnnlab.models.user).
    # In Hydra's YAML and overrides the fields are keys beside _target_ (+model.width=16, Hydra's
    # instantiate convention); experiments/hydra_conf.py gathers them into `fields`.
    _target_: str | None = None
    fields: Any = field(default_factory=dict)  # field name -> value; checked against the module


@dataclass
class AugmentConfig:
    """The training split's random augmentation, inside the train step (`cnnlab.preprocess`);
    evaluation never augments. The first three act on uint8 images, `shift` and `scale` on series
    [L, C]; each kind is refused on the other."""

    crop_padding: int = 0  # random crop after zero-padding each side by this many pixels; 0 = off
    flip: bool = False  # random horizontal flip
    # random erasing (Zhong et al., 2017): the share of images that get one rectangle of uniform
    # noise, of `erase_scale` (min, max) of the image's area and aspect ratio within
    # [erase_ratio, 1 / erase_ratio]; 0 = off
    erase: float = 0.0
    erase_scale: list[float] = field(default_factory=lambda: [0.02, 0.4])
    erase_ratio: float = 0.3
    # series: move each series along time by a whole number of steps drawn from
    # [-shift, shift], within its own length (steps moved past its end are dropped, those
    # uncovered are 0, the mean after normalizing); 0 = off
    shift: int = 0
    # series: multiply each series and channel by a factor drawn from [1 - scale, 1 + scale],
    # after normalizing (so about the mean); 0 = off
    scale: float = 0.0


@dataclass
class DataConfig:
    # fashion_mnist | mnist | cifar10 (TFDS names), idx (a folder of MNIST-format files) or
    # image_folder (train/<class>/*.png|jpg and test/<class>/..., a folder or a .zip); with
    # source=ucr, a dataset of the UCR/UEA time-series archives (GunPoint, BasicMotions, ...)
    name: str = "fashion_mnist"
    # null: data.name is one of the loaders above. ucr: data.name is a dataset of the UCR/UEA
    # archives, read through aeon (conf/data/ucr.yaml), from data.path's <name>_TRAIN.ts and
    # <name>_TEST.ts where it is set
    source: str | None = None  # DataSource
    path: str | None = None  # a local copy; required for idx and image_folder
    tfds_data_dir: str | None = None  # where TFDS keeps its datasets; None = TFDS's default
    val_fraction: float = 0.1  # share of train held out for validation (model selection)
    split_seed: int = 0  # fixes which examples are held out, independently of the training seed
    train_limit: int | None = None  # use only the first N training examples (quick runs, tests)
    test_limit: int | None = None  # use only the first N test examples
    # dataset: the training split's per-channel mean and std, inside the step (images). series:
    # each series and channel to mean 0, std 1 over its time steps, once on loading (the UCR/UEA
    # archives' convention; data.source=ucr only)
    normalize: str = "dataset"  # Normalize
    # NaN in a series (data.source=ucr): interpolate (linearly along time per channel, the ends
    # take the nearest value), zero (NaN -> 0: with normalize=series, the series' mean), or
    # error (refuse the dataset)
    missing: str = "interpolate"  # Missing
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class OptimizerConfig:
    name: str = "sgd"  # sgd | adamw (OptimizerName)
    lr: float = 0.05  # peak learning rate
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    b1: float = 0.9  # adamw only
    b2: float = 0.999  # adamw only
    eps: float = 1e-8  # adamw only
    weight_decay: float = 0.0  # decoupled decay on weight matrices and kernels (not biases)
    schedule: str = "cosine"  # constant | cosine | warmup_cosine | plateau (ScheduleName)
    warmup_epochs: float = 0.0  # warmup_cosine only
    # cosine schedules decay to lr * end_lr_factor; plateau never goes below it
    end_lr_factor: float = 0.0
    # plateau only: the rate is multiplied by plateau_factor whenever the epoch's mean training
    # loss has not improved (by a relative 1e-4) for plateau_patience epochs in a row, Keras's
    # ReduceLROnPlateau(monitor="loss") as the FCN and ResNet baselines of Wang et al. use it
    plateau_factor: float = 0.5
    plateau_patience: int = 50  # epochs
    grad_clip_norm: float | None = None  # clip the global gradient norm; None = no clipping
    # 0: a non-finite loss or gradient stops the run (status diverged). N > 0: skip such updates
    # (optax.apply_if_finite), counted as train/skipped_updates; N in a row still stop it.
    skip_nonfinite: int = 0


@dataclass
class LossConfig:
    # cross_entropy: softmax cross-entropy; squared_error: 0.5 * sum((target - softmax)^2), the
    # "total error" of the classic formulation
    name: str = "cross_entropy"  # LossName
    label_smoothing: float = 0.0  # in [0, 1)


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    # Cap batch_size at this share of the training examples (rounded down, at least 1), for sets
    # of a few dozen series: the time-series baselines' min(16, N/10) is batch_size=16 with 0.1.
    # null: no cap.
    batch_size_cap_fraction: float | None = None
    eval_batch_size: int = 1000
    log_every_steps: int = 100  # metrics record, progress line and W&B point every N steps
    eval_every_epochs: int = 1  # validation accuracy every N epochs (and always after the last)
    # float32, or bfloat16 mixed precision for GPUs and TPUs: the forward and backward pass run in
    # bfloat16 while the parameters, the optimizer state and the loss stay float32
    precision: str = "float32"  # Precision


@dataclass
class LoggerConfig:
    mode: str = "offline"  # LoggerMode: online | offline | disabled; local files are always written
    project: str = "cnnlab"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    init_timeout: float = 10.0  # seconds before an unreachable W&B server falls back to offline
    num_sample_predictions: int = 32  # rows of the W&B table of test images and predictions
    # Draw filters, feature maps, confusion matrix, curves and the most confidently wrong test
    # images into <run dir>/pictures/ at the end of a run, and log them to W&B (a few seconds).
    pictures: bool = True


@dataclass
class SweepConfig:
    # What a multirun does with a point whose geometry or values are impossible: "skip" records it
    # as status "invalid" in its job folder and trains nothing; "refuse" stops the whole sweep in
    # the pre-flight, before any job starts.
    on_invalid: str = "skip"  # OnInvalid
    # Skip a point whose resolved config (see config_hash) already finished under the same
    # multirun/<name>/ folder, copying its results instead of training again.
    skip_done: bool = True


@dataclass
class CheckpointConfig:
    """The training state saved in `<run dir>/checkpoints/<step>/` (cnnlab.checkpoint), at every
    `every_epochs`-th epoch end and the last, every `every_steps` steps and on SIGTERM, SIGUSR1 or
    SIGUSR2 (SLURM's warnings)."""

    every_steps: int | None = 1000  # also save every N steps within an epoch; null = epoch ends
    # Save at every K-th epoch end (and the last). 1 suits epochs of seconds or more; where an
    # epoch is a few steps (a UCR set of 50 series) a save costs more than the epoch.
    every_epochs: int = 1
    keep: int = 2  # the newest checkpoints kept; older ones are deleted
    # Continue from the newest good checkpoint when the run directory already holds one (a rerun
    # with the same hydra.run.dir, a requeued SLURM job); false refuses such a directory.
    resume: bool = True
    # Start from the parameters of another run (its directory, or a checkpoint folder in it) with
    # a fresh optimizer and step 0; ignored when resuming, whose state already has them.
    init_from: str | None = None


@dataclass
class DistributedConfig:
    """Multi-host training: one JAX runtime over the devices of several processes (README,
    Multi-host). Unset (null) values are read by `jax.distributed.initialize` from SLURM's or a
    Cloud TPU's environment."""

    enabled: bool = False  # call jax.distributed.initialize before the first computation
    coordinator_address: str | None = None  # host:port that process 0 listens on
    num_processes: int | None = None  # processes in the run, over all hosts
    process_id: int | None = None  # this process's rank, in [0, num_processes)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    seed: int = 0  # root of every PRNG key: init, dropout, augmentation, data order
    # Train one model per seed in one program, each with its own seed_<s>/ folder and W&B run
    # (cnnlab.train.seeds); empty = one run with `seed`.
    seeds: list[int] = field(default_factory=list)
    # How the seeds run: vmap (one program over stacked models), sequential (one after another,
    # reusing the compiled steps), processes (one process per seed, side by side on a CPU's
    # cores) or auto (cnnlab.train.seeds.choose_strategy: vmap on one GPU or TPU; on the CPU,
    # processes for several seeds where there are cores for them, else sequential).
    seeds_strategy: str = "auto"  # SeedsStrategy
    name: str = "default"  # experiment name, used for run directories and W&B run names
    # JAX's persistent compilation cache: a repeated run or sweep job with known shapes skips
    # compilation. null turns it off.
    compilation_cache: str | None = "~/.cache/cnnlab/jax"
    # The C allocator's arenas in a training process (cnnlab.malloc): 2 keep a LeNet-5 process
    # about 40 MB smaller than glibc's default (8 per core); null = glibc's default.
    malloc_arenas: int | None = DEFAULT_ARENAS
    # GPU runs that repeat bit for bit: XLA's deterministic-ops flags, slower kernels, and a
    # warning for max pooling, whose gradient has no deterministic GPU implementation (README,
    # Reproducibility). The CPU is deterministic without it.
    deterministic: bool = False


def identity(cfg: Config) -> dict:
    """What a run computes: its resolved config without the logging, naming and sweep-control
    keys, which do not change the results (a nested dict of plain values)."""
    from dataclasses import asdict

    content = {k: v for k, v in asdict(cfg).items() if k not in _NOT_HASHED}
    content["checkpoint"] = {"init_from": cfg.checkpoint.init_from}  # the rest is bookkeeping
    return content


def config_hash(cfg: Config) -> str:
    """A short hash of `identity`: equal for two configs that compute the same run."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(identity(cfg), sort_keys=True).encode()).hexdigest()[:16]


def identity_changes(saved: dict, cfg: Config) -> list[str]:
    """The dotted keys where `cfg` computes something else than the run whose `identity` was
    `saved`, as "key: saved -> now". A key that `saved` lacks (added to cnnlab since) counts only
    when `cfg` moves it off its default; a key that cfg lacks (since removed) does not count."""
    now, default = flatten(identity(cfg)), flatten(identity(Config()))
    old = flatten(saved)
    return [
        f"{key}: {old.get(key, 'unset')!r} -> {value!r}"
        for key, value in now.items()
        if (old[key] != value if key in old else value != default.get(key))
    ]


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"model.depth": 6, ...}; lists stay values."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# How a run is started, logged and named; `malloc_arenas` sets how much freed memory a process
# keeps; `distributed` only says how processes find each other;
# `seeds_strategy` changes the order of float sums at most, not what is computed.
_NOT_HASHED = (
    *("logger", "name", "sweep", "compilation_cache", "malloc_arenas", "distributed"),
    "seeds_strategy",
)


def closest_key(dotted: str) -> str | None:
    """The valid config key nearest to a mistyped dotted key, e.g. model.depht -> model.depth,
    trian.epochs -> train.epochs (a mistyped group is matched among the groups)."""
    import difflib
    from dataclasses import fields, is_dataclass

    schema, prefix = Config, ""
    *parents, last = dotted.split(".")
    for part in parents:
        groups = {f.name: f.type for f in fields(schema) if is_dataclass(f.type)}
        close = difflib.get_close_matches(part, list(groups), n=1)
        if part not in groups and not close:
            return None
        part = part if part in groups else close[0]
        schema, prefix = groups[part], f"{prefix}{part}."
    close = difflib.get_close_matches(last, [f.name for f in fields(schema)], n=1)
    return f"{prefix}{close[0]}" if close else None


def from_dict(tree: dict, schema: type = Config, prefix: str = "") -> Any:
    """A `schema` dataclass (the whole `Config` by default) from nested plain dicts, such as
    `yaml.safe_load` of a run's config.yaml gives. A key the tree lacks keeps its default (a run
    written before cnnlab added it computes what the default computes). An unknown key, a typo or
    one cnnlab has removed since, is a ConfigError naming the closest valid key: a removed key may
    have changed what the run computed, so it is never dropped silently. A value of the wrong type
    is a ConfigError too; ints become floats where a float is expected, as OmegaConf does."""
    from dataclasses import fields, is_dataclass

    if not isinstance(tree, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'} must be a mapping, not {tree!r}")
    known = {f.name: f.type for f in fields(schema)}
    values = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            if isinstance(value, dict) and value:  # trian: {epochs: 3}: name the leaf
                dotted += f".{next(iter(value))}"
            close = closest_key(dotted)
            hint = f"; did you mean {close}?" if close else ""
            valid = ", ".join(sorted(known))
            raise ConfigError(f"unknown config key {dotted}{hint} (valid here: {valid})")
        if is_dataclass(known[key]):
            values[key] = from_dict(value, known[key], f"{dotted}.")
        else:
            values[key] = _typed(value, known[key], dotted)
    return schema(**values)


def _typed(value: Any, kind: Any, dotted: str) -> Any:
    """`value` as the field type `kind` (Any, str, int, float, bool, X | None or list[X])."""
    import typing

    if kind is Any:
        return value
    args = typing.get_args(kind)
    if type(None) in args:  # X | None
        (inner,) = (a for a in args if a is not type(None))
        return None if value is None else _typed(value, inner, dotted)
    if typing.get_origin(kind) is list and isinstance(value, list | tuple):
        return [_typed(v, args[0], f"{dotted}[{i}]") for i, v in enumerate(value)]
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, int | float | str) and not isinstance(value, bool):
        return str(value)
    if kind in (int, bool) and type(value) is kind:
        return value
    name = getattr(kind, "__name__", str(kind))
    raise ConfigError(f"{dotted} must be {name}, not {value!r}")


def to_yaml(cfg: Config) -> str:
    """`cfg` as YAML (a run's config.yaml); `from_dict(yaml.safe_load(...))` reads it back equal."""
    from dataclasses import asdict

    import yaml

    def plain(value: Any) -> Any:  # tuples (a per-layer setting given in code) as YAML lists
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return [plain(v) for v in value] if isinstance(value, list | tuple) else value

    return yaml.safe_dump(plain(asdict(cfg)), sort_keys=False, allow_unicode=True)
