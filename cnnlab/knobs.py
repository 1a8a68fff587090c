"""The model config's knobs, applied to a layer list: sweeps over a whole network in one key.

A knob left null keeps what the layers say. Set, it changes every layer it names:
- `conv_layers=N` (or, unset, the length of the first per-conv list below): the first N conv
  blocks of a plain stack (a block is a conv and the layers up to the next conv), the last of
  them ending with the stack's last pool; above the stack's count, copies of its last block
  before it, pooled only where the stack pools after every conv;
- `depth`: an int scales every conv width so that the first has `depth` filters; a list gives
  each conv its width;
- `kernel_size`, `stride`, `padding`: one value for every conv, or a list with one per conv;
- `activation`: every activation layer; `pool`, `pool_size`, `pool_stride`: every pooling layer;
- `norm`: the kind of every normalization layer, inserted after each conv where the list has
  none; `none` removes them; `norm_groups`: every GroupNorm's groups;
- `dense`: the hidden dense layers (each with the dropout before it and the activation after it,
  as the first one has them);
- `dropout`: every dropout layer's rate, inserted before each dense layer where the list has none.
Convs inside residual blocks count with the rest, in order.
"""

import dataclasses
from enum import StrEnum
from typing import Any

from cnnlab.architecture import (
    Act,
    Activation,
    Conv,
    Dense,
    Dropout,
    Flatten,
    GlobalPool,
    Norm,
    NormKind,
    Pool,
    PoolKind,
    Residual,
    _padding,
    _positive,
    _rate,
)  # fmt: skip
from cnnlab.config import ModelConfig
from cnnlab.errors import ConfigError, choose


class NormKnob(StrEnum):
    """`model.norm`: a kind of `NormKind`, or none."""

    none = "none"
    batch = "batch"
    group = "group"
    layer = "layer"


def apply(layers: tuple, cfg: ModelConfig) -> tuple:
    """`layers` with every knob of `cfg` that is set applied."""
    count = cfg.conv_layers if cfg.conv_layers is not None else _listed_count(layers, cfg)
    if count is not None:
        layers = _conv_layers(layers, count)
    layers = _per_conv(layers, cfg)
    if cfg.activation is not None:
        fn = choose("model.activation", cfg.activation, Activation)
        layers = _each(layers, Act, fn=fn)
    if cfg.pool is not None:
        layers = _each(layers, Pool, kind=choose("model.pool", cfg.pool, PoolKind))
    for key, field in (("pool_size", "window"), ("pool_stride", "stride")):
        if (value := getattr(cfg, key)) is not None:
            layers = _each(layers, Pool, **{field: _checked(key, value, _positive)})
    layers = _norm(layers, cfg.norm, cfg.norm_groups)
    if cfg.dense is not None:
        layers = _dense(layers, cfg.dense)
    if cfg.dropout is not None:
        layers = _dropout(layers, _checked("dropout", cfg.dropout, _rate))
    return layers


def _listed_count(layers: tuple, cfg: ModelConfig) -> int | None:
    """Without `conv_layers`, the first per-conv list sets how many conv blocks a plain stack
    has (`model.depth=[8,16,32]` gives LeNet-5 a third); None where no list changes it."""
    for key in ("depth", "kernel_size", "stride", "padding"):
        value = getattr(cfg, key)
        if isinstance(value, list | tuple):
            convs = sum(isinstance(layer, Conv) for layer in _flat(layers))
            plain = not any(isinstance(layer, Residual) for layer in layers)
            return len(value) if value and plain and len(value) != convs else None
    return None


def _checked(key: str, value: Any, check) -> Any:
    if not check(value):
        raise ConfigError(f"model.{key}={value!r} is invalid: use {check.__doc__}")
    return value


def _each(layers: tuple, cls: type, **changes) -> tuple:
    """Every layer of type `cls`, in residual blocks too, with `changes`."""
    return tuple(
        dataclasses.replace(layer, **changes) if isinstance(layer, cls)
        else dataclasses.replace(layer, layers=_each(layer.layers, cls, **changes))
        if isinstance(layer, Residual) else layer
        for layer in layers
    )  # fmt: skip


# --- conv_layers -------------------------------------------------------------------------------


def _blocks(layers: tuple) -> tuple[list[list], tuple]:
    """A plain stack's conv blocks, and the layers after them (flatten, global_pool, dense on)."""
    end = next(
        (i for i, layer in enumerate(layers) if isinstance(layer, Flatten | GlobalPool | Dense)),
        len(layers),
    )
    trunk, blocks = layers[:end], []
    for layer in trunk:
        if isinstance(layer, Residual) or (not blocks and not isinstance(layer, Conv)):
            what = "a residual block" if isinstance(layer, Residual) else "a layer before a conv"
            raise ConfigError(
                "model.conv_layers applies to a plain stack of conv blocks; this network has "
                f"{what}: edit model.layers instead"
            )
        if isinstance(layer, Conv):
            blocks.append([])
        blocks[-1].append(layer)
    return blocks, layers[end:]


def _conv_layers(layers: tuple, n: Any) -> tuple:
    n = _checked("conv_layers", n, _positive)
    blocks, head = _blocks(layers)
    if not blocks:
        raise ConfigError("model.conv_layers is set but the network has no conv layer")
    last = blocks[-1]
    last_pools = [layer for layer in last if isinstance(layer, Pool)]
    unpooled = lambda block: [layer for layer in block if not isinstance(layer, Pool)]
    if n <= len(blocks):
        kept = blocks[:n]
        kept[-1] = unpooled(kept[-1]) + last_pools
    else:
        every = all(any(isinstance(layer, Pool) for layer in block) for block in blocks)
        copy = last if every else unpooled(last)
        kept = blocks[:-1] + [copy] * (n - len(blocks)) + [last]
    return tuple(layer for block in kept for layer in block) + tuple(head)


# --- per-conv values ---------------------------------------------------------------------------


def _per_layer(key: str, value: Any, n: int, check) -> list:
    """Broadcast a scalar to n convs, or check a list has n entries; validate each entry."""
    values = list(value) if isinstance(value, list | tuple) else [value] * n
    if len(values) != n:
        raise ConfigError(
            f"model.{key} has {len(values)} entries but there are {n} conv layers "
            f"(model.conv_layers={n}); give {n} values or a single one"
        )
    for v in values:
        if not check(v):
            raise ConfigError(f"model.{key}={value!r} is invalid: use {check.__doc__}")
    return values


def _widths(depth: Any, convs: list[Conv]) -> list[int]:
    """An int depth scales the widths so that the first conv has `depth` filters; a list is
    literal."""
    if isinstance(depth, list | tuple):
        return _per_layer("depth", depth, len(convs), _positive)
    if not _positive(depth):
        raise ConfigError(
            f"model.depth={depth!r} must be a whole number of filters >= 1 or a list of them"
        )
    first = convs[0].features
    return [max(1, round(depth * (c.features / first))) for c in convs]


def _per_conv(layers: tuple, cfg: ModelConfig) -> tuple:
    keys = {"depth": "features", "kernel_size": "kernel", "stride": "stride", "padding": "padding"}
    if all(getattr(cfg, key) is None for key in keys):
        return layers
    convs = [layer for layer in _flat(layers) if isinstance(layer, Conv)]
    if not convs:
        raise ConfigError("model.depth, kernel_size, stride and padding need conv layers")
    values: dict[str, list] = {}
    if cfg.depth is not None:
        values["features"] = _widths(cfg.depth, convs)
    for key, check in (("kernel_size", _positive), ("stride", _positive), ("padding", _padding)):
        if (value := getattr(cfg, key)) is not None:
            values[keys[key]] = _per_layer(key, value, len(convs), check)
    replaced = iter(
        dataclasses.replace(conv, **{field: v[i] for field, v in values.items()})
        for i, conv in enumerate(convs)
    )
    return _swap_convs(layers, replaced)


def _flat(layers: tuple):
    for layer in layers:
        yield layer
        if isinstance(layer, Residual):
            yield from _flat(layer.layers)


def _swap_convs(layers: tuple, replaced) -> tuple:
    """`layers` with each conv, in order, taken from the iterator `replaced`."""
    out = []
    for layer in layers:
        if isinstance(layer, Conv):
            layer = next(replaced)
        elif isinstance(layer, Residual):
            layer = dataclasses.replace(layer, layers=_swap_convs(layer.layers, replaced))
        out.append(layer)
    return tuple(out)


# --- normalization, dense head, dropout --------------------------------------------------------


def _norm(layers: tuple, kind: Any, groups: Any) -> tuple:
    if groups is not None:
        layers = _each(layers, Norm, groups=_checked("norm_groups", groups, _positive))
    if kind is None:
        return layers
    if kind == "none":
        return _without(layers, Norm)
    kind = choose("model.norm", kind, NormKnob)
    if any(isinstance(layer, Norm) for layer in _flat(layers)):
        return _each(layers, Norm, kind=NormKind(kind))
    norm = Norm(NormKind(kind)) if groups is None else Norm(NormKind(kind), groups)
    return _after_convs(layers, norm)


def _without(layers: tuple, kind: type) -> tuple:
    return tuple(
        dataclasses.replace(layer, layers=_without(layer.layers, kind))
        if isinstance(layer, Residual) else layer
        for layer in layers
        if not isinstance(layer, kind)
    )  # fmt: skip


def _after_convs(layers: tuple, norm: Norm) -> tuple:
    out = []
    for layer in layers:
        if isinstance(layer, Residual):
            layer = dataclasses.replace(layer, layers=_after_convs(layer.layers, norm))
        out.append(layer)
        if isinstance(layer, Conv):
            out.append(norm)
    return tuple(out)


def _dense(layers: tuple, widths: Any) -> tuple:
    """The hidden dense layers replaced by one per width, each written as the first one is
    (its dropout before, its activation after)."""
    if not isinstance(widths, list | tuple) or not all(_positive(w) for w in widths):
        raise ConfigError(f"model.dense={widths!r} must list widths >= 1 (or be empty)")
    units, start, template = [], None, None
    for i, layer in enumerate(layers):
        if isinstance(layer, Dense):
            lo = i - 1 if i and isinstance(layers[i - 1], Dropout) else i
            hi = i + 2 if i + 1 < len(layers) and isinstance(layers[i + 1], Act) else i + 1
            units.append(range(lo, hi))
            start = lo if start is None else start
            template = template or layers[lo:hi]
    if template is None:
        acts = [layer for layer in _flat(layers) if isinstance(layer, Act)]
        template, start = (Dense(1), *acts[:1]), len(layers)
    dropped = {i for unit in units for i in unit}
    kept = [layer for i, layer in enumerate(layers) if i not in dropped]
    at = start - sum(1 for i in dropped if i < start)
    head = [
        dataclasses.replace(layer, units=w) if isinstance(layer, Dense) else layer
        for w in widths
        for layer in template
    ]
    return tuple(kept[:at] + head + kept[at:])


def _dropout(layers: tuple, rate: float) -> tuple:
    if any(isinstance(layer, Dropout) for layer in _flat(layers)):
        return _each(layers, Dropout, rate=rate)
    if rate == 0:
        return layers
    out = []
    for layer in layers:
        if isinstance(layer, Dense):
            out.append(Dropout(rate))
        out.append(layer)
    return tuple(out)
