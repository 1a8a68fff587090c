"""What a `ModelConfig` describes, layer by layer, without JAX: the one place where the config's
scalars-or-lists become per-layer hyper-parameters.

`resolve` turns depth, kernel_size, stride and padding into one value per conv layer and checks
every range; `cnnlab.geometry` walks the result to compute shapes, and `cnnlab.models.build_model`
passes the same values to the Flax module, so the table and the network agree. Nothing here
imports JAX or Flax, so a config is checked (`cnnlab.validate`) before they load: a mistake on
the command line answers in a fraction of a second.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from cnnlab.config import ModelConfig
from cnnlab.errors import ConfigError, check_choice

# The names cnnlab.models.layers implements (tests/test_config.py checks that they agree).
ACTIVATIONS = ("relu", "tanh")
POOLS = ("max", "avg")
NORMS = ("none", "batch", "group")  # what may follow each conv, before its activation


class Family(NamedTuple):
    """An architecture's layout: the conv widths that `model.depth` scales (so that conv1 has
    `depth` filters), and which of `num_conv` conv layers a pooling layer follows."""

    base_widths: tuple[int, ...]
    pools: Callable[[int], tuple[bool, ...]]


FAMILIES = {
    # LeNet-5: C1 and C3 (6, 16 filters), each followed by a subsampling layer (S2, S4, ...)
    "lenet5": Family((6, 16), lambda num_conv: (True,) * num_conv),
    # AlexNet's widths 96:256:384:384:256, pools after the first two conv layers and the last
    "alexnet_lite": Family(
        (96, 256, 384, 384, 256),
        lambda num_conv: tuple(i < 2 or i == num_conv - 1 for i in range(num_conv)),
    ),
}


class Conv(NamedTuple):
    features: int  # filters = depth of the output volume
    kernel: int
    stride: int
    padding: str | int  # "same", "valid" or pixels per side
    pool: bool  # followed by a pooling layer


@dataclass(frozen=True)
class Architecture:
    name: str
    convs: tuple[Conv, ...]
    dense: tuple[int, ...]
    activation: str
    pool: str
    pool_size: int
    pool_stride: int
    dropout: float
    norm: str = "none"  # a key of NORMS
    norm_groups: int = 8

    @property
    def num_conv(self) -> int:
        return len(self.convs)

    @property
    def kernels(self) -> tuple[int, ...]:
        return tuple(c.kernel for c in self.convs)


def _per_layer(key: str, value: Any, n: int, check) -> tuple:
    """Broadcast a scalar to n layers, or check a list has n entries; validate each entry."""
    values = list(value) if isinstance(value, list | tuple) else [value] * n
    if len(values) != n:
        raise ConfigError(
            f"model.{key} has {len(values)} entries but there are {n} conv layers "
            f"(model.conv_layers={n}); give {n} values or a single one"
        )
    for v in values:
        if not check(v):
            raise ConfigError(f"model.{key}={value!r} is invalid: {check.__doc__}")
    return tuple(values)


def _positive_int(v) -> bool:
    """each value must be a whole number >= 1"""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _padding(v) -> bool:
    """use "same", "valid" or a whole number of pixels >= 0"""
    return v in ("same", "valid") or (isinstance(v, int) and not isinstance(v, bool) and v >= 0)


def _num_conv(cfg: ModelConfig, base: tuple[int, ...]) -> int:
    if cfg.conv_layers is not None:
        if not _positive_int(cfg.conv_layers):
            raise ConfigError(f"model.conv_layers={cfg.conv_layers!r} must be a whole number >= 1")
        return cfg.conv_layers
    for key in ("depth", "kernel_size", "stride", "padding"):
        if isinstance(value := getattr(cfg, key), list | tuple):
            return len(value)  # a per-layer list sets the count when conv_layers is unset
    return len(base)


def _widths(depth: Any, base: tuple[int, ...], n: int) -> tuple[int, ...]:
    """An int depth scales the base widths so that conv1 has `depth` filters; a list is literal."""
    if isinstance(depth, list | tuple):
        return _per_layer("depth", depth, n, _positive_int)
    if not _positive_int(depth):
        raise ConfigError(
            f"model.depth={depth!r} must be a whole number of filters >= 1 or a list of them"
        )
    ratios = [w / base[0] for w in base] + [base[-1] / base[0]] * max(n - len(base), 0)
    return tuple(max(1, round(depth * r)) for r in ratios[:n])


def resolve(cfg: ModelConfig) -> Architecture:
    """Per-layer hyper-parameters of the configured model; raises ConfigError on bad values."""
    check_choice("model.name", cfg.name, FAMILIES)
    check_choice("model.activation", cfg.activation, ACTIVATIONS)
    check_choice("model.pool", cfg.pool, POOLS)
    family = FAMILIES[cfg.name]
    n = _num_conv(cfg, family.base_widths)
    widths = _widths(cfg.depth, family.base_widths, n)
    kernels = _per_layer("kernel_size", cfg.kernel_size, n, _positive_int)
    strides = _per_layer("stride", cfg.stride, n, _positive_int)
    paddings = _per_layer("padding", cfg.padding, n, _padding)
    for key in ("pool_size", "pool_stride"):
        if not _positive_int(getattr(cfg, key)):
            raise ConfigError(f"model.{key}={getattr(cfg, key)!r} must be a whole number >= 1")
    if not all(_positive_int(d) for d in cfg.dense):
        raise ConfigError(f"model.dense={list(cfg.dense)} must list widths >= 1 (or be empty)")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"model.dropout={cfg.dropout} must be in [0, 1)")
    check_choice("model.norm", cfg.norm, NORMS)
    if cfg.norm == "group":
        _check_groups(cfg.norm_groups, widths)
    pools = family.pools(n)
    return Architecture(
        name=cfg.name,
        convs=tuple(map(Conv, widths, kernels, strides, paddings, pools)),
        dense=tuple(cfg.dense),
        activation=cfg.activation,
        pool=cfg.pool,
        pool_size=cfg.pool_size,
        pool_stride=cfg.pool_stride,
        dropout=cfg.dropout,
        norm=cfg.norm,
        norm_groups=cfg.norm_groups,
    )


def _check_groups(groups: Any, widths: tuple[int, ...]) -> None:
    if not _positive_int(groups):
        raise ConfigError(f"model.norm_groups={groups!r} must be a whole number >= 1")
    for i, width in enumerate(widths, start=1):
        if width % groups:
            fits = [g for g in range(1, width + 1) if all(w % g == 0 for w in widths)]
            raise ConfigError(
                f"model.norm_groups={groups} does not divide conv{i}'s {width} filters; "
                f"groups that divide every conv width {list(widths)}: {fits}"
            )
