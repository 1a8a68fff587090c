"""Pictures of a trained run: a real two-epoch LeNet-5 run, drawn and checked picture by picture."""

import csv
import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from cnnlab import geometry
from cnnlab.config import ModelConfig, TrainConfig
from cnnlab.data import load_dataset
from cnnlab.errors import CnnlabError
from cnnlab.inference import predict_probs
from cnnlab.models import build_model, variables_like
from cnnlab.models.layers import ACTIVATIONS
from cnnlab.report import pictures
from cnnlab.report.pictures import PANEL
from cnnlab.rundir import RunDir, TrainedModel
from cnnlab.tracking import Trackers
from cnnlab.tracking.local import LocalTracker
from cnnlab.train.run import run
from experiments import pictures as cli_module
from tests.conftest import cli, needs_fashion_mnist, preset, small_config

pytestmark = needs_fashion_mnist
CFG = small_config(
    train=TrainConfig(epochs=2, batch_size=64, log_every_steps=10),
    data=dataclasses.replace(small_config().data, val_fraction=0.02),  # 1,200 val images: fast
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished run, its parameters, test split and test probabilities."""
    run_dir = tmp_path_factory.mktemp("pictures") / "run"
    run_dir.mkdir()
    summary = run(CFG, run_dir, Trackers(LocalTracker(run_dir)))
    assert summary["status"] == "ok"
    trained = RunDir(run_dir).load_model()
    data = load_dataset(CFG.data)
    model, model_vars = trained.module, trained.variables
    probs = predict_probs(model, model_vars, data.test.images, data.mean, data.std)
    fields = ["run_dir", "trained", "model", "variables", "params", "data", "probs"]
    return dataclasses.make_dataclass("Trained", fields)(
        run_dir, trained, model, model_vars, model_vars["params"], data, probs
    )


def _panels(fig) -> list:
    return [ax for ax in fig.axes if ax.get_label() == PANEL]


def test_the_cli_draws_five_valid_pngs_into_the_run_directory(trained, capsys):
    cli_module.main([str(trained.run_dir)])
    out = trained.run_dir / "pictures"
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(pictures.PICTURES)
    for name in pictures.PICTURES:
        path = out / f"{name}.png"
        assert f"cnnlab: wrote {path}" in printed
        with Image.open(path) as img:
            img.verify()  # a whole, valid PNG
        with Image.open(path) as img:
            assert img.format == "PNG"
            width, height = img.size
            assert 400 <= width <= 4000 and 250 <= height <= 4000, (name, img.size)
            pixels = np.asarray(img.convert("L"))
            assert pixels.std() > 10, f"{name} is nearly blank"


def test_the_filter_grid_has_one_panel_per_filter(trained):
    kernel = np.asarray(trained.params["conv1"]["kernel"])  # [5, 5, 1, 6]
    fig = pictures.filters_figure(kernel, "conv1")
    panels = _panels(fig)
    assert len(panels) == 6
    for k, ax in enumerate(panels):
        np.testing.assert_allclose(ax.images[0].get_array(), kernel[..., 0, k])
    assert "5x5x1x6" in fig._suptitle.get_text()
    rgb = np.random.default_rng(0).normal(size=(3, 3, 3, 10))
    panels = _panels(pictures.filters_figure(rgb, "conv1"))
    assert len(panels) == 10
    first = panels[0].images[0].get_array()  # [3, 3, 3], stretched to 0..1 per filter
    assert first.shape == (3, 3, 3) and first.min() == 0 and first.max() == pytest.approx(1)


def test_feature_maps_are_the_network_s_own_one_row_per_conv_and_pool(trained):
    image = trained.data.test.images[0]
    maps = pictures.feature_maps(trained.trained, image, trained.data.mean, trained.data.std)
    rows = [r for r in geometry.layers(CFG.model, (28, 28, 1), 10) if r.kind in ("conv", "pool")]
    assert [m.name for m in maps] == [r.name for r in rows] == ["conv1", "pool1", "conv2", "pool2"]
    assert [m.values.shape for m in maps] == [r.out_shape for r in rows]
    assert all(m.values.min() >= 0 for m in maps)  # after the ReLU
    # the last map, flattened, is what the network's first dense layer really receives
    x = (image[None].astype(np.float32) - trained.data.mean) / trained.data.std
    _, state = trained.model.apply(
        trained.variables, x, capture_intermediates=True, mutable=["intermediates"]
    )
    dense1 = trained.params["dense1"]
    np.testing.assert_allclose(
        maps[-1].values.reshape(-1) @ dense1["kernel"] + dense1["bias"],
        state["intermediates"]["dense1"]["__call__"][0][0],
        rtol=1e-4,
        atol=1e-4,
    )
    # conv2 is valid (pad 0) after a stride-2 pool: 10 pixels of 2 input pixels each, centred,
    # so it covers input pixels 4..23 (edges 3.5..23.5); pool1 covers the whole 28x28 input
    assert maps[2].extent == (3.5, 23.5, 23.5, 3.5)
    assert maps[1].extent == (-0.5, 27.5, 27.5, -0.5)
    fig = pictures.feature_maps_figure(image, maps)
    assert len(_panels(fig)) == 1 + 6 + 6 + 16 + 16  # the input and each map's channels
    assert len(fig.axes) == (1 + len(maps)) * (1 + 16)  # one row per layer, a label column


def _untrained(cfg: ModelConfig, shape: tuple[int, int, int]):
    """The model of `cfg`, random variables (from numpy: no init to compile; running variances
    positive) and a random image."""
    model = build_model(cfg, 10)
    rng = np.random.default_rng(0)
    like = variables_like(model, shape)

    def draw(path, s):
        if path[-1].key == "var":
            return rng.uniform(0.5, 2.0, s.shape).astype(np.float32)
        return rng.normal(0, 0.2, s.shape).astype(np.float32)

    model_vars = jax.tree_util.tree_map_with_path(draw, like)
    return model, model_vars, rng.integers(0, 256, shape, dtype=np.uint8)


def test_feature_maps_of_alexnet_lite_show_every_conv_and_its_three_pools(tmp_path):
    cfg = preset("alexnet_lite", depth=8, stride=[1, 2, 1, 1, 1], dense=[16])
    model, model_vars, image = _untrained(cfg, (32, 32, 3))
    maps = pictures.feature_maps(
        TrainedModel(cfg, model, model_vars), image, np.full(3, 120.0), np.full(3, 60.0)
    )
    rows = [r for r in geometry.layers(cfg, (32, 32, 3), 10) if r.kind in ("conv", "pool")]
    assert [m.name for m in maps] == [r.name for r in rows]
    assert len(maps) == 5 + 3 and [m.values.shape for m in maps] == [r.out_shape for r in rows]
    # conv1 (same) spans the input; pool1 3x3/2: 15 pixels of 2 from input pixel 0 on; conv2 5x5/2
    # (same, 2 pixels of pad before): 8 of 4; pool2 3x3/2 on 8: 3 pixels of 8, centred on 5, 13, 21
    extents = {m.name: m.extent[:2] for m in maps}
    assert extents["conv1"] == (-0.5, 31.5) and extents["pool1"] == (0.0, 30.0)
    assert extents["conv2"] == (-1.0, 31.0) and extents["pool2"] == (1.0, 25.0)
    x = (image[None] - np.float32(120)) / np.float32(60)
    _, state = model.apply(model_vars, x, capture_intermediates=True, mutable=True)
    conv1 = ACTIVATIONS["relu"](state["intermediates"]["conv1"]["__call__"][0][0])
    np.testing.assert_allclose(maps[0].values, conv1, rtol=1e-5, atol=1e-5)
    fig = pictures.feature_maps_figure(image, maps, channels=4)
    assert len(_panels(fig)) == 1 + 4 * len(maps)
    path = pictures.draw_feature_maps(image, maps, tmp_path / "alexnet.png", "alexnet_lite")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[1] > img.size[0] / 2  # 9 rows of 4 maps


def test_the_confusion_matrix_shows_the_run_s_counts(trained):
    with open(trained.run_dir / "confusion_matrix.csv", newline="") as f:
        header, *rows = list(csv.reader(f))
    counts, names = np.array([[int(v) for v in row[1:]] for row in rows]), header[1:]
    assert names == list(trained.data.class_names) and counts.sum() == len(trained.data.test)
    # the parameters read back give the run's own counts, tallied here one image at a time
    expected = np.zeros((10, 10), int)
    for label, pred in zip(trained.data.test.labels, np.argmax(trained.probs, -1), strict=True):
        expected[label, pred] += 1
    np.testing.assert_array_equal(counts, expected)
    fig = pictures.confusion_figure(counts, names)
    ax = fig.axes[0]
    assert len(ax.texts) == 100 and ax.texts[0].get_text() == str(counts[0, 0])
    np.testing.assert_array_equal(ax.images[0].get_array(), counts)
    assert [t.get_text().split(" (")[0] for t in ax.get_yticklabels()] == names
    assert f"{100 * np.trace(counts) / counts.sum():.1f}%" in ax.get_title()


def test_the_curves_hold_every_train_and_val_point(trained):
    records = RunDir(trained.run_dir).metrics()
    val = [r for r in records if "val/accuracy" in r]
    assert len(val) == 2  # one per epoch
    fig = pictures.curves_figure(records)
    loss_ax, acc_ax = fig.axes
    lines = {line.get_label(): line for line in acc_ax.lines}
    np.testing.assert_array_equal(
        lines["validation (each epoch)"].get_xdata(), [r["step"] for r in val]
    )
    np.testing.assert_allclose(
        lines["validation (each epoch)"].get_ydata(), [r["val/accuracy"] for r in val]
    )
    train = [r for r in records if "train/loss" in r]
    loss_lines = {line.get_label(): line for line in loss_ax.lines}
    assert len(loss_lines["train (running, per log step)"].get_xdata()) == len(train)
    test_acc = json.loads((trained.run_dir / "summary.json").read_text())["test/accuracy"]
    assert f"test at the end ({test_acc:.3f})" in lines


def test_most_confidently_wrong_are_wrong_and_sorted(trained):
    labels, probs = trained.data.test.labels, trained.probs
    chosen = pictures.most_confidently_wrong(labels, probs, 16)
    assert len(chosen) == 16
    preds = np.argmax(probs, -1)
    assert (preds[chosen] != labels[chosen]).all()
    confidence = probs[chosen, preds[chosen]]
    assert (np.diff(confidence) <= 0).all()
    wrong = preds != labels
    assert confidence[-1] >= np.sort(probs.max(-1)[wrong])[-16]  # no wrong one above is left out
    names = trained.data.class_names
    fig = pictures.wrong_figure(trained.data.test.images, labels, probs, names, 16)
    titles = [ax.get_title() for ax in _panels(fig)]
    i = chosen[0]
    assert titles[0] == f"{names[labels[i]]} ->\n{names[preds[i]]} ({confidence[0]:.4f})"
    np.testing.assert_array_equal(
        _panels(fig)[3].images[0].get_array(), trained.data.test.images[chosen[3], ..., 0]
    )


def test_most_confidently_wrong_of_a_small_case():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4], [0.05, 0.95]])
    labels = np.array([1, 1, 0, 1, 0])  # wrong: 0 (0.9), 2 (0.7), 3 (0.6), 4 (0.95)
    assert pictures.most_confidently_wrong(labels, probs, 3).tolist() == [4, 0, 2]
    assert pictures.most_confidently_wrong(np.array([0, 1]), probs[:2], 3).size == 0


def test_the_cli_refuses_a_missing_or_unfinished_run_in_one_line(trained, tmp_path, capsys):
    result = cli("pictures", str(tmp_path / "nowhere"), timeout=120)  # as a user runs it
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"cnnlab: error: no run directory at {tmp_path / 'nowhere'}\n"
    unfinished = tmp_path / "unfinished"
    shutil.copytree(trained.run_dir, unfinished, ignore=shutil.ignore_patterns("checkpoint"))
    with pytest.raises(SystemExit) as exit_info:
        cli_module.main([str(unfinished)])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnlab: error: "), lines
    assert f"{unfinished} holds no finished run (no checkpoint)" in lines[0]


def test_pictures_refuse_a_run_whose_data_reads_back_differently(trained, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(trained.run_dir, moved, ignore=shutil.ignore_patterns("pictures"))
    meta = json.loads((moved / "dataset.json").read_text())
    meta["mean"] = [m + 1 for m in meta["mean"]]
    (moved / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(CnnlabError, match=r"reads back differently now \(mean differ"):
        pictures.draw_all(moved)
    assert not (moved / "pictures").exists()


def test_a_picture_that_fails_to_draw_warns_and_keeps_the_run(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise ValueError("no room on the canvas")

    monkeypatch.setattr(pictures, "draw_run", broken)  # the end of run's only drawing call
    cfg = small_config(logger=dataclasses.replace(small_config().logger, pictures=True))
    summary = run(cfg, tmp_path, Trackers(LocalTracker(tmp_path)))
    assert summary["status"] == "ok" and "pictures_seconds" not in summary
    assert (tmp_path / "checkpoint").is_dir() and (tmp_path / "summary.json").is_file()
    warning = capsys.readouterr().err
    assert "cnnlab: warning: pictures not drawn (ValueError: no room on the canvas)" in warning


@pytest.mark.parametrize("kind", ["group", "batch"])
def test_feature_maps_with_a_norm_show_the_normalized_conv(kind):
    cfg = ModelConfig(padding=[2, 0], norm=kind, norm_groups=2)  # LeNet-5
    model, model_vars, image = _untrained(cfg, (28, 28, 1))
    maps = pictures.feature_maps(
        TrainedModel(cfg, model, model_vars), image, np.full(1, 70.0), np.full(1, 90.0)
    )
    x = (image[None] - np.float32(70)) / np.float32(90)
    _, state = model.apply(model_vars, x, capture_intermediates=True, mutable=True)
    norm1 = ACTIVATIONS["relu"](state["intermediates"]["norm1"]["__call__"][0][0])
    np.testing.assert_allclose(maps[0].values, norm1, rtol=1e-5, atol=1e-5)
    assert f"{kind} norm, relu" in maps[0].detail


def test_the_cli_draws_the_feature_maps_of_the_test_image_it_is_given(trained, monkeypatch):
    """`cnnlab-pictures --image 7`: the feature maps and their title are of test image 7."""
    drawn = []
    real = pictures.draw_feature_maps

    def recording(image, maps, path, title="", channels=16):  # the real drawing, its input kept
        drawn.append((image, maps, title))
        return real(image, maps, path, title, channels)

    monkeypatch.setattr(pictures, "draw_feature_maps", recording)
    cli_module.main([str(trained.run_dir), "--image", "7"])
    ((image, maps, title),) = drawn
    test = trained.data.test
    np.testing.assert_array_equal(image, test.images[7])
    assert "test image 7, true class " + trained.data.class_names[test.labels[7]] in title
    own = pictures.feature_maps(
        trained.trained, test.images[7], trained.data.mean, trained.data.std
    )
    for got, want in zip(maps, own, strict=True):
        np.testing.assert_allclose(got.values, want.values, rtol=1e-5, atol=1e-5)
    assert not np.allclose(
        maps[0].values,
        pictures.feature_maps(trained.trained, test.images[0], trained.data.mean, trained.data.std)[
            0
        ].values,
    )


def test_the_pictures_are_drawn_from_arrays_alone(tmp_path):
    """`draw_run` needs no model, config or data set: a `RunPictures` of small arrays will do."""
    rng = np.random.default_rng(0)
    labels, probs = np.array([0, 1, 2, 2]), rng.dirichlet(np.ones(3), 4)
    image = rng.integers(0, 256, (8, 8, 1), dtype=np.uint8)
    conv = pictures.FeatureMap(
        "conv1", "3x3/1 pad 1, relu", rng.random((8, 8, 2)), (-0.5, 7.5, 7.5, -0.5)
    )
    counts = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 1]])
    records = [{"step": 1, "train/loss": 2.0}, {"step": 2, "val/accuracy": 0.5, "epoch": 1}]
    pics = pictures.RunPictures(
        kernel=rng.normal(size=(3, 3, 1, 2)), maps=[conv], image_index=0,
        images=np.stack([image] * 4), labels=labels, probs=probs, counts=counts,
        class_names=["a", "b", "c"], records=records, model="tiny (relu, max pooling)",
    )  # fmt: skip
    paths = pictures.draw_run(pics, tmp_path, n_wrong=2)
    assert list(paths) == list(pictures.PICTURES)
    for name, path in paths.items():
        assert path == tmp_path / f"{name}.png"
        with Image.open(path) as img:
            assert img.format == "PNG" and min(img.size) > 100


def test_a_run_with_one_train_record_shows_it_as_a_point():
    records = [{"step": 15, "train/loss": 1.9, "train/accuracy": 0.4},
               {"step": 15, "epoch": 1, "val/loss": 1.2, "val/accuracy": 0.6}]  # fmt: skip
    loss_ax, _ = pictures.curves_figure(records).axes
    (train,) = [line for line in loss_ax.lines if line.get_label().startswith("train")]
    assert train.get_marker() == "o" and list(train.get_xdata()) == [15]
