"""The time-series baselines (issue 22): the FCN and ResNet presets and LeNet-5 and AlexNet-lite
along one axis, their parameters pinned in the table and in Flax's; the baselines' recipe (the
plateau schedule, the batch capped at a share of the training set); FCN trained through the
library on GunPoint's real series; the epoch-end saves thinned by `checkpoint.every_epochs`.

Glossary: `N` series in a split, `L` length, `C` channels, `K` classes.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnlab import geometry
from cnnlab.config import (
    CheckpointConfig,
    Config,
    DataConfig,
    LoggerConfig,
    OptimizerConfig,
    TrainConfig,
)
from cnnlab.data import Dataset, Split
from cnnlab.errors import ConfigError
from cnnlab.models import build_model, variables_like
from cnnlab.tracking import Trackers
from cnnlab.tracking.local import LocalTracker
from cnnlab.train.loop import batch_size
from cnnlab.train.optim import build_optimizer, lr_scale
from cnnlab.train.run import prepare, run
from cnnlab.validate import validate
from experiments.hydra_conf import compose_config, to_config

GUNPOINT = (150, 1)  # [L, C]


def preset(*overrides: str):
    """The ModelConfig of `overrides` (model=<name>, knobs), as cnnlab-inspect composes it."""
    return to_config(compose_config(list(overrides))).model


def count(tree) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize(
    "name, expected",
    [
        # convs 8*1*128 + 128, 5*128*256 + 256, 3*256*128 + 128; BatchNorms 2 * (128 + 256 + 128);
        # logits 128*2 + 2
        ("fcn", 1_152 + 164_096 + 98_432 + 2 * 512 + 258),
        # blocks 1 and 2 with a bias-free 1x1 projection and its BatchNorm, block 3 the identity
        ("resnet1d", 34_048 + 206_208 + 263_296 + 258),
        # 150 -> 150 -> 75 -> 71 -> 35: convs 36 + 496, dense 35*16 -> 120 -> 84 -> 2
        ("lenet5", 36 + 496 + (560 * 120 + 120) + (120 * 84 + 84) + (84 * 2 + 2)),
        # 150 -> 74 -> 36 -> 17 after the 3/2 pools: convs 144 + 7,744 + 18,528 + 27,744 + 18,496,
        # dense 17*64 -> 512 -> 512 -> 2
        ("alexnet_lite", 72_656 + (1_088 * 512 + 512) + (512 * 512 + 512) + (512 * 2 + 2)),
    ],
)
def test_parameter_counts_on_gunpoint_are_pinned_in_the_table_and_in_flax(name, expected):
    cfg = preset(f"model={name}")
    rows = geometry.layers(cfg, GUNPOINT, 2)
    assert geometry.summarize(rows)["params"] == expected
    model = build_model(cfg, 2)
    variables = variables_like(model, GUNPOINT)
    assert count(variables["params"]) == expected
    x = jax.ShapeDtypeStruct((4, *GUNPOINT), jnp.float32)
    assert jax.eval_shape(model.apply, variables, x).shape == (4, 2)


def test_resnet1d_projects_the_shortcut_where_the_width_changes_and_adds_the_identity_after():
    model = build_model(preset("model=resnet1d"), 2)
    params = variables_like(model, GUNPOINT)["params"]
    projected = sorted(name for name, sub in params.items() if "shortcut" in sub)
    assert projected == ["res1", "res2"]  # 1 -> 64, 64 -> 128; res3 is 128 -> 128
    assert "shortcut_norm" in params["res2"] and "res3" in params


def convs(*overrides: str, shape: tuple[int, ...] = GUNPOINT) -> dict[str, tuple[int, ...]]:
    """Each conv's output [L', F] in the geometry table of the composed model."""
    rows = geometry.layers(preset(*overrides), shape, 2)
    return {row.name: row.out_shape for row in rows if row.kind == "conv"}


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model=fcn"], {"conv1": (150, 128), "conv2": (150, 256), "conv3": (150, 128)}),
        # depth scales every width so the first has 64; stride 2 halves the length, same padding
        (["model=fcn", "model.depth=64", "model.stride=2"],
         {"conv1": (75, 64), "conv2": (38, 128), "conv3": (19, 64)}),
        # valid padding: L - k + 1 with k = 8, 5, 3
        (["model=fcn", "model.padding=valid"],
         {"conv1": (143, 128), "conv2": (139, 256), "conv3": (137, 128)}),
        (["model=fcn", "model.kernel_size=3", "model.padding=valid"],
         {"conv1": (148, 128), "conv2": (146, 256), "conv3": (144, 128)}),
        # LeNet-5's C1 pads 2 and C3 none, as on images; depth 12 doubles both widths
        (["model=lenet5", "model.depth=12"], {"conv1": (150, 12), "conv2": (71, 32)}),
        # stride 2: C1 (150 + 4 - 5) // 2 + 1, S2 halves, C3 (37 - 5) // 2 + 1
        (["model=lenet5", "model.stride=2"], {"conv1": (75, 6), "conv2": (17, 16)}),
        # the 3/2 max pools after conv1, conv2 and conv5: (L - 3) // 2 + 1
        (["model=alexnet_lite", "model.padding=valid"],
         {"conv1": (146, 24), "conv2": (68, 64), "conv3": (31, 96), "conv4": (29, 96),
          "conv5": (27, 64)}),
    ],
)  # fmt: skip
def test_the_knobs_mean_for_series_what_they_mean_for_images(overrides, expected):
    assert convs(*overrides) == expected


def test_the_batch_is_capped_at_a_share_of_the_training_set():
    fcn = TrainConfig(batch_size=16, batch_size_cap_fraction=0.1)  # min(16, N/10)
    assert [batch_size(fcn, n) for n in (50, 100, 159, 160, 1000, 5)] == [5, 10, 15, 16, 16, 1]
    assert batch_size(TrainConfig(batch_size=64, batch_size_cap_fraction=0.29), 100) == 29
    assert batch_size(TrainConfig(batch_size=16), 50) == 16  # no cap
    for bad in (0.0, 1.5):
        cfg = Config(train=TrainConfig(batch_size_cap_fraction=bad))
        with pytest.raises(ConfigError, match=r"train\.batch_size_cap_fraction=.* \(0, 1\]"):
            validate(cfg)


def test_the_plateau_schedule_halves_the_rate_after_the_patience_down_to_the_floor():
    """Adam at 1e-3 on a constant loss with constant gradients: each epoch (2 steps) averages the
    loss, the first sets the best value, and every 3 epochs without improvement halve the rate,
    until 1e-4. Adam's update of a constant gradient is the rate itself, so the updates show it."""
    opt = OptimizerConfig(
        name="adamw", lr=1e-3, weight_decay=0.0, schedule="plateau",
        plateau_factor=0.5, plateau_patience=3, end_lr_factor=0.1,
    )  # fmt: skip
    tx, _ = build_optimizer(opt, steps_per_epoch=2, epochs=20)
    params = {"w": jnp.zeros((3, 2))}
    grads = jax.tree.map(jnp.ones_like, params)
    state = tx.init(params)
    update = jax.jit(lambda state: tx.update(grads, state, params, value=jnp.float32(1.0)))
    rates = []
    for _ in range(2 * 20):
        updates, state = update(state)
        rates.append(-float(updates["w"][0, 0]))
        assert float(lr_scale(state)) * 1e-3 == pytest.approx(rates[-1], rel=1e-4)
    # [epoch, step in it]: the rate changes at an epoch's last step, whose update (optax's
    # reduce_on_plateau decides before it scales) already takes the new rate
    per_epoch = np.array(rates).reshape(20, 2)
    np.testing.assert_allclose(per_epoch[1:, 0], per_epoch[:-1, 1], rtol=1e-5)
    # epochs 1-4 start at 1e-3 (the 4th ends the 3 epochs of patience), 5-7 at 5e-4, 8-10 at
    # 2.5e-4, 11-13 at 1.25e-4, then the floor: 0.0625 would be below 0.1 of the rate
    expected = [1.0] * 4 + [0.5] * 3 + [0.25] * 3 + [0.125] * 3 + [0.1] * 7
    np.testing.assert_allclose(per_epoch[:, 0], np.array(expected) * 1e-3, rtol=1e-4)


def test_plateau_keys_out_of_range_are_refused():
    with pytest.raises(ConfigError, match=r"optimizer\.plateau_factor=1\.0"):
        validate(Config(optimizer=OptimizerConfig(plateau_factor=1.0)))
    with pytest.raises(ConfigError, match=r"optimizer\.plateau_patience=0"):
        validate(Config(optimizer=OptimizerConfig(plateau_patience=0)))
    with pytest.raises(ConfigError, match=r"checkpoint\.every_epochs=0"):
        validate(Config(checkpoint=CheckpointConfig(every_epochs=0)))


def gunpoint_split(split: str) -> Split:
    """GunPoint's series from aeon (bundled with it: no download), each z-normalised on its own
    as the UCR baselines do, [N, 150, 1] float32, labels "1"/"2" as 0/1."""
    from aeon.datasets import load_classification

    x, y = load_classification(
        "GunPoint", split=split, load_equal_length=True, load_no_missing=True
    )  # x [N, C, L]
    x = (x - x.mean(axis=-1, keepdims=True)) / x.std(axis=-1, keepdims=True)
    return Split(x.transpose(0, 2, 1).astype(np.float32), (y.astype(int) - 1).astype(np.int32))


@pytest.fixture(scope="module")
def gunpoint() -> Dataset:
    train, test = gunpoint_split("train"), gunpoint_split("test")
    empty = Split(train.images[:0], train.labels[:0])  # the paper's: no validation split
    return Dataset.from_splits("GunPoint", train, empty, test, ("Gun", "Point"))


def recipe(epochs: int) -> Config:
    """conf/experiment/fcn_ucr.yaml's recipe on GunPoint, shortened to `epochs`."""
    return Config(
        model=preset("model=fcn"),
        data=DataConfig(name="GunPoint"),
        optimizer=OptimizerConfig(
            name="adamw", lr=1e-3, weight_decay=0.0, schedule="plateau",
            plateau_factor=0.5, plateau_patience=50, end_lr_factor=0.1,
        ),
        train=TrainConfig(
            epochs=epochs, batch_size=16, batch_size_cap_fraction=0.1, log_every_steps=100
        ),
        logger=LoggerConfig(mode="disabled", pictures=False),
        checkpoint=CheckpointConfig(every_steps=None, every_epochs=40, keep=5),
    )  # fmt: skip


def test_fcn_learns_gunpoint_with_the_baselines_recipe(gunpoint, tmp_path):
    assert gunpoint.image_shape == GUNPOINT and len(gunpoint.train) == 50
    cfg = recipe(epochs=100)
    tracker = Trackers(LocalTracker(tmp_path))
    summary = run(cfg, tmp_path, tracker, prepared=prepare(cfg, data=gunpoint))
    assert summary["status"] == "ok", summary.get("error")
    assert summary["params"] == 264_962
    assert summary["steps"] == 100 * 10  # batch min(16, 50 / 10) = 5
    assert summary["test/accuracy"] > 0.9, summary  # 150 test series; the paper's FCN: 100%
    # epoch ends 40 and 80 save, the last (100) always; none of the other 97
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").glob("[0-9]*"))
    assert saved == [400, 800, 1000]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["train/lr"] for r in records if "train/lr" in r]
    assert all(1e-4 <= lr <= 1e-3 for lr in lrs) and lrs[0] == pytest.approx(1e-3), lrs
