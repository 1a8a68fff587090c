"""A network written in the layer language alone (tests/conf/model/tiny_res.yaml, or the
command line), through the command-line tools as a user runs them: trained end to end with its
pictures, inspected on two input sizes, pre-flighted, and swept over one value of one layer."""

import json

import pytest
from PIL import Image

from tests.conftest import cli, needs_fashion_mnist

TINY_RES = ["hydra.searchpath=[file://tests/conf]", "model=tiny_res"]
SMALL = [
    "data.train_limit=3000", "data.test_limit=300", "train.epochs=1", "train.batch_size=50",
    "train.log_every_steps=10", "optimizer.name=adamw", "optimizer.lr=0.01", "logger.mode=disabled",
]  # fmt: skip
PARAMS = 80 + (9 * 8 * 16 + 16) + (9 * 16 * 16 + 16) + (8 * 16 + 16) + (16 * 10 + 10)


def totals(text: str) -> list[str]:
    return [line.split()[1] for line in text.splitlines() if line.startswith("total")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("yaml_net")
    done = cli("train", *TINY_RES, *SMALL, f"hydra.run.dir={root}/run",
               f"compilation_cache={root}/jax")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "run"


@needs_fashion_mnist
def test_trains_with_its_pictures(trained):
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["model"] == "tiny_res"
    assert summary["params"] == PARAMS == 3_882
    assert summary["test/accuracy"] > 0.25  # 10 classes: chance is 0.1
    layers = (trained / "layers.txt").read_text()
    assert "res1/shortcut" in layers and "14 x 14 x 16" in layers
    drawn = {path.stem for path in (trained / "pictures").glob("*.png")}
    five = {"filters", "feature_maps", "confusion_matrix", "curves", "confidently_wrong"}
    assert drawn == {*five, "class_activation"}  # its head is a global average
    with Image.open(trained / "pictures" / "feature_maps.png") as image:
        assert image.size[1] > 300  # the input, conv1 and res1: three rows of maps


def test_inspect_shows_its_geometry_for_each_dataset():
    """A global-average head: the same parameters on 28x28x1 and, with 3 input channels more
    weights in the stem only, on 32x32x3."""
    mnist = cli("inspect_model", *TINY_RES)
    cifar = cli("inspect_model", *TINY_RES, "data=cifar10")
    assert mnist.returncode == cifar.returncode == 0, mnist.stderr + cifar.stderr
    assert "28 x 28 x 8" in mnist.stdout and "32 x 32 x 8" in cifar.stdout
    assert totals(mnist.stdout)[0] == f"{PARAMS:,}"
    assert totals(cifar.stdout)[0] == f"{PARAMS + 2 * 9 * 8:,}"
    assert "memory per training step" in mnist.stdout


def test_the_preflight_sweeps_one_layer_s_value_and_names_the_impossible_one():
    done = cli("preflight", *TINY_RES, "model.layers.0.conv=4,8", "model.layers.0.kernel=3,30",
               "+model.layers.0.padding=valid")  # fmt: skip
    assert done.returncode == 2, done.stderr  # some points are impossible
    assert "4 point(s): 2 job(s) to run, 2 invalid" in done.stdout
    assert "conv1 (conv 30x30, stride 1, pad 0) gets a 28x28x1 input" in done.stdout
    # 4 stem filters fewer: their weights and biases, and their inputs to the block's first conv
    # and to its projection
    assert totals(done.stdout) == [f"{PARAMS - 4 * 10 - 4 * 9 * 16 - 4 * 16:,}", f"{PARAMS:,}"]


@needs_fashion_mnist
def test_a_sweep_over_a_layer_s_width_trains_each_point_and_reports_them(tmp_path):
    net = "model.layers=[{conv: 4},relu,{pool: max},flatten,{dense: 16},relu]"
    dirs = [f"hydra.sweep.dir={tmp_path}/sweep", f"compilation_cache={tmp_path}/jax"]
    done = cli("train", "-m", net, "model.layers.0.conv=2,4", *SMALL, "data.train_limit=500", *dirs)
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = [json.loads((tmp_path / "sweep" / j / "summary.json").read_text()) for j in "01"]
    assert [s["status"] for s in summaries] == ["ok", "ok"]
    # 3x3 conv of w filters, 14x14xw flattened into 16 units, 10 logits
    assert [s["params"] for s in summaries] == [
        10 * w + 14 * 14 * w * 16 + 16 + 170 for w in (2, 4)
    ]
    header = (tmp_path / "sweep" / "summary.csv").read_text().splitlines()[0]
    assert header.startswith("model.layers.0.conv,n,")  # the item swept, not its whole list
