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
