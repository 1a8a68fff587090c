"""A Flax module of one's own (`model._target_`, tests/user_nets.py) through the command-line
tools: trained end to end, inspected, pre-flighted, drawn, swept over one of its fields, used for
predictions and several seeds, and refused, before anything compiles, where a map would be empty.

TinyNet with `width` filters on 28x28x1 inputs: stem 3x3 conv 9 * width + width, batch norm
2 * width, body 3x3 conv 9 * width^2 + width, head dense 12 * 12 * width * 10 + 10 parameters
(12,210 for width 8, 5,966 for width 4)."""

import csv
import itertools
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from cnnlab import geometry
from cnnlab.config import ModelConfig
from cnnlab.data import load_dataset
from cnnlab.errors import ConfigError, GeometryError
from cnnlab.rundir import RunDir
from cnnlab.validate import validate
from experiments.hydra_conf import compose_config, to_config
from tests.conftest import cli, final_params, history, needs_fashion_mnist
from tests.test_cli import predicted

TINY = ["model=user", "model._target_=tests.user_nets.TinyNet"]
SMALL = [
    "data.train_limit=2000", "data.test_limit=300", "train.epochs=1", "train.batch_size=50",
    "train.log_every_steps=10", "optimizer.lr=0.01", "optimizer.schedule=constant",
    "logger.mode=disabled",
]  # fmt: skip
EMPTY = "submodule body (Conv) gets a 2x2x8 input and would output 0x0x8: a zero-size feature map"


def table(text: str) -> dict[str, list[str]]:
    """The rows of the first per-layer table in `text` (between its rules): name -> cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("---")) + 1
    body = itertools.takewhile(lambda line: not line.startswith("---"), lines[start:])
    return {line.split()[0]: line.split()[1:] for line in body}


def params_of(width: int) -> int:
    return (9 * width + width) + 2 * width + (9 * width * width + width) + (144 * width * 10 + 10)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """TinyNet trained for 40 steps through cnnlab-train, with pictures; `dropout` is a field
    that shares its name with a knob of the layer language."""
    root = tmp_path_factory.mktemp("user")
    run_dir = root / "run"
    done = cli("train", *TINY, "+model.width=8", "model.dropout=0.1", *SMALL,
               f"hydra.run.dir={run_dir}", f"compilation_cache={root}/jax")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


@needs_fashion_mnist
def test_trains_end_to_end_and_reads_its_config_back(trained):
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["model"] == "tests.user_nets.TinyNet"
    assert summary["params"] == params_of(8) == 12_210
    assert summary["test/accuracy"] > 0.5  # 10 classes: chance is 0.1
    losses = [r["train/loss"] for r in history(trained) if "train/loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]
    variables = final_params(trained)  # with the batch norm's running statistics
    assert set(variables["params"]) == {"stem", "norm", "body", "head"}
    assert variables["params"]["stem"]["kernel"].shape == (3, 3, 1, 8)
    assert variables["batch_stats"]["norm"]["mean"].shape == (8,)
    model = yaml.safe_load((trained / "config.yaml").read_text())["model"]
    assert model["fields"] == {"width": 8, "dropout": 0.1} and model["layers"] == []
    assert RunDir(trained).config().model == ModelConfig(
        name="tests.user_nets.TinyNet", layers=[], _target_="tests.user_nets.TinyNet",
        fields={"width": 8, "dropout": 0.1},
    )  # fmt: skip
    text = (trained / "layers.txt").read_text()
    rows = table(text)
    assert list(rows) == ["input", "stem", "norm", "body", "Dropout_0", "head"]
    assert rows["stem"] == ["module", "Conv", "28", "x", "28", "x", "8", "80", "56,448", "-"]
    assert rows["body"][2:7] == ["12", "x", "12", "x", "8"] and rows["head"][2] == "10"
    assert text.splitlines()[-1].split()[:2] == ["total", "12,210"]


@needs_fashion_mnist
def test_its_pictures_show_its_convs(trained):
    """The filters of its first conv and the maps of both convs (their 4-D outputs)."""
    from cnnlab.report.pictures import run_pictures

    drawn = {path.stem for path in (trained / "pictures").glob("*.png")}
    assert drawn == {"filters", "feature_maps", "confusion_matrix", "curves", "confidently_wrong"}
    with Image.open(trained / "pictures" / "feature_maps.png") as image:
        assert min(image.size) > 200
    run = RunDir(trained)
    model, data = run.load_model(), load_dataset(run.config().data)
    probs = np.full((len(data.test.labels), 10), 0.1)
    pics = run_pictures(model, data, probs, run.metrics())
    assert pics.kernel_layer == "stem"
    np.testing.assert_array_equal(pics.kernel, final_params(trained)["params"]["stem"]["kernel"])
    assert [(m.name, m.values.shape) for m in pics.maps] == [("stem", (28, 28, 8)),
                                                            ("body", (12, 12, 8))]  # fmt: skip
    assert len({float(m.values.std()) for m in pics.maps}) == 2 and pics.maps[0].values.std() > 0


@needs_fashion_mnist
def test_predict_gives_its_test_results_from_the_checkpoint(trained, tmp_path):
    """cnnlab-predict rebuilds the module from config.yaml and its checkpoint (batch statistics
    included): its most likely classes give the run's confusion matrix count for count."""
    test = load_dataset(RunDir(trained).config().data).test
    paths = [tmp_path / f"{i}.png" for i in range(len(test))]
    for path, image in zip(paths, test.images, strict=True):
        Image.fromarray(image[..., 0]).save(path)
    done = cli("predict", str(trained), *map(str, paths))
    assert done.returncode == 0, done.stderr
    names = RunDir(trained).dataset().class_names
    counts = np.zeros((10, 10), int)
    for label, lines in zip(test.labels, predicted(done.stdout).values(), strict=True):
        counts[label, names.index(lines[0][0])] += 1
    with open(trained / "confusion_matrix.csv", newline="") as f:
        _, *rows = list(csv.reader(f))
    np.testing.assert_array_equal(counts, [[int(v) for v in row[1:]] for row in rows])


@needs_fashion_mnist
def test_inspect_prints_its_table_and_refuses_an_empty_map(tmp_path):
    done = cli("inspect_model", *TINY, "+model.width=4")
    assert done.returncode == 0, done.stderr
    assert table(done.stdout)["stem"][:7] == ["module", "Conv", "28", "x", "28", "x", "4"]
    totals = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("total")]
    assert totals == [f"{params_of(4):,}"] == ["5,966"]
    assert "memory per training step" in done.stdout
    bad = cli("inspect_model", *TINY, "+model.width=8", "model.stride=8")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("cnnlab: error: ")
    assert EMPTY in bad.stderr and "model._target_=tests.user_nets.TinyNet" in bad.stderr
    rows = table(bad.stdout)  # the table up to it
    assert list(rows) == ["input", "stem", "norm", "body"] and rows["body"][2:7] == list("0x0x8")


@needs_fashion_mnist
def test_an_empty_map_stops_the_run_before_anything_compiles(tmp_path):
    run_dir = tmp_path / "run"
    done = cli(
        "train", *TINY, "+model.width=8", "model.stride=8", *SMALL, f"hydra.run.dir={run_dir}"
    )
    assert done.returncode == 2 and done.stderr.startswith("cnnlab: error: ")
    assert EMPTY in done.stderr.splitlines()[-1] and "Traceback" not in done.stderr
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "checkpoint").exists()


@needs_fashion_mnist
def test_a_preset_of_its_own_sweeps_a_field_in_the_preflight():
    """tests/conf/model/tiny_net.yaml (width 4, stride 2) on Hydra's search path, its width swept
    without `+`: one table per width, parameters from the abstract evaluation."""
    done = cli("preflight", "hydra.searchpath=[file://tests/conf]", "model=tiny_net",
               "model.width=4,6")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "2 point(s): 2 job(s) to run, 0 invalid" in done.stdout
    totals = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("total")]
    # stride 2: 14x14 after the stem, 7x7 after the pool, 5x5 after the body
    assert totals == [f"{params_of(w) - 144 * w * 10 + 25 * w * 10:,}" for w in (4, 6)]


@needs_fashion_mnist
def test_a_sweep_of_its_fields_trains_the_possible_point_and_skips_the_empty_one(tmp_path):
    done = cli("train", "-m", *TINY, "+model.width=8", "model.stride=1,8", *SMALL,
               "train.epochs=1", "data.train_limit=500", f"hydra.sweep.dir={tmp_path}/sweep",
               f"compilation_cache={tmp_path}/jax")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    preflight = (tmp_path / "sweep" / "preflight.txt").read_text()
    assert "2 point(s): 1 job(s) to run, 1 invalid" in preflight
    assert f"model.stride=8: model._target_=tests.user_nets.TinyNet: {EMPTY}" in preflight
    statuses = [json.loads((tmp_path / "sweep" / j / "summary.json").read_text()) for j in "01"]
    assert [s["status"] for s in statuses] == ["ok", "invalid"]
    assert statuses[0]["params"] == params_of(8) and EMPTY in statuses[1]["error"]
    assert (tmp_path / "sweep" / "0" / "checkpoint").is_dir()
    assert not (tmp_path / "sweep" / "1" / "checkpoint").exists()


@needs_fashion_mnist
def test_several_seeds_train_stacked(tmp_path):
    done = cli("train", *TINY, "+model.width=4", *SMALL, "data.train_limit=500", "seeds=[0,1]",
               "seeds_strategy=vmap", f"hydra.run.dir={tmp_path}/run")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["seeds"] == [0, 1]
    kernels = [
        final_params(tmp_path / "run" / f"seed_{s}")["params"]["stem"]["kernel"] for s in (0, 1)
    ]
    assert kernels[0].shape == (3, 3, 1, 4) and not np.array_equal(*kernels)


def _config(*overrides: str):
    cfg = to_config(compose_config(list(overrides)))
    validate(cfg)
    return cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([*TINY, "+model.widht=8"], "unknown config key model.widht: TinyNet has no field widht; "
         "did you mean model.width?"),
        ([*TINY, "model.depth=8"], "unknown config key model.depth: TinyNet has no field depth"),
        ([*TINY, "+model.num_classes=3"], "model.num_classes is set by cnnlab"),
        (["model=user", "model._target_=tests.user_nets.TinyNett"],
         "tests.user_nets has no TinyNett; did you mean tests.user_nets.TinyNet?"),
        (["model=user", "model._target_=tests.no_such_file.Net"],
         "model._target_=tests.no_such_file.Net cannot be imported: No module named"),
        (["model=user", "model._target_=tests.user_nets.NotAModule"],
         "is the class NotAModule, not a flax.linen.Module subclass"),
        (["model=user", "model._target_=tests.user_nets.NoTrain"],
         "apply(variables, x, train=True)): NoTrain.__call__() got an unexpected keyword argument "
         "'train'; its __call__ must take (x, train=False)"),
        (["model=user"], "model._target_ is required with model=user"),
        (["model._target_=tests.user_nets.TinyNet"], "on top of the layer preset lenet5: start "
         "from model=user"),
        (["+model.width=8"], "unknown config key model.width; did you mean"),
    ],
)  # fmt: skip
def test_mistakes_are_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as error:
        _config(*overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_geometry_is_checked_by_abstract_evaluation():
    """Rows from the traced submodule calls; an empty map, or a submodule that fails (a conv of
    0 filters: Flax's initializer divides by its fan), named with its input."""
    cfg = ModelConfig(layers=[], _target_="tests.user_nets.TinyNet", fields={"width": 2})
    rows = geometry.layers(cfg, (28, 28, 1), 10)
    assert [(r.name, r.out_shape, r.params) for r in rows] == [
        ("input", (28, 28, 1), 0), ("stem", (28, 28, 2), 20), ("norm", (28, 28, 2), 4),
        ("body", (12, 12, 2), 38), ("Dropout_0", (288,), 0), ("head", (10,), 2890),
    ]  # fmt: skip
    assert [r.macs for r in rows if r.name in ("stem", "head")] == [28 * 28 * 18, 2880]
    with pytest.raises(GeometryError) as error:
        geometry.layers(cfg, (4, 4, 1), 10)
    assert "submodule body (Conv) gets a 2x2x2 input and would output 0x0x2" in str(error.value)
    assert [r.name for r in error.value.rows] == ["input", "stem", "norm", "body"]
    zero = ModelConfig(layers=[], _target_="tests.user_nets.TinyNet", fields={"width": 0})
    with pytest.raises(GeometryError, match="submodule stem \\(Conv\\) fails on a 28x28x1 input"):
        geometry.layers(zero, (28, 28, 1), 10)
