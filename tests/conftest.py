"""Shared fixtures: real data locations and small, fast configurations."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cnnlab.config import Config, DataConfig, LoggerConfig, ModelConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CIFAR10_ZIP = REPO.parent / "shared" / "data" / "cifar10-jpeg.zip"

needs_fashion_mnist = pytest.mark.skipif(
    not FASHION_MNIST.is_dir(), reason="apt-get install dataset-fashion-mnist (make setup does)"
)
needs_cifar10 = pytest.mark.skipif(not CIFAR10_ZIP.is_file(), reason=f"no {CIFAR10_ZIP}")


def preset(name: str, **knobs) -> ModelConfig:
    """The model preset conf/model/<name>.yaml (its `defaults` first), with `knobs` set."""
    import yaml

    tree = yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text())
    values = {}
    for parent in tree.pop("defaults", []):
        if parent != "_self_":
            values.update(dataclasses.asdict(preset(parent)))
    return ModelConfig(**{**values, **tree, **knobs})


def small_config(**changes) -> Config:
    """LeNet-5 on 2,000 Fashion-MNIST images for one epoch, W&B off: a run of a few seconds."""
    cfg = Config(
        model=ModelConfig(),
        data=DataConfig(train_limit=2000, test_limit=1000),
        train=TrainConfig(epochs=1, batch_size=64, log_every_steps=10),
        logger=LoggerConfig(mode="disabled", pictures=False),
    )
    return dataclasses.replace(cfg, **changes)


def cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a cnnlab entry point (`train`, `inspect_model`, `predict`) as a user would."""
    module, *rest = args
    environment = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    environment.update(WANDB_SILENT="true", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", f"experiments.{module}", *rest],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def final_params(run_dir: Path):
    """A finished run's final parameters (its `checkpoint/`), as saved."""
    from cnnlab import checkpoint

    return checkpoint.load_params(run_dir / "checkpoint", None)


def history(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl records without their wall-clock times."""
    import json

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in lines]


# LeNet-5 with 3 filters over stride x padding: 3 trainable points and 1 impossible one (stride 2,
# valid padding: pool2 gets a 1x1 map). test_sweep and test_report share one run of it.
SWEEP = [
    "-m", "model.depth=3", "model.stride=1,2", "model.padding=same,valid", "data.train_limit=300",
    "data.test_limit=200", "train.epochs=1", "train.batch_size=50", "train.log_every_steps=2",
    "logger.pictures=false",
]  # fmt: skip


# Every program into the compilation cache, however fast it compiles (cnnlab caches those that
# take 0.5 s or more, which on a fast machine may leave out a LeNet-5 train step)
CACHE_ALL = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


@pytest.fixture(scope="session")
def lenet_sweep(tmp_path_factory):
    """(multirun root, the CompletedProcess): the sweep in `<root>/first`, W&B offline, its jobs
    sharing a compilation cache in `<root>/jax-cache`."""
    root = tmp_path_factory.mktemp("multirun")
    first = cli(
        "train", *SWEEP, "logger.mode=offline", f"hydra.sweep.dir={root}/first",
        f"compilation_cache={root}/jax-cache", env=CACHE_ALL,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    return root, first
