"""An architecture as data: the layer language, read into typed layers without JAX.

A network is a list of layers, each one mapping with one *kind* key whose value is the layer's
main setting, and options beside it (`conf/model/*.yaml`, README "Models"):

    - {conv: 6, kernel: 5, padding: 2}   # 6 filters of 5x5 (5 along a series), 2 pixels padding
    - {act: relu}                        # or just: relu
    - {pool: max, window: 2}
    - flatten
    - {dense: 120}

A dense layer of one unit per class, `logits`, always ends the network (the softmax is in the
loss). Kernel, stride, window and padding apply along every spatial axis, so one list builds a
network over images [H, W, C] and over series [L, C].

`resolve` reads `ModelConfig.layers` into these dataclasses, then applies the config's knobs
(`model.depth`, `stride`, `padding`, `kernel_size`, `conv_layers`, `activation`, `pool`, `norm`,
`dense`, `dropout`: `cnnlab.knobs`) and names the layers with parameters (conv1, norm1, dense1,
res1, ...). `cnnlab.geometry` walks the result to compute shapes, and `cnnlab.models.ConvNet`
builds the same layers, so the table and the network agree. Nothing here imports JAX or Flax, so
a config is checked (`cnnlab.validate`) before they load.
"""

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from cnnlab.config import ModelConfig
from cnnlab.errors import ConfigError, choose, closest


class Activation(StrEnum):
    """The non-linearities of `flax.linen` that map each value on its own."""

    relu = "relu"
    gelu = "gelu"
    tanh = "tanh"
    sigmoid = "sigmoid"
    silu = "silu"
    elu = "elu"
    selu = "selu"
    celu = "celu"
    leaky_relu = "leaky_relu"
    softplus = "softplus"
    relu6 = "relu6"
    hard_tanh = "hard_tanh"
    hard_sigmoid = "hard_sigmoid"
    hard_silu = "hard_silu"
    log_sigmoid = "log_sigmoid"
    soft_sign = "soft_sign"


class PoolKind(StrEnum):
    max = "max"
    avg = "avg"


class NormKind(StrEnum):
    """Normalizations after a conv: BatchNorm (Ioffe & Szegedy, 2015) with the batch's statistics
    in training and running averages otherwise; GroupNorm (Wu & He, 2018) and LayerNorm (Ba et
    al., 2016) per example, the same in training and test."""

    batch = "batch"
    group = "group"
    layer = "layer"


@dataclass(frozen=True)
class Conv:
    features: int  # filters = depth of the output volume
    kernel: int = 3  # along every spatial axis
    stride: int = 1
    padding: str | int = "same"  # "same", "valid" or pixels per side
    dilation: int = 1
    bias: bool = True
    name: str = ""


@dataclass(frozen=True)
class Norm:
    kind: NormKind
    groups: int = 8  # GroupNorm's channel groups; they must divide the channels
    name: str = ""


@dataclass(frozen=True)
class Act:
    fn: Activation


@dataclass(frozen=True)
class Pool:
    kind: PoolKind
    window: int = 2
    stride: int | None = None  # None: the window, non-overlapping
    padding: str | int = "valid"

    @property
    def step(self) -> int:
        return self.window if self.stride is None else self.stride


@dataclass(frozen=True)
class GlobalPool:
    kind: PoolKind = PoolKind.avg


@dataclass(frozen=True)
class Dropout:
    rate: float


@dataclass(frozen=True)
class Flatten:
    pass


@dataclass(frozen=True)
class Dense:
    units: int
    bias: bool = True
    name: str = ""


@dataclass(frozen=True)
class Residual:
    """`layers` added to a shortcut: the input itself where the shapes agree, else a 1x1
    convolution (with the branch's stride, and its normalization) that projects it."""

    layers: tuple
    name: str = ""


Layer = Conv | Norm | Act | Pool | GlobalPool | Dropout | Flatten | Dense | Residual


@dataclass(frozen=True)
class Architecture:
    name: str
    layers: tuple  # of Layer, without the logits

    @property
    def convs(self) -> tuple[Conv, ...]:
        """Every conv, those inside residual blocks included, in order."""
        return tuple(layer for layer in walk(self.layers) if isinstance(layer, Conv))


def walk(layers: tuple):
    """Every layer, with the layers of residual blocks after the block itself, in order."""
    for layer in layers:
        yield layer
        if isinstance(layer, Residual):
            yield from walk(layer.layers)


# --- reading the written form ------------------------------------------------------------------


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive(v) -> bool:
    """a whole number >= 1"""
    return _whole(v) and v >= 1


def _padding(v) -> bool:
    """ "same", "valid" or a whole number of pixels >= 0"""
    return v in ("same", "valid") or (_whole(v) and v >= 0)


def _rate(v) -> bool:
    """a rate in [0, 1)"""
    return isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < 1


def _boolean(v) -> bool:
    """true or false"""
    return isinstance(v, bool)


def _stride(v) -> bool:
    """a whole number >= 1, or null for the window"""
    return v is None or _positive(v)


@dataclass(frozen=True)
class Kind:
    """How one kind of layer is written: its main value's meaning and check, its options."""

    cls: type
    main: str  # the dataclass field the kind key sets
    check: Any  # a predicate with a docstring, or an enum of names
    options: dict  # option name -> (dataclass field, predicate or enum)


KINDS = {
    "conv": Kind(Conv, "features", _positive, {
        "kernel": ("kernel", _positive), "stride": ("stride", _positive),
        "padding": ("padding", _padding), "dilation": ("dilation", _positive),
        "bias": ("bias", _boolean),
    }),
    "norm": Kind(Norm, "kind", NormKind, {"groups": ("groups", _positive)}),
    "act": Kind(Act, "fn", Activation, {}),
    "pool": Kind(Pool, "kind", PoolKind, {
        "window": ("window", _positive), "stride": ("stride", _stride),
        "padding": ("padding", _padding),
    }),
    "global_pool": Kind(GlobalPool, "kind", PoolKind, {}),
    "dropout": Kind(Dropout, "rate", _rate, {}),
    "flatten": Kind(Flatten, "", None, {}),
    "dense": Kind(Dense, "units", _positive, {"bias": ("bias", _boolean)}),
    "residual": Kind(Residual, "layers", None, {}),
}  # fmt: skip

# A kind written alone: its main value at its default
BARE = {"flatten": Flatten(), "global_pool": GlobalPool()}


def _value(where: str, value, check):
    if isinstance(check, type) and issubclass(check, StrEnum):
        return choose(where, value, check)
    if not check(value):
        raise ConfigError(f"{where}={value!r} is invalid: use {check.__doc__}")
    return value


def read_layers(spec, where: str = "model.layers") -> tuple:
    """The written layer list as Layer dataclasses; a ConfigError names the layer and key."""
    if not isinstance(spec, list | tuple):
        raise ConfigError(f"{where} must be a list of layers, not {spec!r}")
    return tuple(read_layer(item, f"{where}[{i}]") for i, item in enumerate(spec))


def read_layer(item, where: str) -> Layer:
    """One written layer: a mapping with one kind key, or a bare kind or activation name."""
    if isinstance(item, str):
        if item in BARE:
            return BARE[item]
        if item in Activation.__members__:
            return Act(Activation(item))
        if item in KINDS:
            raise ConfigError(f"{where}: a {item} layer needs a value, e.g. {{{item}: ...}}")
        names = [*BARE, *Activation]
        raise ConfigError(f"{where}={item!r} is not a layer{closest(item, [*KINDS, *names])}")
    if not isinstance(item, dict):
        raise ConfigError(f"{where} must be a layer, e.g. {{conv: 32, kernel: 3}}, not {item!r}")
    kinds = [key for key in item if key in KINDS]
    if len(kinds) != 1:
        return _no_kind(item, kinds, where)
    kind = kinds[0]
    return _read_kind(kind, item, where)


def _no_kind(item: dict, kinds: list, where: str):
    if kinds:
        raise ConfigError(f"{where} has {len(kinds)} kinds ({', '.join(kinds)}): one per layer")
    unknown = next(iter(item), None)
    hint = closest(unknown, KINDS) if unknown is not None else ""
    raise ConfigError(
        f"{where} has no kind{f' ({unknown!r} is not one{hint})' if unknown else ''}: give one "
        f"of {', '.join(KINDS)}"
    )


def _read_kind(kind: str, item: dict, where: str) -> Layer:
    spec, values = KINDS[kind], {}
    main = item[kind]
    if kind == "residual":
        values["layers"] = read_layers(main, f"{where}.residual")
        if not values["layers"]:
            raise ConfigError(f"{where}.residual is empty: give the block's layers")
    elif kind != "flatten":
        if main is None:
            raise ConfigError(f"{where}.{kind} is missing its value ({_meaning(spec)})")
        values[spec.main] = _value(f"{where}.{kind}", main, spec.check)
    for key, value in item.items():
        if key == kind:
            continue
        if key not in spec.options:
            valid = ", ".join(spec.options) or "none"
            raise ConfigError(
                f"{where}.{key}: a {kind} layer has no option {key!r}"
                f"{closest(key, spec.options)} (its options: {valid})"
            )
        field, check = spec.options[key]
        values[field] = _value(f"{where}.{key}", value, check)
    return spec.cls(**values)


def _meaning(spec: Kind) -> str:
    if isinstance(spec.check, type):
        return f"one of {', '.join(spec.check)}"
    return spec.check.__doc__


# --- names -------------------------------------------------------------------------------------


def named(layers: tuple) -> tuple:
    """The layers with their parameter names: conv1, conv2, ... norm1, ... dense1, ... res1, ...
    counted per kind within the list (a residual block counts its own from 1)."""
    counts: dict[str, int] = {}
    out = []
    for layer in layers:
        prefix = {Conv: "conv", Norm: "norm", Dense: "dense", Residual: "res"}.get(type(layer))
        if prefix is None:
            out.append(layer)
            continue
        counts[prefix] = counts.get(prefix, 0) + 1
        changes = {"name": f"{prefix}{counts[prefix]}"}
        if isinstance(layer, Residual):
            changes["layers"] = named(layer.layers)
        out.append(dataclasses.replace(layer, **changes))
    return tuple(out)


def resolve(cfg: ModelConfig) -> Architecture:
    """The configured network's layers, knobs applied and names given; raises ConfigError."""
    from cnnlab import knobs

    layers = knobs.apply(read_layers(cfg.layers), cfg)
    if not layers:
        raise ConfigError("model.layers is empty: pick a preset (model=lenet5) or list layers")
    layers = named(layers)
    _check_groups(layers)
    return Architecture(cfg.name, layers)


def _check_groups(layers: tuple) -> None:
    """Each GroupNorm right after a conv splits that conv's filters evenly (others are checked
    by the geometry, which knows their channels)."""
    flat = list(walk(layers))
    pairs = [
        (a, b) for a, b in zip(flat, flat[1:], strict=False)
        if isinstance(a, Conv) and isinstance(b, Norm) and b.kind == NormKind.group
    ]  # fmt: skip
    widths = [conv.features for conv, _ in pairs]
    for conv, norm in pairs:
        if conv.features % norm.groups:
            fits = [g for g in range(1, min(widths) + 1) if all(w % g == 0 for w in widths)]
            raise ConfigError(
                f"model.norm_groups={norm.groups} does not divide {conv.name}'s {conv.features} "
                f"filters; groups that divide every conv width {widths}: {fits}"
            )


__all__ = [
    "Act", "Activation", "Architecture", "Conv", "Dense", "Dropout", "Flatten", "GlobalPool",
    "Layer", "Norm", "NormKind", "Pool", "PoolKind", "Residual", "read_layers", "resolve", "walk",
]  # fmt: skip
