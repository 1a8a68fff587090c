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


# Nets of every kind: residual blocks (ResNet-20), a global-pool head (All-CNN-C, a small net
# written on the spot), and 1-D series. (model, overrides, input shape, the message's start)
RESNET20, ALL_CNN_C = preset("resnet20"), preset("all_cnn_c")
GAP_NET = ModelConfig(
    name="gap", layers=[{"conv": 8, "kernel": 3}, "relu", {"pool": "max", "window": 2},
                        {"conv": 16, "kernel": 3, "padding": "valid"}, "relu", "global_pool"],
)  # fmt: skip
CANNOT_ADD = "res1 (residual block) cannot add its branches: the layers map"
IMPOSSIBLE_KINDS = [
    (RESNET20, dict(padding="valid"), CIFAR, f"{CANNOT_ADD} 30x30x16 to 26x26x16"),
    (RESNET20, dict(padding=0), (16, 16, 3), f"{CANNOT_ADD} 14x14x16 to 10x10x16"),
    (RESNET20, dict(depth=[16, 8] + [16] * 17, padding="valid"), CIFAR, CANNOT_ADD),
    (RESNET20, dict(kernel_size=9, padding="valid"), CIFAR, "res2/conv1 (conv 9x9, stride 1"),
    (ALL_CNN_C, {}, (8, 8, 3), "conv7 (conv 3x3, stride 1, pad 0) gets a 2x2x64 input"),
    (ALL_CNN_C, {}, (5, 5, 3), "conv7 (conv 3x3, stride 1, pad 0) gets a 2x2x64 input"),
    (ALL_CNN_C, dict(stride=2), CIFAR, "conv7 (conv 3x3, stride 2, pad 0) gets a 1x1x64"),
    (ALL_CNN_C, dict(kernel_size=5, padding="valid"), CIFAR, "conv6 (conv 5x5, stride 2, pad 0)"),
    (GAP_NET, {}, (5, 5, 1), "conv2 (conv 3x3, stride 1, pad 0) gets a 2x2x8 input"),
    (GAP_NET, dict(kernel_size=4), (4, 4, 1), "conv2 (conv 4x4, stride 1, pad 0) gets a 2x2x8"),
    (GAP_NET, {}, (5, 1), "conv2 (conv 3, stride 1, pad 0) gets a 2x8 input and would output 0"),
    (GAP_NET, dict(kernel_size=50, padding="valid"), (40, 2), "conv1 (conv 50, stride 1, pad 0)"),
    (GAP_NET, dict(pool_size=41), (40, 2), "pool1 (max pool 41, stride 41) after conv1 gets"),
]  # fmt: skip


@pytest.mark.parametrize("base, change, shape, start", IMPOSSIBLE_KINDS)
def test_impossible_nets_of_every_kind_are_refused_in_one_line(base, change, shape, start):
    """Refused by the walk over the layers, which imports nothing of JAX; JAX itself would build
    an empty map or fail in the middle of tracing."""
    cfg = dataclasses.replace(base, **change)
    with pytest.raises(GeometryError) as info:
        geometry.check(cfg, shape, 10)
    message = str(info.value)
    assert message.startswith(start) and "\n" not in message, message
    smallest = geometry.smallest_input(geometry.resolve(cfg), shape, 10)
    if smallest is not None:  # the smallest input that fits really fits, one pixel less does not
        size = "x".join(map(str, smallest))  # a series' by its length alone
        words = f"series of length {smallest[0]}" if len(shape) == 2 else f"inputs from {size}"
        assert f"it takes {words} up" in message
        geometry.check(cfg, smallest, 10)
        with pytest.raises(GeometryError):
            geometry.check(cfg, (smallest[0] - 1,) * (len(shape) - 1) + shape[-1:], 10)


VALID_KINDS = [
    (RESNET20, {}, CIFAR),
    (RESNET20, {}, (1, 1, 3)),  # every conv pads: a 1x1 map stays 1x1
    (RESNET20, dict(stride=[1, 3] + [1] * 17), CIFAR),  # a stride-3 projection
    (RESNET20, dict(padding="same"), (33, 33, 3)),  # odd sides: ceil(33 / 2) both ways
    (RESNET20, dict(depth=8), (64, 40, 3)),
    (ALL_CNN_C, {}, (9, 9, 3)),
    (ALL_CNN_C, {}, (64, 48, 3)),
    (ALL_CNN_C, dict(padding="valid"), CIFAR),
    (GAP_NET, dict(pool_size=9), MNIST),
    (GAP_NET, dict(stride=[1, 8]), (6, 1)),
    (GAP_NET, {}, (6, 1)),
    (GAP_NET, dict(norm="batch", activation="gelu"), (100, 3)),
]


@pytest.mark.parametrize("base, change, shape", VALID_KINDS)
def test_valid_nets_of_every_kind_are_accepted_and_build(base, change, shape):
    cfg = dataclasses.replace(base, **change)
    rows = geometry.layers(cfg, shape, 10)
    model = build_model(cfg, 10)
    variables = variables_like(model, shape)
    x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
    assert jax.eval_shape(model.apply, variables, x).shape == (2, 10)
    assert sum(leaf.size for leaf in jax.tree.leaves(variables["params"])) == sum(
        r.params for r in rows
    )
