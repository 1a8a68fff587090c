"""The cnnlab contender: the task's network trained through cnnlab's own code path.

The model comes from `build_model`, the optimizer and schedule from `build_optimizer`, the jitted
steps from `make_train_step` / `make_eval_step`, the test from `evaluate` and the data order from
`epoch_order`, wired as `cnnlab.train.run` wires them: the splits go to the device once as uint8
(`put_dataset`, in place where the host array allows) and each step receives only the batch
indices. JAX's persistent compilation cache is off, so the first step always includes a cold
compile. The C allocator's arenas are limited as cnnlab-train limits them by default
(`cnnlab.malloc`): part of how cnnlab runs, like its compile options.

Run by `experiments/bench.py`: `python -m experiments.bench_workers.cnnlab_worker SPEC_JSON`.
Glossary: `N` examples, `B` batch, `H, W` spatial, `L` length, `C` channels.
"""

from importlib.metadata import version
from pathlib import Path

import jax
import numpy as np

import cnnlab
from cnnlab import kernels, malloc
from cnnlab.config import AugmentConfig, ModelConfig, OptimizerConfig
from cnnlab.models import build_model
from cnnlab.parallel import data_mesh, put_dataset
from cnnlab.train.loop import epoch_order, evaluate
from cnnlab.train.losses import LOSSES
from cnnlab.train.optim import build_optimizer
from cnnlab.train.step import (
    StepSettings,
    create_state,
    make_eval_step,
    make_train_step,
    variables,
)
from experiments.bench_workers.common import Spec, main


class CnnlabTrainer:
    contender = "cnnlab"
    malloc_arenas: int | None = None  # what __main__ set; None: glibc's default

    def __init__(self, spec: Spec, data: dict[str, np.ndarray]):
        self.eval_batch_size = spec.eval_batch_size
        images = data["train_images"]  # [N, H, W, C] uint8 images or [N, L, C] float32 series
        num_classes = int(max(data["train_labels"].max(), data["test_labels"].max())) + 1
        model = build_model(ModelConfig(**spec.model), num_classes)
        steps_per_epoch = len(images) // spec.batch_size
        tx, _ = build_optimizer(OptimizerConfig(**spec.optimizer), steps_per_epoch, spec.epochs)
        init_key, self.train_key = jax.random.split(jax.random.key(spec.seed))
        self.state = create_state(model, tx, images.shape[1:], init_key)
        loss_fn = LOSSES["cross_entropy"]
        mean, std = data["mean"].astype(np.float32), data["std"].astype(np.float32)
        augment = AugmentConfig(**spec.augment)
        self.train_step = make_train_step(StepSettings(loss_fn, 0.0, mean, std, augment))
        self.eval_step = make_eval_step(model.apply, loss_fn, mean, std)
        mesh = data_mesh()  # one device here, as `cnnlab.train.run.prepare` builds it
        self.train = put_dataset((images, data["train_labels"]), mesh)
        self.test = put_dataset((data["test_images"], data["test_labels"]), mesh)
        self.num_params = sum(p.size for p in jax.tree.leaves(self.state.params))
        self.metrics = None

    def step(self, idx: np.ndarray) -> None:
        self.state, self.metrics = self.train_step(self.state, *self.train, idx, self.train_key)

    def sync(self) -> float:
        return float(jax.device_get(self.metrics["train/loss"]))  # waits for every earlier step

    def test_accuracy(self) -> float:
        return evaluate(
            self.eval_step, variables(self.state), *self.test, self.eval_batch_size
        ).accuracy

    def info(self) -> dict:
        return {
            "framework": f"jax {jax.__version__}, flax {version('flax')}, optax {version('optax')}",
            "backend": jax.default_backend(),
            "malloc_arenas": self.malloc_arenas,
            # whether the float32 convolutions ran on oneDNN (off with CNNLAB_CONV=xla)
            "onednn_kernels": kernels.available(),
            "cnnlab_path": str(Path(cnnlab.__file__).parent),  # which files ran (--against)
        }


if __name__ == "__main__":
    CnnlabTrainer.malloc_arenas = (
        malloc.DEFAULT_ARENAS if malloc.limit_arenas(malloc.DEFAULT_ARENAS) else None
    )
    jax.config.update("jax_enable_compilation_cache", False)
    main(CnnlabTrainer, epoch_order)
