"""The oneDNN kernels: built once and cached, a clear reason where they cannot be, and whole
networks that train as with XLA's own convolutions and pooling."""

import os
import re
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnlab import kernels
from cnnlab.config import ModelConfig
from cnnlab.models import build_model
from cnnlab.models.conv import conv2d
from tests.conftest import preset


def test_the_kernels_are_available_on_this_machine():
    # cnnlab depends on the oneDNN wheels on x86-64 Linux, and CI has a C++ compiler: a kernel
    # that stopped compiling must fail here, not fall back to XLA unnoticed.
    assert kernels.available()


def test_the_library_is_built_once_and_then_taken_from_the_cache():
    first = kernels.build()
    built = first.stat().st_mtime_ns
    assert kernels.build() == first and first.stat().st_mtime_ns == built
    assert first.name.startswith("onednn-") and first.suffix == ".so"


@pytest.mark.parametrize(
    "compiler, reason",
    [("no-such-compiler", "no C++ compiler (no-such-compiler"), ("false", "with false failed")],
)
def test_a_missing_or_failing_compiler_is_one_clear_reason(compiler, reason, tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", compiler)
    monkeypatch.setenv("CNNLAB_KERNEL_CACHE", str(tmp_path))  # nothing cached: it must compile
    with pytest.raises(kernels.Unavailable, match=re.escape(reason)):
        kernels.build()
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind


def test_cnnlab_conv_xla_turns_the_kernels_off():
    probe = "from cnnlab import kernels; print(kernels.available())"
    env = dict(os.environ, CNNLAB_CONV="xla", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


NETWORKS = [
    ("lenet5", ModelConfig(padding=[2, 0]), (8, 28, 28, 1)),
    ("alexnet_lite", preset("alexnet_lite", depth=8, norm="batch"), (4, 16, 16, 3)),
]


@pytest.mark.parametrize("name, cfg, shape", NETWORKS, ids=[n[0] for n in NETWORKS])
def test_networks_train_as_with_xla(name, cfg, shape, monkeypatch):
    """Loss, gradients and BatchNorm's statistics of a training step, oneDNN against XLA."""
    model = build_model(cfg, 10)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, 10, shape[0]))
    variables = model.init(jax.random.key(0), x)

    def step(params):
        logits, updates = model.apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(1)},
        )  # fmt: skip
        one_hot = jax.nn.one_hot(labels, 10)
        return -jnp.mean(jnp.sum(one_hot * jax.nn.log_softmax(logits), -1)), updates

    def run():  # traced afresh: the layers pick their formulation at trace time
        return jax.jit(jax.value_and_grad(step, has_aux=True))(variables["params"])

    ours = run()
    jaxpr = str(jax.make_jaxpr(jax.value_and_grad(step, has_aux=True))(variables["params"]))
    assert "cnnlab_conv_backward_weights" in jaxpr and "cnnlab_max_pool_backward" in jaxpr
    monkeypatch.setattr(kernels, "available", lambda: False)
    chex.assert_trees_all_close(ours, run(), atol=2e-5, rtol=2e-4)


def test_several_seeds_under_vmap_match_one_at_a_time():
    """`seeds_strategy=vmap` stacks the seeds' kernels: the custom calls run once per seed."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(3, 4, 9, 9, 2)).astype(np.float32))  # [S, B, H, W, C]
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 2, 5)).astype(np.float32))  # [S, k, k, C, F]
    pads = ((1, 1), (1, 1))
    loss = lambda x, w: jnp.sum(jnp.sin(conv2d(x, w, (1, 1), pads, "onednn")))
    dx, dw = jax.jit(jax.vmap(jax.grad(loss, (0, 1))))(x, w)
    for s in range(3):
        chex.assert_trees_all_close((dx[s], dw[s]), jax.grad(loss, (0, 1))(x[s], w[s]), atol=1e-5)


def test_a_library_that_does_not_load_falls_back_with_one_warning(tmp_path, monkeypatch):
    broken = tmp_path / "onednn-broken.so"
    broken.write_bytes(b"not a shared library")
    monkeypatch.setattr(kernels, "build", lambda: broken)
    with pytest.warns(UserWarning, match="convolutions and pooling by XLA, not oneDNN"):
        assert kernels.available.__wrapped__() is False  # the uncached check
