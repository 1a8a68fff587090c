"""A 1-D net, written in the layer language, over series [N, L, C]: its geometry table, its
parameters, its training through the library's own loop on a small synthetic set, and the checks
that refuse an impossible series net or augmentation before anything compiles.

Glossary: `N` examples, `L` length, `C` channels.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnlab import geometry
from cnnlab.config import (
    AugmentConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    LoggerConfig,
    ModelConfig,
    OptimizerConfig,
    TrainConfig,
)
from cnnlab.data import Dataset, Split
from cnnlab.errors import ConfigError, GeometryError
from cnnlab.models import build_model
from cnnlab.tracking import Trackers
from cnnlab.tracking.local import LocalTracker
from cnnlab.train.run import prepare, run

LENGTH = 64
TINY1D = ModelConfig(
    name="tiny1d",
    layers=[{"conv": 8, "kernel": 5}, "relu", {"pool": "max", "window": 2},
            {"conv": 16, "kernel": 3}, "relu", "global_pool"],
)  # fmt: skip

# JAX's compilation events, to tell that a refused config compiled nothing
COMPILING: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **kwargs: COMPILING.append(event) if "/compile/" in event else None
)


def sines(n: int, length: int, rng: np.random.Generator) -> Split:
    """Class 0: 2 cycles over the series, class 1: 5, each at a random phase and amplitude in
    [0.5, 1.5] with Gaussian noise of std 0.3: [n, length, 1] float32."""
    labels = rng.integers(0, 2, n).astype(np.int32)  # [N]
    cycles = np.where(labels == 0, 2.0, 5.0)[:, None]  # [N, 1]
    phase = rng.uniform(0, 2 * np.pi, (n, 1))
    amplitude = rng.uniform(0.5, 1.5, (n, 1))
    t = np.arange(length)[None, :] / length  # [1, L]
    x = amplitude * np.sin(2 * np.pi * cycles * t + phase) + rng.normal(0, 0.3, (n, length))
    return Split(x[..., None].astype(np.float32), labels)  # [N, L, 1]


def series_data(length: int = LENGTH, train: int = 200, test: int = 100) -> Dataset:
    rng = np.random.default_rng(0)
    train_split, test_split = sines(train, length, rng), sines(test, length, rng)
    empty = Split(train_split.images[:0], train_split.labels[:0])  # no validation split
    return Dataset.from_splits("sines", train_split, empty, test_split, ("2 cycles", "5 cycles"))


def series_config(model: ModelConfig = TINY1D, **data) -> Config:
    return Config(
        model=model,
        data=DataConfig(name="sines", **data),
        optimizer=OptimizerConfig(name="adamw", lr=1e-2, schedule="constant"),
        train=TrainConfig(epochs=8, batch_size=20, eval_batch_size=100, log_every_steps=10),
        logger=LoggerConfig(mode="disabled", pictures=False),
        checkpoint=CheckpointConfig(every_steps=None, keep=1),  # at epoch ends only
    )


def test_the_geometry_table_of_a_1d_net_is_in_lengths_and_matches_its_parameters():
    rows = geometry.layers(TINY1D, (LENGTH, 1), 2)
    shapes = {row.name: row.out_shape for row in rows}
    assert shapes == {
        "input": (64, 1), "conv1": (64, 8), "act1": (64, 8), "pool1": (32, 8),
        "conv2": (32, 16), "act2": (32, 16), "global_pool1": (16,), "logits": (2,),
    }  # fmt: skip
    table = geometry.format_table(rows)
    assert "output L x C" in table and "32 x 16" in table, table
    # conv1 5*1*8 + 8, conv2 3*8*16 + 16, logits 16*2 + 2
    assert geometry.summarize(rows)["params"] == 48 + 400 + 34
    model = build_model(TINY1D, 2)
    variables = model.init(jax.random.key(0), jnp.zeros((3, LENGTH, 1)))
    sizes = jax.tree.map(lambda p: p.size, variables["params"])
    assert sum(jax.tree.leaves(sizes)) == 482
    assert {k: sum(jax.tree.leaves(v)) for k, v in sizes.items()} == {
        row.name: row.params for row in rows if row.params
    }
    assert model.apply(variables, jnp.zeros((3, LENGTH, 1))).shape == (3, 2)


def test_a_1d_net_trains_on_synthetic_series_through_the_training_loop(tmp_path):
    data = series_data()
    x = data.train.images  # [200, 64, 1]
    np.testing.assert_allclose(data.mean, x.mean(axis=(0, 1)), atol=1e-5)
    np.testing.assert_allclose(data.std, x.std(axis=(0, 1)), rtol=1e-5)
    cfg = series_config()
    summary = run(cfg, tmp_path, Trackers(LocalTracker(tmp_path)), prepared=prepare(cfg, data=data))
    assert summary["status"] == "ok", summary.get("error")
    assert summary["params"] == 482 and summary["steps"] == 8 * 200 // 20
    assert summary["test/accuracy"] > 0.9, summary
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert losses[-1] < 0.5 * losses[0], losses
    info = json.loads((tmp_path / "dataset.json").read_text())
    assert info["image_shape"] == [64, 1] and info["sizes"] == {"train": 200, "val": 0, "test": 100}


@pytest.mark.parametrize(
    "layers, named",
    [
        ([{"conv": 8, "kernel": 20, "padding": "valid"}, "relu", "global_pool"], "conv1"),
        ([{"conv": 8, "kernel": 3, "stride": 4, "padding": "valid"}, "relu",
          {"conv": 8, "kernel": 5, "padding": "valid"}, "global_pool"], "conv2"),
    ],
)  # fmt: skip
def test_a_kernel_or_stride_that_empties_a_short_series_is_refused_before_compiling(layers, named):
    data = series_data(length=16, train=40, test=20)
    before = len(COMPILING)
    with pytest.raises(GeometryError, match=rf"^{named} .* would output 0"):
        prepare(series_config(ModelConfig(name="short", layers=layers)), data=data)
    assert len(COMPILING) == before, COMPILING[before:]


@pytest.mark.parametrize(
    "augment, message",
    [
        (AugmentConfig(flip=True), "data.augment.flip=true augments uint8 images"),
        (AugmentConfig(crop_padding=2), "data.augment.crop_padding=2 augments uint8 images"),
        (AugmentConfig(erase=0.5), r"data.augment.erase=0.5 .*series \[L, C\] of shape \(64, 1\)"),
    ],
)
def test_image_augmentation_of_series_is_refused(augment, message):
    with pytest.raises(ConfigError, match=message):
        prepare(series_config(augment=augment), data=series_data(train=40, test=20))
