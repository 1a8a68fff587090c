"""Reproducibility: two runs of one config through `cnnlab-train` train bit-identical parameters
on the CPU (summary.json's `params_sha256`, which CI compares); `deterministic=true` sets XLA's
GPU determinism flags, which XLA accepts and which change nothing on the CPU; max pooling gets a
warning where it has no deterministic implementation."""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cnnlab import checkpoint, determinism
from cnnlab.config import Config, ModelConfig
from experiments.train import _start_jax
from tests.conftest import cli, history, needs_fashion_mnist, small_config


@pytest.mark.parametrize(
    "backend, pool, warned",
    [("gpu", "max", True), ("cuda", "max", True), ("gpu", "avg", False), ("cpu", "max", False),
     ("cpu", "avg", False), ("tpu", "max", False)],
)  # fmt: skip
def test_only_max_pooling_on_a_gpu_is_warned_about(backend, pool, warned):
    message = determinism.warning(backend, ModelConfig(pool=pool))
    assert (message is not None) == warned
    if warned:
        assert "max pool" in message and "model.pool=avg" in message


def test_start_jax_adds_the_flags_once_and_keeps_the_others(monkeypatch, capsys):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    cfg = Config(deterministic=True, compilation_cache=None)
    _start_jax(dataclasses.replace(cfg, deterministic=False), multirun=False)
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=1"
    for _ in range(2):  # a second job of a multirun in the same process adds nothing
        _start_jax(cfg, multirun=False)
    assert os.environ["XLA_FLAGS"].split() == [
        "--xla_force_host_platform_device_count=1",
        *determinism.XLA_FLAGS,
    ]
    assert capsys.readouterr().err == ""  # the CPU backend: no max pool warning


@pytest.mark.parametrize("mistyped", [False, True])
def test_xla_accepts_the_flags(mistyped):
    """XLA aborts on a flag it does not know; a mistyped one shows that this test can fail."""
    flags = determinism.with_xla_flags("")
    if mistyped:
        flags = flags.replace("deterministic_ops", "determinstic_ops")
    done = subprocess.run(
        [sys.executable, "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"],
        env={**os.environ, "XLA_FLAGS": flags}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert (done.returncode == 0) != mistyped, done.stderr[-2000:]


def test_params_hash_changes_with_one_bit():
    params = {"conv": {"kernel": np.ones((3, 3), np.float32), "bias": np.zeros(3, np.float32)}}
    flipped = jax.tree.map(np.copy, params)
    flipped["conv"]["kernel"].view(np.uint32)[1, 1] ^= 1  # the last bit of one value
    assert checkpoint.tree_sha256(params) == checkpoint.tree_sha256(jax.tree.map(np.copy, params))
    assert checkpoint.tree_sha256(params) != checkpoint.tree_sha256(flipped)


@needs_fashion_mnist
def test_two_runs_of_one_config_train_bit_identical_parameters(tmp_path):
    """Dropout and augmentation on, so that every source of randomness is exercised; the first
    run fills the compilation cache, the second loads from it and sets deterministic=true, which
    changes nothing on the CPU. Parameters and every logged metric are identical."""
    args = [
        "data.train_limit=640", "data.test_limit=200", "train.epochs=1", "train.batch_size=64",
        "model.dropout=0.3", "data.augment.crop_padding=2", "data.augment.flip=true",
        "logger.mode=disabled", "logger.pictures=false", f"compilation_cache={tmp_path / 'jax'}",
    ]  # fmt: skip
    like = jax.eval_shape(
        functools.partial(_init_params, small_config().model)
    )  # LeNet-5 as the CLI builds it
    hashes = []
    for name, extra in [("a", []), ("b", ["deterministic=true"])]:
        run_dir = tmp_path / name
        done = cli("train", *args, *extra, f"hydra.run.dir={run_dir}")
        assert done.returncode == 0, done.stderr[-3000:]
        assert "warning" not in done.stderr  # no max pool warning on the CPU
        summary = json.loads((run_dir / "summary.json").read_text())
        saved = checkpoint.load_params(run_dir / "checkpoint", like)
        assert summary["params_sha256"] == checkpoint.tree_sha256(jax.device_get(saved))
        hashes.append(summary["params_sha256"])
    assert hashes[0] == hashes[1]
    assert history(tmp_path / "a") == history(tmp_path / "b")  # all but the wall-clock times


def _init_params(model_cfg):
    import jax.numpy as jnp

    from cnnlab.models import build_model

    model = build_model(model_cfg, 10)
    return model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
