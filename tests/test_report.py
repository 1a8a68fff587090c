"""The sweep report: a real tiny sweep through cnnlab-train -m and cnnlab-report, and job folders
written with cnnlab's own config schema for seeds, failures and sweeps of other keys."""

import csv
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from omegaconf import OmegaConf

from cnnlab.config import Config, DataConfig, ModelConfig, OptimizerConfig, config_hash, to_yaml
from cnnlab.errors import CnnlabError
from cnnlab.report import aggregate, collect, swept_keys, write_report
from cnnlab.report.collect import inputs
from cnnlab.report.plots import Layout, accuracy_plot, flops_plot, heatmap_plot
from cnnlab.rundir import DatasetInfo, RunDir
from tests.conftest import cli, needs_fashion_mnist, small_config

PLOTS = ("accuracy", "heatmap", "accuracy_vs_flops")


@pytest.fixture(scope="module")
def sweep(lenet_sweep):
    """The shared stride x padding sweep (conftest), reported again by cnnlab-report."""
    sweep_dir = lenet_sweep[0] / "first"
    report = cli("report", str(sweep_dir))
    assert report.returncode == 0, report.stderr[-3000:]
    return sweep_dir


def read_csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@needs_fashion_mnist
def test_real_sweep_table_has_one_row_per_point_and_lists_the_impossible_one(sweep):
    rows = read_csv(sweep / "summary.csv")
    assert [(r["model.stride"], r["model.padding"]) for r in rows] == [
        ("1", "same"), ("1", "valid"), ("2", "same"), ("2", "valid"),
    ]  # fmt: skip
    for row, job in zip(rows[:3], ("0", "1", "2"), strict=True):
        summary = json.loads((sweep / job / "summary.json").read_text())
        assert row["n"] == "1" and row["ok"] == "1" and row["test_accuracy_std"] == ""
        assert float(row["test_accuracy_mean"]) == pytest.approx(summary["test/accuracy"])
        assert int(row["params"]) == summary["params"] and int(row["flops"]) == summary["flops"]
        assert 0 < float(row["final_val_accuracy_mean"]) <= 1
    assert int(rows[0]["flops"]) > int(rows[1]["flops"]) > int(rows[2]["flops"])
    impossible = rows[3]
    assert impossible["n"] == "0" and impossible["test_accuracy_mean"] == ""
    assert (impossible["invalid"], impossible["missing"]) == ("1", "0")  # recorded, not lost
    markdown = (sweep / "summary.md").read_text()
    assert "| stride |" not in markdown and "| model.stride | model.padding | n |" in markdown
    assert "job 3 (model.stride=2 model.padding=valid)" in markdown


@needs_fashion_mnist
def test_real_sweep_html_is_self_contained_with_plots_and_architectures(sweep):
    page = (sweep / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(PLOTS)
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "model.stride=1,2" in page  # the command, from multirun.yaml
    assert page.count("<details>") == 4 and "conv1" in page and "receptive field" in page
    assert "<td class='key'>valid</td>" in page
    for name in PLOTS:
        image = imread(sweep / f"{name}.png")
        assert image.shape[0] > 300 and image.shape[1] > 500 and image.std() > 0.05, name


def write_job(sweep_dir, job: int, cfg: Config, summary: dict | None, val=()) -> None:
    """A job folder as cnnlab-train writes it (config.yaml from the schema, overrides, summary)."""
    folder = sweep_dir / str(job)
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(f"- seed={cfg.seed}\n")
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps({"seed": cfg.seed, **summary}))
    records = [{"step": i, "val/accuracy": v} for i, v in enumerate(val)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def ok(accuracy: float, **more) -> dict:
    return {"status": "ok", "test/accuracy": accuracy, "val/best_accuracy": accuracy + 0.01,
            "params": 100, "flops": 2000, "wall_seconds": 3.0, **more}  # fmt: skip


def test_seeds_are_averaged_and_failures_are_kept_out_of_the_means(tmp_path):
    for seed, accuracy in enumerate((0.5, 0.7)):
        write_job(tmp_path, seed, small_config(seed=seed), ok(accuracy), val=(0.3, accuracy))
    write_job(tmp_path, 2, small_config(seed=2), {"status": "diverged", "error": "NaN at step 7"})
    write_job(tmp_path, 3, small_config(seed=3), None)  # killed before its summary
    points = collect(tmp_path)
    assert [p.status for p in points] == ["ok", "ok", "diverged", "missing"]
    assert swept_keys(points) == ["seed"]
    (row,) = aggregate(points)
    assert row.n == 2 and row.counts["diverged"] == 1 and row.counts["missing"] == 1
    assert row.mean["test_accuracy"] == pytest.approx(0.6)
    assert row.std["test_accuracy"] == pytest.approx(statistics.stdev([0.5, 0.7]))
    assert row.mean["final_val_accuracy"] == pytest.approx(0.6)  # last val/accuracy record
    assert row.mean["best_val_accuracy"] == pytest.approx(0.61)
    paths = write_report(tmp_path)
    assert "60.00 ± 14.14" in paths["markdown"].read_text()
    assert "NaN at step 7" in paths["markdown"].read_text()
    assert "NaN at step 7" in paths["html"].read_text()


def test_a_job_s_seeds_are_replicates_like_swept_seeds(tmp_path):
    """A job that trained `seeds=[...]` counts one point per seed (its seed_<s>/ folder); an
    invalid seeds job, which made no seed folder, stays one point."""
    accuracies = {1: (0.5, 0.7), 2: (0.4, 0.8)}
    for job, stride in enumerate((1, 2)):
        cfg = small_config(seeds=[0, 1], model=ModelConfig(stride=stride, padding="same"))
        write_job(tmp_path, job, cfg, {"status": "ok", "test/accuracy": 0.0})  # the aggregate
        for seed, accuracy in enumerate(accuracies[stride]):
            folder = tmp_path / str(job) / f"seed_{seed}"
            folder.mkdir()
            (folder / "config.yaml").write_text(to_yaml(small_config(seed=seed)))
            (folder / "summary.json").write_text(json.dumps({"seed": seed, **ok(accuracy)}))
    error = "pool2 (max pool 2x2, stride 2) after conv2 gets a 1x1x16 input & would output 0x0"
    cfg = small_config(seeds=[0, 1], model=ModelConfig(stride=3, padding="same"))
    write_job(tmp_path, 2, cfg, {"status": "invalid", "error": error})
    points = collect(tmp_path)
    assert [p.job for p in points] == ["0/seed_0", "0/seed_1", "1/seed_0", "1/seed_1", "2"]
    assert [p.config["seed"] for p in points[:4]] == [0, 1, 0, 1]
    assert swept_keys(points) == ["seed", "model.stride"]
    rows = aggregate(points)
    assert [(r.values["model.stride"], r.n, r.status) for r in rows] == [
        (1, 2, "2 ok"), (2, 2, "2 ok"), (3, 0, "1 invalid"),
    ]  # fmt: skip
    assert rows[0].mean["test_accuracy"] == pytest.approx(0.6)
    assert rows[1].std["test_accuracy"] == pytest.approx(statistics.stdev([0.4, 0.8]))


def test_invalid_points_are_rows_and_an_all_invalid_sweep_still_reports(tmp_path):
    error = "pool2 (max pool 2x2, stride 2) after conv2 gets a 1x1x16 input & would output 0x0"
    for job, stride in enumerate((1, 2)):
        cfg = small_config(model=ModelConfig(stride=stride, padding="valid"))
        write_job(tmp_path, job, cfg, {"status": "invalid", "error": error})
    (tmp_path / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task:\n    - model.stride=1,2\n"
    )
    rows = aggregate(collect(tmp_path))
    assert [(r.values, r.n, r.counts["invalid"]) for r in rows] == [
        ({"model.stride": 1}, 0, 1), ({"model.stride": 2}, 0, 1),
    ]  # fmt: skip
    paths = write_report(tmp_path)
    assert set(paths) == {"csv", "markdown", "html", *PLOTS}
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())
    page = paths["html"].read_text()
    assert "1x1x16 input &amp; would output" in page and "cnnlab-train -m model.stride=1,2" in page
    assert [r["invalid"] for r in read_csv(paths["csv"])] == ["1", "1"]


def test_a_sweep_of_other_keys_and_a_single_point_are_plotted(tmp_path):
    lrs = tmp_path / "lr"
    for job, lr in enumerate((0.01, 0.1, 1.0)):
        write_job(lrs, job, small_config(optimizer=OptimizerConfig(lr=lr)), ok(0.8 - lr / 2))
    rows = aggregate(collect(lrs))
    assert [r.values for r in rows] == [{"optimizer.lr": v} for v in (0.01, 0.1, 1.0)]
    single = tmp_path / "single"
    write_job(single, 0, small_config(), ok(0.9))
    for sweep_dir in (lrs, single):
        paths = write_report(sweep_dir)
        for name in PLOTS:
            assert imread(paths[name]).shape[0] > 200, (sweep_dir, name)
    assert read_csv(single / "summary.csv")[0]["test_accuracy_mean"] == "0.9"


def test_report_is_logged_to_an_offline_wandb_run(tmp_path):
    import wandb

    sweep_dir = tmp_path / "sweep"
    for job, depth in enumerate((3, 6)):
        write_job(
            sweep_dir,
            job,
            small_config(model=ModelConfig(depth=depth, padding="same")),
            ok(0.5 + depth / 100),
        )
    run = wandb.init(mode="offline", dir=tmp_path, project="cnnlab-test")
    try:
        write_report(sweep_dir, wandb_run=run)
    finally:
        run.finish()
    (offline,) = (tmp_path / "wandb").glob("offline-run-*")
    media = offline / "files" / "media"
    assert len(list(media.glob("table/sweep/summary_*.table.json"))) == 1
    for name in PLOTS:
        assert len(list(media.glob(f"images/sweep/{name}_[0-9]*.png"))) == 1, name
    (table,) = media.glob("table/sweep/summary_*.table.json")
    data = json.loads(table.read_text())
    assert data["columns"][:2] == ["model.depth", "n"] and len(data["data"]) == 2


def test_cli_refuses_a_folder_that_is_not_a_sweep_in_one_line(tmp_path):
    write_job(tmp_path / "sweep", 0, small_config(), ok(0.9))
    run_dir = tmp_path / "sweep" / "0"
    for path, message in [(run_dir, "is a single run"), (tmp_path / "nope", "not a directory")]:
        done = cli("report", str(path))
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert done.stderr.startswith("cnnlab: error: ") and message in done.stderr
        assert done.stderr.count("\n") == 1
    assert not (run_dir / "report.html").exists()


GOLDEN = Path(__file__).parent / "data" / "golden" / "format1"


def test_a_run_s_config_reads_back_without_omegaconf(tmp_path):
    """config.yaml as an older cnnlab wrote it (OmegaConf.to_yaml, before data.augment.erase,
    logger.pictures and malloc_arenas existed) reads back as OmegaConf reads it, its missing keys
    at their defaults; a Config written now reads back equal, in the YAML text OmegaConf wrote."""
    old = RunDir(GOLDEN).config()
    text = (GOLDEN / "config.yaml").read_text()
    merged = OmegaConf.to_object(OmegaConf.merge(Config, OmegaConf.create(text)))
    assert old == merged and config_hash(old) == config_hash(merged)
    assert old.model.padding == [2, 0] and old.optimizer.eps == 1e-8 and old.optimizer.lr == 0.002
    assert old.data.augment.erase == 0.0 and old.logger.pictures is True
    cfg = small_config(model=ModelConfig(depth=(4, 8), dense=[16], padding="same"), seeds=[1, 2])
    cfg.optimizer.weight_decay = 1  # an int where a float belongs reads back as the float
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    back = RunDir(tmp_path).config()
    assert back.model.depth == [4, 8] and back.optimizer.weight_decay == 1.0
    assert to_yaml(back) == OmegaConf.to_yaml(OmegaConf.structured(cfg))
    assert to_yaml(old) == OmegaConf.to_yaml(OmegaConf.structured(old))  # as config.yaml was


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("model:\n  old_knob: 3\n", "unknown config key model.old_knob"),
        ("model:\n  depht: 3\n", "unknown config key model.depht; did you mean model.depth?"),
        ("trian:\n  epochs: 3\n", "unknown config key trian.epochs; did you mean train.epochs?"),
        ("seed: seven\n", "seed must be int, not 'seven'"),
        ("optimizer:\n  lr: [1]\n", "optimizer.lr must be float, not [1]"),
        ("model: [1]\n", "model must be a mapping, not [1]"),
        ("model: {depth: [\n", "cannot read"),
    ],
)
def test_a_config_this_cnnlab_cannot_read_is_one_clear_error(tmp_path, yaml_text, message):
    """A key that cnnlab has removed since the run (or a typo) may have changed what the run
    computed: reading it back is an error that names the key and the file, never a silent drop."""
    (tmp_path / "config.yaml").write_text(yaml_text)
    with pytest.raises(CnnlabError) as info:
        RunDir(tmp_path).config()
    assert str(info.value).startswith(f"cannot read {tmp_path / 'config.yaml'}: ")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_swept_keys_are_the_ones_that_change_results_or_were_overridden(tmp_path):
    """One definition of what changes a run's results (config.identity): a key outside it (the
    run name that interpolates the model, checkpointing) is swept only where overrides set it."""
    for job, (depth, keep, strategy) in enumerate(((4, 1, "vmap"), (8, 2, "sequential"))):
        cfg = small_config(model=ModelConfig(depth=depth, padding="same"), name=f"lenet{depth}")
        cfg.checkpoint.keep, cfg.seeds_strategy = keep, strategy
        write_job(tmp_path, job, cfg, ok(0.5))
        overrides = f"- model.depth={depth}\n- seeds_strategy={strategy}\n"
        (tmp_path / str(job) / ".hydra" / "overrides.yaml").write_text(overrides)
    assert swept_keys(collect(tmp_path)) == ["model.depth", "seeds_strategy"]


def test_dataset_json_reads_back(tmp_path):
    sizes = {"train": 54000, "val": 6000, "test": 10000}
    info = DatasetInfo("mnist", list("0123456789"), (28, 28, 1), np.float32([33.3]),
                       np.float32([78.5]), sizes)  # fmt: skip
    (tmp_path / "dataset.json").write_text(json.dumps(info.to_json()))
    back = RunDir(tmp_path).dataset()
    assert back.differences(info) == [] and back.sizes == info.sizes and back.name == "mnist"
    moved = DatasetInfo("mnist", list("0123456789"), (28, 28, 1), np.float32([33.4]),
                        np.float32([78.5]), {})  # fmt: skip
    assert back.differences(moved) == ["mean"]


ITALY = DataConfig(name="ItalyPowerDemand", source="ucr", normalize="series")


def write_input_sweep(sweep_dir: Path, data: DataConfig, shape: list[int] | None) -> None:
    """Two jobs over stride on `data`, each with a dataset.json of `shape` (None: none, as an
    invalid point has)."""
    for job, stride in enumerate((1, 2)):
        cfg = small_config(data=data, model=ModelConfig(stride=stride, padding="same"))
        write_job(sweep_dir, job, cfg, ok(0.8) if shape else {"status": "invalid", "error": "x"})
        if shape:
            info = {"name": data.name, "class_names": ["1", "2"], "image_shape": shape,
                    "mean": [0.0] * shape[-1], "std": [1.0] * shape[-1]}  # fmt: skip
            (sweep_dir / str(job) / "dataset.json").write_text(json.dumps(info))


def test_a_sweep_of_series_says_series_length_where_one_of_images_says_image_size(tmp_path):
    """The table, the page and every plot name the input (a series' length L, an image's
    H x W x C) and count FLOPs per series or per image."""
    for data, shape, text, example in (
        (ITALY, [24, 1], "ItalyPowerDemand: series of length L=24, 1 channel", "series"),
        (DataConfig(), [28, 28, 1], "fashion_mnist: 28x28x1 images", "image"),
    ):
        write_input_sweep(tmp_path / example, data, shape)
        paths = write_report(tmp_path / example)
        markdown = paths["markdown"].read_text()
        assert f"Input: {text}." in markdown and f"| FLOPs/{example} |" in markdown
        assert f"Input: {text}." in paths["html"].read_text()
        points = collect(tmp_path / example)
        assert inputs(points).text == text
        rows = aggregate(points)
        layout = Layout(rows, inputs(points))
        figure = accuracy_plot(rows, layout)
        assert figure.axes[1].get_ylabel() == f"forward FLOPs per {example}"
        assert text in figure.get_suptitle() and text in heatmap_plot(rows, layout).get_suptitle()
        cost = flops_plot(rows, layout)
        assert cost.axes[0].get_xlabel() == f"forward FLOPs per {example} (log scale)"
        assert text in cost.get_suptitle()


def test_a_sweep_of_series_that_never_loaded_its_data_still_counts_per_series(tmp_path):
    write_input_sweep(tmp_path, ITALY, None)  # every point invalid: no dataset.json
    seen = inputs(collect(tmp_path))
    assert (seen.text, seen.example) == ("", "series")
    assert "| FLOPs/series |" in write_report(tmp_path)["markdown"].read_text()
