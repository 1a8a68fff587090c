"""Pictures of runs on series, and class activation maps (CAM): a small fully convolutional net
trained on GunPoint (the UCR set that aeon ships) through `run` with its pictures on, each
picture checked, and the CAMs of it, of a pooled 1-D net and of a small image net (Fashion-MNIST)
computed here from their definition and compared.

Glossary: `N` examples, `L` length, `C` channels, `F` filters, `K` classes.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cnnlab.config import (
    CheckpointConfig,
    Config,
    DataConfig,
    LoggerConfig,
    ModelConfig,
    OptimizerConfig,
    TrainConfig,
)
from cnnlab.data import Dataset, Split, load_dataset
from cnnlab.inference import predict_probs
from cnnlab.models import build_model, resolve, variables_like
from cnnlab.report import cam, pictures, series
from cnnlab.report.pictures import PANEL
from cnnlab.rundir import RunDir, TrainedModel
from cnnlab.tracking import Trackers
from cnnlab.tracking.local import LocalTracker
from cnnlab.tracking.wandb_run import WandbTracker
from cnnlab.train.run import run
from tests.conftest import needs_fashion_mnist, preset, small_config

# GunPoint's 150 steps stay 150 steps to the global pooling (odd kernels, "same" padding): the
# CAM's positions are the input's own
FCN = ModelConfig(
    name="fcn_small",
    layers=[{"conv": 16, "kernel": 7}, "relu", {"conv": 32, "kernel": 5}, "relu",
            {"conv": 16, "kernel": 3}, "relu", "global_pool"],
)  # fmt: skip
ALL_PICTURES = {*pictures.PICTURES, pictures.CAM}


def gunpoint() -> Dataset:
    """GunPoint (50 train, 150 test series of 150 steps, 2 classes), each series z-normalised,
    [N, L, 1] float32, no validation split."""
    datasets = pytest.importorskip("aeon.datasets")
    splits, classes = [], None
    for name in ("train", "test"):
        x, y = datasets.load_classification(
            "GunPoint", split=name, load_equal_length=True, load_no_missing=True
        )  # x [N, C, L]
        x = (x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True)
        classes = classes or sorted(set(y))
        labels = np.searchsorted(classes, y).astype(np.int32)
        splits.append(Split(np.ascontiguousarray(x.transpose(0, 2, 1), np.float32), labels))
    train, test = splits
    empty = Split(train.images[:0], train.labels[:0])
    return Dataset.from_splits("GunPoint", train, empty, test, tuple(classes))


def series_config(model: ModelConfig) -> Config:
    return Config(
        model=model,
        data=DataConfig(name="GunPoint"),
        optimizer=OptimizerConfig(name="adamw", lr=5e-3, schedule="constant"),
        train=TrainConfig(epochs=60, batch_size=10, eval_batch_size=150, log_every_steps=5),
        logger=LoggerConfig(mode="offline", pictures=True, project="cnnlab-tests"),
        checkpoint=CheckpointConfig(every_steps=None, keep=1),
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The FCN trained on GunPoint, pictures drawn and W&B offline: its run directory, data,
    model (read back from the run directory), test probabilities and pictures' arrays."""
    from cnnlab.train.run import prepare

    run_dir = tmp_path_factory.mktemp("gunpoint")
    data, cfg = gunpoint(), series_config(FCN)
    wandb = WandbTracker(cfg.logger, run_dir, {}, "gunpoint")
    summary = run(cfg, run_dir, Trackers(LocalTracker(run_dir), wandb),
                  prepared=prepare(cfg, data=data))  # fmt: skip
    assert summary["status"] == "ok", summary.get("error")
    model = RunDir(run_dir).load_model()
    probs = predict_probs(model.module, model.variables, data.test.images, data.mean, data.std)
    pics = pictures.run_pictures(model, data, probs, RunDir(run_dir).metrics())
    fields = ["run_dir", "summary", "data", "model", "probs", "pics"]
    return dataclasses.make_dataclass("Trained", fields)(run_dir, summary, data, model, probs, pics)


def _panels(fig) -> list:
    return [ax for ax in fig.axes if ax.get_label() == PANEL]


def _maps_before_pool(model: TrainedModel, x: np.ndarray, pool_index: int) -> np.ndarray:
    """The network's own output [N, *S', F] of the layer just before its global pooling."""
    _, state = model.module.apply(model.variables, jnp.asarray(x), mutable=["maps"])
    return np.asarray(state["maps"]["outputs"][pool_index - 1])


def test_a_run_on_series_draws_every_picture_and_logs_its_predictions(trained):
    assert trained.summary["test/accuracy"] > 0.8, trained.summary  # 0.89 when written
    assert trained.summary["pictures_seconds"] > 0  # drawn, not warned about
    drawn = {path.stem: path for path in (trained.run_dir / "pictures").glob("*.png")}
    assert set(drawn) == ALL_PICTURES
    for name, path in drawn.items():
        with Image.open(path) as img:
            assert img.format == "PNG" and min(img.size) > 250, (name, img.size)
            assert np.asarray(img.convert("L")).std() > 10, f"{name} is nearly blank"
    (offline,) = (trained.run_dir / "wandb").glob("offline-run-*")
    (table,) = (offline / "files" / "media" / "table" / "test").glob("predictions_*.table.json")
    written = json.loads(table.read_text())
    assert written["columns"][0] == "test_index" and len(written["data"]) > 0


def test_the_series_filters_are_curves_of_the_first_kernel(trained):
    kernel = np.asarray(trained.model.variables["params"]["conv1"]["kernel"])  # [7, 1, 16]
    np.testing.assert_array_equal(trained.pics.kernel, kernel)
    panels = _panels(series.filters_figure(kernel, "conv1"))
    assert len(panels) == 16
    for f, ax in enumerate(panels):
        (curve,) = [line for line in ax.lines if line.get_label() == "channel 1"]
        np.testing.assert_allclose(curve.get_ydata(), kernel[:, 0, f])
    two = np.random.default_rng(0).normal(size=(5, 2, 3))  # [k, C, F]: a curve per channel
    assert [len(ax.lines) for ax in _panels(series.filters_figure(two))] == [3, 3, 3]  # + zero


def test_the_series_feature_maps_are_strips_on_the_input_s_time_axis(trained):
    maps, series_0 = trained.pics.maps, trained.data.test.images[0]
    assert [(m.name, m.values.shape) for m in maps] == [
        ("conv1", (150, 16)), ("conv2", (150, 32)), ("conv3", (150, 16))
    ]  # fmt: skip
    assert all(m.extent == (-0.5, 149.5) for m in maps)  # same padding, stride 1: step for step
    fig = series.feature_maps_figure(series_0, maps)
    panels = _panels(fig)
    assert len(panels) == 1 + len(maps)
    np.testing.assert_allclose(panels[0].lines[0].get_ydata(), series_0[:, 0])
    strip = np.asarray(panels[2].images[0].get_array())  # conv2's first 16 channels
    values = maps[1].values[:, :16].T
    lo, hi = values.min(1, keepdims=True), values.max(1, keepdims=True)
    live = (hi > lo)[:, 0]  # a dead channel is all 0
    np.testing.assert_allclose(strip[live], ((values - lo)[live] / (hi - lo)[live]), rtol=1e-5)
    assert not strip[~live].any()
    # a strided, valid net: its strips are shorter and centred on their receptive fields
    layers = [{"conv": 4, "kernel": 5, "padding": "valid"}, "relu",
              {"pool": "max", "window": 3, "stride": 2}, "global_pool"]  # fmt: skip
    cfg = ModelConfig(name="strided", layers=layers)
    model, model_vars = _untrained(cfg, (150, 1))
    maps = pictures.feature_maps(TrainedModel(cfg, model, model_vars), series_0, 0.0, 1.0)
    # conv1 valid 5: 146 steps centred on 2..147; pool 3/2: 72 of 2 steps, centred on 3, 5, ...
    assert [m.extent for m in maps] == [(1.5, 147.5), (2.0, 146.0)]


def test_the_confusion_matrix_curves_and_wrong_series_of_a_series_run(trained):
    labels, probs, names = trained.data.test.labels, trained.probs, trained.pics.class_names
    np.testing.assert_array_equal(trained.pics.counts.sum(1), np.bincount(labels))
    ax = pictures.confusion_figure(trained.pics.counts, names, "series").axes[0]
    assert "of 150 series correct" in ax.get_title()
    loss_ax, _ = pictures.curves_figure(trained.pics.records).axes
    (train,) = [line for line in loss_ax.lines if line.get_label().startswith("train")]
    assert len(train.get_xdata()) == 60  # 60 epochs of 5 steps, a record every 5 steps
    fig = series.wrong_figure(trained.data.test.images, labels, probs, names, 16)
    chosen = pictures.most_confidently_wrong(labels, probs, 16)
    panels = _panels(fig)
    assert len(panels) == len(chosen) == min(16, int((np.argmax(probs, -1) != labels).sum()))
    for ax, i in zip(panels, chosen, strict=True):
        pred = int(np.argmax(probs[i]))
        assert ax.get_title() == f"{names[labels[i]]} -> {names[pred]} ({probs[i, pred]:.4f})"
        np.testing.assert_allclose(ax.lines[0].get_ydata(), trained.data.test.images[i, :, 0])


def test_the_series_cam_is_its_definition_and_spreads_the_logit_over_time(trained):
    acts, data, model = trained.pics.cam, trained.data, trained.model
    labels = data.test.labels
    # the first 3 test series of each class, the CAM of the predicted class
    expected = np.concatenate([np.flatnonzero(labels == k)[:3] for k in (0, 1)])
    np.testing.assert_array_equal(acts.indices, expected)
    np.testing.assert_array_equal(acts.classes, np.argmax(trained.probs[expected], -1))
    x = (data.test.images[expected] - data.mean) / data.std  # [6, 150, 1]
    a = _maps_before_pool(model, x, pool_index=6)  # act3's output [6, 150, 16]
    w = np.asarray(model.variables["params"]["logits"]["kernel"])  # [16, 2]
    by_hand = np.stack([a[n] @ w[:, acts.classes[n]] for n in range(len(expected))])  # [6, 150]
    np.testing.assert_allclose(acts.maps, by_hand, rtol=1e-5, atol=1e-5)
    assert acts.layer == "act3"
    np.testing.assert_allclose(acts.upsampled, acts.maps, rtol=1e-6, atol=1e-6)  # one to one
    # mean over time of CAM_c = logit_c - bias_c (average pooling, then the linear logits)
    logits = np.asarray(model.module.apply(model.variables, jnp.asarray(x)))  # [6, 2]
    bias = np.asarray(model.variables["params"]["logits"]["bias"])
    picked = logits[np.arange(len(expected)), acts.classes] - bias[acts.classes]
    np.testing.assert_allclose(acts.upsampled.mean(1), picked, rtol=1e-4, atol=1e-4)
    fig = cam.cam_figure(trained.pics)
    panels = _panels(fig)
    assert len(panels) == 6
    for ax, cam_n in zip(panels, by_hand, strict=True):
        (lines,) = ax.collections  # one channel: one line collection coloured by the CAM
        segments = (cam_n[:-1] + cam_n[1:]) / 2 / np.abs(cam_n).max()  # on the panel's scale
        np.testing.assert_allclose(lines.get_array(), segments, rtol=1e-4, atol=1e-4)
        assert ax.get_title().endswith(f"|CAM| up to {np.abs(cam_n).max():.3g}")


def _untrained(cfg: ModelConfig, shape: tuple[int, ...], classes: int = 2):
    """The model of `cfg` with random variables drawn by numpy (nothing to compile)."""
    model = build_model(resolve(cfg), classes)
    rng = np.random.default_rng(0)
    like = variables_like(model, shape)
    draw = lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32)
    return model, jax.tree.map(draw, like)


def test_a_pooled_map_s_cam_is_interpolated_between_its_receptive_field_centres():
    cfg = ModelConfig(name="pooled", layers=[{"conv": 6, "kernel": 5}, "relu",
                      {"pool": "max", "window": 2}, {"conv": 8, "kernel": 3, "padding": "valid"},
                      "relu", "global_pool"])  # fmt: skip
    model, model_vars = _untrained(cfg, (40, 1))
    trained = TrainedModel(cfg, model, model_vars, resolve(cfg))
    x = np.random.default_rng(1).normal(size=(2, 40, 1)).astype(np.float32)
    acts = cam.class_activations(trained, jnp.asarray(x), np.array([0, 1]), np.array([1, 0]))
    a = _maps_before_pool(trained, x, pool_index=5)  # [2, 18, 8]: 40 -> pool 20 -> valid 18
    w = model_vars["params"]["logits"]["kernel"]
    by_hand = np.stack([a[0] @ w[:, 1], a[1] @ w[:, 0]])  # [2, 18]
    np.testing.assert_allclose(acts.maps, by_hand, rtol=1e-5, atol=1e-5)
    # pool 2/2: steps of 2 centred on 0.5, 2.5, ...; the valid conv of 3 then starts one on
    (centres,) = acts.centres
    np.testing.assert_allclose(centres, 2.5 + 2 * np.arange(18))
    for t in range(40):  # linear between neighbouring centres, the end values beyond
        j = min(max((t - 2.5) / 2, 0), 17)
        lo = min(int(j), 16)
        np.testing.assert_allclose(
            acts.upsampled[:, t], (1 - (j - lo)) * by_hand[:, lo] + (j - lo) * by_hand[:, lo + 1],
            rtol=1e-5, atol=1e-6,
        )  # fmt: skip
    logits = np.asarray(model.apply(model_vars, jnp.asarray(x)))
    bias = model_vars["params"]["logits"]["bias"]
    np.testing.assert_allclose(acts.maps.mean(1), logits[[0, 1], [1, 0]] - bias[[1, 0]],
                               rtol=1e-4, atol=1e-5)  # fmt: skip


def test_only_nets_that_end_in_global_average_pooling_have_a_cam():
    for name, index in (("all_cnn_c", 19), ("resnet20", 21)):
        assert cam.pooled_layer(resolve(preset(name)).layers) == (index, "")
    for name, why in (("lenet5", "flattens its last map"), ("alexnet_lite", "flattens")):
        index, reason = cam.pooled_layer(resolve(preset(name)).layers)
        assert index is None and why in reason
    max_pool = ModelConfig(name="m", layers=[{"conv": 4}, {"global_pool": "max"}])
    assert "global max pooling" in cam.pooled_layer(resolve(max_pool).layers)[1]
    dense = ModelConfig(name="d", layers=[{"conv": 4}, "global_pool", {"dense": 8}])
    assert "not linear" in cam.pooled_layer(resolve(dense).layers)[1]


def test_a_picture_left_out_is_noted_and_the_others_drawn(tmp_path, capsys):
    rng = np.random.default_rng(0)
    labels, probs = np.array([0, 1, 1, 0]), rng.dirichlet(np.ones(2), 4)
    why = cam.pooled_layer(resolve(preset("lenet5")).layers)[1]
    pics = pictures.RunPictures(
        kernel=rng.normal(size=(5, 1, 3)), maps=[], image_index=1,
        images=rng.normal(size=(4, 30, 1)).astype(np.float32), labels=labels, probs=probs,
        counts=np.array([[1, 1], [1, 1]]), class_names=["a", "b"], records=[], model="flat",
        skipped={pictures.CAM: why},
    )  # fmt: skip
    paths = pictures.draw_run(pics, tmp_path, n_wrong=2)
    assert list(paths) == list(pictures.PICTURES)
    assert capsys.readouterr().err == f"cnnlab: note: class_activation.png not drawn: {why}\n"


@needs_fashion_mnist
def test_an_image_net_with_global_pooling_draws_its_cam(tmp_path, capsys):
    layers = [{"conv": 8, "kernel": 3}, "relu", {"pool": "max", "window": 2},
              {"conv": 16, "kernel": 3}, "relu", "global_pool"]  # fmt: skip
    cfg = small_config(model=ModelConfig(name="gap", layers=layers))
    cfg = dataclasses.replace(cfg, logger=dataclasses.replace(cfg.logger, pictures=True))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_limit=640,
                                                             test_limit=200))  # fmt: skip
    summary = run(cfg, tmp_path, Trackers(LocalTracker(tmp_path)))
    assert summary["status"] == "ok" and summary["pictures_seconds"] > 0
    drawn = {p.stem for p in (tmp_path / "pictures").glob("*.png")}
    assert drawn == ALL_PICTURES and "not drawn" not in capsys.readouterr().err
    model, data = RunDir(tmp_path).load_model(), load_dataset(cfg.data)
    probs = predict_probs(model.module, model.variables, data.test.images, data.mean, data.std)
    pics = pictures.run_pictures(model, data, probs, [])
    acts = pics.cam
    assert len(acts.indices) == 20 and acts.maps.shape == (20, 14, 14)
    x = (data.test.images[acts.indices] - data.mean) / data.std  # [20, 28, 28, 1]
    a = _maps_before_pool(model, x.astype(np.float32), pool_index=5)  # [20, 14, 14, 16]
    w = np.asarray(model.variables["params"]["logits"]["kernel"])
    by_hand = np.einsum("nhwf,fn->nhw", a, w[:, acts.classes])
    np.testing.assert_allclose(acts.maps, by_hand, rtol=1e-4, atol=1e-5)
    # 2x2 pool: map pixel (i, j) centred on input pixel (2i + 0.5, 2j + 0.5); pixel (3, 6)
    # is a quarter of the way from map row 1 to row 2 and three quarters from column 2 to 3
    rows = 0.75 * by_hand[:, 1] + 0.25 * by_hand[:, 2]  # [20, 14]
    np.testing.assert_allclose(
        acts.upsampled[:, 3, 6], 0.25 * rows[:, 2] + 0.75 * rows[:, 3], rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(acts.upsampled[:, 0, 0], by_hand[:, 0, 0], rtol=1e-6)
    fig = cam.cam_figure(pics)
    panels = _panels(fig)
    assert len(panels) == 20
    overlay = acts.upsampled[4] / np.abs(acts.upsampled[4]).max()  # over image 4, to scale
    np.testing.assert_allclose(panels[4].images[1].get_array(), overlay, rtol=1e-6)


def test_padded_series_are_pictured_masked_and_without_their_padding(tmp_path):
    """JapaneseVowels (7 to 29 steps, padded to 29): `cnnlab-pictures` predicts with the mask, as
    the run's test did, and every picture stops at a series' own last step."""
    small = dataclasses.replace(FCN, layers=[{"conv": 8, "kernel": 3}, "relu", "global_pool"])
    cfg = dataclasses.replace(
        series_config(small),
        data=DataConfig(name="JapaneseVowels", source="ucr", val_fraction=0.0, normalize="dataset"),
        train=TrainConfig(epochs=3, batch_size=32, eval_batch_size=400, log_every_steps=5),
        logger=LoggerConfig(mode="disabled", pictures=False),
    )
    summary = run(cfg, tmp_path, LocalTracker(tmp_path))
    assert summary["status"] == "ok", summary.get("error")
    pics = pictures.read_pictures(tmp_path)  # the run read back, as cnnlab-pictures does
    counts = np.loadtxt(tmp_path / "confusion_matrix.csv", delimiter=",", skiprows=1,
                        usecols=range(1, 10))  # fmt: skip
    np.testing.assert_array_equal(pics.counts, counts)  # the test's predictions, masked
    model, data = RunDir(tmp_path).load_model(), load_dataset(cfg.data)
    unmasked = predict_probs(model.module, model.variables, data.test.images, data.mean, data.std)
    assert (np.argmax(unmasked, -1) != np.argmax(pics.probs, -1)).any()  # the mask matters here
    length = int(data.test.lengths[0])
    assert length < data.test.images.shape[1]
    assert [m.values.shape[0] for m in pics.maps] == [length]
    assert pics.maps[0].extent == (-0.5, length - 0.5)
    fig = cam.cam_figure(pics)
    for ax, i in zip(_panels(fig), pics.cam.indices, strict=False):
        (segments,) = {len(c.get_segments()) for c in ax.collections}
        assert segments == data.test.lengths[i] - 1, i
    wrong = series.wrong_figure([pics.example(k) for k in range(len(pics.probs))], pics.labels,
                                pics.probs, pics.class_names, 4)  # fmt: skip
    assert all(len(ax.lines[0].get_xdata()) < 29 for ax in _panels(wrong))


def test_a_net_that_opens_with_a_residual_block_draws_its_first_kernel(tmp_path):
    """ResNet-1D's first conv lives in its first block: the filters are res1/conv1's."""
    cfg = ModelConfig(
        name="res_small",
        layers=[{"residual": [{"conv": 4, "kernel": 5}, {"norm": "batch"}, "relu",
                              {"conv": 4, "kernel": 3}, {"norm": "batch"}]},
                "relu", "global_pool"],
    )  # fmt: skip
    data = gunpoint()
    model, model_vars = _untrained(cfg, data.image_shape)
    trained = TrainedModel(cfg, model, model_vars)
    probs = predict_probs(model, model_vars, data.test.images, data.mean, data.std)
    pics = pictures.run_pictures(trained, data, probs, records=[])
    assert pics.kernel_layer == "res1/conv1"
    np.testing.assert_array_equal(pics.kernel, model_vars["params"]["res1"]["conv1"]["kernel"])
    assert set(pictures.draw_run(pics, tmp_path)) == ALL_PICTURES


def test_a_wide_first_layer_shows_its_first_filters_only():
    wide = np.random.default_rng(1).normal(size=(8, 12, 128))  # FCN on JapaneseVowels: [k, C, F]
    fig = series.filters_figure(wide)
    assert len(_panels(fig)) == series.SHOWN_FILTERS
    assert f"the first {series.SHOWN_FILTERS} of 128 learned filters" in fig.texts[0].get_text()
