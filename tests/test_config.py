"""Every preset in conf/ composes into the typed schema and validates; errors are one line."""

import pytest

from cnnlab.config import Config, ModelConfig, closest_key
from cnnlab.errors import ConfigError
from cnnlab.validate import validate
from experiments.hydra_conf import compose_config, conf_dir, to_config

CONF = conf_dir()


def load(*overrides: str) -> Config:
    return to_config(compose_config(list(overrides)))


def load_somewhere(*overrides: str) -> Config:
    """`load`, with a data.path for the image sets that may read one (their shape is known
    without it); an archive's series need none offline, and a folder there must hold them."""
    cfg = load(*overrides)
    return cfg if cfg.data.source == "ucr" else load(*overrides, "data.path=/somewhere")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("preset", options("experiment"))
def test_experiment_presets_compose_and_validate(preset):
    cfg = load_somewhere(f"experiment={preset}")
    recipe = preset.endswith("_ucr")  # a recipe for any archive set names its runs after the set
    assert cfg.name == (f"{cfg.model.name}_{cfg.data.name}" if recipe else preset)
    validate(cfg)


@pytest.mark.parametrize(
    "group, option",
    [(g, o) for g in ("model", "data", "optimizer", "logger", "sweep") for o in options(g)],
)
def test_every_group_option_composes_and_validates(group, option):
    # model=user needs a module, as data=idx needs a folder
    user = (group, option) == ("model", "user")
    needs = ["model._target_=tests.user_nets.TinyNet"] if user else []
    cfg = load_somewhere(f"{group}={option}", *needs)
    validate(cfg)


def test_defaults_are_lenet5_on_fashion_mnist():
    cfg = load()
    assert (cfg.model.name, cfg.data.name) == ("lenet5", "fashion_mnist")
    assert cfg.model.layers == ModelConfig().layers  # the preset writes out the schema's default
    assert [cfg.model.layers[i]["padding"] for i in (0, 3)] == [2, 0]
    assert isinstance(cfg, Config) and cfg.name == "lenet5_fashion_mnist"


def test_classic_lenet5_is_tanh_and_average_pooling():
    cfg = load("model=lenet5_classic")
    assert (cfg.model.activation, cfg.model.pool, cfg.model.depth) == ("tanh", "avg", None)
    assert cfg.model.layers == load().model.layers  # LeNet-5's layers, with every act and pool set


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
    assert "\n" not in line and "model/resnet" in line
    assert "alexnet_lite, all_cnn_c, fcn, lenet5" in line
    with pytest.raises(ConfigError) as info:
        load("model.depht=3")
    assert str(info.value).endswith("did you mean model.depth?")


def test_every_name_a_config_may_choose_has_an_implementation():
    """Each closed set of names is one Enum (cnnlab.config, cnnlab.architecture) that validate
    checks against; every member must key the training code's table, and no table may implement
    a name that validate would refuse."""
    import wandb

    from cnnlab.architecture import Activation
    from cnnlab.config import (
        LoggerMode,
        LossName,
        OptimizerName,
        Precision,
        ScheduleName,
        SeedsStrategy,
    )
    from cnnlab.models.layers import ACTIVATIONS
    from cnnlab.train.losses import LOSSES
    from cnnlab.train.optim import OPTIMIZERS, SCHEDULES
    from cnnlab.train.seeds import STRATEGIES
    from cnnlab.train.step import PRECISIONS

    tables = [(LossName, LOSSES), (OptimizerName, OPTIMIZERS), (ScheduleName, SCHEDULES),
              (Precision, PRECISIONS), (Activation, ACTIVATIONS)]  # fmt: skip
    for names, table in tables:
        assert set(table) == set(names), names.__name__
        assert all(map(callable, table.values())), names.__name__
    # auto is no implementation of its own: choose_strategy resolves it to one of the others
    assert set(STRATEGIES) == set(SeedsStrategy) - {SeedsStrategy.auto}
    for mode in LoggerMode:  # wandb refuses a mode it does not know
        assert wandb.Settings(mode=mode).mode == mode


@pytest.mark.parametrize(
    "key, typo, hint",
    [
        ("optimizer.name", "adamx", "; did you mean adamw? (choose one of: sgd, adamw)"),
        ("optimizer.schedule", "cosin", "; did you mean cosine? (choose one of: constant, cosine,"),
        ("loss.name", "cross_entropi", "; did you mean cross_entropy?"),
        ("train.precision", "bfloat", "; did you mean bfloat16?"),
        ("logger.mode", "ofline", "; did you mean offline?"),
        ("sweep.on_invalid", "refus", "; did you mean refuse?"),
        ("seeds_strategy", "sequental", "; did you mean sequential?"),
        ("seeds_strategy", "grouped", " (choose one of: auto, vmap, sequential, processes)"),
    ],
)
def test_an_unknown_name_is_answered_with_the_closest(key, typo, hint):
    with pytest.raises(ConfigError) as info:
        validate(load(f"{key}={typo}"))
    assert str(info.value).startswith(f"{key}={typo!r} is not known{hint}"), str(info.value)


def test_the_checks_load_without_jax():
    """validate checks a config before JAX loads, which a fresh interpreter confirms."""
    import subprocess
    import sys

    probe = "import sys, cnnlab.validate, cnnlab.geometry; print(sorted({'jax', 'flax', 'optax'} & set(sys.modules)))"  # noqa: E501
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr
