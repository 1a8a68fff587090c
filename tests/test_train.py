"""The training step and loop on real data: losses, optimizers, augmentation, determinism."""

import dataclasses
import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnlab.config import AugmentConfig, DataConfig, ModelConfig, OptimizerConfig, TrainConfig
from cnnlab.data import load_dataset
from cnnlab.models import build_model
from cnnlab.preprocess import augment
from cnnlab.tracking import Trackers
from cnnlab.tracking.local import LocalTracker
from cnnlab.train.loop import Hooks, Lanes, epoch_order, fit
from cnnlab.train.losses import LOSSES, squared_error
from cnnlab.train.optim import OPTIMIZERS, build_optimizer
from cnnlab.train.run import initial_state, prepare, run
from cnnlab.train.step import StepSettings, create_state, make_train_step
from tests.conftest import needs_fashion_mnist, preset, small_config


@pytest.fixture(scope="module")
def fmnist():
    return load_dataset(small_config().data)


def test_squared_error_is_the_classic_total_error():
    logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    labels = jnp.array([0, 2])
    p = np.asarray(jax.nn.softmax(logits))
    target = np.eye(3)[[0, 2]]
    expected = 0.5 * ((target - p) ** 2).sum(-1)
    np.testing.assert_allclose(squared_error(logits, labels, 0.0), expected, rtol=1e-6)


def test_label_smoothing_raises_the_loss_of_a_confident_correct_prediction():
    logits, labels = jnp.array([[10.0, -10.0]]), jnp.array([0])
    for loss in LOSSES.values():
        assert loss(logits, labels, 0.2)[0] > loss(logits, labels, 0.0)[0]


def test_schedules():
    cfg = OptimizerConfig(lr=0.1, schedule="warmup_cosine", warmup_epochs=1, end_lr_factor=0.1)
    _, schedule = build_optimizer(cfg, steps_per_epoch=10, epochs=5)
    assert schedule(0) == 0.0 and schedule(10) == pytest.approx(0.1)
    assert schedule(50) == pytest.approx(0.01)
    _, cosine = build_optimizer(dataclasses.replace(cfg, schedule="cosine"), 10, 5)
    assert cosine(0) == pytest.approx(0.1) and cosine(50) == pytest.approx(0.01)
    _, constant = build_optimizer(dataclasses.replace(cfg, schedule="constant"), 10, 5)
    assert constant(0) == constant(49) == pytest.approx(0.1)


def test_weight_decay_skips_biases():
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
    zero = jax.tree.map(jnp.zeros_like, params)
    for name in OPTIMIZERS:
        cfg = OptimizerConfig(name=name, lr=0.1, weight_decay=0.5, schedule="constant", momentum=0)
        tx, _ = build_optimizer(cfg, 1, 1)
        updates, _ = tx.update(zero, tx.init(params), params)
        assert float(jnp.abs(updates["kernel"]).sum()) > 0, name
        assert float(jnp.abs(updates["bias"]).sum()) == 0, name


def test_gradient_clipping_bounds_the_update():
    cfg = OptimizerConfig(lr=1.0, momentum=0.0, schedule="constant", grad_clip_norm=1.0)
    tx, _ = build_optimizer(cfg, 1, 1)
    params = {"w": jnp.zeros(4)}
    updates, _ = tx.update({"w": jnp.full(4, 100.0)}, tx.init(params), params)
    assert float(optax.global_norm(updates)) == pytest.approx(1.0)


def test_augmentation_crops_and_flips_per_example():
    # 64 different, left-right asymmetric images: each comes out as it was or mirrored, both
    # happen, and which one is drawn per example
    images = jax.random.randint(jax.random.key(9), (64, 4, 4, 1), 0, 256).astype(jnp.uint8)
    flipped = augment(images, jax.random.key(0), AugmentConfig(flip=True))
    same = np.array([jnp.array_equal(o, i) for o, i in zip(flipped, images, strict=True)])
    mirrored = np.array(
        [jnp.array_equal(o, i[:, ::-1]) for o, i in zip(flipped, images, strict=True)]
    )
    assert not (same & mirrored).any()  # no image is its own mirror image
    assert (same | mirrored).all() and 0.25 < mirrored.mean() < 0.75
    cropped = augment(images, jax.random.key(1), AugmentConfig(crop_padding=2))
    chex.assert_shape(cropped, images.shape)
    chex.assert_type(cropped, jnp.uint8)
    many = augment(jnp.ones((64, 4, 4, 1), jnp.uint8), jax.random.key(2), AugmentConfig(2, True))
    assert int((many == 0).sum()) > 0  # some crops show the zero padding
    shown = {tuple(np.asarray(m[..., 0] == 0).ravel()) for m in many}
    assert len(shown) > 8  # each example its own crop offset
    again = augment(jnp.ones((64, 4, 4, 1), jnp.uint8), jax.random.key(2), AugmentConfig(2, True))
    assert jnp.array_equal(many, again)


def test_random_erasing_fills_one_rectangle_of_the_asked_size_with_noise():
    images = jnp.full((256, 28, 28, 1), 128, jnp.uint8)
    cfg = AugmentConfig(erase=1.0, erase_scale=[0.1, 0.3], erase_ratio=0.5)
    erased = np.asarray(augment(images, jax.random.key(0), cfg))[..., 0] != 128  # [B, H, W]
    rows, cols = erased.any(axis=2), erased.any(axis=1)  # [B, H], [B, W]
    heights, widths = rows.sum(1), cols.sum(1)
    area = heights * widths / (28 * 28)  # the bounding box: noise may hit 128 inside it
    assert (area >= 0.1 * 0.8).all() and (area <= 0.3 * 1.25).all()  # rounded to whole pixels
    aspect = heights / widths
    assert (aspect >= 0.5 * 0.7).all() and (aspect <= 2 / 0.7).all()
    assert erased.sum() >= 0.98 * (heights * widths).sum()  # filled, up to noise that hit 128
    corners = {(int(r.argmax()), int(c.argmax())) for r, c in zip(rows, cols, strict=True)}
    assert len(corners) > 100  # at positions spread over the image
    some = np.asarray(augment(images, jax.random.key(0), AugmentConfig(erase=0.5)))
    assert 0.35 < (some != 128).any(axis=(1, 2, 3)).mean() < 0.65
    # turning erasing on leaves the crops and flips of the same key as they were
    x = jax.random.randint(jax.random.key(1), (64, 28, 28, 1), 0, 256).astype(jnp.uint8)
    plain = augment(x, jax.random.key(2), AugmentConfig(crop_padding=2, flip=True))
    more = augment(x, jax.random.key(2), AugmentConfig(crop_padding=2, flip=True, erase=0.5))
    changed = np.asarray(plain != more)[..., 0]  # [B, H, W]
    box = changed.any(axis=2).sum(1) * changed.any(axis=1).sum(1) / (28 * 28)  # [B]
    assert 0.3 < (box == 0).mean() < 0.7 and (box <= 0.4 * 1.25).all()  # erased, nothing else


@needs_fashion_mnist
@pytest.mark.parametrize(
    "model, loss, optimizer",
    [
        (ModelConfig(padding=[2, 0]), "cross_entropy", OptimizerConfig(schedule="constant")),
        (ModelConfig(padding=[2, 0], activation="tanh", pool="avg"), "squared_error",
         OptimizerConfig(name="adamw", lr=3e-3, schedule="constant")),
        (preset("alexnet_lite", depth=8, dense=[64, 64], dropout=0.1), "cross_entropy",
         OptimizerConfig(name="adamw", lr=1e-3, schedule="constant")),
    ],
)  # fmt: skip
def test_a_few_steps_on_one_batch_lower_the_loss(fmnist, model, loss, optimizer):
    tx, _ = build_optimizer(optimizer, 1, 1)
    state = create_state(build_model(model, 10), tx, fmnist.image_shape, jax.random.key(0))
    step = make_train_step(
        StepSettings(LOSSES[loss], 0.0, fmnist.mean, fmnist.std, AugmentConfig())
    )
    images, labels = jnp.asarray(fmnist.train.images), jnp.asarray(fmnist.train.labels)
    idx = np.arange(64)
    losses = []
    for _ in range(40):
        state, metrics = step(state, images, labels, idx, jax.random.key(1))
        losses.append(float(metrics["train/loss"]))
    assert int(state.step) == 40
    assert losses[-1] < 0.5 * losses[0], losses


def test_epoch_order_is_a_function_of_seed_and_epoch():
    a, b = epoch_order(0, 1, 100), epoch_order(0, 1, 100)
    np.testing.assert_array_equal(a, b)
    assert sorted(a.tolist()) == list(range(100))
    assert not np.array_equal(a, epoch_order(0, 2, 100))
    assert not np.array_equal(a, epoch_order(1, 1, 100))


def _run(tmp_path, name, **changes):
    run_dir = tmp_path / name
    run_dir.mkdir()
    summary = run(small_config(**changes), run_dir, Trackers(LocalTracker(run_dir)))
    return run_dir, summary


@needs_fashion_mnist
def test_divergence_stops_the_run_with_its_step(tmp_path):
    run_dir, summary = _run(
        tmp_path, "nan",
        optimizer=OptimizerConfig(lr=1e30, schedule="constant"),
        train=TrainConfig(epochs=2, batch_size=64, log_every_steps=5),
    )  # fmt: skip
    assert summary["status"] == "diverged"
    step = int(summary["error"].split("non-finite at step ")[1])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] - 5 < step <= records[-1]["step"]  # stopped within a log interval
    assert not math.isfinite(records[-1]["train/loss"]) or not math.isfinite(
        records[-1]["train/grad_norm"]
    )
    assert summary["steps"] <= 10 and not (run_dir / "checkpoint").exists()


@needs_fashion_mnist
def test_ctrl_c_ends_the_run_with_status_interrupted(tmp_path):
    """Ctrl-C (a KeyboardInterrupt) during training goes on to the caller, and the run's record
    says so: status `interrupted`, with what was known by then."""

    class CtrlC:
        calls = 0

        def __call__(self) -> bool:  # the loop asks after every step
            self.calls += 1
            if self.calls == 3:
                raise KeyboardInterrupt
            return False

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(KeyboardInterrupt):
        run(small_config(), run_dir, Trackers(LocalTracker(run_dir)), stop=CtrlC())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["error"] == "interrupted by the user"
    assert summary["params"] > 0 and summary["wall_seconds"] > 0
    assert "steps" not in summary  # training never returned


@needs_fashion_mnist
def test_a_run_without_a_validation_split_writes_strict_json(tmp_path):
    data = DataConfig(train_limit=1000, test_limit=500, val_fraction=0.0)
    run_dir, summary = _run(tmp_path, "noval", data=data)
    assert summary["status"] == "ok" and math.isnan(summary["val/best_accuracy"])

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    written = json.loads((run_dir / "summary.json").read_text(), parse_constant=refuse)
    assert written["val/best_accuracy"] is None and written["test/accuracy"] > 0.3


def test_skip_nonfinite_leaves_the_state_and_counts_the_skipped_updates(fmnist):
    """A loss that is NaN on the batches whose first label is 3: those updates are skipped."""

    def poisoned(logits, labels, smoothing):
        loss = LOSSES["cross_entropy"](logits, labels, smoothing)
        return loss * jnp.where(labels[0] == 3, jnp.nan, 1.0)  # NaN gradients too

    tx, _ = build_optimizer(
        OptimizerConfig(name="adamw", lr=1e-3, schedule="constant", skip_nonfinite=3), 1, 1
    )
    state = create_state(
        build_model(ModelConfig(padding=[2, 0]), 10), tx, (28, 28, 1), jax.random.key(0)
    )
    step = make_train_step(StepSettings(poisoned, 0.0, fmnist.mean, fmnist.std, AugmentConfig()))
    images, labels = jnp.asarray(fmnist.train.images), jnp.asarray(fmnist.train.labels)
    skipped = 0
    for i in range(12):
        idx = np.arange(i * 32, (i + 1) * 32)
        before = jax.tree.map(np.array, state.params)  # a copy: the step donates the state
        state, metrics = step(state, images, labels, idx, jax.random.key(1))
        bad = fmnist.train.labels[idx[0]] == 3
        skipped += bad
        assert int(metrics["train/skipped_updates"]) == skipped
        assert np.isfinite(float(metrics["train/param_norm"]))
        same = jax.tree.leaves(jax.tree.map(np.array_equal, before, jax.device_get(state.params)))
        assert all(same) == bad
    assert skipped >= 1, "no batch started with label 3: pick other batches"


@needs_fashion_mnist
def test_skip_nonfinite_stops_a_run_whose_updates_stay_non_finite():
    """`optimizer.skip_nonfinite=3` with a loss that is NaN at every step: optax skips three
    updates in a row and applies the fourth, and the loop, which then watches the parameters'
    norm rather than the loss, goes on through the skipped ones and stops the run at that step."""
    cfg = small_config(
        optimizer=OptimizerConfig(name="adamw", lr=1e-3, schedule="constant", skip_nonfinite=3),
        train=TrainConfig(epochs=1, batch_size=64, log_every_steps=1),
    )
    prepared = prepare(cfg)

    def poisoned(logits, labels, smoothing):
        return LOSSES["cross_entropy"](logits, labels, smoothing) * jnp.nan

    data = prepared.data
    settings = StepSettings(poisoned, 0.0, data.mean.astype(np.float32),
                            data.std.astype(np.float32), AugmentConfig())  # fmt: skip
    task = dataclasses.replace(prepared, train_step=make_train_step(settings))
    state, key = initial_state(prepared, [0])
    records = []
    hooks = Hooks([lambda record, step: records.append((step, record))])
    (result,) = fit(state, task, cfg.train, Lanes([0], key), hooks)
    assert result.record.status == "diverged"
    assert result.record.message == "loss or gradient became non-finite at step 4"
    assert [step for step, _ in records] == [1, 2, 3, 4]
    assert [r["train/skipped_updates"] for _, r in records] == [1, 2, 3, 4]  # non-finite ones
    assert all(math.isfinite(r["train/param_norm"]) for _, r in records[:3])
    assert not math.isfinite(records[-1][1]["train/param_norm"])
