"""Bad input, collected: every mistake a user can make on the command line or with their files
ends in a short error that names the key or file (and, for a typo, the key they meant), a non-zero
exit and no traceback. Each case is a real `cnnlab-train` run.

`{tmp}` in a case is the folder where `make_bad_files` put the broken data files and a plain
file (`{tmp}/file`) to put a run directory under.
"""

import gzip
import io
import os
import shutil
import subprocess
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnlab.errors import CnnlabError
from cnnlab.rundir import check_run_dir
from tests.conftest import cli

# First, so that a bad override after them wins and a missed error trains only briefly.
SHORT = ["logger.mode=disabled", "logger.pictures=false", "train.epochs=1", "data.train_limit=500"]

BAD = [
    # wrong types
    ("wrong-type int", ["train.epochs=ten"], "train.epochs"),
    ("wrong-type float", ["model.dropout=abc"], "model.dropout"),
    ("wrong-type float lr", ["optimizer.lr=fast"], "optimizer.lr"),
    ("wrong-type list", ["seeds=3"], "seeds"),
    ("wrong-type list items", ["seeds=[0,one]"], "seeds"),
    ("wrong-type bool", ["data.augment.flip=maybe"], "data.augment.flip"),
    ("wrong-type dense", ["model.dense=wide"], "model.dense"),
    ("wrong-type depth item", ["model.depth=[6,x]"], "model.depth"),
    # unknown keys and typos, with and without +
    ("typo", ["model.depht=3"], "did you mean model.depth?"),
    ("typo plus", ["+model.dpeth=3"], "did you mean model.depth?"),
    ("typo group", ["trian.epochs=3"], "did you mean train.epochs?"),
    ("typo group plus", ["+trian.epochs=3"], "did you mean train.epochs?"),
    ("typo nested", ["+data.augment.flp=true"], "did you mean data.augment.flip?"),
    ("typo optimizer", ["optimizer.momentun=0.5"], "did you mean optimizer.momentum?"),
    ("typo root plus", ["+seeed=1"], "did you mean seed?"),
    ("unknown flag", ["--epochs=3"], "--epochs=3"),
    ("flag after overrides", ["model.depth=6,12", "-m"], "model.depth=6,12"),
    # required values left unset
    ("unset image_folder path", ["data=image_folder"], "data.path"),
    ("unset idx path", ["data=idx"], "data.path"),
    ("unset ???", ["model.activation=???"], "model.activation"),
    # out-of-range numbers
    ("range depth negative", ["model.depth=-1"], "model.depth"),
    ("range depth zero", ["model.depth=0"], "model.depth"),
    ("range stride", ["model.stride=0"], "model.stride"),
    ("range dropout", ["model.dropout=1.0"], "model.dropout"),
    ("range lr", ["optimizer.lr=-1"], "optimizer.lr"),
    ("range epochs", ["train.epochs=0"], "train.epochs"),
    ("range batch", ["data=idx", "data.path={tmp}/ok", "train.batch_size=64"], "train.batch_size"),
    ("range val_fraction", ["data.val_fraction=1.5"], "data.val_fraction"),
    ("range train_limit", ["data.train_limit=-5"], "data.train_limit"),
    ("range label_smoothing", ["loss.label_smoothing=1"], "loss.label_smoothing"),
    ("range seed", ["seed=-1"], "seed"),
    ("repeated seeds", ["seeds=[1,1]"], "seeds"),
    ("distributed unused", ["distributed.process_id=1"], "distributed.enabled"),
    ("range checkpoint keep", ["checkpoint.keep=0"], "checkpoint.keep"),
    ("range checkpoint every", ["checkpoint.every_steps=0"], "checkpoint.every_steps"),
    ("range skip_nonfinite", ["optimizer.skip_nonfinite=-1"], "optimizer.skip_nonfinite"),
    ("range shift", ["data=ucr", "data.augment.shift=-1"], "data.augment.shift=-1"),
    ("range scale", ["data=ucr", "data.augment.scale=1.0"], "data.augment.scale=1.0"),
    # unknown names
    ("unknown model group", ["model=resnet"], "model/resnet"),
    ("unknown data name", ["data.name=imagenet"], "data.name"),
    ("unknown data group", ["data=imagenet"], "data/imagenet"),
    ("unknown optimizer name", ["optimizer.name=lion"], "optimizer.name"),
    ("unknown optimizer group", ["optimizer=lion"], "optimizer/lion"),
    ("unknown padding", ["model.padding=full"], "model.padding"),
    (
        "unknown activation",
        ["model.activation=gleu"],
        "model.activation='gleu' is not known; did you mean gelu?",
    ),
    ("unknown schedule", ["optimizer.schedule=step"], "optimizer.schedule"),
    ("unknown logger mode", ["logger.mode=loud"], "logger.mode"),
    ("unknown sweep preset", ["sweep=nope"], "sweep/nope"),
    ("unknown launcher", ["hydra/launcher=nope"], "hydra/launcher/nope"),
    # impossible geometry
    ("geometry kernel", ["model.kernel_size=40", "model.padding=valid"], "conv1"),
    ("geometry stride", ["model.padding=valid", "model.stride=2"], "pool2"),
    ("geometry alexnet", ["model=alexnet_lite", "model.stride=2"], "pool"),
    ("geometry list length", ["model.conv_layers=3"], "model.padding"),
    # mistakes in a layer list: each names the layer's index and key, or the layer's table name
    ("layers not a list", ["model.layers=conv"], "model.layers must be list, not 'conv'"),
    (
        "layer kind typo",
        ["model.layers=[{conv: 8},{cnov: 8},flatten]"],
        "model.layers[1] has no kind ('cnov' is not one; did you mean conv?)",
    ),
    (
        "layer bare typo",
        ["model.layers=[{conv: 8},rleu,flatten]"],
        "model.layers[1]='rleu' is not a layer; did you mean relu?",
    ),
    (
        "layer two kinds",
        ["model.layers=[{conv: 8, dense: 4},flatten]"],
        "model.layers[0] has 2 kinds (conv, dense)",
    ),
    (
        "layer option typo",
        ["+model.layers.0.kernal=3"],
        "model.layers[0].kernal: a conv layer has no option 'kernal'; did you mean kernel?",
    ),
    (
        "layer missing value",
        ["model.layers.0.conv=null"],
        "model.layers[0].conv is missing its value",
    ),
    (
        "layer kind without value",
        ["model.layers=[conv,flatten]"],
        "model.layers[0]: a conv layer needs a value",
    ),
    (
        "layer activation typo",
        ["model.layers=[{conv: 8},{act: gleu},flatten]"],
        "model.layers[1].act='gleu' is not known; did you mean gelu?",
    ),
    (
        "layer pool kind",
        ["model.layers.2.pool=median"],
        "model.layers[2].pool='median' is not known",
    ),
    ("layer padding", ["model.layers.0.padding=full"], "model.layers[0].padding='full' is invalid"),
    ("layer stride zero", ["+model.layers.0.stride=0"], "model.layers[0].stride=0 is invalid"),
    (
        "layer dropout rate",
        ["model.layers=[{conv: 8},flatten,{dropout: 1.0}]"],
        "model.layers[2].dropout=1.0 is invalid",
    ),
    (
        "layer empty residual",
        ["model.layers=[{conv: 8},{residual: []},flatten]"],
        "model.layers[1].residual is empty",
    ),
    (
        "layer kernel larger than its input",
        ["model.layers.0.kernel=40", "model.layers.0.padding=valid"],
        "conv1 (conv 40x40, stride 1, pad 0) gets a 28x28x1 input",
    ),
    (
        "layer residual cannot add",
        ["model.layers=[{conv: 8},{residual: [{conv: 8, padding: valid}]},global_pool]"],
        "res1 (residual block) cannot add its branches",
    ),
    (
        "layer dense on a map",
        ["model.layers=[{conv: 8},{dense: 10}]"],
        "dense1 (dense 10) gets a 28x28x8 map: put flatten or global_pool before it",
    ),
    (
        "layer global_pool on a vector",
        ["model.layers=[{conv: 8},flatten,global_pool]"],
        "global_pool1 (global_pool) gets a vector of 6272 units",
    ),
    (
        "layer conv on a vector",
        ["model.layers=[flatten,{conv: 8}]"],
        "conv1 (conv) gets a vector of 784 units",
    ),
    ("layers end on a map", ["model.layers=[{conv: 8},relu]"], "the layers end on a 28x28x8 map"),
    (
        "layer group norm",
        [
            "model.layers=[{conv: 6},{norm: group, groups: 4},relu,flatten]",
            "model.norm_groups=null",
        ],
        "model.norm_groups=4 does not divide conv1's 6 filters",
    ),
    (
        "conv_layers on a residual net",
        ["model.layers=[{conv: 8},{residual: [{conv: 8}]},flatten]", "model.conv_layers=2"],
        "model.conv_layers applies to a plain stack",
    ),
    # a training step larger than the machine's memory
    ("memory batch", ["model=alexnet_lite", "train.batch_size=100000000"], "at batch 100000000"),
    # malformed sweep syntax
    ("sweep empty item", ["-m", "model.depth=6,,12"], "model.depth=6,,12"),
    ("sweep range", ["-m", "model.depth=range(1"], "model.depth=range(1"),
    ("sweep bracket", ["-m", "model.depth=[6,16"], "model.depth=[6,16"),
    ("sweep quote", ["-m", "model.name='lenet5"], "model.name='lenet5"),
    ("sweep without -m", ["model.depth=6,12"], "model.depth=6,12"),
    ("sweep range step 0", ["-m", "model.depth=range(1,5,0)"], "model.depth=range(1,5,0)"),
    ("sweep empty choice", ["-m", "model.depth=choice()"], "model.depth=choice()"),
    ("delete unknown key", ["~model.nope"], "model.nope"),
    # a missing offline dataset
    ("missing idx folder", ["data=idx", "data.path=/nonexistent"], "/nonexistent"),
    ("missing zip", ["data=image_folder", "data.path=/nonexistent.zip"], "/nonexistent.zip"),
    ("missing init_from", ["checkpoint.init_from=/nonexistent/run"], "/nonexistent/run"),
    # corrupt data files (made by make_bad_files)
    ("truncated gzip idx", ["data=idx", "data.path={tmp}/truncated"], "train-images-idx3"),
    ("bad idx magic", ["data=idx", "data.path={tmp}/magic"], "train-labels-idx1"),
    ("not a zip", ["data=image_folder", "data.path={tmp}/x.zip"], "x.zip"),
    ("corrupt jpeg", ["data=image_folder", "data.path={tmp}/jpeg.zip"], "train/b/1.jpg"),
    # time series of the UCR/UEA archives (data=ucr) and .ts files (made by make_bad_files)
    ("ucr unknown name", ["data=ucr", "data.name=GunPiont"], "did you mean GunPoint?"),
    ("ucr unknown source", ["data.source=ucx"], "data.source='ucx' is not known"),
    ("ucr normalize images", ["data.normalize=series"], "data.normalize=series"),
    ("ucr missing ts file", ["data=ucr", "data.name=Nope", "data.path={tmp}/ts"], "Nope_TRAIN.ts"),
    ("ucr malformed ts", ["data=ucr", "data.name=Broken", "data.path={tmp}/ts"], "Broken_TRAIN.ts"),
    (
        "ucr channels differ",
        ["data=ucr", "data.name=Channels", "data.path={tmp}/ts"],
        "{tmp}/ts/Channels_TEST.ts: 2",
    ),
    (  # FCN takes the 4 steps of these files (LeNet-5's geometry would refuse them first)
        "ucr series all missing",
        ["data=ucr", "data.name=Gaps", "data.path={tmp}/ts", "model=fcn"],
        "Gaps_TRAIN.ts: series 1: channel 0 is missing entirely",
    ),
    (
        "ucr missing refused",
        ["data=ucr", "data.name=Gaps", "data.path={tmp}/ts", "data.missing=error", "model=fcn"],
        "Gaps_TRAIN.ts: series 0 has missing values (NaN) and data.missing=error",
    ),
    (
        "series augmentation of images",
        ["data.augment.shift=4"],
        "data.augment.shift=4 augments series [L, C], but this dataset holds uint8 images",
    ),
    (
        "image augmentation of series",
        ["data=ucr", "data.augment.flip=true"],
        "data.augment.flip=true augments uint8 images [H, W, C], but this dataset holds series",
    ),
    ("ucr shift longer than the series", ["data=ucr", "data.augment.shift=150"], "150 steps"),
    (
        "ucr series shorter than the net",
        [
            "data=ucr",
            "data.name=JapaneseVowels",
            "model.layers=[{conv: 8, kernel: 12, padding: valid},relu,global_pool]",
        ],
        "data.name=JapaneseVowels: its shortest series (7..29 steps",
    ),
    # a run directory that cannot be created
    ("run dir under /dev/null", ["hydra.run.dir=/dev/null/x"], "/dev/null/x"),
    ("run dir under a file", ["hydra.run.dir={tmp}/file/run"], "{tmp}/file/run"),
    ("sweep dir under a file", ["-m", "seed=1,2", "hydra.sweep.dir={tmp}/file/s"], "file/s"),
]


def _idx(array: np.ndarray) -> bytes:
    """`array` as an IDX file (uint8)."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def _jpeg(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def make_bad_files(tmp_path: Path) -> None:
    """Small datasets: a good IDX folder of 20 images, and broken ones: a gzipped IDX file cut in
    half, an IDX file with a bad magic number, a text file named x.zip, a zip with a corrupt JPEG;
    and a plain file."""
    images, labels = np.zeros((20, 28, 28), np.uint8), np.arange(20) % 10
    for folder in ("ok", "truncated", "magic"):
        (tmp_path / folder).mkdir()
        for prefix in ("train", "t10k"):
            (tmp_path / folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
                gzip.compress(_idx(images))
            )
            (tmp_path / folder / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(labels))
    cut = tmp_path / "truncated" / "train-images-idx3-ubyte.gz"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    (tmp_path / "magic" / "train-labels-idx1-ubyte").write_bytes(b"<html>not found</html>")
    (tmp_path / "x.zip").write_text("not a zip archive")
    with zipfile.ZipFile(tmp_path / "jpeg.zip", "w") as zf:
        for split in ("train", "test"):
            for k, name in enumerate(("a", "b")):
                zf.writestr(f"{split}/{name}/0.jpg", _jpeg(100 * k))
        zf.writestr("train/b/1.jpg", _jpeg(200)[:40])  # cut off inside the header
    (tmp_path / "file").write_text("a file, not a folder")
    _make_bad_ts(tmp_path / "ts")


def _ts(name: str, rows: list[str], channels: int = 1) -> str:
    """A .ts file of `rows` ("v,v,v:v,v,v:label" each) with the header the archive writes."""
    header = [f"@problemName {name}", "@timeStamps false", "@missing true",
              f"@univariate {str(channels == 1).lower()}", f"@dimensions {channels}",
              "@equalLength false", "@classLabel true a b", "@data"]  # fmt: skip
    return "\n".join(header + rows) + "\n"


def _make_bad_ts(folder: Path) -> None:
    """Broken .ts folders: a train file that is no .ts file, a test split with 2 channels where
    train has 1, a series with one channel missing entirely (NaN) and one with a gap."""
    folder.mkdir()
    good = _ts("x", ["1,2,3,4:a", "4,3,2,1:b"])
    (folder / "Broken_TRAIN.ts").write_text("<html>not found</html>\n@data\n1,2,:3\n")
    (folder / "Broken_TEST.ts").write_text(good)
    (folder / "Channels_TRAIN.ts").write_text(good)
    (folder / "Channels_TEST.ts").write_text(_ts("c", ["1,2,3:1,2,3:a", "3,2,1:1,1,1:b"], 2))
    (folder / "Gaps_TRAIN.ts").write_text(_ts("g", ["1,NaN,3,4:a", "NaN,NaN,NaN,NaN:b"]))
    (folder / "Gaps_TEST.ts").write_text(good)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    """Every invocation of BAD, run once up front, two at a time: each is a process that spends
    most of its second starting Python, so the corpus takes half as long on two cores."""
    root = tmp_path_factory.mktemp("bad")
    make_bad_files(root)

    def invoke(number: int, overrides: list[str]) -> subprocess.CompletedProcess:
        overrides = [o.replace("{tmp}", str(root)) for o in overrides]
        flag = overrides[:1] if overrides[:1] == ["-m"] else []  # before the short-run settings
        dirs = [f"hydra.run.dir={root}/run-{number}", f"hydra.sweep.dir={root}/sweep-{number}"]
        dirs = [d for d in dirs if not any(o.startswith(d.split("=")[0]) for o in overrides)]
        return cli("train", *flag, *SHORT, *overrides[len(flag) :], *dirs)

    with ThreadPoolExecutor(max_workers=2) as pool:
        done = pool.map(invoke, range(len(BAD)), [case[1] for case in BAD])
        return root, dict(zip([case[0] for case in BAD], done, strict=True))


@pytest.mark.parametrize("name, named", [(c[0], c[2]) for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_is_a_short_error_naming_the_key_or_file(outcomes, name, named):
    root, done = outcomes[0], outcomes[1][name]
    assert done.returncode != 0, done.stdout[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 3 and lines[-1].startswith("cnnlab: error: "), done.stderr
    assert named.replace("{tmp}", str(root)) in done.stderr, done.stderr


@pytest.mark.parametrize("command", ["train", "inspect_model"])
def test_a_step_larger_than_memory_is_refused_in_one_line_before_jax(command, tmp_path):
    """666 quadrillion parameters: refused with the figures before JAX loads, not allocated."""
    dirs = [f"hydra.run.dir={tmp_path}/run"] if command == "train" else []
    start = time.perf_counter()
    done = cli(command, *SHORT, "model.depth=100000000", *dirs)
    seconds = time.perf_counter() - start
    assert done.returncode == 2, done.stdout[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cnnlab: error: a training step needs"), lines
    assert "parameters 2,666.7 PB" in lines[0] and "GB available" in lines[0]
    assert "total" not in done.stdout  # no layer table of an impossible net
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert seconds < 15, seconds  # about 1 s; generous for a loaded CI machine


def test_run_dir_check_refuses_a_folder_below_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(CnnlabError, match=r"cannot write the run directory .*file/run: Not a dir"):
        check_run_dir(tmp_path / "file" / "run", need_bytes=0)


def test_run_dir_check_refuses_a_full_disk_and_names_what_is_needed(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(CnnlabError, match=r"only \d+ MB free on /.*needs about \d+ MB"):
        check_run_dir(tmp_path / "run", need_bytes=free + 10**9)
    check_run_dir(tmp_path / "run", need_bytes=1)  # room enough: no error, no probe left behind
    assert list((tmp_path / "run").iterdir()) == []


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 1 MB tmpfs, where the container allows mounting one."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_nearly_full_disk_stops_the_run_before_training(tiny_filesystem):
    done = cli("train", *SHORT, f"hydra.run.dir={tiny_filesystem}/run")
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"MB free on {tiny_filesystem}" in lines[0] and "this run needs about" in lines[0]
    assert not (tiny_filesystem / "run" / "metrics.jsonl").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
@pytest.mark.parametrize("mode", ["", "-m"])
def test_a_full_disk_where_hydra_cannot_even_write_its_files(tiny_filesystem, mode):
    filler = tiny_filesystem / "filler"
    with open(filler, "wb") as f, pytest.raises(OSError):  # No space left on device
        f.write(bytes(2_000_000))
    overrides = [f"hydra.run.dir={tiny_filesystem}/run", f"hydra.sweep.dir={tiny_filesystem}/s"]
    done = cli("train", *([mode] if mode else []), *SHORT, *overrides)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr and len(lines) <= 3, done.stderr
    assert "No space left" in lines[-1] and lines[-1].startswith("cnnlab: error: cannot ")
    assert f"{tiny_filesystem}/{'s' if mode else 'run'}" in lines[-1]
