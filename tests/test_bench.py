"""cnnlab-bench: the PyTorch networks, schedule, data order and augmentation match cnnlab's; the
timing code stops at the target; and a real run at tiny size reports both contenders, in ABBA
order, pinned alike, with medians and ratios that agree with the runs. Timings are never
asserted: the machine is shared."""

import json
import os
import subprocess
import sys
from dataclasses import asdict, replace

import jax
import jax.numpy as jnp
import pytest

from cnnlab import kernels
from cnnlab.config import ModelConfig, OptimizerConfig
from cnnlab.models import build_model
from cnnlab.train.loop import epoch_order
from cnnlab.train.optim import build_optimizer
from experiments import bench
from experiments.bench_workers import common
from tests.conftest import CIFAR10_ZIP, REPO, needs_cifar10, needs_fashion_mnist

NETWORKS = [  # preset, input (H, W, C) or (L, C), parameters, the conv part's output
    ("lenet5", (28, 28, 1), 61_706, (2, 16, 5, 5)),  # [B, C, H, W]
    ("alexnet_lite", (32, 32, 3), 797_290, (2, 64, 3, 3)),
    ("fcn", (50, 1), 265_994, (2, 128, 50)),  # [B, C, L]: "same" keeps the length
]


def cnnlab_params(name: str, shape: tuple, abstract: bool = True) -> dict:
    """cnnlab's parameters for the preset `name`: shapes only, or initialised."""
    model = build_model(bench.preset("model", name, ModelConfig), 10)
    args = (jax.random.key(0), jnp.zeros((1, *shape)))
    return (jax.eval_shape(model.init, *args) if abstract else jax.jit(model.init)(*args))["params"]


@pytest.mark.parametrize("name, shape, count, features", NETWORKS)
def test_torch_networks_have_cnnlabs_layers_and_shapes(name, shape, count, features):
    pytest.importorskip("torch")
    import torch

    from experiments.bench_workers.torch_nets import NETS

    net = NETS[name](shape, 10)
    torch_sizes = sorted(p.numel() for p in net.parameters())
    cnnlab_sizes = sorted(leaf.size for leaf in jax.tree.leaves(cnnlab_params(name, shape)))
    assert torch_sizes == cnnlab_sizes and sum(torch_sizes) == count
    x = torch.zeros(2, shape[-1], *shape[:-1])  # [B, C, H, W] or [B, C, L]
    assert tuple(net.features(x).shape) == features
    assert tuple(net(x).shape) == (2, 10)


def test_torch_fcn_computes_cnnlabs_function():
    """cnnlab's FCN parameters copied into the PyTorch FCN give the same logits, in training
    (batch statistics) and after it (running averages): the same padding of the even kernel
    (3 before, 4 after), BatchNorm and pooling. The biases and BatchNorm's parameters are moved
    off their initial zeros and ones so that a mix-up among them shows."""
    pytest.importorskip("torch")
    import numpy as np
    import torch

    from experiments.bench_workers.torch_nets import FCN

    model = build_model(bench.preset("model", "fcn", ModelConfig), 6)
    x = jax.random.normal(jax.random.key(1), (4, 37, 2))  # [B, L, C]
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x))(x)
    p = dict(variables["params"])
    for k in (1, 2, 3):
        p[f"conv{k}"] = {**p[f"conv{k}"], "bias": p[f"conv{k}"]["bias"] + 0.1 * k}
        p[f"norm{k}"] = {"scale": p[f"norm{k}"]["scale"] * 1.5, "bias": p[f"norm{k}"]["bias"] - 0.2}
    net, tensor = FCN((37, 2), 6), lambda a: torch.tensor(np.asarray(a))
    convs = [m for m in net.features if isinstance(m, torch.nn.Conv1d)]
    norms = [m for m in net.features if isinstance(m, torch.nn.BatchNorm1d)]
    with torch.no_grad():
        for k, (conv, bn) in enumerate(zip(convs, norms, strict=True), start=1):
            conv.weight.copy_(tensor(p[f"conv{k}"]["kernel"]).permute(2, 1, 0))  # [F, C, k]
            conv.bias.copy_(tensor(p[f"conv{k}"]["bias"]))
            bn.weight.copy_(tensor(p[f"norm{k}"]["scale"]))
            bn.bias.copy_(tensor(p[f"norm{k}"]["bias"]))
        net.classifier.weight.copy_(tensor(p["logits"]["kernel"]).T)  # [K, 128]
        net.classifier.bias.copy_(tensor(p["logits"]["bias"]))
    xt = tensor(x).movedim(-1, 1)  # [B, C, L]
    logits, updated = model.apply(
        {**variables, "params": p}, x, train=True, mutable=["batch_stats"]
    )
    np.testing.assert_allclose(net(xt).detach().numpy(), logits, rtol=1e-4, atol=1e-4)
    net.eval()  # PyTorch keeps the unbiased variance (n / (n - 1), n = B * L = 148), Flax not
    test_logits = model.apply({"params": p, **updated}, x, train=False)
    np.testing.assert_allclose(net(xt).detach().numpy(), test_logits, rtol=1e-2, atol=1e-2)


def test_torch_initialisation_is_flaxs():
    pytest.importorskip("torch")
    from experiments.bench_workers.torch_nets import LeNet5

    dense1 = LeNet5((28, 28, 1), 10).classifier[1].requires_grad_(False)  # 400 x 120 weights
    flax_kernel = cnnlab_params("lenet5", (28, 28, 1), abstract=False)["dense1"]["kernel"]
    torch_std, flax_std = float(dense1.weight.std()), float(jnp.std(flax_kernel))
    assert torch_std == pytest.approx(flax_std, rel=0.03)
    assert float(abs(dense1.weight).max()) <= 2 * (1 / 400) ** 0.5 / 0.8796 + 1e-6  # truncated
    assert not dense1.bias.any()


@pytest.mark.parametrize("schedule", ["warmup_cosine", "cosine", "constant"])
def test_torch_schedule_and_order_are_cnnlabs(schedule):
    pytest.importorskip("torch")
    from experiments.bench_workers import torch_worker

    cfg = replace(bench.preset("optimizer", bench.OPTIMIZER, OptimizerConfig), schedule=schedule)
    cfg = replace(cfg, end_lr_factor=0.1, warmup_epochs=0.5)
    _, reference = build_optimizer(cfg, 40, 3)  # 120 steps
    for step in (0, 1, 19, 20, 21, 60, 119, 120, 150):
        lr = torch_worker.learning_rate(asdict(cfg), step, 40, 3)
        assert lr == pytest.approx(float(reference(step)), rel=1e-5, abs=1e-9), step
    for epoch in (1, 2):
        assert (torch_worker.epoch_order(3, epoch, 1000) == epoch_order(3, epoch, 1000)).all()


def test_torch_augmentation_crops_the_padded_image_and_flips():
    pytest.importorskip("torch")
    import torch

    from experiments.bench_workers.torch_worker import crop_flip

    x = torch.arange(64 * 3 * 6 * 6).reshape(64, 3, 6, 6).to(torch.uint8)  # [B, C, H, W]
    out = crop_flip(x, 2, True, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    seen = set()
    for b in range(64):
        windows = {
            (dy, dx, flip)
            for dy in range(5) for dx in range(5) for flip in (False, True)
            if torch.equal(out[b], (lambda w: w.flip(2) if flip else w)(
                padded[b, :, dy : dy + 6, dx : dx + 6]))
        }  # fmt: skip
        assert windows, f"image {b} is not a crop of its padded input"
        seen |= windows
    assert {f for *_, f in seen} == {False, True} and len({d[:2] for d in seen}) > 5


class FakeTrainer:
    """Accuracy after each epoch from a list; counts the steps it is given."""

    contender, num_params = "fake", 1

    def __init__(self, accuracies):
        self.accuracies, self.steps, self.tests = accuracies, 0, 0

    def step(self, idx):
        assert idx.shape == (10,)
        self.steps += 1

    def sync(self):
        return 1.0

    def test_accuracy(self):
        self.tests += 1
        return self.accuracies[self.tests - 1]


def spec(**changes) -> common.Spec:
    fields = dict(
        task="t", mode="target", data_dir="", model={}, optimizer={}, augment={}, batch_size=10,
        eval_batch_size=10, seed=0, epochs=4, warmup=2, steps=5, target=0.9, threads=1,
        launched_at=0.0, result="",
    )  # fmt: skip
    return common.Spec(**{**fields, **changes})


def test_time_to_target_stops_at_the_first_epoch_that_reaches_it():
    trainer = FakeTrainer([0.5, 0.85, 0.91, 0.95])
    result = common.time_to_target(trainer, spec(), epoch_order, 35)  # 3 steps per epoch
    assert result["epochs_to_target"] == 3 and trainer.steps == 9 and trainer.tests == 3
    assert result["time_to_target_seconds"] == result["history"][-1]["train_seconds"] > 0
    missed = common.time_to_target(FakeTrainer([0.5] * 4), spec(), epoch_order, 35)
    assert missed["time_to_target_seconds"] is None and len(missed["history"]) == 4
    timed = common.throughput(trainer := FakeTrainer([]), spec(), epoch_order, 35)
    assert trainer.steps == 1 + 2 + 5 and timed["timed_steps"] == 5
    assert timed["images_per_second_overall"] == pytest.approx(5 * 10 / timed["timed_seconds"])
    assert len(timed["window_rates"]) == 5


def test_runs_alternate_abba():
    t, c, g = "throughput", "cnnlab", "torch"
    assert bench.plan(2, 1) == [(t, c), (t, g), (t, g), (t, c), ("target", c), ("target", g)]
    assert bench.plan(2, 0, ("cnnlab", "before")) == [(t, c), (t, "before"), (t, "before"), (t, c)]


def test_user_errors_are_one_line(capsys, monkeypatch):
    pytest.importorskip("torch")
    for argv in (
        ["--threads", "999"],
        ["--task", "alexnet_cifar10", "--cifar10", "/no/such.zip"],
        ["--against", "no-such-commit"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(argv)
        assert exit_info.value.code == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("cnnlab: error: --") and argv[-1] in line
    monkeypatch.setitem(sys.modules, "torch", None)  # as if PyTorch were not installed
    with pytest.raises(SystemExit) as exit_info:
        bench.main([])
    assert exit_info.value.code != 0
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "pip install 'cnnlab[bench]'" in line


def run_bench(tmp_path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "experiments.bench", "--rounds", "1", "--warmup", "1",
         "--out", str(out), *args],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def check_task(result: dict, runs: list[tuple[str, str]], params: int, cpus: list[int]):
    assert [(r["mode"], r["contender"]) for r in result["runs"]] == runs
    for r in result["runs"]:
        assert r["affinity"] == cpus and r["params"] == params and r["peak_rss_mb"] > 0
        assert r["startup_seconds"] > r["first_step_seconds"] > 0
        assert r.get("torch_threads", len(cpus)) == len(cpus)
    first, second = (result["median"][c] for c in result["pair"])
    assert first.keys() == second.keys()
    for key, value in first.items():
        assert value > 0 and second[key] > 0
        assert result["ratio"][key] == pytest.approx(value / second[key])


@needs_fashion_mnist
def test_bench_runs_both_contenders_end_to_end(tmp_path):
    pytest.importorskip("torch")
    small = ["--steps", "3", "--train-limit", "512", "--test-limit", "500"]
    target = ["--target", "0.05", "--target-epochs", "1"]  # any network tests above 5%
    report, stdout = run_bench(tmp_path, *small, *target)
    cpus = sorted(os.sched_getaffinity(0))
    assert report["pinning"]["cpus"] == cpus and report["command"].startswith("cnnlab-bench")
    result = report["tasks"]["lenet5_fmnist"]
    runs = [("throughput", "cnnlab"), ("throughput", "torch"), ("target", "torch"),
            ("target", "cnnlab")]  # fmt: skip
    check_task(result, runs, 61_706, cpus)
    assert result["median"]["cnnlab"]["epochs_to_target"] == 1
    assert result["settings"]["train_images"] == 512 and "cnnlab/torch" in stdout


@needs_fashion_mnist
def test_bench_against_an_earlier_commit(tmp_path):
    """`--against HEAD`: this tree's worker against the committed one, from its own files."""
    small = ["--steps", "2", "--train-limit", "256", "--test-limit", "200", "--no-target"]
    report, stdout = run_bench(tmp_path, "--against", "HEAD", *small)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    assert report["against"] == {"rev": "HEAD", "commit": head.stdout.strip()}
    result = report["tasks"]["lenet5_fmnist"]
    assert result["pair"] == ["cnnlab", "before"]
    check_task(result, [("throughput", "cnnlab"), ("throughput", "before")], 61_706,
               sorted(os.sched_getaffinity(0)))  # fmt: skip
    assert f"cnnlab at {head.stdout[:7]}" in stdout and "cnnlab/before" in stdout
    now, before = (r["cnnlab_path"] for r in result["runs"])
    assert now == str(REPO / "cnnlab") and "cnnlab-bench-before-" in before


def test_bench_runs_fcn_on_series_end_to_end(tmp_path):
    """The 1-D task, on OSULeaf's series (bundled with aeon), for both contenders."""
    pytest.importorskip("torch")
    small = ["--steps", "2", "--train-limit", "48", "--test-limit", "30"]
    target = ["--target", "0.05", "--target-epochs", "1", "--target-rounds", "1"]
    report, stdout = run_bench(tmp_path, "--task", "fcn_osuleaf", *small, *target)
    result = report["tasks"]["fcn_osuleaf"]
    runs = [("throughput", "cnnlab"), ("throughput", "torch"), ("target", "torch"),
            ("target", "cnnlab")]  # fmt: skip
    # FCN on series of 1 channel with OSULeaf's 6 classes (all among the first 48 and 30)
    check_task(result, runs, 265_478, sorted(os.sched_getaffinity(0)))
    s = result["settings"]
    assert (s["unit"], s["train_images"], s["test_images"], s["batch_size"]) == (
        "series",
        48,
        30,
        16,
    )
    aug = s["augment"]
    assert s["model"]["name"] == "fcn" and (aug["crop_padding"], aug["flip"], aug["erase"]) == (
        0, False, 0.0
    )  # fmt: skip
    assert result["median"]["cnnlab"]["epochs_to_target"] == 1
    assert "train series/s, steady" in stdout and "48 training / 30 test series" in stdout


def test_bench_against_an_environment_variable(tmp_path):
    """`--against-env CNNLAB_CONV=xla`: the second cnnlab runs with XLA's convolutions."""
    small = ["--steps", "2", "--train-limit", "32", "--test-limit", "20", "--no-target"]
    report, stdout = run_bench(
        tmp_path, "--task", "fcn_osuleaf", "--against-env", "CNNLAB_CONV=xla", *small
    )
    assert report["against_env"] == {"CNNLAB_CONV": "xla"}
    result = report["tasks"]["fcn_osuleaf"]
    assert result["pair"] == ["cnnlab", "env"] and "cnnlab CNNLAB_CONV=xla" in stdout
    check_task(result, [("throughput", "cnnlab"), ("throughput", "env")], 265_478,
               sorted(os.sched_getaffinity(0)))  # fmt: skip
    default, xla = (r["onednn_kernels"] for r in result["runs"])
    assert default == kernels.available() and xla is False


@pytest.mark.slow
@needs_cifar10
def test_bench_runs_alexnet_lite_on_cifar10(tmp_path):
    pytest.importorskip("torch")
    small = ["--steps", "2", "--train-limit", "256", "--test-limit", "200", "--no-target"]
    report, _ = run_bench(
        tmp_path, "--task", "alexnet_cifar10", "--cifar10", str(CIFAR10_ZIP), *small
    )
    result = report["tasks"]["alexnet_cifar10"]
    check_task(result, [("throughput", "cnnlab"), ("throughput", "torch")], 797_290,
               sorted(os.sched_getaffinity(0)))  # fmt: skip
    aug = result["settings"]["augment"]
    assert (aug["crop_padding"], aug["flip"], aug["erase"]) == (4, True, 0.0)
