"""WeLore against a float64 replay of the official code (VITA-Group/WeLore): ``utils.py``
``adaptive_rank_pruning`` (min-max normalized singular values, the ones below θ pruned),
``lib/rank_reduction.py`` ``do_rank_reduction`` (a low-rank component when pruned / rank >
min_ratio, 0.4999 in the fine-tuning scripts) and ``lib/LowRankLayer.py`` (``U * sqrt(S)``,
``sqrt(S) * Vᵀ``, forward ``U(V(x))``). The spectra are built so that the old rules (``s / s_1``,
break-even LRCs) give other ranks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxopt_lab.finetune import WeLoreLinear, apply_welore
from jaxopt_lab.finetune.welore import spectra, welore_ranks

THETA = 0.3
SPECTRA = {  # (in, out), singular values
    "p": ((32, 8), [10, 9, 8, 7, 6, 5.5, 5.2, 5]),  # s/s_1 >= 0.3 everywhere; min-max: 4 of 8 below 0.3
    "q": ((36, 12), [10, 9, 8, 7, 6, 5.5, 5, 4.5, 3, 2.5, 2.2, 2]),  # k = 8: RRR 1/3, under break-even
    "r": ((16, 16), [2.0 ** -i for i in range(16)]),  # fast decay
}


class Net(nnx.Module):
    def __init__(self, rngs):
        for name, ((i, o), _) in SPECTRA.items():
            setattr(self, name, nnx.Linear(i, o, use_bias=False, param_dtype=jnp.float64, rngs=rngs))


def build():
    model = Net(nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for name, ((i, o), s) in SPECTRA.items():
        u, _ = np.linalg.qr(rng.normal(size=(i, len(s))))
        v, _ = np.linalg.qr(rng.normal(size=(o, len(s))))
        getattr(model, name).kernel[...] = jnp.asarray((u * np.asarray(s)) @ v.T)
    return model


def official_ranks(theta, min_ratio=0.4999):
    """adaptive_rank_pruning + do_rank_reduction's test, per matrix: (rank k, is an LRC)."""
    out = {}
    for name, (_, s) in SPECTRA.items():
        data = np.asarray(s, np.float64)
        normed = (data - min(data)) / (max(data) - min(data))
        pruned = int(sum(normed < theta))
        rank = len(data)
        out[name] = rank - pruned if pruned / rank > min_ratio else None
    return out


def test_ranks_and_low_rank_components_match_the_official_rule():
    with jax.enable_x64(True):
        spec = spectra(build())
        assert welore_ranks(spec, THETA) == official_ranks(THETA) == {"p": 4, "q": None, "r": 2}
        for min_ratio in (0.0, 0.2, 0.7):
            assert welore_ranks(spec, THETA, min_ratio) == official_ranks(THETA, min_ratio)


def test_factored_layer_is_the_official_low_rank_layer():
    torch = pytest.importorskip("torch")
    with jax.enable_x64(True):
        model = build()
        weights = {n: np.asarray(getattr(model, n).kernel[...]).T.copy() for n in SPECTRA}  # torch (out, in)
        rep = apply_welore(model, threshold=THETA)
        assert rep.ranks == {"p": 4, "r": 2} and rep.dense == ["q"]
        x = np.random.default_rng(1).normal(size=(5, 32))
        for name, k in rep.ranks.items():
            layer = getattr(model, name)
            assert isinstance(layer, WeLoreLinear)
            w = torch.from_numpy(weights[name])
            u, s, v = torch.svd(w)  # LowRankLayer.__init__, in float64 instead of bfloat16
            u_w = u[:, :k].mul(s[:k].sqrt())  # self.U.weight (out x k)
            v_w = v[:, :k].t().mul(s[:k].sqrt().view(-1, 1))  # self.V.weight (k x in)
            xi = torch.from_numpy(x[:, : w.shape[1]])
            want = (xi @ v_w.t() @ u_w.t()).numpy()  # forward: self.U(self.V(x))
            np.testing.assert_allclose(np.asarray(layer(jnp.asarray(xi.numpy()))), want, rtol=1e-10, atol=1e-12)
