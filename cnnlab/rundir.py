"""The run directory must be writable and have room, checked before any training starts.

An unwritable folder or a full disk otherwise shows up when the first checkpoint is written, which
can be an hour into a run.
"""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from cnnlab import geometry
from cnnlab.config import Config
from cnnlab.data import INPUT_SHAPES
from cnnlab.errors import CnnlabError

MB = 1_000_000
# What a run writes when nothing better is known: a few LeNet-5 or AlexNet-lite checkpoints, the
# metrics and W&B's offline files, with a margin.
DEFAULT_NEED_BYTES = 50 * MB


def need_bytes(cfg: Config) -> int:
    """About what a run of `cfg` writes: `checkpoint.keep` training states and one being written
    (float32 parameters and up to two optimizer slots each, AdamW's moments), the final
    parameters, per seed, and DEFAULT_NEED_BYTES for the rest. The default alone where the input
    shape is known only once the data is loaded (image folders, IDX files)."""
    if cfg.data.name not in INPUT_SHAPES:
        return DEFAULT_NEED_BYTES
    shape, num_classes = INPUT_SHAPES[cfg.data.name]
    params = sum(row.params for row in geometry.layers(cfg.model, shape, num_classes))
    per_run = ((cfg.checkpoint.keep + 1) * 3 + 1) * params * 4
    return DEFAULT_NEED_BYTES + per_run * max(1, len(cfg.seeds))


def check_run_dir(run_dir: Path, need_bytes: int = DEFAULT_NEED_BYTES) -> None:
    """Raise CnnlabError unless `run_dir` can be created and written (a probe file is written,
    synced and deleted) and its file system has `need_bytes` free."""
    probe = None  # a unique name: the processes of a multi-host run share the run directory
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=run_dir, prefix=".cnnlab-write-probe-")
        with os.fdopen(fd, "wb") as f:
            f.write(b"cnnlab")
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
        free = shutil.disk_usage(run_dir).free
    except OSError as e:
        if probe:
            with contextlib.suppress(OSError):  # the folder is unusable anyway
                os.remove(probe)
        named = e.filename and str(e.filename) not in (str(run_dir), str(probe))
        raise CnnlabError(
            f"cannot write the run directory {run_dir}: {e.strerror or e}"
            + (f" ({e.filename})" if named else "")
            + "; choose a writable folder with hydra.run.dir=... (hydra.sweep.dir=... with -m)"
        ) from e
    if free < need_bytes:
        raise CnnlabError(
            f"only {free / MB:.0f} MB free on {_mount_point(run_dir)} (the file system of "
            f"{run_dir}); this run needs about {need_bytes / MB:.0f} MB (checkpoints, metrics, "
            "W&B files): free some space or choose another folder with hydra.run.dir=..."
        )


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path
