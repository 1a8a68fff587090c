"""Many seeds at once: sequential seeds equal their single runs bit for bit, vmapped seeds and
seeds in processes equal sequential ones up to float rounding, each seed gets its own folder,
checkpoint and W&B run in one group, the top-level summary aggregates them, a stop reaches the
seeds' processes, and bad seed settings are one-line errors."""

import dataclasses
import json
import multiprocessing
import os

import chex
import jax
import numpy as np
import pytest

from cnnlab import checkpoint
from cnnlab.config import DataConfig, config_hash
from cnnlab.errors import ConfigError
from cnnlab.models import build_model, variables_like
from cnnlab.tracking import Trackers
from cnnlab.tracking.local import LocalTracker
from cnnlab.train.run import run
from cnnlab.train.seeds import aggregate, choose_strategy, run_seeds
from cnnlab.validate import validate
from tests.conftest import cli, final_params, needs_fashion_mnist, small_config
from tests.wandb_records import records

# LeNet-5, 31 steps of 64 on 2,000 images, 600 validation and 500 test images
DATA = DataConfig(train_limit=2000, test_limit=500, val_fraction=0.01)
SEEDS = [0, 1]


def config(**changes):
    return small_config(**{"data": DATA, "seeds": SEEDS, **changes})


def local(cfg, folder):
    return Trackers(LocalTracker(folder))


def params(folder):
    model = build_model(small_config().model, 10)
    like = variables_like(model, (28, 28, 1))["params"]
    return checkpoint.load_params(folder / "checkpoint", like)


def metrics(folder):
    """metrics.jsonl without the wall-clock times."""
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in lines]


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sequential")
    return run_dir, run_seeds(config(seeds_strategy="sequential"), run_dir, local)


@needs_fashion_mnist
def test_sequential_seeds_are_bit_identical_to_single_runs(sequential, tmp_path):
    run_dir, summary = sequential
    single = small_config(data=DATA, seed=1, seeds_strategy="sequential")
    alone = run(single, tmp_path, local(single, tmp_path))
    chex.assert_trees_all_equal(params(run_dir / "seed_1"), params(tmp_path))  # exact
    assert metrics(run_dir / "seed_1") == metrics(tmp_path)
    assert summary["per_seed"]["1"]["test/accuracy"] == alone["test/accuracy"]
    assert (run_dir / "seed_1" / "config.yaml").read_text() == (
        tmp_path / "config.yaml"
    ).read_text()


# JAX's compilation events: a trace or compile of a program that is not in the in-memory cache
COMPILING: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **kwargs: COMPILING.append(event) if "/compile/" in event else None
)


@needs_fashion_mnist
def test_sequential_seeds_after_the_first_compile_nothing(tmp_path):
    """The seeds share the data and the compiled programs (initialization, train and eval
    steps): once the first seed has started, the others trace and compile nothing."""
    started = {}

    def tracker(cfg, folder):
        started[cfg.seed] = len(COMPILING)
        return local(cfg, folder)

    cfg = config(seeds=[0, 1, 2], seeds_strategy="sequential")
    assert run_seeds(cfg, tmp_path, tracker)["status"] == "ok"
    assert started[1] - started[0] > 0  # the first seed compiles: the count can see it
    assert len(COMPILING) == started[1], sorted(set(COMPILING[started[1] :]))


@needs_fashion_mnist
def test_each_seed_has_the_files_of_a_single_run_and_the_summary_aggregates(sequential):
    run_dir, summary = sequential
    for seed in SEEDS:
        folder = run_dir / f"seed_{seed}"
        for name in ("config.yaml", "dataset.json", "layers.txt", "metrics.jsonl",
                     "confusion_matrix.csv", "summary.json"):  # fmt: skip
            assert (folder / name).is_file(), (seed, name)
        assert (folder / "checkpoint").is_dir()
        assert f"seed: {seed}\nseeds: []" in (folder / "config.yaml").read_text()
        one = json.loads((folder / "summary.json").read_text())
        assert one["status"] == "ok" and one["seed"] == seed and one["steps"] == 2000 // 64
        assert summary["per_seed"][str(seed)]["test/accuracy"] == one["test/accuracy"]
    assert json.loads((run_dir / "summary.json").read_text()) == json.loads(json.dumps(summary))
    accuracies = [summary["per_seed"][str(s)]["test/accuracy"] for s in SEEDS]
    assert summary["status"] == "ok" and summary["strategy"] == "sequential"
    assert summary["test/accuracy"] == pytest.approx(sum(accuracies) / 2)
    spread = abs(accuracies[0] - accuracies[1]) / 2**0.5  # sample std of two values
    assert summary["test/accuracy_std"] == pytest.approx(spread)
    assert 0.4 < summary["val/best_accuracy"] <= 1 and summary["params"] == 61_706
    assert metrics(run_dir / "seed_0") != metrics(run_dir / "seed_1")  # different seeds


@pytest.fixture(scope="module")
def vmapped(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("vmapped")
    return run_dir, run_seeds(config(seeds_strategy="vmap"), run_dir, local)


def assert_like_sequential(sequential, other, strategy: str, tol: float) -> None:
    """Seeds trained by `strategy` end as the sequential ones up to float rounding (`tol` on the
    parameters), log at the same steps, and keep a single run's files and config."""
    run_dir, expected = sequential
    tmp_path, summary = other
    assert summary["status"] == "ok" and summary["strategy"] == strategy
    for seed in SEEDS:
        got_dir, want_dir = tmp_path / f"seed_{seed}", run_dir / f"seed_{seed}"
        chex.assert_trees_all_close(params(got_dir), params(want_dir), rtol=tol, atol=tol)
        got, want = metrics(got_dir), metrics(want_dir)
        assert [r["step"] for r in got] == [r["step"] for r in want]  # logged at the same steps
        losses = [[r["train/loss"] for r in m if "train/loss" in r] for m in (got, want)]
        assert losses[0] == pytest.approx(losses[1], rel=1e-3) and len(losses[0]) == 4
        assert f"seed: {seed}\nseeds: []" in (got_dir / "config.yaml").read_text()
        assert (got_dir / "checkpoint").is_dir() and (got_dir / "confusion_matrix.csv").is_file()
        one = json.loads((got_dir / "summary.json").read_text())
        assert summary["per_seed"][str(seed)]["test/accuracy"] == one["test/accuracy"]
    assert summary["test/accuracy"] == pytest.approx(expected["test/accuracy"], abs=0.005)


@needs_fashion_mnist
def test_vmapped_seeds_match_sequential_ones(sequential, vmapped):
    assert_like_sequential(sequential, vmapped, "vmap", tol=1e-4)


@needs_fashion_mnist
def test_vmapped_seeds_with_batch_norm_keep_each_seeds_statistics(tmp_path):
    """BatchNorm's running statistics are stacked like the parameters: each vmapped seed ends
    with the statistics (and parameters) its sequential run has."""
    with_bn = dataclasses.replace(small_config().model, norm="batch")
    runs = {}
    for strategy in ("sequential", "vmap"):
        cfg = config(seeds_strategy=strategy, model=with_bn)
        runs[strategy] = run_seeds(cfg, tmp_path / strategy, local)
        assert runs[strategy]["status"] == "ok" and runs[strategy]["strategy"] == strategy
    stats = {}
    for seed in SEEDS:
        vmapped, one_by_one = (final_params(tmp_path / s / f"seed_{seed}") for s in runs)
        assert set(vmapped) == {"params", "batch_stats"}
        # BatchNorm divides by a batch's spread, which amplifies the float noise of vmapped
        # (grouped) convolutions: after 31 steps single statistics differ by about 1e-4 (CI saw
        # 1.2e-4); the two seeds' statistics differ by 1e-1 and more.
        chex.assert_trees_all_close(vmapped, one_by_one, rtol=1e-3, atol=1e-3)
        stats[seed] = vmapped["batch_stats"]["norm1"]["mean"]
    assert not np.allclose(stats[0], stats[1])  # each seed its own statistics
    expected, got = runs["sequential"]["test/accuracy"], runs["vmap"]["test/accuracy"]
    assert got == pytest.approx(expected, abs=0.005)


@pytest.fixture(scope="module")
def in_processes(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("processes")
    return run_dir, run_seeds(config(seeds_strategy="processes"), run_dir, local)


@needs_fashion_mnist
def test_seeds_in_processes_match_sequential_ones(sequential, in_processes):
    assert_like_sequential(sequential, in_processes, "processes", tol=1e-5)


class StopWhenTraining:
    """Turns true once every seed has logged a training step: the seeds' processes are mid-run."""

    def __init__(self, run_dir, seeds):
        self.files = [run_dir / f"seed_{s}" / "metrics.jsonl" for s in seeds]

    def __call__(self) -> bool:
        return all(f.is_file() and f.stat().st_size > 0 for f in self.files)


@needs_fashion_mnist
def test_a_stop_reaches_the_seeds_processes_and_the_rerun_resumes_them(tmp_path):
    """`stop` turning true (a caught SIGTERM) goes on to the seeds' processes: each saves a
    checkpoint and stops; the rerun resumes both and finishes."""
    cfg = config(seeds_strategy="processes", train=dataclasses.replace(
        small_config().train, epochs=30, log_every_steps=5))  # fmt: skip
    stopped = run_seeds(cfg, tmp_path, local, stop=StopWhenTraining(tmp_path, SEEDS))
    assert stopped["status"] == "preempted", stopped.get("error")
    for seed in SEEDS:
        assert stopped["per_seed"][str(seed)]["status"] == "preempted"
    resumed = run_seeds(cfg, tmp_path, local)
    assert resumed["status"] == "ok", resumed.get("error")
    for seed in SEEDS:
        one = json.loads((tmp_path / f"seed_{seed}" / "summary.json").read_text())
        assert 0 < one["resumed_from_step"] < 30 * 31 and one["steps"] == 30 * 31


def test_aggregate_reports_a_diverged_seed_and_averages_the_others():
    ok = {"status": "ok", "test/accuracy": 0.8, "val/best_accuracy": 0.7}
    bad = {"status": "diverged", "error": "loss or gradient became non-finite by step 5"}
    out = aggregate({0: ok, 1: bad, 2: {**ok, "test/accuracy": 0.6}})
    assert out["status"] == "diverged" and out["error"].startswith("seed 1: loss")
    assert out["test/accuracy"] == pytest.approx(0.7) and out["val/best_accuracy"] == 0.7
    assert out["per_seed"]["1"]["status"] == "diverged"


def _choices_in_a_daemon() -> tuple[str, str]:
    assert multiprocessing.current_process().daemon
    try:
        choose_strategy("processes", "cpu", 1, num_seeds=3, num_cores=2)
    except ConfigError as e:
        explicit = str(e)
    return choose_strategy("auto", "cpu", 1, num_seeds=3, num_cores=2), explicit


def test_strategy_choice_and_seed_validation():
    assert choose_strategy("auto", "cpu", 1) == "sequential"
    assert choose_strategy("auto", "gpu", 1) == "vmap"
    assert choose_strategy("auto", "gpu", 8) == "sequential"
    assert choose_strategy("auto", "cpu", 1, num_seeds=3, num_cores=2) == "processes"
    assert choose_strategy("auto", "cpu", 1, num_seeds=1, num_cores=2) == "sequential"
    assert choose_strategy("auto", "cpu", 1, num_seeds=3, num_cores=1) == "sequential"
    assert choose_strategy("auto", "cpu", 8, num_seeds=3, num_cores=2) == "sequential"
    with pytest.raises(ConfigError, match="splits one CPU's cores between the seeds, not gpu"):
        choose_strategy("processes", "gpu", 1)
    with pytest.raises(ConfigError, match="not 8 devices"):
        choose_strategy("processes", "cpu", 8)
    with pytest.raises(ConfigError, match="seeds_strategy=vmap trains on one device, not 8"):
        choose_strategy("vmap", "gpu", 8)
    # a daemonic process (a pool's worker, as a joblib launcher's may be) starts no processes
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        auto, explicit = pool.apply(_choices_in_a_daemon)
    assert auto == "sequential" and "daemonic" in explicit
    validate(config(seeds_strategy="vmap"))
    with pytest.raises(ConfigError, match="seeds_strategy='grouped' is not known .*auto, vmap"):
        validate(config(seeds_strategy="grouped"))
    with pytest.raises(ConfigError, match=r"repeats seed 1.*use seeds=\[0,1,2\]"):
        validate(config(seeds=[0, 1, 1, 2]))
    with pytest.raises(ConfigError, match="seeds="):
        validate(config(seeds=[-1]))
    # the seeds change what is computed, the strategy does not
    assert config_hash(config()) != config_hash(config(seeds=[0, 2]))
    assert config_hash(config()) == config_hash(config(seeds_strategy="vmap"))


@needs_fashion_mnist
def test_cli_trains_every_seed_with_one_wandb_run_each_in_one_group(tmp_path):
    run_dir = tmp_path / "seeds"
    done = cli(
        "train", "seeds=[0,1]", "data.train_limit=1000", "data.test_limit=500",
        "data.val_fraction=0.01", "train.epochs=1", "train.batch_size=64", "logger.mode=offline",
        f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mean and std of 2 seeds" in done.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    # two seeds on a CPU with several cores: a process each (auto)
    strategy = "processes" if len(os.sched_getaffinity(0)) > 1 else "sequential"
    assert summary["status"] == "ok" and summary["strategy"] == strategy
    assert "[seed 1] epoch 1 step" in done.stderr or strategy == "sequential"
    for seed in (0, 1):  # each seed's own pictures (logger.pictures is on by default)
        assert len(list((run_dir / f"seed_{seed}" / "pictures").glob("*.png"))) == 5
    assert set(summary["per_seed"]) == {"0", "1"}
    for seed in SEEDS:
        (run_file,) = (run_dir / f"seed_{seed}" / "wandb").glob("offline-run-*/run-*.wandb")
        (header,) = [r.run for r in records(run_file) if r.WhichOneof("record_type") == "run"]
        assert header.display_name == f"{run_dir.parent.name}/seeds-seed{seed}"
        assert header.run_group == f"{run_dir.parent.name}/seeds"
        assert "seeds" in header.tags
        assert (run_dir / f"seed_{seed}" / "checkpoint").is_dir()
    bad = cli("train", "seeds=[3,3]", f"hydra.run.dir={tmp_path / 'bad'}")
    assert bad.returncode != 0 and "repeats seed 3" in bad.stderr
    assert "Traceback" not in bad.stderr


@needs_fashion_mnist
def test_stopped_vmapped_seeds_resume_exactly(vmapped, tmp_path):
    """The stacked models' checkpoints: stopped after 5 steps and run again, the seeds end as a
    vmapped run that never stopped."""

    class StopAfter:
        calls = 0

        def __call__(self) -> bool:
            self.calls += 1
            return self.calls >= 5

    cfg = config(seeds_strategy="vmap")
    whole_dir, whole = vmapped
    stopped = run_seeds(cfg, tmp_path / "stopped", local, stop=StopAfter())
    assert stopped["status"] == "preempted"
    resumed = run_seeds(cfg, tmp_path / "stopped", local)
    assert resumed["status"] == "ok"
    for seed in SEEDS:
        a, b = whole_dir / f"seed_{seed}", tmp_path / "stopped" / f"seed_{seed}"
        chex.assert_trees_all_equal(params(a), params(b))
        assert metrics(a) == metrics(b)
        assert json.loads((b / "summary.json").read_text())["resumed_from_step"] == 5
    assert resumed["test/accuracy"] == whole["test/accuracy"]
