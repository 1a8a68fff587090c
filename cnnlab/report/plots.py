"""The sweep's three pictures, as PNG files, generic over whichever keys were swept.

- `accuracy.png`: test accuracy (mean ± std over seeds) and FLOPs against depth (or the first
  swept key), one line per combination of the other keys (stride x padding);
- `heatmap.png`: mean test accuracy on a grid of stride x padding (or the first two swept keys),
  one panel per depth, impossible points hatched;
- `accuracy_vs_flops.png`: the cost/accuracy trade-off, coloured by depth, one marker per line.
Each names the sweep's input (a series' length L, an image's H x W x C) and counts FLOPs per
series or per image (`cnnlab.report.collect.Inputs`).

Matplotlib's object API (`Figure`) without pyplot: no global backend or figure state.
"""

import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from cnnlab.report.collect import Inputs
from cnnlab.report.tables import Row, fmt_value, sort_key

MARKERS = "osD^vPX*<>"
ACC = "test accuracy (%)"
NO_DATA = "no job finished ok: nothing to plot"


def write_plots(rows: list[Row], inputs: Inputs, out_dir: Path) -> dict[str, Path]:
    """Draw the plots of a sweep on `inputs` into `out_dir`; returns plot name -> PNG path."""
    layout = Layout(rows, inputs)
    paths = {}
    for name, draw in (
        ("accuracy", accuracy_plot),
        ("heatmap", heatmap_plot),
        ("accuracy_vs_flops", flops_plot),
    ):
        fig = draw(rows, layout)
        paths[name] = Path(out_dir) / f"{name}.png"
        fig.savefig(paths[name], dpi=110, bbox_inches="tight")
    return paths


class Layout:
    """Which swept key goes where: x axis (depth first), lines, heat-map rows/columns/panels."""

    def __init__(self, rows: list[Row], inputs: Inputs):
        self.inputs = inputs
        keys = list(rows[0].values) if rows else []
        numeric = [k for k in keys if all(_is_number(r.values[k]) for r in rows)]
        self.x = "model.depth" if "model.depth" in keys else (numeric or keys or [None])[0]
        self.series = [k for k in keys if k != self.x]  # one line per combination
        if {"model.stride", "model.padding"} <= set(keys):
            grid = ["model.stride", "model.padding"]
        else:
            grid = [k for k in keys if k != self.x][:2]
            grid = (grid + [k for k in keys if k not in grid])[:2]
        self.grid = grid + [None] * (2 - len(grid))  # heat-map rows, columns
        rest = [k for k in keys if k not in grid]
        self.facet = rest[0] if rest else None  # one heat-map panel per value
        self.best_over = rest[1:]  # more keys than fit: a cell shows the best over them
        self.x_values = _values(rows, self.x)
        self.series_values = sorted(
            {tuple(r.values[k] for k in self.series) for r in rows}.__iter__(),
            key=lambda t: [sort_key(v) for v in t],
        )
        self.labels = {k: short(k, keys) for k in keys}

    def series_label(self, combo: tuple) -> str:
        pairs = zip(self.series, combo, strict=True)
        return ", ".join(f"{self.labels[k]}={fmt_value(v)}" for k, v in pairs) or "all"

    def series_of(self, row: Row) -> int:
        return self.series_values.index(tuple(row.values[k] for k in self.series))


def accuracy_plot(rows: list[Row], layout: Layout) -> Figure:
    fig = Figure(figsize=(12.5, 4.6), layout="constrained")
    acc_ax, cost_ax = fig.subplots(1, 2)
    x_label = layout.labels.get(layout.x, "point") if layout.x else "point"
    n_series = len(layout.series_values)
    for s, combo in enumerate(layout.series_values):
        color = series_color(s)
        dodge = (s - (n_series - 1) / 2) * min(0.08, 0.4 / max(n_series, 1))
        mine = [r for r in rows if layout.series_of(r) == s]
        pos = [layout.x_values.index(r.values.get(layout.x)) + dodge for r in mine]
        acc = [_pct(r.mean["test_accuracy"]) for r in mine]
        err = [_pct(r.std["test_accuracy"]) or 0 for r in mine]
        label = layout.series_label(combo)
        if all(math.isnan(a) for a in acc):
            label += " (no ok run)"
        acc_ax.errorbar(
            pos,
            acc,
            yerr=err,
            color=color,
            marker=MARKERS[s % len(MARKERS)],
            capsize=4,
            label=label,
        )
        for p, r, a in zip(pos, mine, acc, strict=True):
            if math.isnan(a):
                _cross(acc_ax, p, r, color)
        flops = [r.cost["flops"] or math.nan for r in mine]
        cost_ax.plot(pos, flops, color=color, marker=MARKERS[s % len(MARKERS)])
    for ax in (acc_ax, cost_ax):
        ax.set_xticks(range(len(layout.x_values)), [fmt_value(v) for v in layout.x_values])
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
    n = sorted({r.n for r in rows if r.n})
    seeds = f"mean ± std over {'/'.join(map(str, n))} seed(s)" if n else "no finished seeds"
    acc_ax.set(ylabel=ACC, title=f"Test accuracy against {x_label} ({seeds})")
    per = layout.inputs.example
    cost_ax.set(ylabel=f"forward FLOPs per {per}", title=f"Cost against {x_label}")
    _input_title(fig, layout.inputs)
    if any(r.cost["flops"] for r in rows):
        cost_ax.set_yscale("log")
    if not any(r.n for r in rows):
        no_data(acc_ax)
    if layout.series_values and n_series > 1 or layout.series:
        fig.legend(
            *acc_ax.get_legend_handles_labels(),
            loc="outside right center",
            title=" x ".join(layout.labels[k] for k in layout.series) or None,
        )
    return fig


def _cross(ax, position: float, row: Row, color) -> None:
    """An invalid or failed point: a cross on the x axis, labelled with its status."""
    on_axis = ax.get_xaxis_transform()
    ax.plot(position, 0.02, "x", color=color, ms=9, mew=2, transform=on_axis, clip_on=False)
    ax.annotate(_short_status(row), (position, 0.05), xycoords=on_axis, ha="center", fontsize=7,
                color=color, rotation=90)  # fmt: skip


def heatmap_plot(rows: list[Row], layout: Layout) -> Figure:
    row_key, col_key = layout.grid
    row_vals, col_vals = _values(rows, row_key), _values(rows, col_key)
    panels = _values(rows, layout.facet)
    width = max(3.2, 1.5 * len(col_vals) + 1)
    fig = Figure(
        figsize=(width * len(panels) + 1.2, 1.1 * len(row_vals) + 1.8), layout="constrained"
    )
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True, squeeze=False)[0])
    means = [r.mean["test_accuracy"] for r in rows if r.mean["test_accuracy"] is not None]
    lo, hi = (100 * min(means), 100 * max(means)) if means else (0, 100)
    lo, hi = (lo - 1, hi + 1) if hi - lo < 2 else (lo, hi)
    cmap = colormaps["viridis"]
    image = None
    for ax, panel in zip(axes, panels, strict=True):
        grid = np.full((len(row_vals), len(col_vals)), np.nan)
        for i, rv in enumerate(row_vals):
            for j, cv in enumerate(col_vals):
                cell = [r for r in rows if _match(r, layout, panel, rv, cv)]
                grid[i, j] = _heat_cell(ax, (i, j), cell, (lo, hi))
        image = ax.imshow(grid, cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
        ax.set_xticks(range(len(col_vals)), _ticks(col_key, col_vals))
        ax.set_yticks(range(len(row_vals)), _ticks(row_key, row_vals))
        ax.set_xlabel(layout.labels.get(col_key, ""))
        if layout.facet:
            ax.set_title(f"{layout.labels[layout.facet]} = {fmt_value(panel)}")
    axes[0].set_ylabel(layout.labels.get(row_key, ""))
    best = f", best over {', '.join(layout.best_over)}" if layout.best_over else ""
    on = f"\nInput: {layout.inputs.text}" if layout.inputs.text else ""
    fig.suptitle(f"Mean test accuracy (%) by {_grid_name(layout)}{best}{on}")
    fig.colorbar(image, ax=list(axes), label=ACC, shrink=0.9)
    return fig


def _heat_cell(ax, at: tuple[int, int], cell: list[Row], limits: tuple[float, float]) -> float:
    """Write heat-map cell `at` (row, column): the best mean test accuracy (%) of the rows in it,
    with its std, returned; else a hatched cell with their status, and NaN."""
    (i, j), (lo, hi) = at, limits
    accs = [r.mean["test_accuracy"] for r in cell if r.mean["test_accuracy"] is not None]
    if not accs:
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="0.85", hatch="///",
                               edgecolor="0.6", lw=0))  # fmt: skip
        ax.text(j, i, _short_status(cell[0]) if cell else "not run", ha="center", va="center",
                fontsize=10, color="0.25",
                bbox={"facecolor": "0.85", "edgecolor": "none", "pad": 1})  # fmt: skip
        return math.nan
    best = max(cell, key=lambda r: r.mean["test_accuracy"] or -1)
    value, std = 100 * max(accs), best.std["test_accuracy"]
    text = f"{value:.1f}%" + (f"\n±{100 * std:.1f}" if std is not None else "")
    dark = (value - lo) / (hi - lo) < 0.55
    ax.text(j, i, text, ha="center", va="center", fontsize=10, color="white" if dark else "black")
    return value


def flops_plot(rows: list[Row], layout: Layout) -> Figure:
    fig = Figure(figsize=(8.5, 5.2), layout="constrained")
    ax = fig.subplots()
    palette = colormaps["viridis"]
    n_x = len(layout.x_values)
    colour = {v: palette(0.1 + 0.75 * i / max(n_x - 1, 1)) for i, v in enumerate(layout.x_values)}
    for s, _combo in enumerate(layout.series_values):
        mine = [r for r in rows if layout.series_of(r) == s and r.n and r.cost["flops"]]
        if len(mine) > 1:
            ax.plot(
                [r.cost["flops"] for r in mine],
                [_pct(r.mean["test_accuracy"]) for r in mine],
                color="0.7",
                lw=1,
                zorder=1,
            )
        for r in mine:
            ax.errorbar(
                r.cost["flops"],
                _pct(r.mean["test_accuracy"]),
                yerr=_pct(r.std["test_accuracy"]) or 0,
                color=colour[r.values.get(layout.x)],
                marker=MARKERS[s % len(MARKERS)],
                ms=9,
                capsize=3,
                mec="black",
                zorder=2,
            )
    plotted = [r for r in rows if r.n and r.cost["flops"]]
    if plotted:
        ax.set_xscale("log")
    else:
        no_data(ax)
    ax.set(
        xlabel=f"forward FLOPs per {layout.inputs.example} (log scale)",
        ylabel=ACC,
        title="Test accuracy against cost (mean ± std over seeds)",
    )
    ax.grid(alpha=0.3, which="both")
    _flops_legends(ax, rows, layout, colour)
    _input_title(fig, layout.inputs)
    return fig


def _input_title(fig: Figure, inputs: Inputs) -> None:
    """The sweep's input, e.g. "ItalyPowerDemand: series of length L=24, 1 channel", on top."""
    if inputs.text:
        fig.suptitle(f"Input: {inputs.text}", fontsize=10)


def _flops_legends(ax, rows: list[Row], layout: Layout, colour: dict) -> None:
    """The colour legend (the x key's values) and the marker legend (the series)."""
    x_label = layout.labels.get(layout.x, "") if layout.x else ""
    if layout.x:
        handles = [
            Line2D([], [], color=c, marker="o", ls="", ms=9, mec="black") for c in colour.values()
        ]
        first = ax.legend(
            handles,
            [fmt_value(v) for v in colour],
            title=f"colour: {x_label}",
            loc="upper left",
            bbox_to_anchor=(1.01, 1),
        )
        ax.add_artist(first)
    if layout.series:
        handles = [
            Line2D([], [], color="0.4", marker=MARKERS[s % len(MARKERS)], ls="", ms=8)
            for s in range(len(layout.series_values))
        ]
        labels = [
            layout.series_label(c)
            + ("" if any(r.n for r in rows if layout.series_of(r) == s) else " (no ok run)")
            for s, c in enumerate(layout.series_values)
        ]
        ax.legend(handles, labels, title="marker", loc="lower left", bbox_to_anchor=(1.01, 0))


def short(key: str, keys: list[str]) -> str:
    """`model.stride` -> `stride`, unless another swept key ends the same way."""
    last = key.rsplit(".", 1)[-1]
    return last if sum(k.rsplit(".", 1)[-1] == last for k in keys) == 1 else key


def _values(rows: list[Row], key: str | None) -> list[Any]:
    if key is None:
        return [None]
    unique = {repr(r.values[key]): r.values[key] for r in rows}
    return sorted(unique.values(), key=sort_key)


def _ticks(key: str | None, values: list[Any]) -> list[str]:
    return [fmt_value(v) for v in values] if key else [""]


def _match(row: Row, layout: Layout, panel, rv, cv) -> bool:
    want = {layout.facet: panel, layout.grid[0]: rv, layout.grid[1]: cv}
    return all(repr(row.values[k]) == repr(v) for k, v in want.items() if k is not None)


def _grid_name(layout: Layout) -> str:
    names = [layout.labels[k] for k in layout.grid if k is not None]
    return " x ".join(names) or "point"


def _short_status(row: Row) -> str:
    """ "invalid", "failed", ... for a point without an ok run."""
    counts = {s: c for s, c in row.counts.items() if c}
    return "/".join(counts) if counts else "not run"


def _pct(value: float | None) -> float:
    return math.nan if value is None else 100 * value


def series_color(i: int):
    return colormaps["tab10"](i % 10)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def no_data(ax) -> None:
    ax.text(
        0.5,
        0.5,
        NO_DATA,
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize=12,
        color="0.3",
    )
