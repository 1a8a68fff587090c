"""Feature-map geometry, computed from the config before anything is built or compiled.

Every conv and pool layer maps an input side `in` to

    out = floor((in + pad_lo + pad_hi - kernel) / stride) + 1

(with `pad_lo == pad_hi == pad` this is the textbook `floor((in + 2*pad - kernel) / stride) + 1`).
"same" padding pads so that `out == ceil(in / stride)`, splitting the total like XLA does (the
extra pixel goes after); "valid" pads nothing. JAX and Flax accept a kernel larger than its padded
input and silently produce an empty feature map, so `check` rejects that here, with the layer,
its input and output size and a fix that is verified to work.

Glossary: `H, W` spatial size, `C` channels, `K` classes.
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from cnnlab.architecture import Architecture, resolve
from cnnlab.config import ModelConfig
from cnnlab.errors import ConfigError, GeometryError


@dataclass(frozen=True)
class Layer:
    """One row of the per-layer table."""

    name: str  # conv1, pool1, ..., dense1, ..., logits
    kind: str  # input | conv | pool | dense
    detail: str  # e.g. "5x5/1 pad 2+2", "max 2x2/2", "120 units"
    out_shape: tuple[int, ...]  # (H, W, C) for maps, (units,) for dense
    params: int
    macs: int  # multiply-adds for one image
    receptive_field: int | None  # side of the input patch one output pixel sees; None = whole image

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


def _pad_text(pad_h: tuple[int, int], pad_w: tuple[int, int]) -> str:
    if pad_h == pad_w and pad_h[0] == pad_h[1]:
        return f"pad {pad_h[0]}"
    return f"pad {pad_h[0]}+{pad_h[1]}" if pad_h == pad_w else f"pad {pad_h}x{pad_w}"


def layers(cfg: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> list[Layer]:
    """The network's layers with output shapes, parameters, multiply-adds and receptive fields.

    Raises GeometryError (one line, with a fix) if any feature map would be empty; its `rows`
    hold the table up to and including the failing layer.
    """
    rows, problem = _walk(resolve(cfg), input_shape, num_classes)
    if problem:
        fix = _suggest_fix(cfg, input_shape, num_classes)
        raise GeometryError(f"{problem}; fix: {fix}", rows)
    return rows


def check(cfg: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> None:
    """Raise ConfigError/GeometryError if the model cannot be built for this input."""
    layers(cfg, input_shape, num_classes)


def _walk(arch: Architecture, input_shape, num_classes) -> tuple[list[Layer], str]:
    """Rows of the table, and the one-line reason why the geometry is impossible ("" if it is not).

    On failure the last row is the failing layer, with its empty output.
    """
    h, w, c = input_shape
    rf, jump = 1, 1
    rows = [Layer("input", "input", "", (h, w, c), 0, 0, 1)]
    for i, conv in enumerate(arch.convs, start=1):
        k, s = conv.kernel, conv.stride
        pad_h, pad_w = pads(conv.padding, h, k, s), pads(conv.padding, w, k, s)
        oh, ow = out_size(h, k, s, pad_h), out_size(w, k, s, pad_w)
        rf, jump = rf + (k - 1) * jump, jump * s
        detail = f"{k}x{k}/{s} {_pad_text(pad_h, pad_w)}"
        weights = k * k * c * conv.features
        out = (max(oh, 0), max(ow, 0), conv.features)
        macs = out[0] * out[1] * weights  # one multiply-add per weight per output pixel
        params = weights + conv.features
        if arch.norm != "none":  # and the normalization's scale and bias per filter
            params += 2 * conv.features
            detail += f" + {arch.norm} norm"
        rows.append(Layer(f"conv{i}", "conv", detail, out, params, macs, rf))
        if oh < 1 or ow < 1:
            return rows, (
                f"conv{i} (conv {k}x{k}, stride {s}, {_pad_text(pad_h, pad_w)}) gets a {h}x{w}x{c} "
                f"input and would output {out[0]}x{out[1]}"
            )
        h, w, c = out
        if conv.pool:
            k, s = arch.pool_size, arch.pool_stride
            oh, ow = out_size(h, k, s, (0, 0)), out_size(w, k, s, (0, 0))
            rf, jump = rf + (k - 1) * jump, jump * s
            out = (max(oh, 0), max(ow, 0), c)
            rows.append(Layer(f"pool{i}", "pool", f"{arch.pool} {k}x{k}/{s}", out, 0, 0, rf))
            if oh < 1 or ow < 1:
                return rows, (
                    f"pool{i} ({arch.pool} pool {k}x{k}, stride {s}) after conv{i} gets a "
                    f"{h}x{w}x{c} input and would output {out[0]}x{out[1]}"
                )
            h, w = oh, ow
    units = h * w * c
    for j, width in enumerate((*arch.dense, num_classes), start=1):
        name = "logits" if j == len(arch.dense) + 1 else f"dense{j}"
        rows.append(Layer(name, "dense", f"{width} units", (width,), units * width + width,
                          units * width, None))  # fmt: skip
        units = width
    return rows, ""


def _suggest_fix(cfg: ModelConfig, input_shape, num_classes) -> str:
    """The first simple override that makes every layer fit, verified by walking the network."""
    arch = resolve(cfg)
    changes = [{"padding": "same"}, {"stride": 1}]
    changes += [{"kernel_size": k} for k in range(max(arch.kernels) - 1, 0, -1)]
    changes += [{"padding": "same", "stride": 1, "kernel_size": k} for k in (5, 3)]
    changes += [{"pool_size": 2, "pool_stride": 2}]
    if isinstance(cfg.depth, int):
        changes += [{"conv_layers": m} for m in range(arch.num_conv - 1, 0, -1)]
    for change in changes:
        try:
            candidate = resolve(dataclasses.replace(cfg, **change))
        except ConfigError:
            continue
        if not _walk(candidate, input_shape, num_classes)[1]:
            return " ".join(f"model.{key}={value}" for key, value in change.items())
    return "use larger input images or fewer downsampling layers"


def summarize(rows: list[Layer]) -> dict[str, int]:
    """Totals: parameters, forward multiply-adds and FLOPs (2 per multiply-add) for one image."""
    params = sum(r.params for r in rows)
    macs = sum(r.macs for r in rows)
    return {"params": params, "macs": macs, "flops": 2 * macs}


def format_table(rows: list[Layer], title: str = "", totals: bool = True) -> str:
    """The per-layer table as aligned plain text, with a totals row unless `totals` is False."""
    head = ("layer", "type", "output H x W x C", "params", "mult-adds", "receptive field")
    body = [
        (r.name, f"{r.kind} {r.detail}".strip(), r.shape_text, f"{r.params:,}", f"{r.macs:,}",
         "all" if r.receptive_field is None else f"{r.receptive_field}x{r.receptive_field}")
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


__all__ = ["Layer", "check", "format_table", "layers", "out_size", "pads", "summarize"]
