"""AdamP and SGDP against float64 numpy versions of the reference (clovaai/AdamP) code.

The numpy reference works on torch-layout weights (output channels first, the
reference's ``view(size(0), -1)``). The optimizers run on flax-layout kernels
with the default ``channel_axis=-1`` (Dense ``(in, out)``, Conv
``(kh, kw, in, out)``), transposed back for the comparison, and once on the
torch layout with ``channel_axis=0``.

Every weight gets gradients of one of three kinds, built each step from the
reference weights, so that all branches of the projection are exercised:
``channel`` (orthogonal to every output channel: the channel view applies),
``layer`` (orthogonal to the whole tensor only: the layer view applies) and
``none`` (correlated with the weights: no projection). The reference asserts
that each weight took its intended branch at every step, with a margin.
"""

import inspect

import jax
import numpy as np

from tests.transforms.trajectory import trajectory
import pytest

from jaxopt_lab.transforms.adamp import adamp, sgdp

# torch layout: Linear (out=4, in=3), Conv2d (out=4, in=3, kh=2, kw=2)
TORCH_SHAPES = {"dense": (4, 3), "conv": (4, 3, 2, 2)}
TO_FLAX = {"dense": (1, 0), "conv": (2, 3, 1, 0)}  # torch -> flax transposition
KINDS = ("channel", "layer", "none")
STEPS = 5


# --- float64 numpy reference, torch layout


def _views(w):
    return {"channel": w.reshape(w.shape[0], -1), "layer": w.reshape(1, -1)}


def numpy_projection(w, g, perturb, delta, wd_ratio, eps):
    """Returns (perturb, wd ratio, branch taken, relative margin to the threshold)."""
    if w.ndim <= 1:
        return perturb, 1.0, "none", np.inf
    expand = (-1,) + (1,) * (w.ndim - 1)
    margin = np.inf
    for name, wv in _views(w).items():
        gv = _views(g)[name]
        cos = np.abs((gv * wv).sum(1)) / (np.linalg.norm(gv, axis=1) + eps) / (np.linalg.norm(wv, axis=1) + eps)
        threshold = delta / np.sqrt(wv.shape[1])
        margin = min(margin, abs(cos.max() - threshold) / threshold)
        if cos.max() < threshold:
            w_unit = w / (np.linalg.norm(wv, axis=1).reshape(expand) + eps)
            radial = _views(w_unit * perturb)[name].sum(1).reshape(expand)
            return perturb - w_unit * radial, wd_ratio, name, margin
    return perturb, 1.0, "none", margin


def make_grad(w, kind, rng):
    """A gradient for weight ``w`` (torch layout) of the given kind."""
    h = rng.normal(size=w.shape)
    if kind == "none" or w.ndim <= 1:
        return h + 2.0 * w
    name = "channel" if kind == "channel" else "layer"
    wv, hv = _views(w)[name], _views(h)[name]
    hv = hv - wv * ((hv * wv).sum(1, keepdims=True) / (wv * wv).sum(1, keepdims=True))
    return hv.reshape(w.shape)


class NumpyAdamP:
    def __init__(self, lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, delta=0.1, wd_ratio=0.1, nesterov=False):
        self.hp = dict(lr=lr, b1=b1, b2=b2, eps=eps, wd=weight_decay, delta=delta, wd_ratio=wd_ratio, nesterov=nesterov)
        self.t, self.m, self.v = 0, None, None

    def step(self, w, g):
        hp = self.hp
        if self.m is None:
            self.m, self.v = np.zeros_like(w), np.zeros_like(w)
        self.t += 1
        bc1, bc2 = 1 - hp["b1"] ** self.t, 1 - hp["b2"] ** self.t
        self.m = hp["b1"] * self.m + (1 - hp["b1"]) * g
        self.v = hp["b2"] * self.v + (1 - hp["b2"]) * g * g
        denom = np.sqrt(self.v) / np.sqrt(bc2) + hp["eps"]
        perturb = (hp["b1"] * self.m + (1 - hp["b1"]) * g if hp["nesterov"] else self.m) / denom
        perturb, ratio, branch, margin = numpy_projection(w, g, perturb, hp["delta"], hp["wd_ratio"], hp["eps"])
        w = w * (1 - hp["lr"] * hp["wd"] * ratio) - hp["lr"] / bc1 * perturb
        return w, branch, margin


class NumpySGDP:
    def __init__(
        self, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, eps=1e-8, delta=0.1, wd_ratio=0.1
    ):
        self.hp = dict(
            lr=lr, mom=momentum, damp=dampening, wd=weight_decay, nesterov=nesterov, eps=eps, delta=delta, wd_ratio=wd_ratio
        )
        self.buf = None

    def step(self, w, g):
        hp = self.hp
        if self.buf is None:
            self.buf = np.zeros_like(w)
        self.buf = hp["mom"] * self.buf + (1 - hp["damp"]) * g
        d_p = g + hp["mom"] * self.buf if hp["nesterov"] else self.buf
        d_p, ratio, branch, margin = numpy_projection(w, g, d_p, hp["delta"], hp["wd_ratio"], hp["eps"])
        w = w * (1 - hp["lr"] * hp["wd"] * ratio / (1 - hp["mom"])) - hp["lr"] * d_p
        return w, branch, margin


def reference_run(make_opt, seed=0):
    """float64 trajectories (torch layout) and the gradients used, for every (shape, kind) and a bias."""
    rng = np.random.default_rng(seed)
    weights = {f"{s}_{k}": rng.normal(size=shape) for s, shape in TORCH_SHAPES.items() for k in KINDS}
    weights["bias"] = rng.normal(size=(4,))
    grads = {name: [] for name in weights}
    traj = {name: [] for name in weights}
    for name, w in weights.items():
        opt, kind = make_opt(), name.split("_")[-1]
        for _ in range(STEPS):
            g = make_grad(w, kind, rng)
            grads[name].append(g)
            w, branch, margin = opt.step(w, g)
            traj[name].append(w)
            if name != "bias":
                assert branch == kind and margin > 1e-3, (name, branch, margin)
    stack = lambda d: {k: np.stack(v) for k, v in d.items()}  # noqa: E731
    return weights, stack(grads), stack(traj)


def to_flax(name, x, lead=0, inverse=False):
    """Torch layout -> flax layout (flax -> torch if ``inverse``); ``lead`` leading (step) axes are kept."""
    key = name.split("_")[0]
    if key not in TO_FLAX:
        return x
    perm = np.argsort(TO_FLAX[key]) if inverse else TO_FLAX[key]
    return x.transpose(tuple(range(lead)) + tuple(lead + int(a) for a in perm))


def run_jax(tx, params, grads):
    """Parameters after each step (a leading step axis), float32, in one compiled scan."""

    @jax.jit
    def run(params, grads):
        return trajectory(tx, params, grads)

    f32 = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float32), t)  # noqa: E731
    return jax.tree.map(np.asarray, run(f32(params), f32(grads)))


# The reference's defaults except a visible weight decay (flax layout), then
# every option off its default (torch layout).
ADAMP_CONFIGS = {
    "flax": (dict(learning_rate=0.1, weight_decay=0.1), -1),
    "torch": (
        dict(learning_rate=0.05, b1=0.8, b2=0.99, eps=1e-3, weight_decay=0.2, delta=0.2, wd_ratio=0.3, nesterov=True),
        0,
    ),
}
SGDP_CONFIGS = {
    "flax": (dict(learning_rate=0.1, momentum=0.9, dampening=0.1, weight_decay=0.1), -1),
    "torch": (dict(learning_rate=0.05, momentum=0.5, weight_decay=0.2, nesterov=True, eps=1e-3, delta=0.2, wd_ratio=0.3), 0),
}


def _numpy_kwargs(kw):
    return {("lr" if k == "learning_rate" else k): v for k, v in kw.items()}


OPTIMIZERS = {"adamp": (ADAMP_CONFIGS, adamp, NumpyAdamP), "sgdp": (SGDP_CONFIGS, sgdp, NumpySGDP)}


@pytest.fixture(scope="module")
def runs():
    """(optimizer, layout) -> reference weights, gradients, numpy and JAX trajectories (torch layout)."""
    cache = {}

    def get(optimizer, layout):
        if (optimizer, layout) not in cache:
            configs, factory, ref_cls = OPTIMIZERS[optimizer]
            kwargs, channel_axis = configs[layout]
            weights, grads, expected = reference_run(lambda: ref_cls(**_numpy_kwargs(kwargs)))
            tx = factory(**kwargs, channel_axis=channel_axis)
            if layout == "flax":
                params = {k: to_flax(k, w) for k, w in weights.items()}
                out = run_jax(tx, params, {k: to_flax(k, g, lead=1) for k, g in grads.items()})
                out = {k: to_flax(k, x, lead=1, inverse=True) for k, x in out.items()}
            else:
                out = run_jax(tx, weights, grads)
            cache[optimizer, layout] = weights, grads, expected, out
        return cache[optimizer, layout]

    return get


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("layout", ["flax", "torch"])
def test_matches_numpy_reference(runs, optimizer, layout):
    weights, _, expected, out = runs(optimizer, layout)
    for k in weights:
        np.testing.assert_allclose(out[k], expected[k], rtol=1e-5, atol=2e-6, err_msg=k)


def test_defaults_are_the_reference_defaults():
    a = inspect.signature(adamp).parameters
    assert {k: a[k].default for k in list(a)[1:]} == dict(
        b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, delta=0.1, wd_ratio=0.1, nesterov=False, channel_axis=-1
    )
    s = inspect.signature(sgdp).parameters
    assert list(s)[:8] == ["learning_rate", "momentum", "dampening", "weight_decay", "nesterov", "eps", "delta", "wd_ratio"]
    assert {k: s[k].default for k in list(s)[1:]} == dict(
        momentum=0.0, dampening=0, weight_decay=0, nesterov=False, eps=1e-8, delta=0.1, wd_ratio=0.1, channel_axis=-1
    )


@pytest.mark.parametrize(
    "factory, kwargs, message",
    [
        (adamp, dict(b1=1.0), r"b1 must be in \[0, 1\), got 1.0"),
        (adamp, dict(b2=1.5), r"b2 must be in \[0, 1\), got 1.5"),
        (adamp, dict(eps=-1.0), "eps must be >= 0, got -1.0"),
        (adamp, dict(weight_decay=-0.1), "weight_decay must be >= 0, got -0.1"),
        (adamp, dict(delta=-0.1), "delta must be >= 0, got -0.1"),
        (adamp, dict(wd_ratio=-2.0), "wd_ratio must be >= 0, got -2.0"),
        (adamp, dict(learning_rate=-1e-3), "learning_rate must be >= 0, got -0.001"),
        (adamp, dict(channel_axis=1.5), "channel_axis must be an int, got 1.5"),
        (adamp, dict(channel_axis=True), "channel_axis must be an int, got True"),
        (sgdp, dict(momentum=1.0), r"momentum must be in \[0, 1\), got 1.0"),
        (sgdp, dict(dampening=1.5), r"dampening must be in \[0, 1\], got 1.5"),
        (sgdp, dict(weight_decay=-1), "weight_decay must be >= 0, got -1"),
        (sgdp, dict(delta=-1.0), "delta must be >= 0, got -1.0"),
        (sgdp, dict(eps=-1e-8), "eps must be >= 0, got -1e-08"),
        (sgdp, dict(channel_axis="out"), "channel_axis must be an int, got 'out'"),
    ],
)
def test_bad_arguments_raise(factory, kwargs, message):
    with pytest.raises(ValueError, match=message):
        factory(**{"learning_rate": 1e-3, **kwargs})


def test_channel_axis_out_of_range_and_missing_params_raise():
    params = {"w": np.ones((3, 4), np.float32)}
    tx = adamp(1e-3, channel_axis=2)
    with pytest.raises(ValueError, match=r"channel_axis=2 is out of range for a parameter of shape \(3, 4\)"):
        jax.eval_shape(tx.update, params, tx.init(params), params)  # raised while tracing
    tx = sgdp(1e-3)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, tx.init(params))


def _torch_run(torch_cls, kwargs, weights, grads):
    import torch

    out = {}
    for name, w in weights.items():
        p = torch.nn.Parameter(torch.tensor(w, dtype=torch.float64))
        opt = torch_cls([p], **kwargs)
        traj = []
        for g in grads[name]:
            p.grad = torch.tensor(g, dtype=torch.float64)
            opt.step()
            traj.append(p.detach().numpy().copy())
        out[name] = np.stack(traj)
    return out


@pytest.mark.parametrize("package", ["torch_optimizer", "adamp"])  # torch-optimizer; clovaai's official code
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_matches_torch_implementations(runs, optimizer, package):
    """AdamP / SGDP of a PyTorch package (torch layout) against the numpy reference and the JAX run."""
    pytest.importorskip("torch")
    module = pytest.importorskip(package)
    weights, grads, expected, out = runs(optimizer, "torch")
    kw = _numpy_kwargs(OPTIMIZERS[optimizer][0]["torch"][0])
    if optimizer == "adamp":
        kw["betas"] = (kw.pop("b1"), kw.pop("b2"))
    got = _torch_run(module.AdamP if optimizer == "adamp" else module.SGDP, kw, weights, grads)
    for k in weights:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-10, atol=1e-12, err_msg=k)
        np.testing.assert_allclose(out[k], got[k], rtol=1e-5, atol=2e-6, err_msg=k)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_default_run_matches_reference_defaults(optimizer):
    """Only the learning rate given: the numpy reference with clovaai/AdamP's defaults (SGDP: momentum 0)."""
    _, factory, ref_cls = OPTIMIZERS[optimizer]
    weights, grads, expected = reference_run(lambda: ref_cls(lr=0.1), seed=1)
    out = run_jax(factory(0.1, channel_axis=0), weights, grads)
    for k in weights:
        np.testing.assert_allclose(out[k], expected[k], rtol=1e-5, atol=2e-6, err_msg=k)
