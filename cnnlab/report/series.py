"""The pictures of a run on series [N, L, C], in 1-D form (`cnnlab.report.pictures` dispatches
here on the examples' rank):

- `filters.png`: the first conv's kernel [k, C, F], one small panel per filter, a curve per input
  channel over the kernel's k taps;
- `feature_maps.png`: one test series, then one heat strip per conv, pool and residual block,
  its first channels stacked, on the input's time axis: each map step is `jump` input steps wide
  and centred where its receptive field is (`pictures.feature_maps`, as for images);
- `confidently_wrong.png`: the test series the model got wrong with the highest confidence, a
  curve per channel.

The confusion matrix and the curves are those of images (`pictures.confusion_figure`,
`pictures.curves_figure`).

Glossary: `N` series, `L` length, `C` channels, `F` filters, `K` classes.
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from cnnlab.report.pictures import (
    PANEL,
    FeatureMap,
    RunPictures,
    draw_confusion,
    draw_curves,
    grid,
    most_confidently_wrong,
    save,
)
from cnnlab.report.plots import no_data, series_color


def _curves(ax, x: np.ndarray, lw: float = 1.2) -> None:
    """Series `x` [L, C] (or a kernel [k, C]): one curve per channel, tab10 colours in order."""
    for c in range(x.shape[1]):
        ax.plot(np.arange(len(x)), x[:, c], color=series_color(c), lw=lw, label=f"channel {c + 1}")


def _legend(fig: Figure, ax, channels: int, loc: str = "outside lower center") -> None:
    """One legend of the channels' colours beside the figure, where there are several."""
    if channels > 1:
        handles, labels = ax.get_legend_handles_labels()
        ncol = min(channels, 8) if "center" in loc else 1
        fig.legend(handles, labels, loc=loc, ncol=ncol, fontsize=7)


# --- first-layer filters ----------------------------------------------------------------------


SHOWN_FILTERS = 32  # more panels of C curves each make a PNG of megabytes and show no more


def filters_figure(kernel: np.ndarray, layer: str = "conv1") -> Figure:
    """`kernel` [k, C, F] as small panels of C curves over the k taps, its first
    `SHOWN_FILTERS` filters, one weight scale for all (the dotted line is 0)."""
    kernel = np.asarray(kernel, np.float32)
    k, c, total = kernel.shape
    f = min(total, SHOWN_FILTERS)
    rows, cols = grid(f, 8)
    fig = Figure(figsize=(cols * 1.5 + 1.0, rows * 1.2 + 0.9), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True).ravel()
    limit = 1.08 * float(np.abs(kernel).max()) or 1.0
    for i, ax in enumerate(axes):
        if i >= f:
            ax.axis("off")
            continue
        ax.axhline(0, color="0.6", lw=0.8, ls=":")
        _curves(ax, kernel[..., i], lw=1.4)
        ax.set_ylim(-limit, limit)
        ax.set_xticks([0, k - 1])
        ax.tick_params(labelsize=6, length=2)
        ax.set_title(f"{i + 1}", fontsize=8, pad=2)
        ax.set_label(PANEL)
    _legend(fig, axes[0], c)
    fig.suptitle(
        f"{layer}: {'' if f == total else 'the first '}{f} of {total} learned filters, kernel "
        f"{k}x{c}x{total}: weight against tap (0..{k - 1}), "
        f"{'a curve per input channel' if c > 1 else 'one input channel'}, one scale for all",
        fontsize=10,
    )
    return fig


def draw_filters(kernel: np.ndarray, path: Path, layer: str = "conv1") -> Path:
    return save(filters_figure(kernel, layer), path)


# --- feature maps -----------------------------------------------------------------------------


def _strip(ax, m: FeatureMap, shown: int):
    """Map `m` [L', F] as a heat strip: its first `shown` channels top to bottom, each scaled to
    its own range (0 its lowest value, 1 its highest), at its extent on the input's time axis."""
    values = m.values[:, :shown].T  # [shown, L']
    lo, hi = values.min(1, keepdims=True), values.max(1, keepdims=True)
    scaled = (values - lo) / np.where(hi > lo, hi - lo, 1.0)
    rows = len(values)
    image = ax.imshow(scaled, cmap="viridis", vmin=0, vmax=1, aspect="auto",
                      interpolation="nearest", extent=(*m.extent, rows + 0.5, 0.5))  # fmt: skip
    ax.set_yticks([1, rows] if rows > 1 else [1], ["ch 1", f"ch {rows}"][: min(rows, 2)])
    ax.tick_params(labelsize=7, length=2)
    return image


def feature_maps_figure(
    series: np.ndarray, maps: list[FeatureMap], title: str = "", channels: int = 16
) -> Figure:
    """The input `series` [L, C], then one heat strip per map of its first `channels`."""
    length, c = series.shape
    channels = min(channels, max((m.values.shape[-1] for m in maps), default=1))
    fig = Figure(figsize=(9.5, 1.6 + 1.05 * (len(maps) + 1)), layout="constrained")
    axes = fig.subplots(len(maps) + 1, 1, squeeze=False, sharex=True)[:, 0]
    _curves(axes[0], series)
    axes[0].set_ylabel(f"input\n{length}x{c}", rotation=0, ha="right", va="center", fontsize=8)
    axes[0].tick_params(labelsize=7)
    axes[0].grid(alpha=0.25)
    axes[0].set_label(PANEL)
    _legend(fig, axes[0], c)
    image = None
    for ax, m in zip(axes[1:], maps, strict=True):
        image = _strip(ax, m, min(channels, m.values.shape[-1]))
        ml, mc = m.values.shape
        ax.set_ylabel(f"{m.name}\n{ml}x{mc}\n{m.detail}", rotation=0, ha="right", va="center",
                      fontsize=8, linespacing=1.3)  # fmt: skip
        ax.set_label(PANEL)
    lefts = [-0.5, *(m.extent[0] for m in maps)]
    rights = [length - 0.5, *(m.extent[1] for m in maps)]
    axes[-1].set_xlim(min(lefts), max(rights))
    axes[-1].set_xlabel("time step of the input")
    if image is not None:
        fig.colorbar(image, ax=list(axes[1:]), shrink=0.6, aspect=30,
                     label="each channel on its own scale (0 lowest, 1 highest)")  # fmt: skip
    fig.suptitle(
        (title + "\n" if title else "")
        + f"first {channels} channels of each layer after it, one strip per channel; each strip "
        "is drawn on the input's time axis:\none step of a map covers stride-product input "
        "steps, centred on its receptive field (a shorter strip lost its ends to valid padding)",
        fontsize=9,
    )
    return fig


def draw_feature_maps(
    series: np.ndarray, maps: list[FeatureMap], path: Path, title: str = "", channels: int = 16
) -> Path:
    return save(feature_maps_figure(series, maps, title, channels), path)


# --- most confidently wrong -------------------------------------------------------------------


def wrong_figure(
    series: Sequence[np.ndarray], labels: np.ndarray, probs: np.ndarray, class_names: list[str],
    n: int = 16,
) -> Figure:  # fmt: skip
    """The `n` most confidently wrong of `series` (N arrays [L_i, C]), most confident first."""
    chosen = most_confidently_wrong(labels, probs, n)
    rows, cols = grid(max(len(chosen), 1), 4)
    fig = Figure(figsize=(cols * 2.9, rows * 1.9 + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True).ravel()
    for ax in axes[len(chosen) :]:
        ax.axis("off")
    for ax, i in zip(axes, chosen, strict=False):
        pred = int(np.argmax(probs[i]))
        _curves(ax, series[i])
        ax.set_title(f"{class_names[labels[i]]} -> {class_names[pred]} ({probs[i, pred]:.4f})",
                     fontsize=8, pad=3)  # fmt: skip
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.25)
        ax.set_label(PANEL)
    wrong = int((np.argmax(probs, -1) != labels).sum())
    if not len(chosen):
        no_data(axes[0])
        axes[0].axis("on")
    fig.supxlabel("time step", fontsize=9)
    _legend(fig, axes[0], series[0].shape[-1], "outside right upper")
    fig.suptitle(
        f"The {len(chosen)} most confidently wrong of {len(labels):,} test series "
        f"({wrong:,} wrong): true -> predicted (probability)",
        fontsize=10,
    )
    return fig


def draw_wrong(
    series: Sequence[np.ndarray], labels: np.ndarray, probs: np.ndarray, class_names: list[str],
    path: Path, n: int = 16,
) -> Path:  # fmt: skip
    return save(wrong_figure(series, labels, probs, class_names, n), path)


# --- a finished run ---------------------------------------------------------------------------


def draw_run(pics: RunPictures, out_dir: Path, title: str, n_wrong: int = 16) -> dict[str, Path]:
    """The pictures of a run on series into `out_dir`; returns picture name -> PNG path."""
    names, i = pics.class_names, pics.image_index
    filters = {}
    if pics.kernel is not None and np.ndim(pics.kernel) == 3:
        filters["filters"] = draw_filters(pics.kernel, out_dir / "filters.png", pics.kernel_layer)
    return {
        **filters,
        "feature_maps": draw_feature_maps(
            pics.example(i), pics.maps, out_dir / "feature_maps.png", title
        ),
        "confusion_matrix": draw_confusion(
            pics.counts, names, out_dir / "confusion_matrix.png", "series"
        ),
        "curves": draw_curves(pics.records, out_dir / "curves.png"),
        "confidently_wrong": draw_wrong(
            [pics.example(k) for k in range(len(pics.labels))],
            pics.labels,
            pics.probs,
            names,
            out_dir / "confidently_wrong.png",
            n_wrong,
        ),  # fmt: skip
    }
