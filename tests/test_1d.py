"""A 1-D net, written in the layer language, over series [N, L, C]: its geometry table, its
parameters, its training through the library's own loop on a small synthetic set, the checks
that refuse an impossible series net or augmentation before anything compiles, and the series
augmentation (random shift and scaling) inside the train step, never in evaluation.

Glossary: `N` examples, `L` length, `C` channels.
"""

import dataclasses
import json

import chex
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
from cnnlab.preprocess import augment_series, check_augment, shift
from cnnlab.tracking import Trackers
from cnnlab.tracking.local import LocalTracker
from cnnlab.train.loop import evaluate
from cnnlab.train.run import prepare, run
from cnnlab.train.step import variables

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


@pytest.mark.parametrize(
    "augment, shape, dtype, message",
    [
        (AugmentConfig(shift=4), (28, 28, 1), np.uint8,
         r"^data.augment.shift=4 augments series \[L, C\], but this dataset holds uint8 images of "
         r"shape \(28, 28, 1\); turn it off: data.augment.shift=0$"),
        (AugmentConfig(scale=0.1), (32, 32, 3), np.uint8, "data.augment.scale=0.1 augments series"),
        (AugmentConfig(scale=0.1), (8, 8, 1), np.float32, "holds float32 examples of shape"),
        (AugmentConfig(shift=64), (64, 1), np.float32,
         "data.augment.shift=64 would move whole series of 64 steps out of sight; use fewer"),
    ],
)  # fmt: skip
def test_series_augmentation_of_images_or_longer_than_the_series_is_refused(
    augment, shape, dtype, message
):
    with pytest.raises(ConfigError, match=message):
        check_augment(augment, shape, dtype)
    check_augment(AugmentConfig(shift=63, scale=0.5), (64, 1), np.float32)  # series: accepted


def test_a_shift_moves_each_series_within_its_own_length():
    """Step t of channel 0 holds t + 1 (channel 1 its negative), so that each output value names
    the step it came from: every series moves by one offset in [-3, 3], nothing lands past its
    own length, and what the shift uncovers is 0."""
    b, length, steps = 256, 20, 3
    lengths = jnp.asarray(np.random.default_rng(0).integers(5, length + 1, b), jnp.int32)  # [B]
    t = np.arange(1, length + 1, dtype=np.float32)
    x = np.where(np.arange(length) < np.asarray(lengths)[:, None], t, 0)  # [B, L], padded with 0
    x = jnp.asarray(np.stack([x, -x], -1))  # [B, L, 2]
    y = shift(x, lengths, jax.random.key(0), steps)
    chex.assert_shape(y, x.shape)
    chex.assert_type(y, jnp.float32)
    y = np.asarray(y)
    np.testing.assert_array_equal(y[..., 1], -y[..., 0])  # the channels move together
    offsets = []
    for row, n in zip(y[..., 0], np.asarray(lengths), strict=True):
        source = row[row > 0] - 1  # [<= n] the steps the values came from
        d = int(np.flatnonzero(row)[0] - source[0])  # the offset: where its first value landed
        want = np.zeros(length, np.float32)
        want[max(d, 0) : n + min(d, 0)] = np.arange(max(-d, 0), n - max(d, 0)) + 1
        np.testing.assert_array_equal(row, want)
        offsets.append(d)
    assert set(offsets) == set(range(-steps, steps + 1))  # every offset, 0 included
    chex.assert_trees_all_equal(y, shift(x, lengths, jax.random.key(0), steps))  # one key, one draw
    assert not np.array_equal(y, shift(x, lengths, jax.random.key(1), steps))
    no_lengths = np.asarray(shift(x[:, :, :1] + 1, None, jax.random.key(0), steps))
    assert ((no_lengths[..., 0] == 0).sum(1) == np.abs(offsets)).all()  # uncovered at one end


def test_scaling_multiplies_each_series_and_channel_by_a_factor_in_range():
    x = jax.random.normal(jax.random.key(3), (512, 30, 2)) + 5.0  # [B, L, C], no value near 0
    y = augment_series(x, None, jax.random.key(0), AugmentConfig(scale=0.2))
    chex.assert_shape(y, x.shape)
    factor = np.asarray(y / x)  # [B, L, C]
    along_time = np.broadcast_to(factor[:, :1], factor.shape)  # one factor for every step
    np.testing.assert_allclose(factor, along_time, rtol=1e-6)
    factor = factor[:, 0]  # [B, C]
    assert factor.min() >= 0.8 - 1e-6 and factor.max() <= 1.2 + 1e-6
    assert factor.min() < 0.81 and factor.max() > 1.19 and abs(factor.mean() - 1) < 0.01
    assert np.mean(np.abs(factor[:, 0] - factor[:, 1]) > 1e-3) > 0.9  # each channel its own
    # scaling on leaves the shift's draws as they were: the same zeros, the values scaled
    moved = augment_series(x, None, jax.random.key(0), AugmentConfig(shift=5))
    both = augment_series(x, None, jax.random.key(0), AugmentConfig(shift=5, scale=0.2))
    np.testing.assert_array_equal(np.asarray(moved) == 0, np.asarray(both) == 0)
    assert int((np.asarray(moved) == 0).any(axis=(1, 2)).sum()) > 300  # most moved, a few not


def padded_series_data() -> Dataset:
    """series_data's sines cut to 40..64 steps: padded series, with lengths."""
    data = series_data(train=40, test=20)
    rng = np.random.default_rng(1)
    cut = []
    for split in (data.train, data.val, data.test):
        lengths = rng.integers(40, LENGTH + 1, len(split)).astype(np.int32)
        values = np.where(np.arange(LENGTH)[:, None] < lengths[:, None, None], split.images, 0)
        cut.append(Split(values.astype(np.float32), split.labels, lengths))
    return Dataset.from_splits("sines", *cut, data.class_names)


def test_series_augmentation_changes_the_train_step_but_never_evaluation():
    """Padded series, so that the lengths reach the augmentation inside the jitted step. The
    same parameters evaluate to the same probabilities with augmentation on or off; one train
    step from the same state and key gives another loss with it on, and the same loss twice."""
    data = padded_series_data()
    plain = prepare(series_config(), data=data)
    on = dataclasses.replace(series_config().data, augment=AugmentConfig(shift=8, scale=0.3))
    augmented = prepare(dataclasses.replace(series_config(), data=on), data=data)
    state = plain.init(jax.random.key(0))
    probs = [
        evaluate(p.eval_step, variables(state), *p.test, 100).probs for p in (plain, augmented)
    ]
    chex.assert_trees_all_equal(probs[0], probs[1])
    idx = np.arange(20, dtype=np.int32)

    def loss(prepared, seed: int) -> float:  # the state is donated: a fresh one each time
        fresh = prepared.init(jax.random.key(0))
        _, metrics = prepared.train_step(fresh, *prepared.train, idx, jax.random.key(seed))
        return float(metrics["train/loss"])

    assert loss(augmented, 0) == loss(augmented, 0) != loss(plain, 0)
    assert loss(augmented, 1) != loss(augmented, 0) and loss(plain, 1) == loss(plain, 0)
