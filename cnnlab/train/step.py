"""The jitted train and eval steps: pure functions of arrays.

The dataset lives on the device as stored (uint8 images, float32 series) for the whole run; a
step receives the full arrays and the indices of its batch, gathers the batch, augments and
normalizes it inside the compiled program, so the host sends only B int32 indices per step.

Both steps run data-parallel over a mesh (`cnnlab.parallel`): the state and the dataset are
replicated, the indices and so the batch are split over the devices, and the loss's mean over the
global batch makes the gradient the same as on one device. One device is a mesh of one.

A model with batch normalization (`model.norm=batch`) also carries its running statistics, the
Flax collection `batch_stats`, in the state: the train step normalizes with the batch's statistics
(over the global batch, on every device) and updates the running ones, and evaluation uses those.
`variables(state)` is what `model.apply` takes.

With `precision="bfloat16"` the forward and backward pass run in bfloat16 (tensor cores on GPUs
and TPUs, half the activation memory) while the master parameters, the optimizer state, the
logits fed to the loss, the loss and the gradients the optimizer sees all stay float32.

Glossary: `N` examples in a split, `B` batch, `H, W` spatial, `L` length, `C` channels, `K`
classes. Series [N, L, C] go wherever images [N, H, W, C] do; series of unequal lengths as
`cnnlab.data.Padded` (values and lengths, gathered alike), the lengths passed to the model.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state
from jax.sharding import Mesh

from cnnlab import inference
from cnnlab.compiler import compiler_options, jit
from cnnlab.config import AugmentConfig, Precision
from cnnlab.parallel import batch_sharded, data_mesh, replicated, step_input
from cnnlab.preprocess import augment, augment_series, augmenting, augmenting_series, normalize
from cnnlab.train.optim import lr_scale

Metrics = dict[str, jax.Array]

# train.precision: the dtype of the forward and backward pass
PRECISIONS = {Precision.float32: jnp.float32, Precision.bfloat16: jnp.bfloat16}


class TrainState(train_state.TrainState):
    """Flax's train state (step, params, optimizer state) and the model's other variables: the
    running statistics of its batch normalization, `{}` for a model without."""

    batch_stats: Any = struct.field(default_factory=dict)


def variables(state: TrainState) -> dict:
    """What `model.apply` takes: `{"params": ...}`, with `"batch_stats"` where the model has any."""
    return collect(state.params, state.batch_stats)


def collect(params, batch_stats) -> dict:
    """The Flax variables of `params` and `batch_stats` (left out when empty)."""
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def create_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    image_shape: tuple,
    key: jax.Array,
    mesh: Mesh | None = None,
    lanes: bool = False,
) -> TrainState:
    """Initialize parameters from `key` for images of `image_shape` (H, W, C), replicated on
    every device of `mesh` (default: every device): `make_init(...)(key)`."""
    return make_init(model, tx, image_shape, mesh, lanes)(key)


def make_init(
    model: nn.Module,
    tx: optax.GradientTransformation,
    image_shape: tuple,
    mesh: Mesh | None = None,
    lanes: bool = False,
) -> Callable[[jax.Array], TrainState]:
    """`key -> TrainState`, jitted once: calling it for several seeds compiles it once.

    One compiled program (the same values as running it op by op): every process of a multi-host
    run computes the same state from the same key, and there a compilation per op costs seconds.
    `lanes=True`: `key` [S] initializes S states, stacked along a leading axis (`jax.vmap`).
    """

    def init(key: jax.Array) -> TrainState:
        init_vars = model.init(key, jnp.zeros((1, *image_shape), jnp.float32))
        return TrainState.create(
            apply_fn=model.apply,
            params=init_vars["params"],
            tx=tx,
            batch_stats=init_vars.get("batch_stats", {}),
        )

    if lanes:
        init = jax.vmap(init)
    mesh = mesh or data_mesh()
    options = compiler_options(mesh, once=True)
    return jax.jit(init, out_shardings=replicated(mesh), compiler_options=options)


def to_dtype(tree, dtype):
    """Floating leaves of `tree` in `dtype`; in float32 the tree is returned as is, so that the
    float32 program has no casts at all."""
    if dtype == jnp.float32:
        return tree
    cast = lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a
    return jax.tree.map(cast, tree)


@dataclass
class StepSettings:
    """What a train step computes besides the model and the optimizer (in the state)."""

    loss_fn: Callable  # cnnlab.train.losses: (logits [B, K], labels [B], smoothing) -> [B]
    label_smoothing: float
    mean: np.ndarray  # [C] the training split's per-channel mean, float32
    std: np.ndarray  # [C]
    augment: AugmentConfig
    precision: str = "float32"  # Precision, a key of PRECISIONS


def make_train_step(
    settings: StepSettings, mesh: Mesh | None = None, lanes: bool = False
) -> Callable[..., tuple[TrainState, Metrics]]:
    """`(state, images, labels, idx, key) -> (state, metrics)`, jitted, with the state donated.

    `images` [N, H, W, C] uint8 and `labels` [N] stay on the device; `idx` [B], host int32, picks
    the batch and is split over the devices of `mesh` (default: every device), so B must be a
    multiple of their number. The state, images, labels and key are replicated on the mesh
    (`cnnlab.parallel.put`). The step's randomness is `key` folded with the step number: no key
    travels in the state.

    `lanes=True` trains S models at once (`jax.vmap`, one device): the state, `idx` [S, B], `key`
    [S] and the metrics have a leading axis S, one entry per model; the dataset is shared.
    """
    mesh = mesh or data_mesh()
    everywhere, split = replicated(mesh), batch_sharded(mesh)
    train_step = functools.partial(_train_step, settings)
    if lanes:
        train_step = jax.vmap(train_step, in_axes=(0, None, None, 0, 0))
    jitted, nestable = jit(
        train_step,
        mesh,
        donate_argnums=0,
        in_shardings=(everywhere, everywhere, everywhere, split, everywhere),
        out_shardings=everywhere,  # the new state and the metrics, whole on every device
    )

    @functools.wraps(nestable)  # step.__wrapped__: the jitted step, to trace or inspect it
    def step(state: TrainState, images, labels, idx, key) -> tuple[TrainState, Metrics]:
        return jitted(state, images, labels, step_input(idx, split), key)

    return step


def _train_step(
    settings: StepSettings, state: TrainState, images, labels, idx, key
) -> tuple[TrainState, Metrics]:
    """The train step of `make_train_step`, before jit."""
    dtype = PRECISIONS[settings.precision]
    augment_key, dropout_key = jax.random.split(jax.random.fold_in(key, state.step))
    batch, y = inference.gather(images, idx), labels[idx]  # [B, H, W, C] uint8, [B]
    x, extra = inference.model_input(batch)  # extra: the lengths of padded series
    if augmenting(settings.augment):  # uint8 images, in pixels
        x = augment(x, augment_key, settings.augment)
    x = normalize(x, settings.mean, settings.std)
    if augmenting_series(settings.augment):  # series, normalized: the shift fills in the mean
        # and scaling stretches about it; the key is the images' (one kind runs, check_augment)
        x = augment_series(x, extra.get("lengths"), augment_key, settings.augment)

    def loss(params):
        logits, updates = state.apply_fn(
            collect(to_dtype(params, dtype), state.batch_stats),
            to_dtype(x, dtype),
            train=True,
            rngs={"dropout": dropout_key},
            mutable=["batch_stats"],  # the running statistics' new values, if there are any
            **extra,
        )
        logits = logits.astype(jnp.float32)  # [B, K]
        return settings.loss_fn(logits, y, settings.label_smoothing).mean(), (logits, updates)

    # float32 gradients: the cast of the float32 parameters is part of the differentiated path
    (value, (logits, updates)), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
    state = _apply_gradients(state, grads, value, updates.get("batch_stats", {}))
    metrics = {
        "train/loss": value,
        "train/accuracy": jnp.mean(jnp.argmax(logits, -1) == y),
        "train/grad_norm": optax.global_norm(grads),
    }
    if isinstance(state.opt_state, optax.ApplyIfFiniteState):  # optimizer.skip_nonfinite
        metrics["train/skipped_updates"] = state.opt_state.total_notfinite
        metrics["train/param_norm"] = optax.global_norm(state.params)
    scale = lr_scale(state.opt_state)
    if scale is not None:  # optimizer.schedule=plateau: the factor on the rate it has reached
        metrics["train/lr_scale"] = scale
    return state, metrics


def _apply_gradients(state: TrainState, grads, loss: jax.Array, batch_stats) -> TrainState:
    """Flax's `apply_gradients`, with the loss passed to the optimizer as `value=`, which
    `optax.contrib.reduce_on_plateau` reads (and every other transformation ignores)."""
    tx = optax.with_extra_args_support(state.tx)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, value=loss)
    params = optax.apply_updates(state.params, updates)
    return state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, batch_stats=batch_stats
    )


def make_eval_step(
    apply_fn: Callable,
    loss_fn: Callable,
    mean: np.ndarray,
    std: np.ndarray,
    precision: str = "float32",
    mesh: Mesh | None = None,
) -> Callable[..., dict[str, Any]]:
    """`(variables, images, labels, idx, mask) -> sums and probabilities` for one padded batch;
    `variables` as `variables(state)` gives them.

    `mask` [B] is False for the padding that fills the last batch; sums ignore it. Any B works:
    the batch is padded further to a multiple of the devices of `mesh`, and the probabilities of
    that extra padding are dropped again.
    """
    dtype = PRECISIONS[precision]
    mesh = mesh or data_mesh()
    everywhere, split = replicated(mesh), batch_sharded(mesh)

    def eval_step(model_vars, images, labels, idx, mask, size: int) -> dict[str, jax.Array]:
        y = labels[idx]
        model_vars = {**model_vars, "params": to_dtype(model_vars["params"], dtype)}
        batch = inference.gather(images, idx)  # [B, H, W, C], or padded series
        logits = inference.logits(apply_fn, model_vars, batch, mean, std, dtype)  # [B, K]
        losses = loss_fn(logits, y, 0.0)  # [B]
        return {
            "loss_sum": jnp.sum(jnp.where(mask, losses, 0.0)),
            "correct": jnp.sum(mask & (jnp.argmax(logits, -1) == y)),
            "probs": jax.nn.softmax(logits)[:size],  # [size, K]: the extra padding dropped
        }

    # The outputs are replicated (the probabilities gathered), so that every process can read them.
    jitted, nestable = jit(
        eval_step,
        mesh,
        in_shardings=(everywhere, everywhere, everywhere, split, split),
        out_shardings=everywhere,
        static_argnums=5,  # size
    )

    @functools.wraps(nestable)
    def step(model_vars, images, labels, idx, mask) -> dict[str, jax.Array]:
        b, extra = len(idx), -len(idx) % mesh.size
        idx, mask = np.pad(idx, (0, extra), mode="edge"), np.pad(mask, (0, extra))  # [B + extra]
        idx, mask = step_input(idx, split), step_input(mask, split)
        return jitted(model_vars, images, labels, idx, mask, b)

    return step
