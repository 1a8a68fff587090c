"""Feature-map geometry, computed from the resolved layers before anything is built or compiled.

Every conv and pool layer maps an input side `in`, along each spatial axis, to

    out = floor((in + pad_lo + pad_hi - kernel) / stride) + 1

(with `pad_lo == pad_hi == pad` this is the textbook `floor((in + 2*pad - kernel) / stride) + 1`;
a dilated kernel spans `dilation * (kernel - 1) + 1`). "same" padding pads so that
`out == ceil(in / stride)`, splitting the total like XLA does (the extra pixel goes after);
"valid" pads nothing. JAX and Flax accept a kernel larger than its padded input and silently
produce an empty feature map, and a dense layer on a map without complaint; `layers` rejects
both here, with the layer, its input and output and a fix that is verified to work.

The same walk serves images [H, W, C] and series [L, C]: shapes are (*spatial, C).
Glossary: `H, W` spatial size, `L` length, `C` channels, `K` classes.
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from cnnlab.architecture import (
    Act,
    Architecture,
    Conv,
    Dense,
    Dropout,
    Flatten,
    GlobalPool,
    Norm,
    NormKind,
    Pool,
    Residual,
    resolve,
)  # fmt: skip
from cnnlab.config import ModelConfig
from cnnlab.errors import ConfigError, GeometryError


@dataclass(frozen=True)
class Layer:
    """One row of the per-layer table."""

    name: str  # conv1, act1, pool1, ..., dense1, ..., logits; res1/conv1 inside a block
    kind: str  # input | conv | norm | act | pool | global_pool | dropout | flatten | dense | add
    detail: str  # e.g. "5x5/1 pad 2", "max 2x2/2", "120 units"
    out_shape: tuple[int, ...]  # (*spatial, C) for maps, (units,) for vectors
    params: int
    macs: int  # multiply-adds for one example
    receptive_field: int | None  # side of the input patch one output pixel sees; None = all

    @property
    def shape_text(self) -> str:
        return " x ".join(str(d) for d in self.out_shape)


def pads(padding: Any, size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(low, high) padding of one spatial side, exactly as XLA resolves it."""
    if padding == "valid":
        return 0, 0
    if padding == "same":
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        return total // 2, total - total // 2
    return padding, padding


def out_size(size: int, kernel: int, stride: int, pad: tuple[int, int]) -> int:
    """Output side of a conv or pool layer; 0 or less means the window does not fit."""
    return (size + pad[0] + pad[1] - kernel) // stride + 1


def shortcut_stride(size_in: tuple[int, ...], size_out: tuple[int, ...]) -> int | None:
    """The stride of the 1x1 convolution that maps spatial sizes `size_in` to `size_out` (one
    stride along every axis), or None where none does."""
    stride = max(1, round(size_in[0] / max(size_out[0], 1)))
    fits = all(-(-i // stride) == o for i, o in zip(size_in, size_out, strict=True))
    return stride if fits else None


def _text(values) -> str:
    return "x".join(str(v) for v in values)


def _pad_text(spatial_pads: list[tuple[int, int]]) -> str:
    first = spatial_pads[0]
    if all(p == first for p in spatial_pads):
        return f"pad {first[0]}" if first[0] == first[1] else f"pad {first[0]}+{first[1]}"
    return "pad " + "x".join(str(p) for p in spatial_pads)


@dataclass
class _Walk:
    """The state of a walk through the layers: the current shape and receptive field."""

    shape: tuple[int, ...]
    rank: int  # spatial axes of the input: 2 for images, 1 for series
    prefix: str = ""  # "res1/" inside a residual block
    rf: int | None = 1
    jump: int = 1
    counts: dict = dataclasses.field(default_factory=dict)
    last_conv: str = ""

    @property
    def is_map(self) -> bool:
        return len(self.shape) == self.rank + 1

    def name(self, layer) -> str:
        return self.prefix + _row_name(layer, self.counts)

    def grow(self, kernel: int, stride: int) -> None:
        if self.rf is not None:
            self.rf, self.jump = self.rf + (kernel - 1) * self.jump, self.jump * stride


_KIND = {
    Conv: "conv", Norm: "norm", Act: "act", Pool: "pool", GlobalPool: "global_pool",
    Dropout: "dropout", Flatten: "flatten", Dense: "dense", Residual: "res",
}  # fmt: skip


def _row_name(layer, counts: dict[str, int]) -> str:
    """A layer's name in the table: its parameter name, else its kind numbered (act1, pool2)."""
    if getattr(layer, "name", ""):
        return layer.name
    kind = _KIND[type(layer)]
    counts[kind] = counts.get(kind, 0) + 1
    return f"{kind}{counts[kind]}"


def row_names(layers: tuple) -> list[str]:
    """The table's names of `layers` (one list, not the layers of its residual blocks)."""
    counts: dict[str, int] = {}
    return [_row_name(layer, counts) for layer in layers]


def _map_text(walk: _Walk) -> str:
    return _text(walk.shape)


def _needs_map(walk: _Walk, name: str, what: str) -> None:
    if not walk.is_map:
        raise _Problem(
            f"{name} ({what}) gets a vector of {walk.shape[0]} units, not a map: put it before "
            "flatten or global_pool",
            sized=False,
        )


class _Problem(Exception):
    """Why the geometry is impossible, raised inside the walk (with the rows so far); `sized`
    where a map is too small, not where a layer gets the wrong kind of input."""

    def __init__(self, message: str, sized: bool = True):
        super().__init__(message)
        self.sized = sized


def _window(walk: _Walk, window: tuple[int, int, Any]):
    """Output spatial size and pads of a conv or pool window (kernel, stride, padding)."""
    kernel, stride, padding = window
    spatial = walk.shape[:-1]
    pad = [pads(padding, n, kernel, stride) for n in spatial]
    out = tuple(out_size(n, kernel, stride, p) for n, p in zip(spatial, pad, strict=True))
    return out, pad


def _empty(walk: _Walk, name: str, what: str, out: tuple[int, ...]) -> str:
    after = f" after {walk.last_conv}" if what.startswith(("max pool", "avg pool")) else ""
    return (
        f"{name} ({what}){after} gets a {_map_text(walk)} input and would output "
        f"{_text(max(o, 0) for o in out)}"
    )


def _conv(walk: _Walk, layer: Conv, rows: list) -> None:
    name = walk.name(layer)
    span = layer.dilation * (layer.kernel - 1) + 1
    _needs_map(walk, name, "conv")
    out, pad = _window(walk, (span, layer.stride, layer.padding))
    k = _text([layer.kernel] * walk.rank)
    dilated = f" dilation {layer.dilation}" if layer.dilation > 1 else ""
    weights = layer.kernel**walk.rank * walk.shape[-1] * layer.features
    shape = (*(max(o, 0) for o in out), layer.features)
    walk.grow(span, layer.stride)
    detail = f"{k}/{layer.stride} {_pad_text(pad)}{dilated}"
    params = weights + layer.features * layer.bias
    rows.append(Layer(name, "conv", detail, shape, params, math.prod(out) * weights, walk.rf))
    if min(out) < 1:
        what = f"conv {k}, stride {layer.stride}, {_pad_text(pad)}"
        raise _Problem(_empty(walk, name, what, out))
    walk.shape, walk.last_conv = shape, name


def _pool(walk: _Walk, layer: Pool, rows: list) -> None:
    name = walk.name(layer)
    k = _text([layer.window] * walk.rank)
    what = f"{layer.kind} pool {k}, stride {layer.step}"
    _needs_map(walk, name, what)
    out, pad = _window(walk, (layer.window, layer.step, layer.padding))
    shape = (*(max(o, 0) for o in out), walk.shape[-1])
    walk.grow(layer.window, layer.step)
    padded = f" {_pad_text(pad)}" if any(p != (0, 0) for p in pad) else ""
    rows.append(Layer(name, "pool", f"{layer.kind} {k}/{layer.step}{padded}", shape, 0, 0,
                      walk.rf))  # fmt: skip
    if min(out) < 1:
        raise _Problem(_empty(walk, name, what, out))
    walk.shape = shape


def _norm(walk: _Walk, layer: Norm, rows: list) -> None:
    name, channels = walk.name(layer), walk.shape[-1]
    detail = str(layer.kind)
    if layer.kind == NormKind.group:
        detail += f" {layer.groups} groups"
        if channels % layer.groups:
            fits = [g for g in range(1, channels + 1) if channels % g == 0]
            raise _Problem(
                f"{name} (group norm) splits {channels} channels into {layer.groups} groups, "
                f"which do not divide them; use model.norm_groups= one of {fits}"
            )
    rows.append(Layer(name, "norm", detail, walk.shape, 2 * channels, 0, walk.rf))


def _vector(walk: _Walk, layer, rows: list) -> None:
    """flatten and global_pool: a map to a vector."""
    name = walk.name(layer)
    kind = "flatten" if isinstance(layer, Flatten) else "global_pool"
    if not walk.is_map:
        raise _Problem(f"{name} ({kind}) gets a vector of {walk.shape[0]} units, not a map", False)
    if isinstance(layer, Flatten):
        shape, detail = (math.prod(walk.shape),), ""
    else:
        shape, detail, walk.rf = (walk.shape[-1],), str(layer.kind), None
    rows.append(Layer(name, kind, detail, shape, 0, 0, walk.rf))
    walk.shape = shape


def _dense(walk: _Walk, layer: Dense, rows: list, name: str = "") -> None:
    name = name or walk.name(layer)
    if walk.is_map:
        raise _Problem(
            f"{name} (dense {layer.units}) gets a {_map_text(walk)} map: put flatten or "
            "global_pool before it",
            sized=False,
        )
    units = walk.shape[0]
    params = units * layer.units + layer.units * layer.bias
    rows.append(Layer(name, "dense", f"{layer.units} units", (layer.units,), params,
                      units * layer.units, None))  # fmt: skip
    walk.shape, walk.rf = (layer.units,), None


def _same_shape(walk: _Walk, layer, rows: list) -> None:
    """Activations and dropout: the shape goes through."""
    name = walk.name(layer)
    detail = str(layer.fn) if isinstance(layer, Act) else f"rate {layer.rate:g}"
    kind = "act" if isinstance(layer, Act) else "dropout"
    rows.append(Layer(name, kind, detail, walk.shape, 0, 0, walk.rf))


def _residual(walk: _Walk, layer: Residual, rows: list) -> None:
    name = walk.name(layer)
    _needs_map(walk, name, "residual block")
    branch = _Walk(walk.shape, walk.rank, f"{name}/", walk.rf, walk.jump, last_conv=walk.last_conv)
    _steps(branch, layer.layers, rows)
    if not branch.is_map:
        raise _Problem(
            f"{name} (residual block) ends on a vector: its layers must keep a map", False
        )
    if branch.shape != walk.shape:
        _projection(walk, branch, layer, rows)
    walk.shape, walk.rf, walk.jump = branch.shape, branch.rf, branch.jump
    rows.append(Layer(name, "add", "branch + shortcut", walk.shape, 0, 0, walk.rf))


def _projection(walk: _Walk, branch: _Walk, layer: Residual, rows: list) -> None:
    """The 1x1 convolution (and normalization) that brings the input to the branch's shape."""
    name = branch.prefix.rstrip("/")
    stride = shortcut_stride(walk.shape[:-1], branch.shape[:-1])
    if stride is None:
        raise _Problem(
            f"{name} (residual block) cannot add its branches: the layers map "
            f"{_map_text(walk)} to {_map_text(branch)}, which no 1x1 projection with one stride "
            "gives; use padding same in the block"
        )
    norm = next((x for x in layer.layers if isinstance(x, Norm)), None)
    conv = Conv(branch.shape[-1], 1, stride, "valid", bias=norm is None, name="shortcut")
    side = _Walk(walk.shape, walk.rank, f"{name}/", None)
    _conv(side, conv, rows)
    if norm is not None:
        _norm(side, dataclasses.replace(norm, name="shortcut_norm"), rows)


STEPS = {
    Conv: _conv, Pool: _pool, Norm: _norm, Flatten: _vector, GlobalPool: _vector,
    Dense: _dense, Act: _same_shape, Dropout: _same_shape, Residual: _residual,
}  # fmt: skip


def _steps(walk: _Walk, layers: tuple, rows: list) -> None:
    for layer in layers:
        STEPS[type(layer)](walk, layer, rows)


def walk(arch: Architecture, input_shape: tuple[int, ...], num_classes: int) -> list[Layer]:
    """The table of `arch` on inputs of `input_shape` (*spatial, C); raises GeometryError with
    the rows up to the failing layer where a map would be empty or a layer gets the wrong kind
    of input."""
    rows = [Layer("input", "input", "", tuple(input_shape), 0, 0, 1)]
    state = _Walk(tuple(input_shape), len(input_shape) - 1)
    try:
        _steps(state, arch.layers, rows)
        if state.is_map:
            raise _Problem(
                f"the layers end on a {_map_text(state)} map: end them with flatten or "
                "global_pool (the logits layer takes a vector)",
                sized=False,
            )
        _dense(state, Dense(num_classes), rows, "logits")
    except _Problem as problem:
        raise GeometryError(str(problem), rows, problem.sized) from None
    return rows


def layers(
    cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, arch: Architecture = None
) -> list[Layer]:
    """The network's layers with output shapes, parameters, multiply-adds and receptive fields
    (`arch`, the config resolved, where the caller has it).

    Raises GeometryError (one line, with a fix) if any feature map would be empty; its `rows`
    hold the table up to and including the failing layer. A module of one's own
    (`model._target_`) is evaluated abstractly instead (`cnnlab.models.user.layers`, with JAX).
    """
    if cfg._target_:
        from cnnlab.models import user

        return user.layers(cfg, tuple(input_shape), num_classes)
    arch = arch or resolve(cfg)
    try:
        return walk(arch, input_shape, num_classes)
    except GeometryError as e:
        if not e.sized:  # a layer out of place: no size or override puts it right
            raise
        fix = _suggest_fix(cfg, input_shape, num_classes)
        smallest = smallest_input(arch, input_shape, num_classes)
        fits = f"; it takes {_smallest_text(smallest)} up" if smallest else ""
        raise GeometryError(f"{e}; fix: {fix}{fits}", e.rows) from None


def _smallest_text(shape: tuple[int, ...]) -> str:
    """The smallest input in words: "series of length 38" for [L, C], "inputs from 32x32x3"."""
    return f"series of length {shape[0]}" if len(shape) == 2 else f"inputs from {_text(shape)}"


def check(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> None:
    """Raise ConfigError/GeometryError if the model cannot be built for this input."""
    layers(cfg, input_shape, num_classes)


def _fits(arch: Architecture, shape: tuple[int, ...], num_classes: int) -> bool:
    try:
        walk(arch, shape, num_classes)
    except GeometryError:
        return False
    return True


def smallest_input(
    arch: Architecture, input_shape: tuple[int, ...], num_classes: int, limit: int = 4096
) -> tuple[int, ...] | None:
    """The smallest input (the same side along every spatial axis, the same channels) that the
    network takes; None if none up to `limit` does."""
    rank, channels = len(input_shape) - 1, input_shape[-1]
    shape = lambda side: (side,) * rank + (channels,)
    lo, hi = 1, limit + 1  # the first side that fits, as a larger one fits where a smaller does
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _fits(arch, shape(mid), num_classes) else (mid + 1, hi)
    return shape(lo) if lo <= limit else None


def _suggest_fix(cfg: ModelConfig, input_shape, num_classes) -> str:
    """The first simple override that makes every layer fit, verified by walking the network."""
    try:
        kernels = [c.kernel for c in resolve(cfg).convs]
    except ConfigError:
        kernels = []
    changes = [{"padding": "same"}, {"stride": 1}]
    changes += [{"kernel_size": k} for k in range(max(kernels, default=1) - 1, 0, -1)]
    changes += [{"padding": "same", "stride": 1, "kernel_size": k} for k in (5, 3)]
    changes += [{"pool_size": 2, "pool_stride": 2}]
    if not isinstance(cfg.depth, list | tuple):
        changes += [{"conv_layers": m} for m in range(len(kernels) - 1, 0, -1)]
    for change in changes:
        try:
            candidate = resolve(dataclasses.replace(cfg, **change))
        except ConfigError:
            continue
        if _fits(candidate, input_shape, num_classes):
            return " ".join(f"model.{key}={value}" for key, value in change.items())
    return "use larger inputs or fewer downsampling layers"


def summarize(rows: list[Layer]) -> dict[str, int]:
    """Totals: parameters, forward multiply-adds and FLOPs (2 per multiply-add) for one example."""
    params = sum(r.params for r in rows)
    macs = sum(r.macs for r in rows)
    return {"params": params, "macs": macs, "flops": 2 * macs}


def _receptive(r: Layer, rank: int) -> str:
    if r.kind == "module":  # a submodule of one's own module: its receptive field is not known
        return "-"
    return "all" if r.receptive_field is None else _text([r.receptive_field] * rank)


def example_name(rank: int) -> str:
    """What one input of `rank` spatial axes is called where costs are per input: "series" for
    [L, C], "image" for [H, W, C]."""
    return "series" if rank == 1 else "image"


def input_text(shape: tuple[int, ...]) -> str:
    """An input shape (*spatial, C) in words: "series of length L=24, 1 channel" for [L, C],
    "28x28x1 images" for [H, W, C]."""
    *spatial, channels = shape
    if len(spatial) == 1:
        return f"series of length L={spatial[0]}, {channels} channel{'s' * (channels != 1)}"
    return f"{_text(shape)} {example_name(len(spatial))}s"


def format_table(rows: list[Layer], title: str = "", totals: bool = True) -> str:
    """The per-layer table as aligned plain text, with a totals row unless `totals` is False."""
    rank = len(rows[0].out_shape) - 1
    axes = "H x W x C" if rank == 2 else "L x C" if rank == 1 else "shape"
    head = ("layer", "type", f"output {axes}", "params", "mult-adds", "receptive field")
    body = [
        (r.name, f"{r.kind} {r.detail}".strip(), r.shape_text, f"{r.params:,}", f"{r.macs:,}",
         _receptive(r, rank))
        for r in rows
    ]  # fmt: skip
    footer = []
    if totals:
        total = summarize(rows)
        footer = [("total", "", "", f"{total['params']:,}", f"{total['macs']:,}", "")]
    widths = [max(len(row[i]) for row in (head, *body, *footer)) for i in range(len(head))]

    def line(row):
        cells = [
            cell.rjust(width) if i in (3, 4) else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "-" * len(line(head))
    out = [title] if title else []
    out += [line(head), rule, *map(line, body)]
    out += [rule, *map(line, footer)] if footer else []
    return "\n".join(out)


__all__ = [
    "Layer", "check", "example_name", "format_table", "input_text", "layers", "out_size", "pads",
    "row_names", "shortcut_stride", "smallest_input", "summarize", "walk",
]  # fmt: skip
