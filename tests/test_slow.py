"""Full-size runs behind the README's figures (minutes each): `pytest -m slow`."""

import json

import pytest

from tests.conftest import CIFAR10_ZIP, cli, needs_cifar10, needs_fashion_mnist


@pytest.mark.slow
@needs_fashion_mnist
def test_default_experiment_reaches_90_percent(tmp_path):
    done = cli("train", "logger.mode=disabled", f"hydra.run.dir={tmp_path}", timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["test/accuracy"] >= 0.90, summary


@pytest.mark.slow
@needs_cifar10
def test_alexnet_lite_on_the_cifar10_copy_reaches_60_percent(tmp_path):
    done = cli(
        "train", "experiment=alexnet_lite_cifar10", f"data.path={CIFAR10_ZIP}", "train.epochs=3",
        "logger.mode=disabled", f"hydra.run.dir={tmp_path}", timeout=1800,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["test/accuracy"] >= 0.60, summary


@pytest.mark.slow
@needs_fashion_mnist
def test_the_lenet5_baselines_pass_their_full_tier(tmp_path):
    """The full tier of both LeNet-5 variants on Fashion-MNIST: 6 runs, about 25 minutes."""
    done = cli(
        "verify", "lenet5_fashion_mnist", "lenet5_classic_fashion_mnist", "--tier", "full",
        "--out", str(tmp_path), "logger.mode=disabled", timeout=3600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:]
    lines = done.stdout.strip().splitlines()[-2:]
    assert all(line.startswith("PASS ") for line in lines), lines
