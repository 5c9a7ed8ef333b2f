"""KAT (a ViT with GR-KAN MLPs) on digits: trains, and the kernel and reference paths agree.

One tiny model (width 32, one block, 2x2 patches) is built once; the kernel
path runs the GR-KAN Pallas kernels in interpret mode inside the jitted
training step, so it only runs a few steps; the reference path runs more to
show learning.
"""

import functools

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from jaxopt_lab.data import load_digits
from jaxopt_lab.models import MODELS
from jaxopt_lab.models.kat import KAT, GroupRational, fit_rational

BATCH = 64
# Tests are compile-bound on 2 cores: XLA:CPU without its expensive passes compiles about twice as fast.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def model():
    build = lambda: KAT(width=32, depth=1, heads=2, mlp_ratio=2, impl="reference", rngs=nnx.Rngs(0))  # noqa: E731
    graphdef, _ = nnx.split(nnx.eval_shape(build))
    # one compiled init instead of an eager op-by-op one
    return nnx.merge(graphdef, jax.jit(lambda: nnx.state(build()), compiler_options=FAST)())


def train(model, data, steps, impl, lr=3e-3, evaluate=True):
    """Adam from a copy of ``model`` with its GR-KAN units set to ``impl``; (losses, test accuracy)."""
    model = nnx.clone(model)
    model.set_impl(impl)
    opt = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))

    @functools.partial(jax.jit, compiler_options=FAST)
    def step(state, x, y):
        model, opt = nnx.merge(graphdef, state)

        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return nnx.state((model, opt)), loss

    losses = []
    for t in range(steps):
        x, y = data.batch(t, BATCH, seed=0)
        state, loss = step(state, x, y)
        losses.append(float(loss))
    if not evaluate:
        return np.array(losses), None
    model, _ = nnx.merge(graphdef, state)
    logits = jax.jit(lambda m, x: m(x), compiler_options=FAST)(model, data.x_test)
    return np.array(losses), float((np.asarray(logits).argmax(-1) == data.y_test).mean())


@pytest.fixture(scope="module")
def reference_run(model, digits):
    return train(model, digits, 60, "reference")


def test_kat_learns_digits(reference_run):
    losses, accuracy = reference_run
    assert accuracy > 0.3, accuracy  # chance is 0.1
    assert losses[-10:].mean() < losses[:5].mean() - 0.5, losses


def test_kernel_path_gives_the_reference_loss_curve(model, digits, reference_run):
    losses, _ = train(model, digits, 6, "interpret", evaluate=False)
    np.testing.assert_allclose(losses, reference_run[0][:6], rtol=1e-5)


def rational(a, b, x):
    """float64 numpy P(x)/Q(x) for one group's coefficients."""
    return np.polyval(np.asarray(a, np.float64)[::-1], x) / (
        1 + np.polyval(np.r_[np.abs(np.asarray(b, np.float64))[::-1], 0.0], np.abs(x))
    )


def test_rationals_start_as_identity_and_swish(model):
    """KAT's init: the first rational of each MLP is the identity, the second fits Swish (on [-3, 3])."""
    block = model.blocks[0]
    x = np.linspace(-3, 3, 301)
    swish = x / (1 + np.exp(-x))
    for g in range(8):
        np.testing.assert_allclose(rational(block.act1.a[g], block.act1.b[g], x), x, atol=1e-7)
        assert np.abs(rational(block.act2.a[g], block.act2.b[g], x) - swish).max() < 5e-3


def test_gelu_fit_is_gelu_in_the_kernel_form():
    """The "gelu" option is fitted in the form the kernel evaluates (KAT's own gelu coefficients are not)."""
    from scipy.special import erf

    x = np.linspace(-3, 3, 301)
    gelu = 0.5 * x * (1 + erf(x / np.sqrt(2)))
    a, b = fit_rational("gelu")
    assert np.abs(rational(a, b, x) - gelu).max() < 5e-3


def test_swish_fit_matches_kat_published_init():
    """An independent check of the fit: KAT's init.json lists these coefficients for swish."""
    a, b = fit_rational("swish")
    kat_a = [3.054879741161051e-07, 0.5000007853744493, 0.24999783422824703,
             0.05326628273219478, 0.005803034571292244, 0.0002751961022402342]
    kat_b_abs = [4.111554955950634e-06, 0.10652899335007572, 1.2690007399796238e-06, 0.0005502331264140556]
    np.testing.assert_allclose(a, kat_a, atol=1e-4)
    np.testing.assert_allclose(np.abs(b), kat_b_abs, atol=1e-4)


def test_registered_and_checked(model):
    assert MODELS["kat"] is KAT
    assert sum(isinstance(m, GroupRational) for _, m in nnx.iter_graph(model)) == 2
    with pytest.raises(ValueError, match=r"width=36 .*groups=8"):
        KAT(width=36, heads=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"image_size=8 .*patch_size=3"):
        KAT(patch_size=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"unknown rational init 'relu'"):
        GroupRational(32, init="relu")
    with pytest.raises(ValueError, match=r"impl must be one of"):
        KAT(impl="gpu", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 8, 8, 1\)"):
        model(np.zeros((2, 8, 8, 3), np.float32))
