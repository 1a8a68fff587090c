"""Pictures of what one trained network learned, as PNG files in its run directory.

- `filters.png`: the first conv layer's kernels, one small image per filter;
- `feature_maps.png`: one test image and its feature maps after each conv (with its activation)
  and each pool layer, each map drawn on the input's pixel grid, so that padding and stride show;
- `confusion_matrix.png`: test counts, rows true class, columns predicted;
- `curves.png`: loss and accuracy against step, train and validation (and the final test);
- `confidently_wrong.png`: the test images the model got wrong with the highest confidence;
- `class_activation.png`: for a net whose layers end in global average pooling, a few test
  images of each class with their class activation maps (`cnnlab.report.cam`); skipped, with a
  note, for other nets.

Series [N, L, C] get the same pictures in 1-D form (`cnnlab.report.series`): `draw_run`
dispatches on the rank of the test examples.

A module of one's own (`model._target_`) shows its first 2-D conv kernel and the outputs of its
submodules that have one, each stretched over the input (`module_maps`); without one, no filters.

`<name>_figure` builds a matplotlib `Figure` from plain arrays and `draw_<name>` writes it to a
path and returns the path. `draw_run` draws them all from a `RunPictures`, the arrays of one run
(`run_pictures` takes them from a trained model, its test data and metrics), and `draw_all(run_dir)`
does so for a finished run read back from its directory. Matplotlib's object API (`Figure`)
without pyplot, as in `cnnlab.report.plots`.

Glossary: `N` images, `H, W` spatial, `L` length, `C` channels, `K` classes, `F` filters.
"""

import dataclasses
import functools
import math
import operator
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import jax.numpy as jnp
import numpy as np
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from cnnlab import geometry
from cnnlab.architecture import Act, Conv, GlobalPool, Norm, Pool, Residual, walk
from cnnlab.data import Dataset, load_dataset
from cnnlab.errors import CnnlabError
from cnnlab.inference import predict_probs
from cnnlab.preprocess import normalize
from cnnlab.report.plots import no_data, series_color
from cnnlab.rundir import DatasetInfo, RunDir, TrainedModel
from cnnlab.tracking import confusion_matrix

if TYPE_CHECKING:  # cam.py draws with this module's helpers, so it is imported where it is used
    from cnnlab.report.cam import ClassActivations

DPI = 110
PANEL = "panel"  # the label of the axes that hold one filter, map or image (the tests count them)
PICTURES = ("filters", "feature_maps", "confusion_matrix", "curves", "confidently_wrong")
CAM = "class_activation"  # drawn besides PICTURES for nets that end in global average pooling


def save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def grid(n: int, max_cols: int) -> tuple[int, int]:
    cols = min(max_cols, max(1, math.ceil(math.sqrt(n))))
    return math.ceil(n / cols), cols


def bare(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


# --- first-layer filters ----------------------------------------------------------------------


def filters_figure(kernel: np.ndarray, layer: str = "conv1") -> Figure:
    """`kernel` [kh, kw, C, F] as F small images: grey on one scale shared by all filters (mid
    grey = 0) for C = 1, RGB stretched per filter for C = 3, the mean over channels otherwise."""
    kernel = np.asarray(kernel, np.float32)
    kh, kw, c, f = kernel.shape
    rows, cols = grid(f, 12)
    side = 1.0 if f <= 16 else 0.8
    fig = Figure(figsize=(cols * side + 1.4, rows * side + 0.9), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    limit = float(np.abs(kernel).max()) or 1.0
    image = None
    for i, ax in enumerate(axes):
        if i >= f:
            ax.remove()
            continue
        w = kernel[..., i]  # [kh, kw, C]
        if c == 3:
            lo, hi = w.min(), w.max()
            image = ax.imshow((w - lo) / (hi - lo or 1.0), interpolation="nearest")
        else:
            grey = w[..., 0] if c == 1 else w.mean(-1)
            image = ax.imshow(grey, cmap="gray", vmin=-limit, vmax=limit, interpolation="nearest")
        ax.set_label(PANEL)
        ax.set_title(f"{i + 1}", fontsize=8, pad=2)
        bare(ax)
    how = {1: "grey, one scale for all (mid grey = 0)", 3: "RGB, each stretched to its range"}
    fig.suptitle(
        f"{layer}: {f} learned filters, kernel {kh}x{kw}x{c}x{f} "
        f"({how.get(c, f'mean over the {c} input channels')})",
        fontsize=10,
    )
    if c != 3 and image is not None:
        fig.colorbar(image, ax=list(axes[:f]), label="weight", shrink=0.8)
    return fig


def draw_filters(kernel: np.ndarray, path: Path, layer: str = "conv1") -> Path:
    return save(filters_figure(kernel, layer), path)


# --- feature maps -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureMap:
    name: str  # conv1, pool1, ... as in the per-layer table
    detail: str  # e.g. "5x5/1 pad 2 + relu", "max 2x2/2"
    values: np.ndarray  # [H, W, C] for one image, [L, C] for one series
    extent: tuple[float, ...]  # (left, right, bottom, top) in input pixels; (left, right) in steps


def feature_maps(
    model: TrainedModel, image: np.ndarray, mean: np.ndarray, std: np.ndarray,
    length: int | None = None,
) -> list[FeatureMap]:  # fmt: skip
    """The maps of one uint8 `image` [H, W, C] (or float series [L, C]) after each conv (with the
    normalization and activation that follow it), each pool and each residual block, normalized
    with the training split's `mean` and `std` [C].

    The maps are the network's own outputs, which `ConvNet` puts in its `maps` collection. Each
    map's extent places its pixels on the input's grid: a pixel covers `jump x jump` input pixels,
    where jump is the product of the strides so far, and is centred where the centre of its
    receptive field lies (along a series: `jump` steps).

    A padded series runs masked, as in training, with its own `length`: each map keeps the steps
    centred within that length, so no picture shows what the net computed over the padding.
    """
    x = normalize(jnp.asarray(image[None]), np.float32(mean), np.float32(std))  # [1, *S, C]
    lengths = None if length is None else jnp.array([length])
    _, state = model.module.apply(model.variables, x, lengths=lengths, mutable=["maps"])
    arch = model.layers()
    layers, names = arch.layers, geometry.row_names(arch.layers)
    place = Placement(np.array(image.shape[:-1]), np.zeros(image.ndim - 1), 1)
    maps = []
    for i, (layer, name) in enumerate(zip(layers, names, strict=True)):
        if not isinstance(layer, Conv | Pool | Residual):
            continue
        place = place.after(layer)
        shown = i  # a conv or a block is shown after the normalization and activation that follow
        while (
            isinstance(layer, Conv | Residual)
            and shown + 1 < len(layers)
            and isinstance(layers[shown + 1], Norm | Act)
        ):
            shown += 1
        y = np.asarray(state["maps"]["outputs"][shown])  # [1, *S', F]
        detail = _detail(layers[i : shown + 1], image.ndim - 1)
        m = FeatureMap(name, detail, y[0], _extent(y, place.centre, place.jump))
        maps.append(m if length is None else _within(m, place.jump, length))
        place = dataclasses.replace(place, size=np.array(y.shape[1:-1]))
    return maps


def _within(m: FeatureMap, jump: int, length: int) -> FeatureMap:
    """Series map `m` cut to its steps centred before input step `length` (at least one)."""
    left = m.extent[0]
    keep = int(np.clip(np.floor((length - 0.5 - left - jump / 2) / jump) + 1, 1, len(m.values)))
    return dataclasses.replace(m, values=m.values[:keep], extent=(left, left + keep * jump))


@dataclass(frozen=True)
class Placement:
    """Where a map's pixels lie on the input: its size, the input coordinates (row, column; or
    the step along a series) of the centre of its pixel 0, and the input pixels per map pixel
    along each side."""

    size: np.ndarray
    centre: np.ndarray
    jump: int

    def centres(self) -> tuple[np.ndarray, ...]:
        """The input coordinate of every map position, one array per spatial axis [S'_i]."""
        return tuple(
            c + self.jump * np.arange(int(n)) for c, n in zip(self.centre, self.size, strict=True)
        )

    def after(self, layer) -> "Placement":
        if isinstance(layer, Residual):  # the branch's convs and pools set where its pixels lie
            place = self
            for inner in layer.layers:
                if isinstance(inner, Conv | Pool):
                    place = place.after(inner)
            return place
        k, s, padding = (
            (layer.dilation * (layer.kernel - 1) + 1, layer.stride, layer.padding)
            if isinstance(layer, Conv) else (layer.window, layer.step, layer.padding)
        )  # fmt: skip
        lo = np.array([geometry.pads(padding, int(n), k, s)[0] for n in self.size])
        size = np.array([geometry.out_size(int(n), k, s, geometry.pads(padding, int(n), k, s))
                         for n in self.size])  # fmt: skip
        return Placement(size, self.centre + ((k - 1) / 2 - lo) * self.jump, self.jump * s)


def _detail(layers: tuple, axes: int = 2) -> str:
    """A map's caption: "5x5/1 pad 2, relu", "max pool 2x2/2", "residual block of 2 convs, relu";
    over one spatial axis (`axes`) "5/1 pad 2, relu", "max pool 2/2"."""
    first = layers[0]
    side = lambda n: "x".join([str(n)] * axes)
    if isinstance(first, Pool):
        return f"{first.kind} pool {side(first.window)}/{first.step}"
    if isinstance(first, Residual):
        convs = sum(isinstance(layer, Conv) for layer in first.layers)
        head = f"residual block of {convs} convs"
    else:
        head = f"{side(first.kernel)}/{first.stride} pad {first.padding}"
    extras = [
        f"{layer.kind} norm" if isinstance(layer, Norm) else str(layer.fn) for layer in layers[1:]
    ]
    return ", ".join([head, *extras])


def _extent(y, centre: np.ndarray, jump: int) -> tuple[float, ...]:
    """imshow's (left, right, bottom, top) of map `y` [1, H, W, C] in input pixel coordinates;
    (left, right) in input steps of a series map [1, L, C]."""
    if y.ndim == 3:
        left = float(centre[0] - jump / 2)
        return (left, left + y.shape[1] * jump)
    h, w = y.shape[1:3]
    top, left = centre - jump / 2
    return (float(left), float(left + w * jump), float(top + h * jump), float(top))


def feature_maps_figure(
    image: np.ndarray, maps: list[FeatureMap], title: str = "", channels: int = 16
) -> Figure:
    """The input `image` [H, W, C] uint8, then one row per map with its first `channels`."""
    h, w, c = image.shape
    shown = min(channels, max((m.values.shape[-1] for m in maps), default=1))
    fig = Figure(figsize=(1.0 * shown + 2.2, 1.05 * (len(maps) + 1) + 0.6), layout="constrained")
    axes = fig.subplots(len(maps) + 1, shown + 1, squeeze=False)
    frame = (-0.5, w - 0.5, h - 0.5, -0.5)
    label = axes[0, 0]
    label.axis("off")
    label.text(0, 0.5, f"input\n{h}x{w}x{c}", va="center", fontsize=9, transform=label.transAxes)
    axes[0, 1].imshow(image[..., 0] if c == 1 else image, cmap="gray", extent=frame)
    axes[0, 1].set_label(PANEL)
    bare(axes[0, 1])
    for ax in axes[0, 2:]:
        ax.axis("off")
    for r, m in enumerate(maps, start=1):
        mh, mw, mc = m.values.shape
        axes[r, 0].axis("off")
        axes[r, 0].text(
            0, 0.5, f"{m.name}\n{mh}x{mw}x{mc}\n{m.detail}",
            va="center", fontsize=8, transform=axes[r, 0].transAxes, linespacing=1.3,
        )  # fmt: skip
        for k, ax in enumerate(axes[r, 1:]):
            if k >= mc:
                ax.axis("off")
                continue
            values = m.values[..., k]
            lo, hi = float(values.min()), float(values.max())
            ax.imshow(values, cmap="viridis", vmin=lo, vmax=max(hi, lo + 1e-6),
                      extent=m.extent, interpolation="nearest")  # fmt: skip
            # the input's extent: a map smaller than it lost border pixels to valid padding
            ax.add_patch(Rectangle((-0.5, -0.5), w, h, fill=False, ec="0.5", lw=0.8, ls=":"))
            ax.set_xlim(min(frame[0], m.extent[0]), max(frame[1], m.extent[1]))
            ax.set_ylim(max(frame[2], m.extent[2]), min(frame[3], m.extent[3]))
            ax.set_label(PANEL)
            bare(ax)
            if hi == lo:  # one pixel, or a dead ReLU channel: no pattern to colour, so the value
                ax.text(0.5, 0.5, f"{'' if mh * mw == 1 else 'all '}{lo:.2g}", color="white",
                        ha="center", va="center", fontsize=7, transform=ax.transAxes)  # fmt: skip
            if r == 1 or k >= maps[r - 2].values.shape[-1]:
                ax.set_title(f"ch {k + 1}", fontsize=7, pad=2)
    fig.suptitle(
        (title + "\n" if title else "")
        + f"first {shown} channels of each layer after it, each map on its own colour scale "
        "(yellow = its highest value)\nmaps are drawn on the input's pixel grid: one pixel covers "
        "stride x stride input pixels; white inside a frame is input border the map does not "
        "cover (valid padding, or pool windows that do not fit)",
        fontsize=9,
    )
    return fig


def draw_feature_maps(
    image: np.ndarray, maps: list[FeatureMap], path: Path, title: str = "", channels: int = 16
) -> Path:
    return save(feature_maps_figure(image, maps, title, channels), path)


# --- confusion matrix -------------------------------------------------------------------------


def confusion_figure(
    counts: np.ndarray, class_names: list[str], examples: str = "images"
) -> Figure:
    """`counts` [K, K], rows true class, columns predicted, with each class's recall; `examples`
    names what was classified."""
    counts = np.asarray(counts)
    k = len(class_names)
    size = max(5.0, 0.62 * k + 2.5)
    fig = Figure(figsize=(size + 1.6, size), layout="constrained")
    ax = fig.subplots()
    norm = PowerNorm(0.5, vmin=0, vmax=max(int(counts.max()), 1))  # errors visible beside hits
    image = ax.imshow(counts, cmap="Blues", norm=norm)
    for i in range(k):
        for j in range(k):
            dark = norm(counts[i, j]) > 0.55
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8 if k > 12 else 9,
                    color="white" if dark else ("black" if counts[i, j] else "0.7"))  # fmt: skip
    recall = np.diag(counts) / np.maximum(counts.sum(1), 1)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(
        range(k), [f"{n} ({100 * r:.0f}%)" for n, r in zip(class_names, recall, strict=True)]
    )
    ax.set(xlabel="predicted class", ylabel="true class (recall)")
    total = int(counts.sum())
    accuracy = np.trace(counts) / max(total, 1)
    ax.set_title(f"Test confusion matrix: {100 * accuracy:.1f}% of {total:,} {examples} correct")
    fig.colorbar(image, ax=ax, label=f"test {examples} (square-root colour scale)", shrink=0.8)
    return fig


def draw_confusion(
    counts: np.ndarray, class_names: list[str], path: Path, examples: str = "images"
) -> Path:
    return save(confusion_figure(counts, class_names, examples), path)


# --- training curves --------------------------------------------------------------------------


def curves_figure(records: list[dict]) -> Figure:
    """Loss and accuracy against step: train (every log step), validation (every epoch) and the
    final test result where the records hold one."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    epochs = max((r.get("epoch", 0) for r in records), default=0)
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for split, style in (("train", {"lw": 1.2}), ("val", {"marker": "o", "lw": 2})):
            points = [
                (r["step"], r[f"{split}/{metric}"]) for r in records if f"{split}/{metric}" in r
            ]
            if points:
                x, y = zip(*points, strict=True)
                label = {
                    "train": "train (running, per log step)",
                    "val": "validation (each epoch)",
                }[split]
                if len(points) == 1:  # a short run's one train record: a line alone would not show
                    style = {**style, "marker": "o"}
                ax.plot(x, y, color=series_color(split == "val"), label=label, **style)
        test = [(r["step"], r[f"test/{metric}"]) for r in records if f"test/{metric}" in r]
        if test:
            step, value = test[-1]
            ax.axhline(
                value, color=series_color(2), ls="--", lw=1, label=f"test at the end ({value:.3f})"
            )
        ax.set(xlabel="step", ylabel=metric, title=f"{metric.capitalize()} against step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            no_data(ax)
    fig.suptitle(f"Training curves ({epochs} epoch{'s' * (epochs != 1)})", fontsize=11)
    return fig


def draw_curves(records: list[dict], path: Path) -> Path:
    return save(curves_figure(records), path)


# --- most confidently wrong -------------------------------------------------------------------


def most_confidently_wrong(labels: np.ndarray, probs: np.ndarray, n: int = 16) -> np.ndarray:
    """Indices of the (up to) `n` misclassified examples with the highest predicted probability,
    most confident first. labels [N], probs [N, K]."""
    preds = np.argmax(probs, -1)
    wrong = np.flatnonzero(preds != labels)
    confidence = probs[wrong, preds[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")[:n]]


def wrong_figure(
    images: np.ndarray, labels: np.ndarray, probs: np.ndarray, class_names: list[str], n: int = 16
) -> Figure:
    """The `n` most confidently wrong of `images` [N, H, W, C] uint8, most confident first."""
    chosen = most_confidently_wrong(labels, probs, n)
    rows, cols = grid(max(len(chosen), 1), 8)
    fig = Figure(figsize=(cols * 1.75, rows * 2.05 + 0.5), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(chosen) :]:
        ax.axis("off")
    for ax, i in zip(axes, chosen, strict=False):
        image, pred = images[i], int(np.argmax(probs[i]))
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray")
        ax.set_title(f"{class_names[labels[i]]} ->\n{class_names[pred]} ({probs[i, pred]:.4f})",
                     fontsize=8, pad=3)  # fmt: skip
        ax.set_label(PANEL)
        bare(ax)
    wrong = int((np.argmax(probs, -1) != labels).sum())
    if not len(chosen):
        no_data(axes[0])
    fig.suptitle(
        f"The {len(chosen)} most confidently wrong of {len(labels):,} test images "
        f"({wrong:,} wrong): true -> predicted (probability)",
        fontsize=10,
    )
    return fig


def draw_wrong(
    images: np.ndarray,
    labels: np.ndarray,
    probs: np.ndarray,
    class_names: list[str],
    path: Path,
    n: int = 16,
) -> Path:
    return save(wrong_figure(images, labels, probs, class_names, n), path)


# --- a finished run ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RunPictures:
    """What the pictures of a run are drawn from: arrays and names, no model or config."""

    kernel: np.ndarray | None  # [kh, kw, C, F] ([k, C, F]) the first conv's; None: no filters.png
    maps: list[FeatureMap]  # test image `image_index` after each conv and pool
    image_index: int
    images: np.ndarray  # [N, H, W, C] uint8 the test images, or [N, L, C] float series
    labels: np.ndarray  # [N]
    probs: np.ndarray  # [N, K] the model's softmax outputs
    counts: np.ndarray  # [K, K] confusion counts, rows true class, as confusion_matrix.csv
    class_names: list[str]  # [K]
    records: list[dict]  # metrics.jsonl
    model: str  # the network as the feature maps' title names it, e.g. "lenet5 (relu, max pooling)"
    kernel_layer: str = "conv1"  # the name or path of the layer whose kernel `kernel` is
    cam: "ClassActivations | None" = None  # a few test examples' CAMs; None: no CAM picture
    skipped: dict[str, str] = field(default_factory=dict)  # picture name -> why it is not drawn
    lengths: np.ndarray | None = None  # [N] each padded series' own steps; None: all of `images`

    def example(self, i: int) -> np.ndarray:
        """Test example `i` as drawn: a padded series without its padding."""
        return self.images[i] if self.lengths is None else self.images[i][: self.lengths[i]]


def run_pictures(
    model: TrainedModel, data: Dataset, probs: np.ndarray, records: list[dict], image_index: int = 0
) -> RunPictures:
    """The arrays of a trained `model`'s pictures: its first kernel, the feature maps of test
    image `image_index`, from the test probabilities [N, K] its confusion counts, and the class
    activation maps of a few test examples of each class where the net has them."""
    test = data.test
    if not 0 <= image_index < len(test.images):
        raise CnnlabError(
            f"image index {image_index} is outside the {len(test.images)} test images"
        )
    probs = np.asarray(probs)
    image = test.images[image_index]
    if model.config._target_:  # a module of one's own
        first, kernel, maps = module_maps(model, image, data.mean, data.std)
        title = model.config.name + ("" if maps else " (no conv-like submodule: no feature maps)")
    else:
        arch = model.layers()
        path = _first_conv(arch.layers)
        first = "/".join(path)
        kernel = np.asarray(
            functools.reduce(operator.getitem, path, model.variables["params"])["kernel"]
        )
        length = None if test.lengths is None else int(test.lengths[image_index])
        maps, title = feature_maps(model, image, data.mean, data.std, length), _title(arch)
    cam, skipped = _class_activations(model, data, probs)
    if kernel is None:
        skipped["filters"] = "the module has no conv kernel of the input's rank"
    return RunPictures(
        kernel=kernel,
        maps=maps,
        image_index=image_index,
        images=test.images,
        labels=test.labels,
        probs=probs,
        counts=confusion_matrix(test.labels, np.argmax(probs, -1), data.num_classes),
        class_names=list(data.class_names),
        records=records,
        model=title,
        kernel_layer=first or "",
        cam=cam,
        skipped=skipped,
        lengths=test.lengths,
    )


def _first_conv(layers: tuple) -> tuple[str, ...]:
    """The parameter path of the first conv, inside a residual block too: ("res1", "conv1")."""
    for layer in layers:
        if isinstance(layer, Conv):
            return (layer.name,)
        if isinstance(layer, Residual) and (inner := _first_conv(layer.layers)):
            return (layer.name, *inner)
    return ()


def _class_activations(
    model: TrainedModel, data: Dataset, probs: np.ndarray
) -> tuple["ClassActivations | None", dict[str, str]]:
    """The CAMs of the predicted class of the first few test examples of each class, or None
    and the reason (picture name -> why) where the net does not end in global average pooling."""
    from cnnlab.report import cam

    if model.config._target_:
        return None, {CAM: "a module of one's own: its layers, and so its head, are not known"}
    index, why = cam.pooled_layer(model.layers().layers)
    if index is None:
        return None, {CAM: why}
    test = data.test
    chosen = cam.examples_per_class(test.labels, data.num_classes)
    x = normalize(jnp.asarray(test.images[chosen]), np.float32(data.mean), np.float32(data.std))
    lengths = None if test.lengths is None else test.lengths[chosen]
    return cam.class_activations(model, x, chosen, np.argmax(probs[chosen], -1), lengths), {}


def module_maps(
    model: TrainedModel, image: np.ndarray, mean: np.ndarray, std: np.ndarray
) -> tuple[str | None, np.ndarray | None, list[FeatureMap]]:
    """A module of one's own: the path and kernel of its first submodule with a 2-D conv kernel
    [kh, kw, C, F] (in call order), and the [H, W, C] outputs of each such submodule for one
    uint8 `image`, each stretched over the input (their padding and strides are not known)."""
    from cnnlab.models import user

    x = normalize(jnp.asarray(image[None]), np.float32(mean), np.float32(std))  # [1, H, W, C]
    kernels = user.conv_kernels(model.variables["params"])
    outputs = [(p, y) for p, y in user.one_image(model.module, model.variables, x) if p in kernels]
    h, w = image.shape[:2]
    frame = (-0.5, w - 0.5, h - 0.5, -0.5)  # imshow's extent of the input
    maps = [FeatureMap(p, "", y[0], frame) for p, y in outputs if y.ndim == 4]
    first = outputs[0][0] if outputs else next(iter(kernels), None)
    return first, kernels.get(first), maps


def _title(arch) -> str:
    """The network's name with its activation and pooling, which tell LeNet-5's classic variant
    (tanh, avg) from the modern one: "lenet5 (relu, max pooling)"."""
    layers = list(walk(arch.layers))
    acts = dict.fromkeys(str(x.fn) for x in layers if isinstance(x, Act))
    pools = dict.fromkeys(str(x.kind) for x in layers if isinstance(x, Pool))
    heads = dict.fromkeys(str(x.kind) for x in layers if isinstance(x, GlobalPool))
    parts = [
        ", ".join(acts),
        f"{', '.join(pools)} pooling" if pools else "",
        f"global {', '.join(heads)} pooling" if heads else "",
    ]
    return f"{arch.name} ({', '.join(p for p in parts if p)})"


def draw_run(pics: RunPictures, out_dir: Path, n_wrong: int = 16) -> dict[str, Path]:
    """The pictures into `out_dir`, of series [N, L, C] in their 1-D form (`cnnlab.report.series`),
    with `class_activation.png` where `pics.cam` is set; returns picture name -> PNG path. Each
    picture of `pics.skipped` gets a note on stderr."""
    out_dir, names, i = Path(out_dir), pics.class_names, pics.image_index
    label, pred = int(pics.labels[i]), int(np.argmax(pics.probs[i]))
    kind = "series" if pics.images.ndim == 3 else "image"
    title = (f"{pics.model}: test {kind} {i}, true class {names[label]}, "
             f"predicted {names[pred]} ({pics.probs[i, pred]:.2f})")  # fmt: skip
    if kind == "series":
        from cnnlab.report import series

        paths = series.draw_run(pics, out_dir, title, n_wrong)
    else:
        paths = _draw_images(pics, out_dir, title, n_wrong)
    if pics.cam is not None:
        from cnnlab.report import cam

        paths[CAM] = cam.draw_cam(pics, out_dir / f"{CAM}.png")
    for name, why in pics.skipped.items():
        print(f"cnnlab: note: {name}.png not drawn: {why}", file=sys.stderr)
    return paths


def _draw_images(pics: RunPictures, out_dir: Path, title: str, n_wrong: int) -> dict[str, Path]:
    names, i = pics.class_names, pics.image_index
    filters = {}  # a module of one's own without a 2-D conv has no filters to draw
    if pics.kernel is not None:
        filters["filters"] = draw_filters(pics.kernel, out_dir / "filters.png", pics.kernel_layer)
    return {
        **filters,
        "feature_maps": draw_feature_maps(
            pics.images[i], pics.maps, out_dir / "feature_maps.png", title
        ),
        "confusion_matrix": draw_confusion(pics.counts, names, out_dir / "confusion_matrix.png"),
        "curves": draw_curves(pics.records, out_dir / "curves.png"),
        "confidently_wrong": draw_wrong(
            pics.images, pics.labels, pics.probs, names, out_dir / "confidently_wrong.png", n_wrong
        ),
    }


def draw_all(
    run_dir: Path, out_dir: Path | None = None, image_index: int = 0, n_wrong: int = 16
) -> dict[str, Path]:
    """Draw the pictures of a finished run into `out_dir` (default `<run_dir>/pictures/`);
    returns picture name -> PNG path."""
    pics = read_pictures(run_dir, image_index)
    return draw_run(pics, Path(out_dir) if out_dir else Path(run_dir) / "pictures", n_wrong)


def read_pictures(run_dir: Path, image_index: int = 0) -> RunPictures:
    """The arrays of a finished run's pictures. Reads the run's config, final variables and
    metrics, and its data again from the data source (the same config gives the same arrays)."""
    run = RunDir(run_dir)
    run.check(*RunDir.FINISHED)
    data = load_dataset(run.config().data)
    changed = run.dataset().differences(DatasetInfo.of(data))
    if changed:
        raise CnnlabError(
            f"the data of {run.path} reads back differently now ({', '.join(changed)} differ "
            "from its dataset.json): restore the data the run was trained on"
        )
    model = run.load_model()
    probs = predict_probs(model.module, model.variables, data.test.examples, data.mean, data.std)
    return run_pictures(model, data, probs, run.metrics(), image_index)
