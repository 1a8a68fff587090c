"""Optimizers and learning-rate schedules from `OptimizerConfig`, all built from optax parts.

A schedule is a function of the step, except `plateau`, which follows the training loss: the
optimizer is chained with `optax.contrib.reduce_on_plateau`, whose scale (in the optimizer state)
multiplies the updates, so the train step passes its loss to every `tx.update` as `value=`.
"""

import jax
import optax

from cnnlab.config import OptimizerConfig, OptimizerName, ScheduleName


def _sgd(cfg: OptimizerConfig, lr: optax.Schedule) -> optax.GradientTransformation:
    # optax.sgd has no weight decay: decay is added to the gradient before momentum (the L2
    # formulation of PyTorch's SGD), on kernels only.
    return optax.chain(
        optax.add_decayed_weights(cfg.weight_decay, mask=_kernels),
        optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.nesterov),
    )


def _adamw(cfg: OptimizerConfig, lr: optax.Schedule) -> optax.GradientTransformation:
    return optax.adamw(lr, cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay, mask=_kernels)


OPTIMIZERS = {OptimizerName.sgd: _sgd, OptimizerName.adamw: _adamw}


def _constant(cfg: OptimizerConfig, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
    return optax.constant_schedule(cfg.lr)


def _cosine(cfg: OptimizerConfig, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
    return optax.cosine_decay_schedule(cfg.lr, total_steps, alpha=cfg.end_lr_factor)


def _warmup_cosine(cfg: OptimizerConfig, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, warmup, max(total_steps, warmup + 1), end_value=cfg.lr * cfg.end_lr_factor
    )


SCHEDULES = {
    ScheduleName.constant: _constant,
    ScheduleName.cosine: _cosine,
    ScheduleName.warmup_cosine: _warmup_cosine,
    ScheduleName.plateau: _constant,  # the base rate; `_on_plateau` scales the updates
}


def _on_plateau(cfg: OptimizerConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """Scale the updates by `plateau_factor` after `plateau_patience` epochs without improvement of
    the epoch's mean loss, down to `end_lr_factor`. reduce_on_plateau counts values: it averages
    `steps_per_epoch` of them (one epoch's batch losses), then decides, so patience is in epochs."""
    return optax.contrib.reduce_on_plateau(
        factor=cfg.plateau_factor,
        patience=cfg.plateau_patience,
        accumulation_size=steps_per_epoch,
        min_scale=cfg.end_lr_factor,
    )


def lr_scale(opt_state) -> jax.Array | None:
    """The plateau schedule's current factor on the rate, found in the optimizer state; None for
    the other schedules."""
    found = [
        s.scale
        for s in jax.tree.leaves(opt_state, is_leaf=_is_plateau)
        if isinstance(s, optax.contrib.ReduceLROnPlateauState)
    ]
    return found[0] if found else None


def _is_plateau(node) -> bool:
    return isinstance(node, optax.contrib.ReduceLROnPlateauState)


def _kernels(params):
    """Weight decay mask: conv kernels and dense matrices, not biases."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def build_optimizer(
    cfg: OptimizerConfig, steps_per_epoch: int, epochs: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax transformation (with optional global-norm clipping and skipping of non-finite
    updates) and its schedule."""
    schedule = SCHEDULES[cfg.schedule](cfg, steps_per_epoch * epochs, steps_per_epoch)
    tx = OPTIMIZERS[cfg.name](cfg, schedule)
    if cfg.schedule == ScheduleName.plateau:
        tx = optax.chain(tx, _on_plateau(cfg, steps_per_epoch))
    if cfg.grad_clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
    if cfg.skip_nonfinite:  # an update with a NaN or inf leaves the state as it was
        tx = optax.apply_if_finite(tx, max_consecutive_errors=cfg.skip_nonfinite)
    return tx, schedule
