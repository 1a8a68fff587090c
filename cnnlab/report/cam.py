"""Class activation maps (Zhou, Khosla, Lapedriza, Oliva & Torralba 2016, "Learning deep features
for discriminative localization"): where in a test example the evidence for a class lies, for a
net whose layers end in global average pooling before the logits (Wang, Yan & Oates 2017 drew
them for a fully convolutional net on GunPoint).

With A [*S', F] the map that the global pooling averages (the network's own output, from the
`maps` collection) and w [F, K] the kernel of the logits layer, class c's map is

    CAM_c(s) = sum_f w[f, c] * A[s, f],

so its mean over the map's positions is logit_c less the logits' bias: the CAM spreads the logit
over the positions. It is drawn on the input's grid: each map position sits at the centre of its
receptive field (`pictures.Placement`, as the feature maps do) and the CAM is interpolated
linearly between those centres, held at its end values beyond them.

`class_activation.png` shows a few test examples of each class with the CAM of the class the net
predicted: a series as a curve coloured by it, an image under it as a translucent heat map.

Glossary: `n` examples shown, `S` the input's spatial axes (L, or H, W), `S'` the map's, `F` its
channels, `K` classes.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from cnnlab import geometry
from cnnlab.architecture import Conv, Dropout, Flatten, GlobalPool, Pool, PoolKind, Residual
from cnnlab.errors import CnnlabError
from cnnlab.report.pictures import PANEL, Placement, RunPictures, bare, grid, save
from cnnlab.rundir import TrainedModel

CMAP = "turbo"  # dark at both ends: a curve stays visible on white wherever its CAM lies


@dataclass(frozen=True)
class ClassActivations:
    indices: np.ndarray  # [n] the test examples shown
    classes: np.ndarray  # [n] the class of each CAM: the one the net predicted
    maps: np.ndarray  # [n, *S'] CAM on the map's own grid
    centres: tuple[np.ndarray, ...]  # per spatial axis [S'_i]: input coordinate of each position
    upsampled: np.ndarray  # [n, *S] the CAM on the input's grid
    layer: str  # the layer whose output the global pooling averages, as the table names it


def pooled_layer(layers: tuple) -> tuple[int | None, str]:
    """The index of the global average pooling whose output the logits read (through dropout
    alone), or None and why these layers have no class activation map."""
    pools = [i for i, layer in enumerate(layers) if isinstance(layer, GlobalPool)]
    if not pools:
        head = "flattens its last map" if any(isinstance(x, Flatten) for x in layers) else ""
        return None, (
            f"the net {head or 'has no global pooling'}; a CAM needs global average pooling "
            "right before the logits"
        )
    i = pools[-1]
    if layers[i].kind != PoolKind.avg:
        return None, "the net ends in global max pooling: a CAM needs global average pooling"
    between = [x for x in layers[i + 1 :] if not isinstance(x, Dropout)]
    if between:
        return None, (
            f"{len(between)} layer(s) after the global pooling: the logits are not linear in "
            "its input map"
        )
    return i, ""


def placement(layers: tuple, spatial: tuple[int, ...]) -> Placement:
    """Where the positions of the map after `layers` lie on an input of `spatial` size."""
    place = Placement(np.array(spatial), np.zeros(len(spatial)), 1)
    for layer in layers:
        if isinstance(layer, Conv | Pool | Residual):
            place = place.after(layer)
    return place


def upsample(maps: np.ndarray, centres: tuple[np.ndarray, ...], shape: tuple[int, ...]):
    """`maps` [n, *S'] onto the input grid [n, *S]: linear between the positions' `centres`
    along each axis in turn, the end values beyond them."""
    out = np.asarray(maps, np.float64)
    for axis, (at, size) in enumerate(zip(centres, shape, strict=True), start=1):
        along = lambda v, at=at, n=size: np.interp(np.arange(n), at, v)  # [S'_i] -> [S_i]
        out = np.apply_along_axis(along, axis, out)
    return out


def class_activations(
    model: TrainedModel, x: np.ndarray, indices: np.ndarray, classes: np.ndarray,
    lengths: np.ndarray | None = None,
) -> ClassActivations:  # fmt: skip
    """The CAMs of class `classes[i]` [n] for the normalized test examples `x` [n, *S, C] (test
    examples `indices` [n]) of a layer-language net that ends in global average pooling; padded
    series run masked with their `lengths` [n], as in training."""
    layers = model.layers().layers
    i, why = pooled_layer(layers)
    if i is None:
        raise CnnlabError(f"no class activation map: {why}")
    lengths = None if lengths is None else np.asarray(lengths)
    _, state = model.module.apply(model.variables, x, lengths=lengths, mutable=["maps"])
    a = np.asarray(state["maps"]["outputs"][i - 1]) if i else np.asarray(x)  # [n, *S', F]
    w = np.asarray(model.variables["params"]["logits"]["kernel"])  # [F, K]
    maps = np.einsum("n...f,fn->n...", a, w[:, classes])  # [n, *S']
    place = placement(layers[:i], x.shape[1:-1])
    if tuple(place.size) != a.shape[1:-1]:
        raise CnnlabError(f"the pooled map is {a.shape[1:-1]}, its placement {place.size}")
    centres = place.centres()
    name = geometry.row_names(layers)[i - 1] if i else "input"
    up = upsample(maps, centres, x.shape[1:-1])
    return ClassActivations(np.asarray(indices), np.asarray(classes), maps, centres, up, name)


def examples_per_class(labels: np.ndarray, num_classes: int, per_class: int | None = None):
    """Indices of the first `per_class` test examples of each class, class by class (by default
    3 of each of a few classes, down to 1 of each of 24 or more)."""
    per_class = per_class or max(1, min(3, 24 // max(num_classes, 1)))
    return np.concatenate(
        [np.flatnonzero(labels == k)[:per_class] for k in range(num_classes)]
    ).astype(int)


# --- the picture ------------------------------------------------------------------------------


def _panel_title(i: int, label: int, probs: np.ndarray, names: list[str], sep: str) -> str:
    pred = int(np.argmax(probs))
    return f"test {i}: {names[label]}{sep}-> {names[pred]} ({probs[pred]:.2f})"


def _series_panel(ax, x: np.ndarray, cam: np.ndarray, norm: Normalize):
    """Series `x` [L, C], a curve per channel, each segment coloured by `cam` [L]."""
    t = np.arange(len(x))
    colour = (cam[:-1] + cam[1:]) / 2  # [L - 1] one per segment
    for c in range(x.shape[1]):
        points = np.stack([t, x[:, c]], -1)  # [L, 2]
        lines = LineCollection(np.stack([points[:-1], points[1:]], 1), cmap=CMAP, norm=norm)
        lines.set_array(colour)
        lines.set_linewidth(2.2)
        ax.add_collection(lines)
    ax.set_xlim(-0.5, len(x) - 0.5)
    pad = 0.08 * float(np.ptp(x) or 1.0)
    ax.set_ylim(float(x.min()) - pad, float(x.max()) + pad)
    ax.grid(alpha=0.25)
    ax.tick_params(labelsize=7)
    return lines


def _image_panel(ax, image: np.ndarray, cam: np.ndarray, norm: Normalize):
    """uint8 `image` [H, W, C] in grey (or colour), `cam` [H, W] over it, translucent."""
    ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray")
    shown = ax.imshow(cam, cmap=CMAP, norm=norm, alpha=0.5, interpolation="bilinear")
    bare(ax)
    return shown


def cam_figure(pics: RunPictures) -> Figure:
    """The examples of `pics.cam`, each with its CAM divided by its largest magnitude (in the
    panel's title): one example's logit can be many times another's, and would leave the others
    one colour on a shared scale."""
    acts, examples, labels = pics.cam, pics.images, pics.labels  # examples [N, *S, C]
    n, series = len(acts.indices), examples.ndim == 3
    per_class = max(np.bincount(labels[acts.indices]).max(), 1)
    rows, cols = (-(-n // per_class), per_class) if series else grid(n, 8)
    side = (3.4, 2.1) if series else (1.7, 1.9)
    fig = Figure(figsize=(cols * side[0] + 1.2, rows * side[1] + 1.0), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    norm, shown = Normalize(-1.0, 1.0), None
    for ax in axes[n:]:
        ax.axis("off")
    for ax, i, cam in zip(axes, acts.indices, acts.upsampled, strict=False):
        panel = _series_panel if series else _image_panel
        example = pics.example(i)  # a padded series without its padding
        cam = cam[: len(example)]
        scale = float(np.abs(cam).max()) or 1.0
        shown = panel(ax, example, cam / scale, norm)
        sep = " " if series else "\n"
        title = _panel_title(int(i), int(labels[i]), pics.probs[i], pics.class_names, sep)
        ax.set_title(f"{title}{',' * series}{sep}|CAM| up to {scale:.3g}", fontsize=8)
        ax.set_label(PANEL)
    if shown is not None:
        label = "CAM / its largest |CAM| in the panel"
        fig.colorbar(shown, ax=list(axes[:n]), shrink=0.8, label=label)
    if series:
        fig.supxlabel("time step", fontsize=9)
    where = "time step" if series else "pixel"
    fig.suptitle(
        f"{pics.model}: class activation maps of the predicted class, first test "
        f"{'series' if series else 'images'} of each class: true -> predicted (probability)\n"
        f"CAM_c = sum_f w[f, c] A_f, A = {acts.layer}'s output that the global average pooling "
        f"reads, w the logits' kernel; 1 (red): this {where} drove the prediction most, -1 "
        "(blue): it argued against it most",
        fontsize=9,
    )
    return fig


def draw_cam(pics: RunPictures, path: Path) -> Path:
    return save(cam_figure(pics), path)
