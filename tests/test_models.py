"""Shapes and pinned parameter counts of the model variants, checked against the geometry table."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import pytest

from cnnlab import geometry
from cnnlab.architecture import Conv, Flatten, Pool
from cnnlab.config import ModelConfig
from cnnlab.errors import ConfigError
from cnnlab.models import build_model, resolve, variables_like
from tests.conftest import preset

LENET5_FMNIST = preset("lenet5")  # padding 2 in C1 and none in C3, as on 28x28 inputs
LENET5 = dataclasses.replace(LENET5_FMNIST, padding="same")
ALEXNET_LITE = preset("alexnet_lite")


def real_params(cfg: ModelConfig, shape, num_classes=10):
    model = build_model(cfg, num_classes)
    return variables_like(model, shape)["params"]


def count(tree) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize(
    "cfg, shape, expected",
    [
        (dataclasses.replace(LENET5, padding="valid"), (32, 32, 1), 61_706),  # LeCun et al. 1998
        (LENET5_FMNIST, (28, 28, 1), 61_706),  # 28x28 padded by 2 in conv1 is the same network
        (dataclasses.replace(LENET5, padding="valid"), (28, 28, 1), 44_426),
        (LENET5, (28, 28, 1), 107_786),  # "same" everywhere: 7x7x16 = 784 inputs to C5
        (dataclasses.replace(LENET5_FMNIST, depth=12), (28, 28, 1), 2 * 156 + 12 * 25 * 32 + 32
         + 400 * 2 * 120 + 120 + 10_164 + 850),
        (ALEXNET_LITE, (32, 32, 3), 797_290),
        (dataclasses.replace(ALEXNET_LITE, depth=96), (32, 32, 3), 5_167_498),  # AlexNet widths
        # GroupNorm adds a scale and a bias per filter: 2 * (24 + 64 + 96 + 96 + 64)
        (dataclasses.replace(ALEXNET_LITE, norm="group"), (32, 32, 3), 797_290 + 688),
        # BatchNorm's trainable part is the same; its running statistics are not parameters
        (dataclasses.replace(ALEXNET_LITE, norm="batch"), (32, 32, 3), 797_290 + 688),
    ],
)  # fmt: skip
def test_parameter_counts_are_pinned(cfg, shape, expected):
    assert count(real_params(cfg, shape)) == expected
    assert geometry.summarize(geometry.layers(cfg, shape, 10))["params"] == expected


def test_depth_scales_widths_in_the_architecture_proportions():
    assert [c.features for c in resolve(LENET5).convs] == [6, 16]
    assert [c.features for c in resolve(dataclasses.replace(LENET5, depth=12)).convs] == [12, 32]
    assert [c.features for c in resolve(dataclasses.replace(LENET5, depth=3)).convs] == [3, 8]
    assert [c.features for c in resolve(ALEXNET_LITE).convs] == [24, 64, 96, 96, 64]
    alexnet = dataclasses.replace(ALEXNET_LITE, depth=96)
    assert [c.features for c in resolve(alexnet).convs] == [96, 256, 384, 384, 256]


def pooled(cfg: ModelConfig) -> list[bool]:
    """For each conv: whether a pool follows it before the next conv or the flatten."""
    out = []
    for layer in resolve(cfg).layers:
        if isinstance(layer, Conv):
            out.append(False)
        elif isinstance(layer, Flatten):
            break
        elif isinstance(layer, Pool):
            out[-1] = True
    return out


def test_per_layer_lists_and_conv_layers():
    cfg = dataclasses.replace(LENET5, depth=[4, 8, 16], conv_layers=3)
    arch = resolve(cfg)
    assert [c.features for c in arch.convs] == [4, 8, 16]
    cfg = dataclasses.replace(LENET5, conv_layers=3, stride=[1, 1, 2])
    assert [(c.features, c.stride) for c in resolve(cfg).convs] == [(6, 1), (16, 1), (16, 2)]
    assert pooled(cfg) == [True, True, True]  # LeNet-5 pools after every conv, whatever the count
    # AlexNet-lite pools after conv1, conv2 and the last conv, whatever the count
    assert pooled(ALEXNET_LITE) == [True, True, False, False, True]
    six = dataclasses.replace(ALEXNET_LITE, conv_layers=6)
    assert pooled(six) == [True, True, False, False, False, True]
    assert [c.features for c in resolve(six).convs] == [24, 64, 96, 96, 64, 64]
    four = dataclasses.replace(ALEXNET_LITE, conv_layers=4)
    assert pooled(four) == [True, True, False, True]
    assert [(c.features, c.kernel) for c in resolve(four).convs] == [(24, 5), (64, 5), (96, 3),
                                                                      (96, 3)]  # fmt: skip
    assert pooled(dataclasses.replace(ALEXNET_LITE, conv_layers=1)) == [True]


VARIANTS = [
    (LENET5_FMNIST, (28, 28, 1)),
    (dataclasses.replace(LENET5, padding="valid", stride=[1, 2]), (32, 32, 1)),
    (dataclasses.replace(LENET5, depth=[3, 5, 7], padding=[2, 1, "same"], kernel_size=3),
     (28, 28, 1)),
    (dataclasses.replace(LENET5, activation="tanh", pool="avg", padding=[1, 0]), (30, 26, 3)),
    (ALEXNET_LITE, (32, 32, 3)),
    (dataclasses.replace(ALEXNET_LITE, stride=[2, 1, 1, 1, 1], padding=[0, 1, 1, 1, 1],
                         kernel_size=3),
     (32, 32, 3)),
    (dataclasses.replace(ALEXNET_LITE, conv_layers=3, kernel_size=3, depth=8), (28, 28, 1)),
    (dataclasses.replace(LENET5_FMNIST, norm="group", norm_groups=2), (28, 28, 1)),
    (dataclasses.replace(ALEXNET_LITE, norm="group", padding=[4, "same", 1, 1, 1]), (28, 28, 1)),
    (dataclasses.replace(ALEXNET_LITE, norm="batch", padding=[4, "same", 1, 1, 1]), (28, 28, 1)),
]  # fmt: skip


@pytest.mark.parametrize("cfg, shape", VARIANTS)
def test_geometry_table_matches_the_real_network(cfg, shape):
    """Every conv output shape and every layer's parameter count in the table is the model's."""
    rows = {r.name: r for r in geometry.layers(cfg, shape, 10)}
    model = build_model(cfg, 10)
    x = jnp.zeros((2, *shape))
    variables = model.init(jax.random.key(0), x)
    logits, state = model.apply(variables, x, capture_intermediates=True)
    chex.assert_shape(logits, (2, 10))
    for name, params in variables["params"].items():
        assert count(params) == rows[name].params, name
        (out,) = state["intermediates"][name]["__call__"]
        assert out.shape[1:] == rows[name].out_shape, name


def test_dropout_is_active_only_in_training():
    model = build_model(ALEXNET_LITE, 10)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    variables = model.init(jax.random.key(0), x)
    eval_a, eval_b = model.apply(variables, x), model.apply(variables, x)
    chex.assert_trees_all_equal(eval_a, eval_b)
    train_a = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    train_b = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(3)})
    assert not jnp.allclose(train_a, train_b)


def test_group_norm_normalizes_each_example_on_its_own():
    cfg = dataclasses.replace(LENET5_FMNIST, norm="group", norm_groups=2)
    model = build_model(cfg, 10)
    x = jax.random.normal(jax.random.key(1), (3, 28, 28, 1))
    variables = model.init(jax.random.key(0), x)
    _, state = model.apply(variables, x, capture_intermediates=True)
    normed = state["intermediates"]["norm1"]["__call__"][0]  # [3, 28, 28, 6], scale 1, bias 0
    groups = normed.reshape(3, 28, 28, 2, 3)  # each example's 2 groups of 3 channels
    chex.assert_trees_all_close(groups.mean((1, 2, 4)), jnp.zeros((3, 2)), atol=1e-4)
    chex.assert_trees_all_close(groups.std((1, 2, 4)), jnp.ones((3, 2)), atol=1e-3)
    # no batch statistics: an example's logits do not depend on the rest of its batch
    alone = model.apply(variables, x[:1], train=True, rngs={"dropout": jax.random.key(2)})
    batch = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    chex.assert_trees_all_close(alone[0], batch[0], atol=1e-5)


def test_batch_norm_uses_the_batch_in_training_and_running_averages_in_evaluation():
    cfg = dataclasses.replace(LENET5_FMNIST, norm="batch")
    model = build_model(cfg, 10)
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(1), (16, 28, 28, 1))
    variables = model.init(jax.random.key(0), x)
    stats = variables["batch_stats"]["norm1"]  # mean and var [6]: 0 and 1 before training
    chex.assert_trees_all_equal(stats["mean"], jnp.zeros(6))
    (_, state) = model.apply(
        variables, x, train=True, mutable=["batch_stats", "intermediates"],
        capture_intermediates=True,
    )  # fmt: skip
    conv1 = state["intermediates"]["conv1"]["__call__"][0]  # [16, 28, 28, 6]
    normed = state["intermediates"]["norm1"]["__call__"][0]  # over the batch: mean 0, std 1
    chex.assert_trees_all_close(normed.mean((0, 1, 2)), jnp.zeros(6), atol=1e-4)
    chex.assert_trees_all_close(normed.std((0, 1, 2)), jnp.ones(6), atol=1e-3)
    # the running mean moved a tenth of the way (momentum 0.9) to the batch's
    new = state["batch_stats"]["norm1"]
    chex.assert_trees_all_close(new["mean"], 0.1 * conv1.mean((0, 1, 2)), atol=1e-5)
    # evaluation reads the running statistics: an example's logits do not depend on its batch
    alone = model.apply({**variables, "batch_stats": state["batch_stats"]}, x[:1])
    batch = model.apply({**variables, "batch_stats": state["batch_stats"]}, x)
    chex.assert_trees_all_close(alone[0], batch[0], atol=1e-5)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"norm": "instance"}, "model.norm='instance' is not known"),
        ({"norm": "group", "norm_groups": 0}, "norm_groups=0 is invalid: use a whole number"),
        ({"norm": "group", "norm_groups": 4}, "does not divide conv1's 6 filters"),
    ],
)
def test_bad_normalization_settings_say_what_would_work(changes, message):
    with pytest.raises(ConfigError, match=message) as error:
        resolve(dataclasses.replace(LENET5_FMNIST, **changes))
    if "divide" in message:
        assert "[1, 2]" in str(error.value)  # the groups that divide both 6 and 16
