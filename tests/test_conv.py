"""Every convolution formulation and the max pools agree with XLA's own, gradients included."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnlab import kernels
from cnnlab.models import conv
from cnnlab.models.conv import DW_PIXELS, FORMULATIONS, conv2d, plan
from cnnlab.models.layers import Conv
from cnnlab.models.pool import max_pool, max_pool_onednn

# (x shape [B, H, W, C], kernel side, filters, stride, padding): LeNet-5's and AlexNet-lite's
# layers, strided and asymmetric "same" padding, a 1-channel input with stride 2, and batches
# that "chunks" splits (32x32 outputs: DW_PIXELS // 1024 = 4 images a chunk), one unevenly.
CASES = [
    ((4, 28, 28, 1), 5, 6, 1, 2),
    ((4, 14, 14, 6), 5, 16, 1, 0),
    ((2, 32, 32, 3), 5, 8, 1, "same"),
    ((2, 16, 16, 4), 4, 5, 2, "same"),  # even kernel, stride 2: padding 1+2
    ((3, 11, 11, 1), 3, 4, 2, "valid"),
    ((16, 32, 32, 3), 5, 4, 1, "same"),  # 4 chunks of 4 images
    ((10, 28, 28, 6), 5, 3, 1, 4),  # 32x32 outputs: chunks of 4, 4 and 2 images
]
assert DW_PIXELS // (32 * 32) == 4, "the chunked cases above assume 4 images a chunk"
DW_MIN_MACS = conv.DW_MIN_MACS  # the real threshold, before the fixture below lowers it


@pytest.fixture(autouse=True)
def chunk_small_layers(monkeypatch):
    """ "chunks" splits layers of any size here: the cases are far below DW_MIN_MACS."""
    monkeypatch.setattr(conv, "DW_MIN_MACS", 0)


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
    ref = lambda x, w: FORMULATIONS["xla"](x, w, strides, pads)  # noqa: E731
    # through conv2d, whose gradients are the formulation's own (oneDNN's primitives for "onednn")
    got = lambda x, w: conv2d(x, w, strides, pads, (name,) * 3)  # noqa: E731
    g = rng.normal(size=jax.eval_shape(ref, x, w).shape).astype(np.float32)
    outputs = lambda conv: jax.jit(  # noqa: E731
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
    "case", [CASES[0], CASES[3], CASES[6]], ids=["lenet-conv1", "stride2-even-kernel", "chunked"]
)
@pytest.mark.parametrize("name", OTHERS)
def test_formulation_gradients_match_xla(case, name):
    _check(name, case, gradients=True)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-k{c[1]}-f{c[2]}-s{c[3]}-{c[4]}")
def test_onednn_gradients_match_xla_on_every_case(case):
    _check("onednn", case, gradients=True)  # the CPU's default: every shape, not three


MIXES = [
    ("taps", "xla", "xla"), ("xla", "taps", "taps"), ("taps", "chunks", "xla"),
    ("taps", "onednn", "xla"), ("onednn", "chunks", "onednn"),
]  # fmt: skip


@pytest.mark.parametrize("how", MIXES)
def test_conv2d_mixes_formulations_per_pass(how):
    x, w, _ = _inputs((10, 30, 30, 6), 5, 16)  # 28x28 outputs: "chunks" takes 5 images at a time
    pads = ((1, 1), (1, 1))
    loss = lambda conv: lambda x, w: jnp.sum(jnp.sin(conv(x, w)))  # noqa: E731
    ours = jax.jit(jax.value_and_grad(loss(lambda x, w: conv2d(x, w, (1, 1), pads, how)), (0, 1)))
    ref = jax.value_and_grad(loss(lambda x, w: FORMULATIONS["xla"](x, w, (1, 1), pads)), (0, 1))
    assert_close_at_scale(ours(x, w), ref(x, w))


def test_plan_uses_onednn_on_one_cpu_device_in_float32():
    assert kernels.available()
    onednn = ("onednn",) * 3
    for x_shape, w_shape in [((128, 28, 28, 1), (5, 5, 1, 6)), ((128, 7, 7, 96), (3, 3, 96, 64))]:
        assert plan(x_shape, w_shape, "cpu") == onednn
        assert plan(x_shape, w_shape, "cpu", devices=8) != onednn  # XLA cannot split the call
        assert plan(x_shape, w_shape, "cpu", dtype=jnp.bfloat16) != onednn
        assert plan(x_shape, w_shape, "gpu") == ("xla", "xla", "xla")


def test_plan_uses_xla_off_the_cpu_taps_for_an_images_channels_and_chunks_for_kernels(
    monkeypatch,
):
    monkeypatch.setattr(kernels, "available", lambda: False)  # as where oneDNN is not built
    assert plan((128, 28, 28, 1), (5, 5, 1, 6), "gpu") == ("xla", "xla", "xla")
    assert plan((128, 28, 28, 1), (5, 5, 1, 6), "cpu") == ("taps", "chunks", "xla")
    assert plan((128, 32, 32, 3), (5, 5, 3, 24), "cpu")[0] == "taps"
    assert plan((128, 13, 13, 24), (5, 5, 24, 64), "cpu") == ("xla", "chunks", "xla")
    # Over several devices a chunk of the batch would gather onto one of them.
    assert plan((128, 13, 13, 24), (5, 5, 24, 64), "cpu", devices=8) == ("xla", "xla", "xla")
    for shape in [(5, 5, 6, 16), (3, 3, 64, 96)]:
        assert all(form in FORMULATIONS for form in plan((128, 14, 14, shape[2]), shape, "cpu"))


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
@pytest.mark.parametrize("pool", [max_pool, max_pool_onednn], ids=["views", "onednn"])
def test_max_pool_matches_flax_values_and_gradient(shape, window, stride, pool):
    rng = np.random.default_rng(3)
    # Rounded values make ties within windows common: the gradient must pick the same input.
    x = jnp.asarray(np.round(rng.normal(size=shape), 1).astype(np.float32))
    ref = lambda x: nn.max_pool(x, (window, window), (stride, stride))  # noqa: E731
    ours = lambda x: pool(x, window, stride)  # noqa: E731
    y, ref_vjp = jax.vjp(ref, x)
    g = jnp.asarray(rng.normal(size=y.shape).astype(np.float32))
    both = jax.jit(lambda x: jax.vjp(ours, x)[0:1] + (jax.vjp(ours, x)[1](g),))
    got_y, (got_dx,) = both(x)
    chex.assert_trees_all_equal(got_y, y)
    # Overlapping windows add several cotangents into one input, in another order than XLA.
    chex.assert_trees_all_close(got_dx, ref_vjp(g)[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("batch, convolutions", [(16, 4), (10, 3), (4, 1)])
def test_chunks_convolve_a_few_images_at_a_time(batch, convolutions, monkeypatch):
    x, w, _ = _inputs((batch, 32, 32, 3), 5, 4)
    pads = ((2, 2), (2, 2))  # 32x32 outputs: 4 images a chunk

    def count():
        jaxpr = jax.make_jaxpr(lambda x, w: FORMULATIONS["chunks"](x, w, (1, 1), pads))(x, w)
        return [eqn.primitive.name for eqn in jaxpr.eqns].count("conv_general_dilated")

    assert count() == convolutions
    macs = batch * 32 * 32 * w.size
    monkeypatch.setattr(conv, "DW_MIN_MACS", macs)
    assert count() == convolutions  # as large as the threshold: chunked
    monkeypatch.setattr(conv, "DW_MIN_MACS", macs + 1)
    assert count() == 1  # smaller: one convolution


def test_chunks_leave_lenet5_one_convolution_per_layer_and_split_alexnet_lite(monkeypatch):
    monkeypatch.setattr(conv, "DW_MIN_MACS", DW_MIN_MACS)
    layers = {  # (x shape, kernel shape, pads) at batch 128: images per chunk, or 128 for none
        "lenet5 conv1": ((128, 28, 28, 1), (5, 5, 1, 6), ((2, 2), (2, 2)), 128),
        "lenet5 conv2": ((128, 14, 14, 6), (5, 5, 6, 16), ((0, 0), (0, 0)), 128),
        "alexnet_lite conv1, Fashion-MNIST": ((128, 28, 28, 1), (5, 5, 1, 24), ((4, 4),) * 2, 4),
        "alexnet_lite conv2": ((128, 15, 15, 24), (5, 5, 24, 64), ((2, 2), (2, 2)), 18),
        "alexnet_lite conv5": ((128, 7, 7, 96), (3, 3, 96, 64), ((1, 1), (1, 1)), 83),
    }
    for name, (x_shape, w_shape, pads, size) in layers.items():
        x, w = jnp.zeros(x_shape), jnp.zeros(w_shape)
        jaxpr = jax.make_jaxpr(FORMULATIONS["chunks"], static_argnums=(2, 3))(x, w, (1, 1), pads)
        shapes = [e.outvars[0].aval.shape[0] for e in jaxpr.eqns if "conv" in e.primitive.name]
        assert shapes[0] == size, name


def test_max_pool_in_training_passes_a_nan_on_as_its_primal_does():
    x = np.zeros((1, 3, 3, 1), np.float32)
    x[0, 2, 2, 0] = np.nan  # the window's last tap
    x = jnp.asarray(x)
    primal = max_pool(x, 3, 2)
    trained, _ = jax.vjp(lambda x: max_pool(x, 3, 2), x)
    assert np.isnan(primal).all() and np.isnan(trained).all()
