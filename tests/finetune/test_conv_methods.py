"""The fine-tuning methods on conv layers, the kernel seen as its (kh kw c_in) x c_out matrix (LoRAConv's
view): each conv version against the dense method on that matrix, or an identity, in float64.

- LoRA-Pro, LoRA-GGPO, IST: the update of a tree holding a conv kernel and its LoRA pair equals, reshaped,
  the update of the same tree with the kernel as a matrix (the Linear case, tested against the papers'
  rules in their own files); LoRAConv's factor gradients are ``s G Bᵀ`` and ``s Aᵀ G`` of the kernel
  matrix's gradient G (what LoRA-Pro and GGPO assume of a pair);
- SVFit, WeLore: the conv layers equal a float64 numpy im2col reference of their formula with the numpy SVD
  of the kernel matrix; at init SVFit is the pretrained conv, WeLore its best rank-k approximation;
- EVA: the conv's patches times the kernel matrix are the convolution, and EVA on a conv gives the A of EVA
  on a Linear layer fed those patches.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxopt_lab.finetune import (
    LoRAConv,
    apply_lora,
    apply_svfit,
    apply_welore,
    eva_init,
    freeze_base,
    ist,
    lora_ggpo,
    merge_svfit,
    remove_perturbation,
    scale_by_lora_pro,
)
from jaxopt_lab.finetune.lora import LoRALinear
from jaxopt_lab.finetune.lora_conv import patches
from jaxopt_lab.finetune.svfit import SVFitConv
from jaxopt_lab.finetune.welore import WeLoreConv
from jaxopt_lab.models import CNN

KH, CIN, COUT, R, S = 3, 3, 5, 2, 2.0
X = np.random.default_rng(0).normal(size=(2, 6, 5, CIN))
H = np.random.default_rng(7).normal(size=(10, KH * KH * CIN))  # rows the kernel matrices multiply


def conv_same_f64(x, kernel):
    """SAME-padded stride-1 conv, channels last, by explicit patches (kh, kw, c_in order), float64."""
    kh, kw, c_in, c_out = kernel.shape
    x = np.pad(np.asarray(x, np.float64), ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))
    n, h, w = x.shape[0], x.shape[1] - kh + 1, x.shape[2] - kw + 1
    cols = np.stack([x[:, i:i + h, j:j + w, :] for i in range(kh) for j in range(kw)], axis=3)
    return cols.reshape(n, h, w, kh * kw * c_in) @ np.asarray(kernel, np.float64).reshape(-1, c_out)


def _conv(seed=0):
    conv = nnx.Conv(CIN, COUT, kernel_size=(KH, KH), padding="SAME", param_dtype=jnp.float64, rngs=nnx.Rngs(seed))
    conv.bias[...] = jax.random.normal(jax.random.key(seed + 5), conv.bias.shape, jnp.float64)
    return conv


# ---- the gradient rules on LoRA pairs ------------------------------------------------------------


def _trees(rng, layers=2):
    """A params tree with conv kernels (3, 3, c_in, c_out) and their pairs, and the same with the kernels
    as (9 c_in, c_out) matrices."""
    conv, dense = {}, {}
    for i in range(layers):
        k = rng.normal(size=(KH, KH, CIN, COUT))
        lora = {"lora_a": jnp.asarray(rng.normal(size=(KH * KH * CIN, R))),
                "lora_b": jnp.asarray(0.3 * rng.normal(size=(R, COUT)))}
        bias = jnp.asarray(rng.normal(size=(COUT,)))
        conv[str(i)] = {"kernel": jnp.asarray(k), "bias": bias, "lora": lora}
        dense[str(i)] = {"kernel": jnp.asarray(k.reshape(-1, COUT)), "bias": bias, "lora": lora}
    head = jnp.asarray(rng.normal(size=(COUT,)))
    return {"convs": conv, "head": head}, {"convs": dense, "head": head}


def _as_dense(tree):
    return jax.tree.map(lambda x: x.reshape(-1, x.shape[-1]) if x.ndim == 4 else x, tree)


def _loss_dense(p):
    h = jnp.asarray(H)
    out = 0.0
    for i in sorted(p["convs"]):
        c = p["convs"][i]
        w = c["kernel"].reshape(-1, COUT) + S * c["lora"]["lora_a"] @ c["lora"]["lora_b"]
        out = out + jnp.mean(jnp.tanh(h @ w + c["bias"]) @ p["head"])
    return out


@pytest.mark.parametrize("method", ["lora_pro_adamw", "lora_pro_sgd", "lora_ggpo", "ist"])
def test_pair_rules_on_conv_kernels_equal_the_dense_rules(method):
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        conv, dense = _trees(rng)
        make = {
            "lora_pro_adamw": lambda: freeze_base(scale_by_lora_pro(scale=S, mode="adamw"), train_also="head"),
            "lora_pro_sgd": lambda: freeze_base(scale_by_lora_pro(scale=S, mode="sgd"), train_also="head"),
            "lora_ggpo": lambda: lora_ggpo(freeze_base(optax.adam(0.1), train_also="head"), sigma=0.05, beta=0.5,
                                           scale=S, seed=3),
            "ist": lambda: ist(freeze_base(optax.adam(0.1), train_also="head"), layer_pattern=r"convs/(\d+)",
                               update_ratio=0.5, interval=2, seed=4),
        }[method]
        tx_c, tx_d = make(), make()
        s_c, s_d = tx_c.init(conv), tx_d.init(dense)
        extra = {"loss_fn": _loss_dense} if method == "ist" else {}
        moved = set()
        for _ in range(3):
            g = jax.grad(_loss_dense)(dense)
            g_conv = jax.tree.map(lambda x, ref: x.reshape(ref.shape), g, conv)
            u_c, s_c = tx_c.update(g_conv, s_c, conv, **extra)
            u_d, s_d = tx_d.update(g, s_d, dense, **extra)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a).reshape(b.shape), b, rtol=1e-10,
                                                                 atol=1e-12), u_c, u_d)
            moved |= {jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(u_c) if np.any(x != 0)}
            conv, dense = optax.apply_updates(conv, u_c), optax.apply_updates(dense, u_d)
        kernels_move = method == "lora_ggpo"  # only GGPO's perturbation moves the frozen kernels
        assert any("lora_b" in p for p in moved) and any("head" in p for p in moved)
        assert any("kernel" in p for p in moved) == kernels_move
        assert not any("bias" in p for p in moved)
        if method == "lora_ggpo":
            clean_c, clean_d = remove_perturbation(conv, s_c, seed=3), remove_perturbation(dense, s_d, seed=3)
            np.testing.assert_allclose(np.asarray(_as_dense(clean_c)["convs"]["0"]["kernel"]),
                                       np.asarray(clean_d["convs"]["0"]["kernel"]), rtol=1e-12)


def test_loraconv_factor_gradients_are_the_kernel_matrix_gradient_through_the_pair():
    """g_A = s G Bᵀ and g_B = s Aᵀ G (flax orientation), G the gradient of the kernel matrix."""
    with jax.enable_x64(True):
        layer = LoRAConv.from_conv(_conv(), rank=R, alpha=S * R, rngs=nnx.Rngs(1))
        layer.lora.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(2), layer.lora.lora_b.shape, jnp.float64)
        target = jnp.asarray(np.random.default_rng(3).normal(size=(2, 6, 5, COUT)))
        grads = nnx.grad(lambda m: jnp.sum((m(jnp.asarray(X)) - target) ** 2))(layer)
        g = np.asarray(grads["kernel"][...]).reshape(-1, COUT)
        a, b = np.asarray(layer.lora.lora_a[...]), np.asarray(layer.lora.lora_b[...])
        np.testing.assert_allclose(np.asarray(grads["lora"]["lora_a"][...]), S * g @ b.T, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np.asarray(grads["lora"]["lora_b"][...]), S * a.T @ g, rtol=1e-10, atol=1e-12)


# ---- SVFit and WeLore: the SVD of the kernel matrix ------------------------------------------------


def test_svfit_conv_is_the_formula_and_starts_equal():
    with jax.enable_x64(True):
        conv = _conv()
        w = np.asarray(conv.kernel[...]).reshape(-1, COUT)
        layer = SVFitConv.from_conv(conv, rank=R)
        np.testing.assert_allclose(np.asarray(layer(X)), np.asarray(conv(X)), rtol=1e-10, atol=1e-12)
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        np.testing.assert_allclose(np.abs(np.asarray(layer.svfit_u[...])), np.abs(u[:, :R]), atol=1e-12)
        np.testing.assert_allclose(np.asarray(layer.svfit_s[...]), s[:R], rtol=1e-12)
        sigma = s[:R] * np.array([1.5, 0.25])  # trained singular values
        layer.svfit_s[...] = jnp.asarray(sigma)
        u_r, v_r = np.asarray(layer.svfit_u[...]), np.asarray(layer.svfit_v[...])
        want_kernel = w - (u_r * s[:R]) @ v_r + (u_r * sigma) @ v_r
        want = conv_same_f64(X, want_kernel.reshape(KH, KH, CIN, COUT)) + np.asarray(conv.bias[...])
        np.testing.assert_allclose(np.asarray(layer(X)), want, rtol=1e-10, atol=1e-10)
        model = CNN(num_classes=3, in_channels=CIN, channels=(4, 6), rngs=nnx.Rngs(0))
        assert apply_svfit(model, "convs/.*", rank=3) == ["convs/0", "convs/1"]
        assert isinstance(model.convs[1], SVFitConv) and model.convs[1].svfit_u.shape == (9 * 4, 3)
        before = np.asarray(model(X.astype(np.float32)))
        assert merge_svfit(model) == ["convs/0", "convs/1"] and type(model.convs[1]) is nnx.Conv
        np.testing.assert_allclose(np.asarray(model(X.astype(np.float32))), before, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="svfit rank 10 is larger"):
        SVFitConv.from_conv(nnx.Conv(1, 10, kernel_size=(3, 3), rngs=nnx.Rngs(0)), rank=10)  # 9 x 10 matrix


def test_welore_conv_compresses_the_kernel_matrix_as_the_dense_layer():
    with jax.enable_x64(True):
        conv = _conv()
        w = np.asarray(conv.kernel[...]).reshape(-1, COUT)
        model_c = nnx.Dict(c=conv)
        dense = nnx.Linear(w.shape[0], COUT, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        dense.kernel[...] = jnp.asarray(w)
        model_d = nnx.Dict(c=dense)
        rep_c = apply_welore(model_c, ".*", threshold=0.5, min_reduction=0.0)
        rep_d = apply_welore(model_d, ".*", threshold=0.5, min_reduction=0.0)
        assert rep_c.ranks == rep_d.ranks and 1 <= rep_c.ranks["c"] < COUT
        assert rep_c.compression == pytest.approx(rep_d.compression)
        layer, k = model_c["c"], rep_c.ranks["c"]
        assert isinstance(layer, WeLoreConv)
        np.testing.assert_allclose(np.asarray(layer.welore_a[...]), np.asarray(model_d["c"].welore_a[...]), atol=1e-12)
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        best = (u[:, :k] * s[:k]) @ vt[:k]  # Eckart-Young
        want = conv_same_f64(X, best.reshape(KH, KH, CIN, COUT)) + np.asarray(conv.bias[...])
        np.testing.assert_allclose(np.asarray(layer(X)), want, rtol=1e-10, atol=1e-10)
        full = nnx.Dict(c=_conv())  # threshold 0, no reduction asked: full rank, the conv unchanged
        apply_welore(full, ".*", threshold=0.0, min_reduction=0.0)
        np.testing.assert_allclose(np.asarray(full["c"](X)), np.asarray(conv(X)), rtol=1e-10, atol=1e-10)


# ---- EVA: the conv's input patches ----------------------------------------------------------------


def test_patches_times_the_kernel_matrix_is_the_convolution():
    with jax.enable_x64(True):
        conv = _conv()
        rows = np.asarray(patches(conv, jnp.asarray(X)))
        assert rows.shape == (2 * 6 * 5, KH * KH * CIN)
        w = np.asarray(conv.kernel[...]).reshape(-1, COUT)
        np.testing.assert_allclose(rows @ w, conv_same_f64(X, np.asarray(conv.kernel[...])).reshape(-1, COUT),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:eva_init")  # tau 0.999 is not reached in 6 batches: both stop alike
def test_eva_on_a_conv_is_eva_on_its_patches():
    with jax.enable_x64(True):
        conv = _conv()
        batches = [jnp.asarray(np.random.default_rng(i).normal(size=(3, 6, 5, CIN))) for i in range(3)]
        model_c = nnx.Dict(c=LoRAConv.from_conv(conv, rank=R, alpha=4.0, rngs=nnx.Rngs(0)))
        before = np.asarray(conv(batches[0]))
        dense = nnx.Linear(KH * KH * CIN, COUT, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        dense.kernel[...] = conv.kernel[...].reshape(-1, COUT)
        model_d = nnx.Dict(c=LoRALinear.from_linear(dense, rank=R, alpha=4.0, rngs=nnx.Rngs(0)))
        res_c = eva_init(model_c, batches, lambda m, b: m["c"](b), rho=2.0, tau=0.999, max_steps=6)
        res_d = eva_init(model_d, batches, lambda m, b: m["c"](patches(conv, b)), rho=2.0, tau=0.999, max_steps=6)
        assert res_c.ranks == res_d.ranks and res_c.steps == res_d.steps
        layer = model_c["c"]
        assert isinstance(layer, LoRAConv) and layer.lora.lora_a.shape == (KH * KH * CIN, res_c.ranks["c"])
        np.testing.assert_allclose(np.asarray(layer.lora.lora_a[...]), np.asarray(model_d["c"].lora.lora_a[...]),
                                   rtol=1e-10, atol=1e-12)
        assert np.all(np.asarray(layer.lora.lora_b[...]) == 0)
        np.testing.assert_allclose(np.asarray(layer(batches[0])), before, rtol=1e-12)  # B = 0: unchanged


def test_eva_redistributes_ranks_over_the_cnn_convs():
    model = CNN(num_classes=3, in_channels=1, channels=(4, 6), rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype(np.float32)
    before = np.asarray(model(x))
    apply_lora(model, "convs/.*", rank=2, rngs=nnx.Rngs(1))
    res = eva_init(model, [x], rho=2.0, tau=0.99, max_steps=4)
    assert sum(res.ranks.values()) == 2 * 2 and set(res.ranks) == {"convs/0", "convs/1"}
    np.testing.assert_allclose(np.asarray(model(x)), before, rtol=1e-5, atol=1e-6)


# ---- SNELLA: the kernelized sparse update of the kernel matrix ------------------------------------


@pytest.mark.parametrize("kernel", ["mixk", "linear"])
def test_snella_conv_is_snella_linear_on_the_patches(kernel):
    from jaxopt_lab.finetune import SNELLAConv, SNELLALinear, apply_snella

    with jax.enable_x64(True):
        conv = _conv()
        layer = SNELLAConv.from_conv(conv, rank=4, kernel=kernel, heads=2, ratio=0.3, scale=0.7, rngs=nnx.Rngs(1))
        if kernel == "linear":  # B starts at 0: give it values so that the update shows
            layer.lora.lora_b[...] = jax.random.normal(jax.random.key(3), layer.lora.lora_b.shape, jnp.float64)
        dense = nnx.Linear(KH * KH * CIN, COUT, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        dense.kernel[...] = conv.kernel[...].reshape(-1, COUT)
        dense.bias[...] = conv.bias[...]
        ref = SNELLALinear.from_linear(dense, rank=4, kernel=kernel, heads=2, ratio=0.3, scale=0.7, rngs=nnx.Rngs(1))
        assert ref.lora.lora_a.shape == layer.lora.lora_a.shape == (KH * KH * CIN, 4)
        for name in ("lora_a", "lora_b"):
            getattr(ref.lora, name)[...] = getattr(layer.lora, name)[...]
        want = np.asarray(ref(patches(conv, jnp.asarray(X)))).reshape(2, 6, 5, COUT)
        np.testing.assert_allclose(np.asarray(layer(X)), want, rtol=1e-10, atol=1e-12)
        delta = np.asarray(layer.delta())
        assert 0 < np.mean(delta == 0) < 0.5  # the 0.3-quantile mask over the whole matrix
        model = CNN(num_classes=3, in_channels=1, channels=(4, 6), rngs=nnx.Rngs(0))
        assert apply_snella(model, "convs/.*", rngs=nnx.Rngs(0), rank=4, heads=2) == ["convs/0", "convs/1"]
        assert isinstance(model.convs[1], SNELLAConv) and model.convs[1].lora.lora_a.shape == (9 * 4, 4)
