"""The jitted train and eval steps: pure functions of arrays.

The dataset lives on the device as uint8 for the whole run; a step receives the full arrays and
the indices of its batch, gathers the batch, augments and normalizes it inside the compiled
program, so the host sends only B int32 indices per step.

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

Glossary: `N` examples in a split, `B` batch, `H, W` spatial, `C` channels, `K` classes.
"""

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state
from jax.sharding import Mesh

from cnnlab.compiler import compiler_options, jit
from cnnlab.config import AugmentConfig
from cnnlab.parallel import batch_sharded, data_mesh, replicated, step_input

Metrics = dict[str, jax.Array]

# train.precision: the dtype of the forward and backward pass
PRECISIONS = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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
    every device of `mesh` (default: every device).

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
    return jax.jit(init, out_shardings=replicated(mesh), compiler_options=options)(key)


def normalize(images: jax.Array, mean: np.ndarray, std: np.ndarray) -> jax.Array:
    """uint8 [B, H, W, C] -> float32 with the training split's per-channel mean and std."""
    return (images.astype(jnp.float32) - mean) / std


def augmenting(cfg: AugmentConfig) -> bool:
    return cfg.crop_padding > 0 or cfg.flip or cfg.erase > 0


def augment(images: jax.Array, key: jax.Array, cfg: AugmentConfig) -> jax.Array:
    """Random crop after zero padding, random horizontal flip and random erasing, per example, in
    that order. [B, H, W, C] uint8."""
    b, h, w, c = images.shape
    crop_key, flip_key = jax.random.split(key)
    if cfg.crop_padding:
        p = cfg.crop_padding
        padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))  # [B, H + 2p, W + 2p, C]
        offsets = jax.random.randint(crop_key, (b, 2), 0, 2 * p + 1)  # [B, 2]
        crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))  # noqa: E731
        images = jax.vmap(crop)(padded, offsets)
    if cfg.flip:
        flip = jax.random.bernoulli(flip_key, 0.5, (b, 1, 1, 1))
        images = jnp.where(flip, images[:, :, ::-1], images)
    if cfg.erase > 0:  # its own key, so that turning it on leaves the crops and flips as they were
        images = erase(
            images, jax.random.fold_in(key, 2), cfg.erase, cfg.erase_scale, cfg.erase_ratio
        )
    return images


def erase(
    images: jax.Array, key: jax.Array, probability: float, scale: Sequence[float], ratio: float
) -> jax.Array:
    """Random erasing (Zhong et al., 2017, arXiv:1708.04896): with `probability`, an image gets
    one rectangle of `scale` (min, max) of its area, aspect ratio (height / width) log-uniform in
    [ratio, 1 / ratio], at a uniform position, filled with uniform noise. The paper redraws a
    rectangle that does not fit; here its sides are clipped to the image. [B, H, W, C] uint8."""
    b, h, w, _ = images.shape
    keys = jax.random.split(key, 6)
    area = jax.random.uniform(keys[0], (b,), minval=scale[0], maxval=scale[1]) * (h * w)
    log_ratio = abs(math.log(ratio))
    aspect = jnp.exp(jax.random.uniform(keys[1], (b,), minval=-log_ratio, maxval=log_ratio))
    eh = jnp.clip(jnp.round(jnp.sqrt(area * aspect)), 1, h).astype(jnp.int32)  # [B]
    ew = jnp.clip(jnp.round(jnp.sqrt(area / aspect)), 1, w).astype(jnp.int32)
    top = jax.random.randint(keys[2], (b,), 0, h - eh + 1)
    left = jax.random.randint(keys[3], (b,), 0, w - ew + 1)
    rows = jnp.arange(h)[None, :, None]  # [1, H, 1]
    cols = jnp.arange(w)[None, None, :]  # [1, 1, W]
    inside = (rows >= top[:, None, None]) & (rows < (top + eh)[:, None, None])
    inside &= (cols >= left[:, None, None]) & (cols < (left + ew)[:, None, None])  # [B, H, W]
    inside &= jax.random.bernoulli(keys[4], probability, (b, 1, 1))
    noise = jax.random.bits(keys[5], images.shape, images.dtype)
    return jnp.where(inside[..., None], noise, images)


def to_dtype(tree, dtype):
    """Floating leaves of `tree` in `dtype`; in float32 the tree is returned as is, so that the
    float32 program has no casts at all."""
    if dtype == jnp.float32:
        return tree
    cast = lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a  # noqa: E731
    return jax.tree.map(cast, tree)


def make_train_step(
    loss_fn: Callable,
    label_smoothing: float,
    mean: np.ndarray,
    std: np.ndarray,
    augment_cfg: AugmentConfig,
    precision: str = "float32",
    mesh: Mesh | None = None,
    lanes: bool = False,
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
    dtype = PRECISIONS[precision]
    mesh = mesh or data_mesh()
    everywhere, split = replicated(mesh), batch_sharded(mesh)

    def train_step(state: TrainState, images, labels, idx, key) -> tuple[TrainState, Metrics]:
        augment_key, dropout_key = jax.random.split(jax.random.fold_in(key, state.step))
        x, y = images[idx], labels[idx]  # [B, H, W, C] uint8, [B]
        if augmenting(augment_cfg):
            x = augment(x, augment_key, augment_cfg)
        x = normalize(x, mean, std)

        def loss(params):
            logits, updates = state.apply_fn(
                collect(to_dtype(params, dtype), state.batch_stats),
                to_dtype(x, dtype),
                train=True,
                rngs={"dropout": dropout_key},
                mutable=["batch_stats"],  # the running statistics' new values, if there are any
            )
            logits = logits.astype(jnp.float32)  # [B, K]
            return loss_fn(logits, y, label_smoothing).mean(), (logits, updates)

        # float32 gradients: the cast of the float32 parameters is part of the differentiated path
        (value, (logits, updates)), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
        state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", {}))
        metrics = {
            "train/loss": value,
            "train/accuracy": jnp.mean(jnp.argmax(logits, -1) == y),
            "train/grad_norm": optax.global_norm(grads),
        }
        if isinstance(state.opt_state, optax.ApplyIfFiniteState):  # optimizer.skip_nonfinite
            metrics["train/skipped_updates"] = state.opt_state.total_notfinite
            metrics["train/param_norm"] = optax.global_norm(state.params)
        return state, metrics

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
        x, y = normalize(images[idx], mean, std), labels[idx]
        model_vars = {**model_vars, "params": to_dtype(model_vars["params"], dtype)}
        logits = apply_fn(model_vars, to_dtype(x, dtype), train=False)
        logits = logits.astype(jnp.float32)  # [B, K]
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
