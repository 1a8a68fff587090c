"""cnnlab.compiler: the CPU compile options, what overrides them, and that they change no value."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnlab import compiler
from cnnlab.config import AugmentConfig, OptimizerConfig
from cnnlab.models import build_model
from cnnlab.parallel import data_mesh
from cnnlab.train.losses import LOSSES
from cnnlab.train.optim import build_optimizer
from cnnlab.train.step import StepSettings, create_state, make_train_step
from tests.conftest import preset


@pytest.fixture
def fresh_options():
    compiler._options.cache_clear()
    yield
    compiler._options.cache_clear()


def test_cpu_steps_compile_with_the_elemental_emitters(fresh_options, monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert compiler.compiler_options(data_mesh()) == {"xla_cpu_use_fusion_emitters": False}
    assert compiler._options("gpu") == {} and compiler._options("tpu") == {}


def test_the_initialization_compiles_without_llvm_optimizations(fresh_options, monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert compiler.compiler_options(data_mesh(), once=True) == {
        "xla_cpu_use_fusion_emitters": False, "xla_backend_optimization_level": 0,
    }  # fmt: skip
    assert compiler._options("gpu", once=True) == {}


def test_an_xla_flag_naming_the_option_wins(fresh_options, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1 "
                       "--xla_cpu_use_fusion_emitters=true")  # fmt: skip
    assert compiler.compiler_options(data_mesh()) == {}


def test_an_option_this_xla_does_not_know_is_left_out(fresh_options, monkeypatch):
    assert compiler.supported({"xla_cpu_use_fusion_emitters": False})
    assert not compiler.supported({"xla_cpu_no_such_option": False})
    monkeypatch.setattr(compiler, "CPU_OPTIONS", {"xla_cpu_no_such_option": False})
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert compiler.compiler_options(data_mesh()) == {}


@pytest.mark.parametrize("model", ["lenet5", "alexnet_lite"])
def test_the_options_change_no_value_of_a_training_step(model, fresh_options, monkeypatch):
    """Three augmented steps of each model compiled with cnnlab's options and with XLA's defaults:
    LeNet-5's end bit-identical, AlexNet-lite's with BatchNorm within float32 rounding (a
    reduction is emitted differently). A control compiled with fast math must differ from XLA's
    defaults, so the options really reach the step's compilation."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    cfg = preset(model, norm="batch" if model == "alexnet_lite" else "none")
    net = build_model(cfg, 10)
    tx, _ = build_optimizer(OptimizerConfig(), 10, 1)
    rng = np.random.default_rng(0)
    shape = (32, 32, 3) if model == "alexnet_lite" else (28, 28, 1)
    images = jnp.asarray(rng.integers(0, 256, (64, *shape), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, 64, dtype=np.int32))
    mean, std = np.full(shape[-1], 120.0, np.float32), np.full(shape[-1], 60.0, np.float32)
    settings = StepSettings(LOSSES["cross_entropy"], 0.0, mean, std, AugmentConfig(2, True))
    states = []
    arms = (
        compiler.CPU_OPTIONS,
        {},
        {"xla_cpu_enable_fast_math": True},
    )  # cnnlab's, XLA's, control
    for options in arms:
        monkeypatch.setattr(compiler, "CPU_OPTIONS", options)
        compiler._options.cache_clear()
        assert compiler.compiler_options(data_mesh()) == options
        train_step = make_train_step(settings)
        state = create_state(net, tx, shape, jax.random.key(0))
        for i in range(3):
            idx = np.arange(16 * i, 16 * i + 16, dtype=np.int32)
            state, _ = train_step(state, images, labels, idx, jax.random.key(1))
        states.append(jax.device_get(state))
    cnnlab, xla, control = states
    # float32 rounding: an ulp of the O(1) values; the biases before BatchNorm are ~1e-9 noise
    close = functools.partial(chex.assert_trees_all_close, rtol=1e-6, atol=1e-7)
    same = chex.assert_trees_all_equal if model == "lenet5" else close
    same(cnnlab.params, xla.params)
    same(cnnlab.batch_stats, xla.batch_stats)
    equal = jax.tree.leaves(jax.tree.map(np.array_equal, control.params, xla.params))
    assert not all(equal), "the control's options did not reach the compiled step"
