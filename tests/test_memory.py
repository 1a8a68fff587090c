"""The memory estimate of a training step: its parts for LeNet-5 worked out by hand, the dataset
in its own dtype (float32 series as well as uint8 images), the refusal of a step that cannot fit,
and no refusal of the shipped presets."""

import dataclasses

import pytest

from cnnlab import geometry, memory
from cnnlab.config import Config, DataConfig, ModelConfig, OptimizerConfig, TrainConfig
from cnnlab.data import data_shape, load_dataset
from cnnlab.errors import ConfigError
from experiments.hydra_conf import compose_config, conf_dir, to_config

# LeNet-5 on Fashion-MNIST, as conf/model/lenet5.yaml: 61,706 float32 parameters; the values one
# example keeps for the backward pass, layer by layer: input 28x28x1, conv1 and its relu 28x28x6,
# pool1 14x14x6, conv2 and its relu 10x10x16, pool2 5x5x16 (flatten is a view of it), dense 120 and
# 84 and their relus, logits 10.
PARAMS = 61_706
PER_EXAMPLE = 784 + 2 * 4704 + 1176 + 2 * 1600 + 400 + 2 * 120 + 2 * 84 + 10
LENET5 = Config(
    model=ModelConfig(padding=[2, 0]),
    data=DataConfig(train_limit=1000, test_limit=500),  # val_fraction 0.1 of 60,000: 6,000
    optimizer=OptimizerConfig(name="sgd", momentum=0.9),
    train=TrainConfig(batch_size=32),
)


def lenet5_estimate(cfg: Config = LENET5) -> memory.Estimate:
    rows = geometry.layers(cfg.model, (28, 28, 1), 10)
    return memory.estimate(cfg, rows, memory.dataset_bytes(cfg.data, data_shape(cfg.data)))


def test_lenet5_estimate_parts_match_the_hand_count():
    est = lenet5_estimate()
    assert est.params == PARAMS * 4
    assert est.optimizer == PARAMS * 4  # SGD's momentum: one slot
    assert est.gradients == PARAMS * 4
    assert est.activations == 32 * PER_EXAMPLE * 4  # float32
    assert est.dataset == (1000 + 6000 + 500) * (28 * 28 * 1 + 4)  # uint8 images, int32 labels
    assert est.total == 3 * PARAMS * 4 + 32 * PER_EXAMPLE * 4 + 7500 * 788
    assert "at batch 32" in est.text() and "1 slot)" in est.text()


@pytest.mark.parametrize(
    "optimizer, slots",
    [
        (OptimizerConfig(name="sgd", momentum=0.0), 0),
        (OptimizerConfig(name="sgd", momentum=0.9), 1),
        (OptimizerConfig(name="adamw"), 2),
    ],
)
def test_optimizer_state_follows_the_optimizer(optimizer, slots):
    est = lenet5_estimate(dataclasses.replace(LENET5, optimizer=optimizer))
    assert est.optimizer == slots * PARAMS * 4 and est.slots == slots


def test_bfloat16_halves_activations_and_seeds_multiply_the_model():
    train = dataclasses.replace(LENET5.train, precision="bfloat16")
    half = lenet5_estimate(dataclasses.replace(LENET5, train=train))
    assert half.activations == 32 * PER_EXAMPLE * 2
    three = lenet5_estimate(dataclasses.replace(LENET5, seeds=[0, 1, 2]))
    assert three.params == 3 * PARAMS * 4 and three.dataset == lenet5_estimate().dataset
    one_at_a_time = dataclasses.replace(LENET5, seeds=[0, 1, 2], seeds_strategy="sequential")
    assert lenet5_estimate(one_at_a_time).params == PARAMS * 4


def test_a_step_over_the_available_memory_is_refused_with_its_figures():
    est = lenet5_estimate()
    memory.check(est, est.total)  # exactly enough: accepted
    memory.check(est, None)  # unknown: accepted
    with pytest.raises(ConfigError) as refused:
        memory.check(est, est.total - 1, "gpu device 0")
    message = str(refused.value)
    assert "\n" not in message and "gpu device 0 has" in message
    assert memory.size(est.total) in message and "lower train.batch_size" in message


def test_host_memory_is_read_without_jax():
    available = memory.host_available()
    assert available is not None and 10**8 < available < 10**14


def presets() -> list[str]:
    return sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))


def test_series_count_as_float32_from_their_files_as_loaded():
    """GunPoint's 50 + 150 series of 150 steps, 1 channel: float32 (4 bytes a value, 4x what the
    uint8 count of images gave), as `load_dataset` holds them, known before they are read."""
    data = DataConfig(name="GunPoint", source="ucr", normalize="series", val_fraction=0.1)
    shape = data_shape(data)
    assert (shape.example_shape, shape.num_classes) == ((150, 1), 2)
    assert (shape.train, shape.test) == (50, 150)
    assert memory.dataset_bytes(data, shape) == (50 + 150) * (150 * 4 + 4)
    assert memory.dataset_bytes(data, shape) == memory.loaded_bytes(load_dataset(data))
    limited = DataConfig(name="GunPoint", source="ucr", normalize="series", test_limit=10)
    assert memory.dataset_bytes(limited, shape) == (50 + 10) * (150 * 4 + 4)


def test_padded_series_hold_their_lengths_too():
    """JapaneseVowels: 12 channels, unequal lengths padded to the longest, each with its length."""
    data = DataConfig(name="JapaneseVowels", source="ucr", normalize="series", val_fraction=0.0)
    shape, loaded = data_shape(data), load_dataset(data)
    assert shape.padded and shape.example_shape == loaded.image_shape
    assert shape.num_classes == loaded.num_classes
    assert memory.dataset_bytes(data, shape) == memory.loaded_bytes(loaded)


@pytest.mark.parametrize("preset", presets())
def test_shipped_presets_need_well_under_a_laptops_memory(preset):
    overrides = [f"experiment={preset}", "data.path=/somewhere"]
    cfg = to_config(compose_config(overrides))
    if cfg.data.source == "ucr":  # an archive's set: aeon's bundled copy, not data.path's
        cfg = to_config(compose_config(overrides[:1]))
    shape = data_shape(cfg.data)
    rows = geometry.layers(cfg.model, shape.example_shape, shape.num_classes)
    est = memory.estimate(cfg, rows, memory.dataset_bytes(cfg.data, shape))
    assert 10**6 < est.total < 2 * 10**9, est.text()


class FakeDevice:
    """What `memory.device_available` reads of a JAX device: its `memory_stats()`."""

    def __init__(self, stats: dict | None):
        self.stats = stats

    def memory_stats(self) -> dict | None:
        return self.stats


def test_an_accelerators_memory_is_its_limit_less_what_is_in_use():
    gpu = FakeDevice({"bytes_limit": 80 * 10**9, "bytes_in_use": 10**9, "peak_bytes_in_use": 0})
    assert memory.device_available(gpu) == 79 * 10**9
    assert memory.device_available(FakeDevice(None)) is None  # the CPU reports no stats
    assert memory.device_available(FakeDevice({"bytes_in_use": 5})) is None
