"""The command-line tools as a user runs them: a real end-to-end run on Fashion-MNIST with its
run directory and W&B offline files, prediction from the checkpoint, and the inspect table
(bad input: tests/test_bad_input.py)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnlab.data import load_dataset
from cnnlab.rundir import RunDir
from tests.conftest import cli, needs_fashion_mnist
from tests.wandb_records import summary_and_history

SMALL = [
    "data.train_limit=3000", "data.test_limit=1000", "train.epochs=1", "train.batch_size=64",
    "train.log_every_steps=10",
]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One real run through cnnlab-train, W&B online without an API key (-> offline)."""
    run_dir = tmp_path_factory.mktemp("run") / "fmnist"
    done = cli("train", *SMALL, "logger.mode=online", f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, done


@needs_fashion_mnist
def test_run_directory_holds_config_metrics_summary_and_checkpoint(trained):
    run_dir, done = trained
    for name in ("config.yaml", "dataset.json", "layers.txt", "confusion_matrix.csv"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / ".hydra" / "overrides.yaml").is_file()
    assert (run_dir / "checkpoint").is_dir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok"
    assert summary["params"] == 61_706 and summary["flops"] == 833_040
    assert 0.6 < summary["test/accuracy"] <= 1 and np.isfinite(summary["test/loss"])
    assert summary["wall_seconds"] > 0 and summary["steps"] == 3000 // 64
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [10, 20, 30, 40, 46]
    assert train[-1]["train/loss"] < train[0]["train/loss"]
    assert any("val/accuracy" in r for r in records) and any("test/accuracy" in r for r in records)
    matrix = (run_dir / "confusion_matrix.csv").read_text().splitlines()
    assert len(matrix) == 11 and matrix[0].split(",")[1] == "T-shirt/top"
    assert sum(int(v) for row in matrix[1:] for v in row.split(",")[1:]) == 1000
    assert "test accuracy" in done.stdout


@needs_fashion_mnist
def test_wandb_without_api_key_falls_back_to_an_offline_run(trained):
    run_dir, done = trained
    assert "no W&B API key" in done.stderr
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    (run_file,) = offline.glob("run-*.wandb")
    config, history, summary = summary_and_history(run_file)
    flat = json.dumps(config)
    assert '"train_limit": 3000' in flat and '"name": "lenet5"' in flat
    losses = [row["train/loss"] for row in history if "train/loss" in row]
    assert len(losses) == 5 and losses[-1] < losses[0]
    assert summary["status"] == "ok" and 0.6 < summary["test/accuracy"] <= 1
    assert summary["params"] == 61_706
    # LeNet-5's 13 rows: the input, 11 layers and the logits
    for table, rows in [("model/layers", 13), ("test/predictions", 32)]:
        assert summary[f"{table}/_type"] == "table-file" and summary[f"{table}/nrows"] == rows
        assert (offline / "files" / summary[f"{table}/path"]).is_file()
    assert summary["test/confusion_matrix_table/nrows"] == 100  # 10 x 10 (true, predicted) pairs


@needs_fashion_mnist
def test_pictures_are_drawn_into_the_run_directory_and_logged_to_wandb(trained):
    run_dir, _ = trained
    names = {"filters", "feature_maps", "confusion_matrix", "curves", "confidently_wrong"}
    drawn = {path.stem: path for path in (run_dir / "pictures").glob("*.png")}
    assert set(drawn) == names
    for path in drawn.values():
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 200
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["pictures_seconds"] > 0
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    (run_file,) = offline.glob("run-*.wandb")
    wandb_summary = summary_and_history(run_file)[2]
    for name in names:  # one W&B image per picture, its file in the run's media
        assert wandb_summary[f"pictures/{name}/_type"] == "image-file"
        assert (offline / "files" / wandb_summary[f"pictures/{name}/path"]).is_file()


def predicted(stdout: str) -> dict[str, list[tuple[str, float]]]:
    """cnnlab-predict's output: image path -> the (class, probability) lines printed under it."""
    ranked: dict[str, list[tuple[str, float]]] = {}
    for line in stdout.splitlines():
        if line.startswith(" "):
            probability, name = line.split(maxsplit=1)
            ranked[next(reversed(ranked))].append((name, float(probability)))
        else:
            ranked[line] = []
    return ranked


@pytest.fixture(scope="module")
def test_pngs(trained, tmp_path_factory):
    """The run's own test split (read as its config says), each image a grey PNG file."""
    run_dir, _ = trained
    test = load_dataset(RunDir(run_dir).config().data).test
    folder = tmp_path_factory.mktemp("test_pngs")
    paths = [folder / f"{i}.png" for i in range(len(test))]
    for path, image in zip(paths, test.images, strict=True):
        Image.fromarray(image[..., 0]).save(path)
    return test, paths


@needs_fashion_mnist
def test_predict_gives_the_run_s_test_results_from_the_checkpoint(trained, test_pngs, tmp_path):
    """On the run's 1,000 test images, saved as PNG files, cnnlab-predict's most likely classes
    give the run's confusion_matrix.csv count for count (random weights would not)."""
    run_dir, _ = trained
    test, paths = test_pngs
    done = cli("predict", str(run_dir), *map(str, paths))
    assert done.returncode == 0, done.stderr
    ranked = predicted(done.stdout)
    assert list(ranked) == list(map(str, paths))
    names = list(load_dataset(RunDir(run_dir).config().data).class_names)
    counts = np.zeros((10, 10), int)  # rows true class, columns the most likely class
    for label, lines in zip(test.labels, ranked.values(), strict=True):
        probs = [p for _, p in lines]
        assert len(lines) == 10 and sum(probs) == pytest.approx(1, abs=1e-3)
        assert probs == sorted(probs, reverse=True)
        counts[label, names.index(lines[0][0])] += 1
    with open(run_dir / "confusion_matrix.csv", newline="") as f:
        header, *rows = list(csv.reader(f))
    assert header[1:] == names
    np.testing.assert_array_equal(counts, [[int(v) for v in row[1:]] for row in rows])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert np.trace(counts) / len(test) == pytest.approx(summary["test/accuracy"], abs=1e-9)
    bad = cli("predict", str(run_dir), str(tmp_path / "missing.png"))
    assert bad.returncode != 0 and "cannot read image" in bad.stderr
    assert "Traceback" not in bad.stderr


@needs_fashion_mnist
def test_predict_top_and_its_conversion_of_colour_and_size(trained, test_pngs, tmp_path):
    """--top N prints the N most likely classes; an RGB image becomes the grey one (L), and a
    larger one is resized to 28x28 and still gets its class."""
    run_dir, _ = trained
    test, paths = test_pngs
    grey = predicted(cli("predict", str(run_dir), *map(str, paths[:50])).stdout)
    sure = [i for i, lines in enumerate(grey.values()) if lines[0][1] > 0.95][:6]
    assert len(sure) == 6
    converted = []
    for i in sure:
        rgb = np.repeat(test.images[i], 3, axis=-1)  # [28, 28, 3], the grey value thrice
        converted.append(tmp_path / f"rgb{i}.png")
        Image.fromarray(rgb).save(converted[-1])
        converted.append(tmp_path / f"large{i}.jpg")
        Image.fromarray(rgb).resize((70, 70), Image.Resampling.NEAREST).save(converted[-1])
    done = cli("predict", "--top", "2", str(run_dir), *map(str, converted))
    assert done.returncode == 0, done.stderr
    ranked = list(predicted(done.stdout).values())
    assert [len(lines) for lines in ranked] == [2] * len(converted)
    for k, i in enumerate(sure):
        rgb, expected = ranked[2 * k], grey[str(paths[i])][:2]  # RGB -> L: the grey image again
        assert [name for name, _ in rgb] == [name for name, _ in expected]
        assert [p for _, p in rgb] == pytest.approx([p for _, p in expected], abs=2e-4)
        assert ranked[2 * k + 1][0][0] == grey[str(paths[i])][0][0]  # 70x70 -> 28x28


def test_inspect_prints_the_table_without_training():
    done = cli("inspect_model", "model=alexnet_lite", "data=cifar10", "model.stride=[2,1,1,1,1]")
    assert done.returncode == 0, done.stderr
    assert "alexnet_lite on cifar10 (32x32x3 images, 10 classes)" in done.stdout
    assert "16 x 16 x 24" in done.stdout and "receptive field" in done.stdout
    assert "total" in done.stdout and "535,146" in done.stdout
    assert "memory per training step at batch 128: about" in done.stdout  # cnnlab.memory
    assert "optimizer state 4.3 MB (2 slots)" in done.stdout  # AdamW: 535,146 x 4 bytes x 2


def test_inspect_shows_where_an_impossible_network_collapses():
    done = cli("inspect_model", "model=alexnet_lite", "data=cifar10", "model.stride=2")
    assert done.returncode == 2
    table = done.stdout.splitlines()
    assert table[-1].split()[:2] == ["pool3", "pool"] and "1 x 1 x 64" in table[-2]
    assert "0 x 0 x 64" in table[-1]
    assert done.stderr.startswith("cnnlab: error: pool3 (max pool 3x3, stride 2) after conv5")
    assert "fix: model." in done.stderr and len(done.stderr.splitlines()) == 1


def test_the_flags_cnnlab_checks_are_the_flags_hydra_lists():
    """experiments/hydra_conf.py parses Hydra's flags itself, to report a wrong one in one line;
    the day Hydra adds, renames or drops one, this fails."""
    from experiments.hydra_conf import FLAG_NAMES

    done = cli("train", "--hydra-help")
    assert done.returncode == 0, done.stderr
    section = done.stdout.split("== Flags ==")[1].split("== ")[0]
    listed = {
        name.strip()
        for line in section.splitlines()
        if line.startswith("-")
        for name in line.split(" : ")[0].split(",")
    }
    assert listed == FLAG_NAMES


def test_the_entry_points_work_from_a_built_wheel(tmp_path):
    """The wheel, installed without the source tree (its dependencies from this environment),
    run from another folder: cnnlab-train finds the packaged conf/, cnnlab-inspect its table."""
    import subprocess
    import sys
    import sysconfig

    from tests.conftest import REPO

    def run(*args, cwd=tmp_path):
        done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done

    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path / "dist", REPO)
    (wheel,) = (tmp_path / "dist").glob("cnnlab-*.whl")
    run(sys.executable, "-m", "venv", tmp_path / "venv")
    python, bin_dir = tmp_path / "venv" / "bin" / "python", tmp_path / "venv" / "bin"
    run(python, "-m", "pip", "install", "-q", "--no-deps", wheel)
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    # this environment's packages after the wheel's: a plain path, so not its editable cnnlab
    (Path(site.stdout.strip()) / "zz_dependencies.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n"
    )
    where = run(
        python, "-c", "import cnnlab, experiments; print(cnnlab.__file__, experiments.__file__)"
    )
    assert str(REPO) not in where.stdout and where.stdout.count(str(tmp_path / "venv")) == 2
    helped = run(bin_dir / "cnnlab-train", "--help")
    assert "cnnlab-train: train a convolutional network" in helped.stdout
    assert "model: alexnet_lite, all_cnn_c, fcn, lenet5" in helped.stdout  # conf/'s groups
    table = run(bin_dir / "cnnlab-inspect", "model=alexnet_lite", "data=cifar10")
    assert "alexnet_lite on cifar10 (32x32x3 images, 10 classes)" in table.stdout


@pytest.mark.parametrize(
    "command", [["cnnlab-verify", "--list"], ["cnnlab-inspect"], ["cnnlab-preflight"]]
)
def test_output_into_a_closed_pipe_ends_quietly(command):
    """`cnnlab-verify --list | head -3`: when the reader has gone, the command ends with exit code
    1 and no BrokenPipeError traceback. The pipe's reading end is closed before the command
    starts, so its first write fails, whatever the timing."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [str(Path(sys.executable).parent / command[0]), *command[1:]],
            stdout=write, stderr=subprocess.PIPE, text=True, timeout=120,
        )  # fmt: skip
    finally:
        os.close(write)
    assert done.returncode == 1 and done.stderr == "", done.stderr[-2000:]
