"""Every way of computing a convolution, and oneDNN's max pool, agree with XLA's own, gradients
included; `plan` and `layers.pooled` pick the way each layer is computed."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnlab import kernels
from cnnlab.architecture import Pool, PoolKind
from cnnlab.models import layers
from cnnlab.models.conv import FORMULATIONS, conv2d, plan
from cnnlab.models.layers import Conv
from cnnlab.models.pool import max_pool_onednn

# (x shape [B, H, W, C], kernel side, filters, stride, padding): LeNet-5's and AlexNet-lite's
# layers, strided and asymmetric "same" padding, a 1-channel input with stride 2, larger batches,
# and padding wider than the kernel's reach.
CASES = [
    ((4, 28, 28, 1), 5, 6, 1, 2),
    ((4, 14, 14, 6), 5, 16, 1, 0),
    ((2, 32, 32, 3), 5, 8, 1, "same"),
    ((2, 16, 16, 4), 4, 5, 2, "same"),  # even kernel, stride 2: padding 1+2
    ((3, 11, 11, 1), 3, 4, 2, "valid"),
    ((16, 32, 32, 3), 5, 4, 1, "same"),
    ((10, 28, 28, 6), 5, 3, 1, 4),  # 32x32 outputs
]


def _pads(padding, x_shape, k, s):
    if isinstance(padding, str):
        return tuple(jax.lax.padtype_to_pads(x_shape[1:3], (k, k), (s, s), padding.upper()))
    return ((padding, padding),) * 2


def _inputs(x_shape, k, f):
    """Random x, w and a cotangent seed, from numpy: jax.random would compile per shape."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=x_shape).astype(np.float32)
    w = (rng.normal(size=(k, k, x_shape[-1], f)) / k).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(w), rng  # rng draws the cotangent


OTHERS = sorted(set(FORMULATIONS) - {"xla"})


def _check(name, case, gradients):
    x_shape, k, f, s, padding = case
    x, w, rng = _inputs(x_shape, k, f)
    pads, strides = _pads(padding, x_shape, k, s), (s, s)
    ref = lambda x, w: FORMULATIONS["xla"](x, w, strides, pads)
    # through conv2d, whose gradients are oneDNN's primitives for "onednn", else XLA's autodiff
    got = lambda x, w: conv2d(x, w, strides, pads, name)
    g = rng.normal(size=jax.eval_shape(ref, x, w).shape).astype(np.float32)
    outputs = lambda conv: jax.jit(
        lambda x, w: (conv(x, w), jax.vjp(conv, x, w)[1](g) if gradients else ())
    )(x, w)
    assert_close_at_scale(outputs(got), outputs(ref))


def assert_close_at_scale(got, ref):
    """Close to 1e-4, or to 1e-5 of each array's largest value: a kernel gradient sums B * H' * W'
    products of values in the hundreds, so an entry near zero after that cancellation keeps an
    absolute error of the sums' size, which another summation order changes."""
    for got_leaf, ref_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        scale = float(jnp.max(jnp.abs(ref_leaf)))
        np.testing.assert_allclose(got_leaf, ref_leaf, atol=1e-4 + 1e-5 * scale, rtol=1e-4)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-k{c[1]}-f{c[2]}-s{c[3]}-{c[4]}")
@pytest.mark.parametrize("name", OTHERS)
def test_formulation_matches_xla(case, name):
    _check(name, case, gradients=False)


@pytest.mark.parametrize(
    "case", [CASES[0], CASES[3], CASES[6]], ids=["lenet-conv1", "stride2-even-kernel", "wide-pad"]
)
@pytest.mark.parametrize("name", OTHERS)
def test_formulation_gradients_match_xla(case, name):
    _check(name, case, gradients=True)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-k{c[1]}-f{c[2]}-s{c[3]}-{c[4]}")
def test_onednn_gradients_match_xla_on_every_case(case):
    _check("onednn", case, gradients=True)  # the CPU's default: every shape, not three


def test_plan_uses_onednn_on_one_cpu_device_in_float32():
    assert kernels.available()
    for channels in [1, 3, 96]:
        assert plan(channels, "cpu") == "onednn"
        assert plan(channels, "cpu", devices=8) != "onednn"  # XLA cannot split the call
        assert plan(channels, "cpu", dtype=jnp.bfloat16) == "xla"
        assert plan(channels, "gpu") == "xla"


def test_plan_without_onednn_uses_taps_for_an_images_channels_in_float32_on_the_cpu(monkeypatch):
    monkeypatch.setattr(kernels, "available", lambda: False)  # as where oneDNN is not built
    assert plan(1, "cpu") == plan(3, "cpu") == plan(4, "cpu") == "taps"
    assert plan(1, "cpu", devices=8) == "taps"
    assert plan(5, "cpu") == plan(24, "cpu") == "xla"
    assert plan(1, "cpu", dtype=jnp.bfloat16) == "xla"  # the taps make bfloat16 slower
    assert plan(1, "gpu") == "xla"


def _layer_ops(dtype) -> tuple[str, str]:
    """The jaxprs of a 1-channel conv layer and a max pool in `dtype`: forward, and its gradient."""
    x = jnp.zeros((2, 12, 12, 1), dtype)
    conv = Conv(4, 3, 1, "same")
    params = conv.init(jax.random.key(0), x)
    layer = lambda params, x: jnp.sum(layers.pooled(conv.apply(params, x), Pool(PoolKind.max)))
    return str(jax.make_jaxpr(layer)(params, x)), str(jax.make_jaxpr(jax.grad(layer))(params, x))


def test_float32_takes_onednn_else_taps_and_bfloat16_xlas_convolution_all_else_nn_max_pool(
    monkeypatch,
):
    forward, grad = _layer_ops(jnp.float32)
    assert "cnnlab_conv_forward" in forward and "cnnlab_max_pool_forward" in forward
    assert "cnnlab_max_pool_backward" in grad and "select_and_scatter_add" not in grad
    monkeypatch.setattr(kernels, "available", lambda: False)  # as where oneDNN is not built
    (forward32, grad32), (forward16, grad16) = _layer_ops(jnp.float32), _layer_ops(jnp.bfloat16)
    assert "conv_general_dilated" not in forward32  # the taps
    assert "conv_general_dilated" in forward16
    for forward, grad in [(forward32, grad32), (forward16, grad16)]:
        assert "cnnlab_" not in forward + grad
        assert "reduce_window_max" in forward and "select_and_scatter_add" in grad


@pytest.mark.parametrize("padding", [2, "same", "valid"])
def test_conv_layer_has_nn_conv_parameters_and_output(padding):
    x, _, _ = _inputs((2, 12, 12, 3), 1, 1)
    ours = Conv(7, 5, 1, padding)
    theirs = nn.Conv(7, (5, 5), padding=padding.upper() if isinstance(padding, str) else padding)
    params = ours.init(jax.random.key(2), x)
    chex.assert_trees_all_equal(params, theirs.init(jax.random.key(2), x))  # same names and init
    params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias too
    np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), atol=1e-5)


@pytest.mark.parametrize(
    "shape, window, stride",
    [((2, 28, 28, 3), 2, 2), ((2, 15, 15, 4), 3, 2), ((1, 9, 11, 2), 3, 3), ((2, 7, 7, 1), 2, 1)],
)
def test_onednn_max_pool_matches_flax_values_and_gradient(shape, window, stride):
    rng = np.random.default_rng(3)
    # Rounded values make ties within windows common: the gradient must pick the same input.
    x = jnp.asarray(np.round(rng.normal(size=shape), 1).astype(np.float32))
    ref = lambda x: nn.max_pool(x, (window, window), (stride, stride))
    ours = lambda x: max_pool_onednn(x, window, stride)
    y, ref_vjp = jax.vjp(ref, x)
    g = jnp.asarray(rng.normal(size=y.shape).astype(np.float32))
    both = jax.jit(lambda x: jax.vjp(ours, x)[0:1] + (jax.vjp(ours, x)[1](g),))
    got_y, (got_dx,) = both(x)
    chex.assert_trees_all_equal(got_y, y)
    # Overlapping windows add several cotangents into one input, in another order than XLA.
    chex.assert_trees_all_close(got_dx, ref_vjp(g)[0], atol=1e-6, rtol=0)
