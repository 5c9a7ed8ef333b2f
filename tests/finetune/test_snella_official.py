"""SNELLA's sparsify against the official ``SNELLA.sparsify`` (ssfgunner/SNELL,
``model/vision_transformer_timm.py``), replayed in torch float64:
``K * F.threshold(|K|.detach(), quantile(|K|, init_thres), 0)`` — also at ratio 0, where the
smallest ``|K|`` is zeroed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_lab.finetune.snella import sparsify


@pytest.mark.parametrize("ratio", [0.0, 0.01, 0.5, 0.8])
def test_sparsify_is_the_official_rule(ratio):
    torch = pytest.importorskip("torch")
    k = np.random.default_rng(0).normal(size=(9, 7))
    w = torch.from_numpy(k)
    weight_abs = w.detach().abs()
    thres = torch.quantile(weight_abs.flatten(), ratio)
    want = (w * torch.nn.functional.threshold(weight_abs, float(thres), 0)).numpy()
    with jax.enable_x64(True):
        got = np.asarray(sparsify(jnp.asarray(k), jnp.asarray(ratio)))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    assert np.count_nonzero(got) == np.count_nonzero(want) < k.size  # ratio 0 too: the minimum is dropped
