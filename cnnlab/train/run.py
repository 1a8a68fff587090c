"""One experiment from config to summary: data, geometry check, model, training, test, checkpoint.

`run` is what `cnnlab-train` calls for each Hydra job; it takes a plain `Config`, a run directory
and a tracker, and always finishes the tracker with a summary whose `status` says how it ended
(ok, diverged, failed, interrupted), so a failed run still leaves its record.
"""

import json
import time
import traceback
from pathlib import Path

import jax
import numpy as np
from omegaconf import OmegaConf

from cnnlab import checkpoint, geometry
from cnnlab.config import Config
from cnnlab.data import Dataset, load_dataset
from cnnlab.errors import ConfigError
from cnnlab.models import build_model
from cnnlab.parallel import data_mesh, put, replicated
from cnnlab.tracking import Tracker
from cnnlab.train.loop import evaluate, fit
from cnnlab.train.losses import LOSSES
from cnnlab.train.optim import build_optimizer
from cnnlab.train.progress import Progress
from cnnlab.train.step import create_state, make_eval_step, make_train_step
from cnnlab.validate import check_devices, validate


def write_run_files(cfg: Config, run_dir: Path, data: Dataset) -> None:
    """The resolved config and what `cnnlab-predict` needs to preprocess new images."""
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    meta = {
        "name": data.name,
        "class_names": list(data.class_names),
        "image_shape": list(data.image_shape),
        "mean": data.mean.tolist(),
        "std": data.std.tolist(),
        "sizes": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
    }
    (run_dir / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")


def run(cfg: Config, run_dir: Path, tracker: Tracker, progress: Progress | None = None) -> dict:
    """Train and test one configuration; returns the summary written to `summary.json`."""
    start = time.perf_counter()
    run_dir = Path(run_dir)
    summary: dict = {"status": "failed", "model": cfg.model.name, "dataset": cfg.data.name}
    summary.update(seed=cfg.seed, backend=jax.default_backend(), devices=jax.device_count())
    summary.update(processes=jax.process_count())
    try:
        validate(cfg)  # names and ranges, and the geometry wherever the input shape is known
        check_devices(cfg.train, jax.device_count(), jax.default_backend())
        data = load_dataset(cfg.data)
        if len(data.train) < cfg.train.batch_size:
            raise ConfigError(
                f"train.batch_size={cfg.train.batch_size} is more than the {len(data.train)} "
                "training examples; lower it, or raise data.train_limit"
            )
        rows = geometry.layers(cfg.model, data.image_shape, data.num_classes)
        summary.update(geometry.summarize(rows))
        if jax.process_index() == 0:  # the processes of a multi-host run share the run directory
            write_run_files(cfg, run_dir, data)
        tracker.log_layers(rows)
        result, test = _train(cfg, data, tracker, progress)
        summary.update(
            status=result.status,
            epochs=result.epochs,
            steps=int(result.state.step),
            compile_seconds=round(result.compile_seconds, 3),
            images_per_second=round(result.images_per_second, 1),
            **{"val/best_accuracy": result.best_val_accuracy, "val/best_epoch": result.best_epoch},
            **{k: v for k, v in result.last.items() if k.startswith("train/")},
        )
        if result.status == "diverged":
            summary["error"] = result.message
        else:
            summary.update({"test/accuracy": test.accuracy, "test/loss": test.loss})
            tracker.log_predictions(
                data.test.images, data.test.labels, test.probs, data.class_names
            )
            checkpoint.save_params(run_dir / "checkpoint", result.state.params)
    except KeyboardInterrupt:
        summary.update(status="interrupted", error="interrupted by the user")
        raise
    except Exception as e:
        summary.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        raise
    finally:
        summary["wall_seconds"] = round(time.perf_counter() - start, 3)
        tracker.finish(summary)
    return summary


def _train(cfg: Config, data: Dataset, tracker: Tracker, progress: Progress | None):
    init_key, train_key = jax.random.split(jax.random.key(cfg.seed))
    model = build_model(cfg.model, data.num_classes)
    steps_per_epoch = len(data.train) // cfg.train.batch_size
    tx, schedule = build_optimizer(cfg.optimizer, steps_per_epoch, cfg.train.epochs)
    mesh = data_mesh()  # every device; the batch is split over them (cnnlab.parallel)
    everywhere = replicated(mesh)
    state = create_state(model, tx, data.image_shape, init_key, mesh)
    loss_fn = LOSSES[cfg.loss.name]
    mean, std = data.mean.astype(np.float32), data.std.astype(np.float32)
    precision = cfg.train.precision
    train_step = make_train_step(
        loss_fn, cfg.loss.label_smoothing, mean, std, cfg.data.augment, precision, mesh
    )
    eval_step = make_eval_step(model.apply, loss_fn, mean, std, precision, mesh)
    device = lambda split: put((split.images, split.labels), everywhere)  # noqa: E731
    result = fit(
        state, train_step, eval_step, device(data.train), device(data.val), cfg.train,
        cfg.seed, put(train_key, everywhere), tracker.log, schedule, progress,
    )  # fmt: skip
    test = None
    if result.status == "ok":
        test = evaluate(
            eval_step, result.state.params, *device(data.test), cfg.train.eval_batch_size
        )
        tracker.log(
            {"test/loss": test.loss, "test/accuracy": test.accuracy}, int(result.state.step)
        )
    return result, test
