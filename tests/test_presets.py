"""The All-CNN-C and ResNet-20 presets (conf/model/): composed through Hydra as a user gets them,
their parameter counts pinned in the geometry table and in Flax's real parameters, their shapes
computed by abstract evaluation (nothing runs)."""

import jax
import jax.numpy as jnp
import pytest

from cnnlab import geometry
from cnnlab.errors import GeometryError
from cnnlab.models import build_model, resolve, variables_like
from experiments.hydra_conf import compose_config, to_config

CIFAR = (32, 32, 3)


def preset(name: str, *overrides: str):
    """The ModelConfig of `model=<name>` with `overrides`, as cnnlab-inspect composes it."""
    return to_config(compose_config([f"model={name}", "data=cifar10", *overrides])).model


def count(tree) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(tree))


def logits_shape(cfg, shape: tuple[int, ...], batch: int = 4) -> tuple[int, ...]:
    """The logits' shape for a [batch, *shape] input, by abstract evaluation."""
    model = build_model(cfg, 10)
    variables = variables_like(model, shape)
    x = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
    return jax.eval_shape(model.apply, variables, x).shape


def shortcuts(params: dict) -> list[str]:
    """The residual blocks of a Flax parameter tree that project their shortcut."""
    return sorted(name for name, sub in params.items() if "shortcut" in sub)


@pytest.mark.parametrize(
    "name, overrides, expected",
    [
        # 3x3 convs 3-32-32-32-64-64-64-64, a 1x1 conv 64-64, the dense 64-10
        ("all_cnn_c", [], 896 + 2 * 9_248 + 18_496 + 3 * 36_928 + 4_160 + 650),
        # the paper's widths 96 and 192: its own 1x1 conv to 10 classes is our logits layer
        ("all_cnn_c", ["model.depth=96"], 1_369_738),
        # He et al.'s 0.27M (option A: 269,722) plus the two 1x1 projections with BatchNorm
        ("resnet20", [], 269_722 + (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)),
    ],
)
def test_parameter_counts_are_pinned_in_the_table_and_in_flax(name, overrides, expected):
    cfg = preset(name, *overrides)
    assert cfg.name == name
    assert geometry.summarize(geometry.layers(cfg, CIFAR, 10))["params"] == expected
    assert count(variables_like(build_model(cfg, 10), CIFAR)["params"]) == expected


@pytest.mark.parametrize("name", ["all_cnn_c", "resnet20"])
def test_presets_give_one_logit_per_class_and_every_table_row_is_the_modules(name):
    cfg = preset(name)
    assert logits_shape(cfg, CIFAR) == (4, 10)
    rows = {r.name: r.params for r in geometry.layers(cfg, CIFAR, 10)}
    params = variables_like(build_model(cfg, 10), CIFAR)["params"]
    per_layer = {}  # the Flax tree's layers as the table names them: conv1, res4/shortcut_norm
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        layer = "/".join(key.key for key in path[:-1])
        per_layer[layer] = per_layer.get(layer, 0) + leaf.size
    assert per_layer == {layer: n for layer, n in rows.items() if n}


def test_resnet20_is_he_et_al_s_cifar_net():
    cfg = preset("resnet20")
    arch = resolve(cfg)
    widths = [conv.features for conv in arch.convs]
    assert widths == [16] * 7 + [32] * 6 + [64] * 6  # 6n + 1 convs, n = 3, and the logits: 20
    assert [conv.stride for conv in arch.convs].count(2) == 2
    assert not any(conv.bias for conv in arch.convs)
    rows = {r.name: r for r in geometry.layers(cfg, CIFAR, 10)}
    sides = [rows[f"res{i}"].out_shape for i in (3, 6, 9)]  # the end of each stage
    assert sides == [(32, 32, 16), (16, 16, 32), (8, 8, 64)]
    params = variables_like(build_model(cfg, 10), CIFAR)["params"]
    assert shortcuts(params) == ["res4", "res7"]  # where the shape changes, option B
    assert params["res7"]["shortcut"]["kernel"].shape == (1, 1, 32, 64)
    assert "batch_stats" in variables_like(build_model(cfg, 10), CIFAR)


def test_overrides_reach_into_a_presets_layers():
    """`cnnlab-inspect model=resnet20 model.layers.0.conv=32`: the stem widens, so the first
    block, whose branch keeps 16 filters, projects its shortcut too."""
    cfg = preset("resnet20", "model.layers.0.conv=32")
    assert [conv.features for conv in resolve(cfg).convs][:2] == [32, 16]
    params = variables_like(build_model(cfg, 10), CIFAR)["params"]
    assert shortcuts(params) == ["res1", "res4", "res7"]
    assert params["res1"]["shortcut"]["kernel"].shape == (1, 1, 32, 16)
    assert logits_shape(cfg, CIFAR) == (4, 10)


def test_all_cnn_c_takes_larger_inputs_through_its_global_average():
    cfg = preset("all_cnn_c")
    rows = geometry.layers(cfg, (64, 64, 3), 10)
    before_pool = next(i for i, r in enumerate(rows) if r.kind == "global_pool") - 1
    assert rows[before_pool].out_shape == (14, 14, 64)  # 64 -> 32 -> 16 -> 14 (valid 3x3)
    assert geometry.summarize(rows)["params"] == 153_482  # the same weights as on 32x32
    assert logits_shape(cfg, (64, 64, 3), batch=2) == (2, 10)


def test_all_cnn_c_names_the_smallest_input_it_takes():
    cfg = preset("all_cnn_c")
    # 9 -> 5 -> 3 after the two stride-2 convs leaves the valid 3x3 conv a 1x1 map; 8 -> 4 -> 2
    # leaves it nothing
    rows = {r.name: r for r in geometry.layers(cfg, (9, 9, 3), 10)}
    assert rows["conv7"].out_shape == (1, 1, 64)
    with pytest.raises(GeometryError, match=r"conv7 .*it takes inputs from 9x9x3 up"):
        geometry.layers(cfg, (8, 8, 3), 10)
