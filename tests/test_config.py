"""Every preset in conf/ composes into the typed schema and validates; errors are one line."""

import pytest

from cnnlab.config import Config, closest_key
from cnnlab.errors import ConfigError
from cnnlab.validate import validate
from experiments.hydra_conf import compose_config, conf_dir, to_config

CONF = conf_dir()


def load(*overrides: str) -> Config:
    return to_config(compose_config(list(overrides)))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("preset", options("experiment"))
def test_experiment_presets_compose_and_validate(preset):
    cfg = load(f"experiment={preset}", "data.path=/somewhere")
    assert cfg.name == preset
    validate(cfg)


@pytest.mark.parametrize(
    "group, option",
    [(g, o) for g in ("model", "data", "optimizer", "logger", "sweep") for o in options(g)],
)
def test_every_group_option_composes_and_validates(group, option):
    cfg = load(f"{group}={option}", "data.path=/somewhere")
    validate(cfg)


def test_defaults_are_lenet5_on_fashion_mnist():
    cfg = load()
    assert (cfg.model.name, cfg.data.name, cfg.model.padding) == ("lenet5", "fashion_mnist", [2, 0])
    assert isinstance(cfg, Config) and cfg.name == "lenet5_fashion_mnist"


def test_classic_lenet5_is_tanh_and_average_pooling():
    cfg = load("model=lenet5_classic")
    assert (cfg.model.activation, cfg.model.pool, cfg.model.depth) == ("tanh", "avg", 6)


def test_sweepable_overrides_reach_the_model():
    cfg = load("model.depth=12", "model.stride=2", "model.padding=valid", "model.conv_layers=3")
    assert (cfg.model.depth, cfg.model.stride, cfg.model.padding) == (12, 2, "valid")
    cfg = load("model.depth=[4,8]", "model.padding=[same,1]")
    assert cfg.model.depth == [4, 8] and cfg.model.padding == ["same", 1]


def test_plus_typos_are_caught_with_the_closest_key():
    with pytest.raises(ConfigError, match=r"model\.dpeth; did you mean model\.depth\?"):
        load("+model.dpeth=3")
    with pytest.raises(ConfigError, match=r"unknown config key sed; did you mean seed\?"):
        load("+sed=3")
    assert closest_key("optimizer.weight_decy") == "optimizer.weight_decay"
    assert closest_key("nothing.like.this") is None


def test_unset_required_values_are_named():
    with pytest.raises(ConfigError, match=r"data\.path is required"):
        validate(load("data=idx"))


def test_hydra_errors_condense_to_one_line():
    with pytest.raises(ConfigError) as info:
        load("model=resnet")
    line = str(info.value)
    assert "\n" not in line and "model/resnet" in line and "alexnet_lite, all_cnn_c, lenet5" in line
    with pytest.raises(ConfigError) as info:
        load("model.depht=3")
    assert str(info.value).endswith("did you mean model.depth?")


def test_the_checks_name_what_the_code_implements_and_load_without_jax():
    """validate and architecture list the names the training code's tables hold, so that they can
    check a config before JAX loads, which a fresh interpreter confirms."""
    import subprocess
    import sys

    from cnnlab import architecture
    from cnnlab import validate as checks
    from cnnlab.models import MODELS
    from cnnlab.models.layers import ACTIVATIONS, POOLS
    from cnnlab.train.losses import LOSSES
    from cnnlab.train.optim import OPTIMIZERS, SCHEDULES
    from cnnlab.train.step import PRECISIONS

    assert tuple(LOSSES) == checks.LOSSES and tuple(PRECISIONS) == checks.PRECISIONS
    assert tuple(OPTIMIZERS) == checks.OPTIMIZERS and tuple(SCHEDULES) == checks.SCHEDULES
    assert tuple(MODELS) == tuple(architecture.FAMILIES)
    assert tuple(ACTIVATIONS) == architecture.ACTIVATIONS and tuple(POOLS) == architecture.POOLS
    probe = "import sys, cnnlab.validate, cnnlab.geometry; print(sorted({'jax', 'flax', 'optax'} & set(sys.modules)))"  # noqa: E501
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr
