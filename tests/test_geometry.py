"""Geometry is checked before anything compiles: impossible layouts are rejected with one line and a
working fix, and every layout the check accepts really builds (no false rejections)."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import pytest

from cnnlab import geometry
from cnnlab.config import ModelConfig
from cnnlab.errors import ConfigError, GeometryError
from cnnlab.models import build_model, variables_like
from tests.conftest import preset

LENET5 = preset("lenet5")
ALEXNET_LITE = preset("alexnet_lite")
MNIST, CIFAR = (28, 28, 1), (32, 32, 3)


def xla_out_size(size, kernel, stride, padding):
    """What XLA itself computes for one conv (0 when the window does not fit)."""
    pad = padding.upper() if isinstance(padding, str) else [(padding, padding)] * 2
    out = jax.eval_shape(
        lambda x, w: jax.lax.conv_general_dilated(x, w, (stride, stride), pad),
        jax.ShapeDtypeStruct((1, 1, size, size), jnp.float32),
        jax.ShapeDtypeStruct((1, 1, kernel, kernel), jnp.float32),
    )
    return out.shape[-1]


@pytest.mark.parametrize("padding", ["same", "valid", 0, 1, 2, 3])
def test_output_size_formula_is_xlas(padding):
    for size, kernel, stride in itertools.product(range(1, 13), range(1, 8), range(1, 5)):
        pads = geometry.pads(padding, size, kernel, stride)
        ours = geometry.out_size(size, kernel, stride, pads)
        assert max(ours, 0) == xla_out_size(size, kernel, stride, padding), (size, kernel, stride)
        if isinstance(padding, int):  # the textbook formula
            assert ours == (size + 2 * padding - kernel) // stride + 1


def builds_an_empty_feature_map(cfg, shape) -> bool:
    """Flax without the check: a 0-sized map, or the ZeroDivisionError its initializer hits."""
    model = build_model(cfg, 10)
    try:
        params = variables_like(model, shape)
    except ZeroDivisionError:
        return True
    return any(0 in leaf.shape for leaf in jax.tree.leaves(params))


# (model, overrides, input shape, the layer the message must name)
IMPOSSIBLE = [
    (LENET5, dict(padding="valid", stride=2), MNIST, "pool2"),
    (LENET5, dict(padding="valid", kernel_size=13), MNIST, "conv2"),
    (LENET5, dict(padding="valid", kernel_size=29), MNIST, "conv1"),
    (LENET5, dict(padding=0, kernel_size=[5, 12]), MNIST, "pool2"),
    (LENET5, dict(stride=[1, 10]), MNIST, "pool2"),
    (LENET5, dict(stride=[4, 4]), MNIST, "conv2"),
    (LENET5, dict(padding="same", stride=3, conv_layers=3), MNIST, "pool3"),
    (LENET5, dict(padding="valid", depth=[6, 16, 32]), MNIST, "conv3"),
    (LENET5, dict(padding="same", conv_layers=5), MNIST, "pool5"),
    (LENET5, dict(padding="valid", pool_size=5, pool_stride=5), MNIST, "conv2"),
    (LENET5, dict(padding="valid"), (8, 8, 1), "conv2"),
    (LENET5, dict(padding="valid", kernel_size=7), (20, 20, 1), "pool2"),
    (LENET5, dict(padding="valid", kernel_size=[3, 12]), (24, 24, 3), "conv2"),
    (LENET5, dict(stride=2, padding=1), (16, 16, 1), "pool2"),
    (ALEXNET_LITE, dict(stride=2), CIFAR, "pool3"),
    (ALEXNET_LITE, dict(padding="valid"), CIFAR, "conv4"),
    (ALEXNET_LITE, dict(padding="valid", kernel_size=5), CIFAR, "conv3"),
    (ALEXNET_LITE, dict(stride=[4, 1, 1, 1, 1]), CIFAR, "pool3"),
    (ALEXNET_LITE, dict(kernel_size=[33, 5, 3, 3, 3], padding="valid"), CIFAR, "conv1"),
    (ALEXNET_LITE, dict(pool_size=7, pool_stride=4), CIFAR, "pool3"),
    (ALEXNET_LITE, dict(padding="valid", stride=[1, 2, 1, 1, 1]), CIFAR, "conv3"),
    (ALEXNET_LITE, dict(conv_layers=8, kernel_size=3, padding="valid"), CIFAR, "conv5"),
    (ALEXNET_LITE, dict(depth=[8, 8, 8, 8, 8], padding=[0, 0, 0, 0, 2]), MNIST, "conv4"),
    (ALEXNET_LITE, dict(stride=3), MNIST, "pool2"),
]


@pytest.mark.parametrize("base, change, shape, layer", IMPOSSIBLE)
def test_impossible_geometry_is_rejected_with_a_working_fix(base, change, shape, layer):
    cfg = dataclasses.replace(base, **change)
    with pytest.raises(GeometryError) as info:
        geometry.check(cfg, shape, 10)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{layer} (")
    assert "would output 0x" in message and " input" in message
    assert builds_an_empty_feature_map(cfg, shape)  # the network really is impossible
    # The suggested fix, applied as an override, makes the network valid.
    fix = message.split("fix: ")[1].split(";")[0]
    if fix.startswith("model."):
        for override in fix.split():
            key, value = override.removeprefix("model.").split("=")
            cfg = dataclasses.replace(cfg, **{key: int(value) if value.isdigit() else value})
        geometry.check(cfg, shape, 10)


VALID = [
    (LENET5, {}, MNIST),
    (LENET5, dict(padding="valid"), (32, 32, 1)),
    (LENET5, dict(padding="same", stride=2), MNIST),
    (LENET5, dict(padding="valid", kernel_size=[5, 7]), MNIST),  # 24 -> 12 -> 6 -> 3
    (LENET5, dict(padding="valid", kernel_size=[5, 8]), MNIST),  # ... 12x12 in, 5x5 out, pool 2x2
    (LENET5, dict(padding="same", conv_layers=4), MNIST),  # 28 -> 14 -> 7 -> 3 -> 1
    (LENET5, dict(padding="same", kernel_size=31), MNIST),  # kernel larger than the input is fine
    (LENET5, dict(padding=20, kernel_size=29, stride=3), MNIST),
    (LENET5, dict(padding="valid", stride=[1, 2]), MNIST),  # 24 -> 12 -> 4 -> 2
    (LENET5, dict(depth=[1, 1]), MNIST),
    (LENET5, dict(pool_size=1, pool_stride=1, padding="valid"), MNIST),
    (ALEXNET_LITE, {}, CIFAR),
    (ALEXNET_LITE, {}, MNIST),
    (ALEXNET_LITE, dict(stride=[2, 1, 1, 1, 1]), CIFAR),  # 16 -> 7 -> 3 -> 1
    (ALEXNET_LITE, dict(padding="valid", kernel_size=[3, 3, 3, 1, 1]), CIFAR),  # ... 3 -> 1
    (ALEXNET_LITE, dict(depth=96), CIFAR),
    (ALEXNET_LITE, dict(conv_layers=7, kernel_size=3), CIFAR),
    (ALEXNET_LITE, dict(pool="avg", activation="tanh", pool_size=2), CIFAR),
    (ALEXNET_LITE, dict(padding=1, kernel_size=3, stride=[1, 1, 1, 1, 2]), (64, 48, 3)),
    (ALEXNET_LITE,
     dict(kernel_size=[11, 5, 3, 3, 3], stride=[4, 1, 1, 1, 1], padding=[2, 2, 1, 1, 1]),
     (227, 227, 3)),  # the original AlexNet stem
]  # fmt: skip


@pytest.mark.parametrize("base, change, shape", VALID)
def test_valid_geometry_is_accepted_and_builds(base, change, shape):
    cfg = dataclasses.replace(base, **change)
    rows = geometry.layers(cfg, shape, 10)
    assert all(min(r.out_shape) >= 1 for r in rows)
    logits = jax.eval_shape(
        build_model(cfg, 10).init_with_output, jax.random.key(0), jnp.zeros((1, *shape))
    )[0]
    assert logits.shape == (1, 10)


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(depth=0), "model.depth"),
        (dict(depth=-6), "model.depth"),
        (dict(depth=[6, 0]), "model.depth"),
        (dict(depth="six"), "model.depth"),
        (dict(stride=0), "model.stride"),
        (dict(kernel_size=0), "model.kernel_size"),
        (dict(padding=-1), "model.padding"),
        (dict(padding="full"), "model.padding"),
        (dict(padding=[2, 0, 0]), "model.padding"),
        (dict(conv_layers=0), "model.conv_layers"),
        (dict(dropout=1.0), "model.dropout"),
        (dict(dropout=-0.1), "model.dropout"),
        (dict(activation="gleu"), "model.activation='gleu' is not known; did you mean gelu?"),
        (dict(pool="median"), "model.pool"),
        (dict(pool_size=0), "model.pool_size"),
    ],
)
def test_out_of_range_values_name_their_key(change, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        geometry.check(dataclasses.replace(LENET5, **change), MNIST, 10)


def test_table_has_every_layer_with_totals():
    text = geometry.format_table(geometry.layers(LENET5, MNIST, 10), "lenet5")
    lines = text.splitlines()
    assert lines[0] == "lenet5"
    names = [line.split()[0] for line in lines[3:-2]]
    assert names == [
        "input", "conv1", "act1", "pool1", "conv2", "act2", "pool2", "flatten1",
        "dense1", "act3", "dense2", "act4", "logits",
    ]  # fmt: skip
    assert "28 x 28 x 6" in text and "5 x 5 x 16" in text and "16x16" in text
    assert lines[-1].split()[:2] == ["total", "61,706"]
    assert geometry.summarize(geometry.layers(LENET5, MNIST, 10)) == {
        "params": 61_706, "macs": 416_520, "flops": 833_040,
    }  # fmt: skip
