"""Sweeps end to end: expansion, pre-flight, invalid points, one W&B run per job, skipping done
points on a rerun, refusing to start, and a sweep of series (FCN on ItalyPowerDemand)."""

import json
import re
import statistics
import time

import pytest

from experiments.hydra_conf import expand
from tests.conftest import CACHE_ALL, SWEEP, cli, needs_fashion_mnist
from tests.test_report import read_csv
from tests.wandb_records import records, summary_and_history


def test_expand_is_the_cartesian_product_and_the_command_line_wins():
    jobs = expand(["model.depth=3,6", "seed=0", "train.epochs=1"], {"seed": "0,1,2", "x.y": "a,b"})
    assert len(jobs) == 2 * 2 * 1  # x.y (2) x depth (2) x seed (the command line's single 0)
    assert {"x.y=a", "seed=0", "model.depth=3", "train.epochs=1"} in [set(job) for job in jobs]
    assert all(len(job) == 4 for job in jobs)


@pytest.fixture(scope="module")
def sweep(lenet_sweep):
    return lenet_sweep


@needs_fashion_mnist
def test_invalid_points_are_recorded_and_not_trained(sweep):
    root, done = sweep
    preflight = (root / "first" / "preflight.txt").read_text()
    assert "4 point(s): 3 job(s) to run, 1 invalid" in preflight
    assert "model.stride=2 model.padding=valid: pool2" in preflight
    assert "invalid: model.stride=2 model.padding=valid" in done.stdout
    statuses = {}
    for job in sorted((root / "first").glob("[0-9]*")):
        summary = json.loads((job / "summary.json").read_text())
        statuses[job.name] = summary["status"]
        assert (job / "checkpoint").exists() == (summary["status"] == "ok")
    assert statuses == {"0": "ok", "1": "ok", "2": "ok", "3": "invalid"}
    # the report, written by the end-of-multirun callback, lists the invalid point with its reason
    markdown = (root / "first" / "summary.md").read_text()
    assert "pool2 (max pool 2x2, stride 2)" in markdown
    for name in ("summary.csv", "report.html", "accuracy.png", "heatmap.png"):
        assert (root / "first" / name).is_file(), name
    assert "sweep report:" in done.stdout


@needs_fashion_mnist
def test_each_job_is_its_own_wandb_run_in_one_group(sweep):
    root, _ = sweep
    runs = []
    for job in ("0", "1", "2"):
        (run_file,) = (root / "first" / job / "wandb").glob("offline-run-*/run-*.wandb")
        (run,) = [r.run for r in records(run_file) if r.WhichOneof("record_type") == "run"]
        runs.append(run)
    assert len({r.run_id for r in runs}) == 3
    assert {r.run_group for r in runs} == {f"{root.name}/first"}
    assert "model.stride=2" in runs[2].tags and "model.padding=same" in runs[2].tags
    assert not list((root / "first" / "3").glob("wandb"))  # the invalid point started no run


@needs_fashion_mnist
def test_the_sweep_report_is_a_wandb_run_in_the_sweep_s_group(sweep):
    """`<group>/report`: the summary table, a row per point, and the plots, in the jobs' group."""
    root, _ = sweep
    (run_file,) = (root / "first" / "wandb").glob("offline-run-*/run-*.wandb")
    (run,) = [r.run for r in records(run_file) if r.WhichOneof("record_type") == "run"]
    group = f"{root.name}/first"
    assert (run.run_group, run.display_name) == (group, f"{group}/report")
    _, _, summary = summary_and_history(run_file)
    assert summary["status"] == "ok" and summary["sweep/summary/_type"] == "table-file"
    assert summary["sweep/summary/nrows"] == 4
    plots = {
        key.split("/")[1] for key in summary if key.endswith("/_type") and "image" in summary[key]
    }
    assert {"accuracy", "heatmap"} <= plots, plots


@needs_fashion_mnist
def test_jobs_share_jax_compilation_cache(sweep):
    """A later job with the shapes of the sweep's job 0 (another seed, another process) loads
    its train step from the sweep's cache instead of compiling it. (The sweep caches every
    program, `CACHE_ALL`; by default those that compile in under 0.5 s are not cached.)"""
    root, _ = sweep
    cache = root / "jax-cache"
    before = {path.name for path in cache.iterdir()}
    job0 = [o for o in SWEEP if o != "-m" and "," not in o]
    logged = {"JAX_LOG_COMPILES": "1", **CACHE_ALL}
    done = cli("train", *job0, "model.stride=1", "model.padding=same", "seed=1",
               "logger.mode=disabled", f"compilation_cache={cache}",
               f"hydra.run.dir={root}/same-shapes", env=logged)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    hits = set(re.findall(r"Persistent compilation cache hit for '[^']+' with key '([^']+)'",
                          done.stderr))  # fmt: skip
    log = [line for line in done.stderr.splitlines() if "train_step" in line]
    assert any("train_step" in key for key in hits), (sorted(before), log)
    assert {f"{key}-cache" for key in hits} <= before
    added = {path.name for path in cache.iterdir()} - before
    assert not [name for name in added if "train_step" in name], added


@needs_fashion_mnist
def test_rerunning_the_sweep_reuses_every_finished_point(sweep):
    root, _ = sweep
    start = time.monotonic()
    again = cli("train", *SWEEP, "logger.mode=offline", f"hydra.sweep.dir={root}/second")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already done in") == 3
    for job in ("0", "1", "2"):
        summary = json.loads((root / "second" / job / "summary.json").read_text())
        first = json.loads((root / "first" / job / "summary.json").read_text())
        assert summary["cached_from"] == str(root / "first" / job)
        assert summary["test/accuracy"] == first["test/accuracy"]
        assert not (root / "second" / job / "wandb").exists()
    assert time.monotonic() - start < 60  # no training: start-up and the pre-flight only


@needs_fashion_mnist
def test_skip_done_false_trains_a_finished_point_again(sweep):
    """sweep.skip_done=false: job 0's point, finished in the first sweep, is trained again."""
    root, _ = sweep
    job0 = [o for o in SWEEP if "," not in o]
    done = cli("train", *job0, "model.stride=1", "model.padding=same", "sweep.skip_done=false",
               "logger.mode=disabled", f"hydra.sweep.dir={root}/again")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "already done" not in done.stdout and "cnnlab: ok: test accuracy" in done.stdout
    summary = json.loads((root / "again" / "0" / "summary.json").read_text())
    first = json.loads((root / "first" / "0" / "summary.json").read_text())
    assert summary["status"] == "ok" and "cached_from" not in summary
    assert summary["test/accuracy"] == first["test/accuracy"]  # trained again, bit for bit
    assert (root / "again" / "0" / "checkpoint").is_dir()


@needs_fashion_mnist
def test_a_sweep_of_seeds_jobs_reports_each_seed_and_a_rerun_copies_them(tmp_path):
    """`seeds=[...]` inside each job (as the geometry presets do): the report's row is the mean
    and std over the job's seeds, and a rerun copies the finished job with its seed folders."""
    args = ["-m", *(o for o in SWEEP if "," not in o and o != "-m")]
    args += ["model.stride=2", "model.padding=same,valid", "seeds=[0,1]",
             "seeds_strategy=sequential", "logger.mode=disabled"]  # fmt: skip
    first = cli("train", *args, f"hydra.sweep.dir={tmp_path}/first")
    assert first.returncode == 0, first.stderr[-3000:]
    (row, invalid) = read_csv(tmp_path / "first" / "summary.csv")
    per_seed = [json.loads((tmp_path / "first" / "0" / f"seed_{s}" / "summary.json").read_text())
                for s in (0, 1)]  # fmt: skip
    accuracies = [s["test/accuracy"] for s in per_seed]
    assert row["n"] == "2" and float(row["test_accuracy_mean"]) == pytest.approx(
        statistics.fmean(accuracies), abs=1e-4
    )
    assert float(row["test_accuracy_std"]) == pytest.approx(statistics.stdev(accuracies), abs=1e-4)
    assert (invalid["n"], invalid["invalid"]) == ("0", "1")
    again = cli("train", *args, f"hydra.sweep.dir={tmp_path}/second")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already done in") == 1
    for seed, first_summary in enumerate(per_seed):
        copied = tmp_path / "second" / "0" / f"seed_{seed}"
        assert json.loads((copied / "summary.json").read_text()) == first_summary
    (row_again, _) = read_csv(tmp_path / "second" / "summary.csv")
    assert row_again["test_accuracy_std"] == row["test_accuracy_std"]


@needs_fashion_mnist
def test_refuse_stops_an_invalid_sweep_before_any_job(tmp_path):
    done = cli("train", *SWEEP, "sweep.on_invalid=refuse", "logger.mode=disabled",
               f"hydra.sweep.dir={tmp_path}/s")  # fmt: skip
    assert done.returncode == 2
    assert "sweep.on_invalid=refuse" in done.stderr and "Traceback" not in done.stderr
    assert not list((tmp_path / "s").glob("[0-9]*"))


def test_preflight_command_prints_tables_invalid_points_and_totals():
    done = cli("preflight", "sweep=lenet5_geometry")
    assert done.returncode == 2  # the preset has invalid points (stride 2 with valid padding)
    assert "8 point(s): 6 job(s) to run, 2 invalid" in done.stdout
    assert "receptive field" in done.stdout and "architecture 1 of" in done.stdout
    ok = cli("preflight", "-m", "model.depth=3,6", "model.stride=1,2")
    assert ok.returncode == 0 and "4 point(s): 4 job(s) to run, 0 invalid" in ok.stdout


def test_preflight_shows_memory_and_refuses_a_point_larger_than_memory():
    done = cli("preflight", "-m", "model.depth=6,100000000")
    assert done.returncode == 2
    assert "2 point(s): 1 job(s) to run, 1 invalid" in done.stdout
    assert "memory per training step at batch 128: about" in done.stdout  # the valid point's
    (refused,) = [line for line in done.stdout.splitlines() if "model.depth=100000000:" in line]
    assert "a training step needs at least" in refused and "lower train.batch_size" in refused


def test_sweep_presets_are_mostly_valid_grids():
    """lenet5_geometry's 8 points, 2 invalid, are checked by the pre-flight command's test."""
    alexnet = cli("preflight", "sweep=alexnet_lite_geometry", "data.path=/somewhere")
    assert "12 point(s): 10 job(s) to run, 2 invalid" in alexnet.stdout, alexnet.stdout[-2000:]
    fcn = cli("preflight", "sweep=fcn_geometry")  # series: their [L, C] from the .ts files
    assert fcn.returncode == 2 and "12 point(s): 10 job(s) to run, 2 invalid" in fcn.stdout
    assert "output L x C" in fcn.stdout and "x series x epochs" in fcn.stdout
    for depth, channels in ((16, 32), (64, 128)):
        invalid = f"model.depth={depth} model.stride=3 model.padding=valid: conv3 (conv 3, stride "
        assert f"{invalid}3, pad 0) gets a 1x{channels} input" in fcn.stdout, fcn.stdout[-2000:]


# The series preset at 8 filters, 2 epochs, one seed, over stride 1 and 3: stride 3 with valid
# padding leaves conv3 one step of ItalyPowerDemand's 24, the one impossible point of 4.
FCN_SWEEP = [
    "-m", "sweep=fcn_geometry", "model.depth=8", "model.stride=1,3", "seeds=[]", "train.epochs=2",
    "logger.mode=disabled", "logger.pictures=false",
]  # fmt: skip


def test_the_series_sweep_trains_its_valid_points_and_reports_the_invalid_one(tmp_path):
    done = cli("train", *FCN_SWEEP, f"hydra.sweep.dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4 point(s): 3 job(s) to run, 1 invalid" in (tmp_path / "preflight.txt").read_text()
    rows = read_csv(tmp_path / "summary.csv")
    assert [(r["model.stride"], r["model.padding"], r["ok"], r["invalid"]) for r in rows] == [
        ("1", "same", "1", "0"), ("1", "valid", "1", "0"), ("3", "same", "1", "0"),
        ("3", "valid", "0", "1"),
    ]  # fmt: skip
    for row, job in zip(rows[:3], ("0", "1", "2"), strict=True):
        summary = json.loads((tmp_path / job / "summary.json").read_text())
        assert (summary["status"], summary["dataset"], summary["model"]) == (
            "ok", "ItalyPowerDemand", "fcn",
        )  # fmt: skip
        assert float(row["test_accuracy_mean"]) == pytest.approx(summary["test/accuracy"])
        assert int(row["flops"]) == summary["flops"]
    flops = [int(row["flops"]) for row in rows[:3]]
    assert flops[0] > flops[1] > flops[2]  # conv3 outputs 24, 11 and 1 steps
    invalid = json.loads((tmp_path / "3" / "summary.json").read_text())
    assert invalid["status"] == "invalid" and not (tmp_path / "3" / "checkpoint").exists()
    reason = "conv3 (conv 3, stride 3, pad 0) gets a 1x16 input and would output 0"
    assert invalid["error"].startswith(reason)
    markdown = (tmp_path / "summary.md").read_text()
    assert "Input: ItalyPowerDemand: series of length L=24, 1 channel." in markdown
    assert "| FLOPs/series |" in markdown
    assert f"job 3 (model.stride=3 model.padding=valid): **invalid**: {reason}" in markdown
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "series of length L=24" in page
    assert "Model: fcn." in page


@needs_fashion_mnist
def test_optuna_search_maximises_validation_accuracy(tmp_path):
    done = cli(
        "train", "sweep=lenet5_optuna", "hydra.sweeper.n_trials=2", "data.train_limit=300",
        "data.test_limit=100", "train.epochs=1", "train.batch_size=50", "logger.mode=disabled",
        "logger.pictures=false", f"hydra.sweep.dir={tmp_path}",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pre-flight skipped" in done.stdout
    results = (tmp_path / "optimization_results.yaml").read_text()
    best = max(json.loads((tmp_path / j / "summary.json").read_text())["val/best_accuracy"]
               for j in ("0", "1"))  # fmt: skip
    assert f"best_value: {best}" in results and "optimizer.lr" in results
