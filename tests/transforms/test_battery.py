"""One battery for every single-worker transformation of jaxopt_lab.

The generic checks of optax's own suites (``contrib/_common_test.py`` and
``_src/alias_test.py``), run over every entry of ``TRANSFORMS``. Each must

(a) jit without retracing over several steps, in a step that donates the
    params and the state (so ``init`` returns distinct buffers) and passes
    ``update`` an unexpected keyword argument (optax's
    ``test_optimizers_accept_extra_args``);
(b) keep the parameters' dtypes, bfloat16 included, and its state's dtypes;
(c) work under ``optax.inject_hyperparams`` (the injected learning rate
    drives the step; same updates and state as without it), and so must
    every public factory it covers, with its int arguments in ``static_args``;
(d) work under ``optax.MultiSteps(every_k=2)``;
(e) converge on a quadratic, on the Rosenbrock function and on a complex
    quadratic (optax's ``test_optimization`` with complex64; a method that
    cannot take complex parameters refuses them by name);
(f) let ``optax.tree.map_params`` map over its state (how sharding specs for
    the optimizer state are derived from the params'), init and update an
    empty tree, and run inside ``nnx.Optimizer`` for two updates.

To add a method: append a ``Case`` to ``TRANSFORMS`` (and list its public
functions in ``covers``, with their arguments in ``FACTORY_ARGS`` when they
need some; ``test_every_public_transform_is_in_the_battery`` fails for a
transforms or lowrank module that is left out). A method whose ``update`` needs
keyword arguments (a loss function, a layer's input batch, ...) gives them as
``Case.extras(loss, params, grads) -> dict`` (and ``FACTORY_EXTRAS`` for its
factories): every check passes them, built for the loss it runs on (the
problem's, or the linear loss whose gradient is the check's random ``grads``).

Compiled functions are built once per case and shared through module-scoped
fixtures: the battery compiles four small programs per case (a training step,
its inject_hyperparams and MultiSteps versions, and the convergence runs); the
other checks trace (``jax.eval_shape``) or run tiny eager steps.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import pkgutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxopt_lab.lowrank
import jaxopt_lab.transforms
from jaxopt_lab.finetune import ist, lora_ggpo, lora_pro, scale_by_lora_pro, snella_allocation
from jaxopt_lab.lowrank.adam8bit import create_dynamic_map, dequantize_blockwise, quantize_blockwise, quantize_codes
from jaxopt_lab.lowrank.fira import init_limiter_state
from jaxopt_lab.lowrank.kernels_as_matrices import kernels_as_matrices
from jaxopt_lab.lowrank.memory import optimizer_state_bytes, state_bytes_report
from jaxopt_lab.transforms.adamp import adamp, scale_by_adamp, scale_by_sgdp, sgdp
from jaxopt_lab.transforms.delta_sgd import delta_sgd, scale_by_delta_sgd
from jaxopt_lab.transforms.diffgrad import diffgrad, scale_by_diffgrad
from jaxopt_lab.transforms.entropy_sgd import entropy_sgd, scale_by_entropy_sgd
from jaxopt_lab.transforms.orthogonal_grad import orthogonal_grad
from jaxopt_lab.transforms.perp_adamw import perp_adamw
from jaxopt_lab.transforms.gradient_normalized_smoothness import (
    gradient_normalized_smoothness,
    scale_by_gradient_normalized_smoothness,
)
from jaxopt_lab.transforms.sso import scale_by_sso, sso
from jaxopt_lab.transforms.tpsgd import conv_projection, scale_by_target_projection, target_projection_grad, tpsgd
from jaxopt_lab.transforms.tract import conv_patches, scale_by_tract, select_leaf, tract
from jaxopt_lab.transforms.weight_decay import clip_by_coordinate, independent_weight_decay
from jaxopt_lab.lowrank import (
    apollo,
    apollo_mini,
    fira,
    galore,
    gradnorm_lorp,
    int8_weights,
    q_galore,
    scale_by_adam_8bit,
    scale_by_apollo,
    scale_by_fira,
    scale_by_galore,
    scale_by_gradnorm_lorp,
    scale_by_q_galore,
    scale_by_stable_spam,
    stable_spam,
    stochastic_round_int8,
    stochastic_round_uint8,
    weight_normalized,
)

# These programs run a handful of times on tiny arrays: LLVM's optimizations
# cost more compile time than they save.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


# --- transformations that are not an optimizer on their own, in a typical chain


def orthogonal_grad_sgd(learning_rate):
    return optax.chain(orthogonal_grad(), optax.sgd(learning_rate))


def adam_independent_weight_decay(learning_rate, weight_decay):
    return optax.chain(optax.adam(learning_rate), independent_weight_decay(weight_decay))


def clip_by_coordinate_sgd(learning_rate, max_abs):
    return optax.chain(clip_by_coordinate(max_abs), optax.sgd(learning_rate))


def entropy_sgd_linearized(learning_rate, inner_steps, inner_lr, gamma, gamma_growth, noise, seed):
    """entropy_sgd fed the battery's gradient at every inner step.

    Entropy-SGD needs ``grad_fn`` (gradients at the Langevin iterates), which
    the battery's ``update(grads, state, params)`` cannot give: this wrapper
    passes ``grad_fn = lambda x, k: grads``, the loss's first-order model
    around the parameters (exact for a linear loss). The inner loop, the noise,
    the scoping of gamma and the outer momentum all still run; the step is
    then a positive multiple of ``grads`` plus the small Langevin noise.
    """
    tx = entropy_sgd(
        learning_rate,
        inner_steps=inner_steps,
        inner_lr=inner_lr,
        gamma=gamma,
        gamma_growth=gamma_growth,
        noise=noise,
        seed=seed,
    )

    def update_fn(grads, state, params=None, **extra_args):
        return tx.update(grads, state, params, grad_fn=lambda x, k: grads, **extra_args)

    return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def int8_q_galore(learning_rate, rank, update_proj_gap, group_size, seed):
    """Q-GaLore with its int8 weights (the parameters on a stochastically rounded int8 grid)."""
    return int8_weights(q_galore(learning_rate, rank=rank, update_proj_gap=update_proj_gap), group_size, seed)


def lora_ggpo_adam(learning_rate, sigma, beta, seed):
    """LoRA-GGPO around Adam. The battery's trees hold no LoRA factors, so this checks the wrapper
    (state, dtypes, jit, inject_hyperparams) around its inner method; tests/finetune checks the rule."""
    return lora_ggpo(optax.adam(learning_rate), sigma=sigma, beta=beta, seed=seed)


def kernels_as_matrices_adam(learning_rate):
    """Adam on every >2-D leaf reshaped to a matrix (elementwise Adam: the same steps; the battery's
    trees are 0-2-D, so this checks the wrapper; tests/lowrank/test_kernels_as_matrices.py the reshape)."""
    return kernels_as_matrices(optax.adam(learning_rate))


def adam_8bit(learning_rate, b1=0.9, b2=0.999, block_size=4, min_8bit_size=4):
    """Adam with bitsandbytes' 8-bit moments, blocks and threshold small enough to quantize the battery's tensors."""
    return optax.chain(scale_by_adam_8bit(b1, b2, block_size=block_size, min_8bit_size=min_8bit_size),
                       optax.scale_by_learning_rate(learning_rate))


def ist_adam(learning_rate, seed):
    """IST around Adam. The battery's trees hold no LoRA factors, so this checks the wrapper
    (state, dtypes, jit, inject_hyperparams); tests/finetune/test_ist.py checks the rule."""
    return ist(optax.adam(learning_rate), seed=seed)


def snella_allocation_adam(learning_rate, total_steps):
    """SNELLA's allocation around Adam. The battery's trees hold no SNELLA layers, so this checks the
    wrapper; tests/finetune/test_snella.py checks the rule."""
    return snella_allocation(optax.adam(learning_rate), total_steps=total_steps)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    factory: Callable[..., optax.GradientTransformation]
    hparams: dict[str, Any]  # keyword arguments of ``factory``, "learning_rate" among them
    solve: dict[str, dict[str, Any]]  # problem name -> overrides of ``hparams`` for the convergence run
    covers: tuple[Callable, ...] = ()  # public jaxopt_lab functions this case exercises
    static_args: tuple[str, ...] = ()  # for optax.inject_hyperparams
    # complex parameters: "supported" (the complex quadratic converges), "vectors" (a complex matrix is
    # refused by name: low-rank projection is real), "refused" (any complex parameter is)
    complex_params: str = "supported"
    affine_in_lr: bool = True  # whether the first step is affine in the learning rate
    # (loss, params, grads) -> keyword arguments of ``update`` (a loss function, a layer's inputs, ...)
    extras: Callable[[Callable, Any, Any], dict] | None = None

    def make(self, **overrides) -> optax.GradientTransformation:
        return self.factory(**{**self.hparams, **overrides})

    def extra(self, loss, params, grads) -> dict:
        return {} if self.extras is None else self.extras(loss, params, grads)


def linear_loss(grads):
    """The loss whose gradient is ``grads`` everywhere: sum_i Re<g_i, p_i> (in float32)."""
    gs = jax.tree.leaves(grads)

    def loss(p):
        wide = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))  # noqa: E731
        return sum((jnp.sum(jnp.real(jnp.conj(wide(g)) * wide(x))) for g, x in zip(gs, jax.tree.leaves(p))),
                   jnp.float32(0))

    return loss


# --- extras of the methods that need more than the gradient


def first_matrix(params):  # a label function: the first 2-D leaf (TrAct's first layer, tpSGD's hidden layer)
    leaves, treedef = jax.tree.flatten(params)
    first = next((i for i, p in enumerate(leaves) if jnp.ndim(p) == 2), None)
    return treedef.unflatten([i == first for i in range(len(leaves))])


def first_real_matrix(params):
    leaves, treedef = jax.tree.flatten(params)
    first = next((i for i, p in enumerate(leaves) if jnp.ndim(p) == 2 and not jnp.iscomplexobj(p)), None)
    return treedef.unflatten([i == first for i in range(len(leaves))])


def first_hidden_layer(params):  # tpSGD: the first 2-D leaf is hidden layer 0, the rest is the output layer
    return jax.tree.map(lambda f: 0 if f else -1, first_matrix(params))


def no_hidden_layer(params):
    return jax.tree.map(lambda _: -1, params)


def _first_matrix_shape(params):
    return next((jnp.shape(p) for p in jax.tree.leaves(params) if jnp.ndim(p) == 2), None)


def tract_extras(loss, params, grads):
    """A fixed batch of 8 inputs for the first 2-D leaf (TrAct's preconditioner (X^T X / 8 + l I)^-1)."""
    shape = _first_matrix_shape(params)
    if shape is None:
        return {}
    return {"first_layer_input": np.random.default_rng(0).normal(size=(8, shape[0])).astype(np.float32)}


def tpsgd_extras(loss, params, grads):
    """A batch of 8: the hidden layer's inputs and pre-activations and labels of 3 classes."""
    shape = _first_matrix_shape(params)
    if shape is None:
        return {}
    rng = np.random.default_rng(1)
    return {"layer_inputs": [rng.normal(size=(8, shape[0])).astype(np.float32)],
            "layer_preacts": [rng.normal(size=(8, shape[1])).astype(np.float32)],
            "labels": rng.integers(0, 3, size=8)}


def sso_extras(loss, params, grads):
    """The targets are the parameters themselves (f = identity), so dL/dz is the gradient."""
    return {"targets_fn": lambda p: p, "target_grad": grads}


def gns_extras(loss, params, grads):
    return {"loss_fn": loss}


# Non-zero decays and the non-default branches (nesterov) are switched on where
# they exist, so that their arguments go through inject_hyperparams too. The
# convergence runs switch a weight decay off (a regularizer moves the minimizer
# away from the loss's), except where the decay is the transform under test:
# independent decay 1e-4 moves it by far less than the threshold allows.
NO_DECAY = dict(weight_decay=0.0)
LOW_RANK_STATIC = ("rank", "update_proj_gap", "seed")  # ints: static under inject_hyperparams


def real_matrices(params):  # a label function: the real 2-D leaves
    return jax.tree.map(lambda p: p.ndim == 2 and not jnp.iscomplexobj(p), params)


TRANSFORMS = [
    Case(
        "orthogonal_grad+sgd",
        orthogonal_grad_sgd,
        dict(learning_rate=0.1),
        solve=dict(quadratic=dict(learning_rate=0.1), rosenbrock=dict(learning_rate=1e-3)),
        covers=(orthogonal_grad,),
    ),
    Case(
        "diffgrad",
        diffgrad,
        dict(learning_rate=0.1, weight_decay=1e-4),
        solve=dict(quadratic=dict(learning_rate=0.1, **NO_DECAY), rosenbrock=dict(learning_rate=1e-2, **NO_DECAY)),
        covers=(diffgrad, scale_by_diffgrad),
    ),
    Case(
        "adamp",
        adamp,
        dict(learning_rate=0.1, weight_decay=1e-4, nesterov=True),
        solve=dict(quadratic=dict(learning_rate=0.1, **NO_DECAY), rosenbrock=dict(learning_rate=3e-3, **NO_DECAY)),
        covers=(adamp, scale_by_adamp),
        static_args=("channel_axis",),
    ),
    Case(
        "sgdp",
        sgdp,
        dict(learning_rate=0.1, weight_decay=1e-4),
        solve=dict(quadratic=dict(learning_rate=0.1, **NO_DECAY), rosenbrock=dict(learning_rate=1e-3, **NO_DECAY)),
        covers=(sgdp, scale_by_sgdp),
        static_args=("channel_axis",),
    ),
    Case(
        "perp_adamw",
        perp_adamw,
        dict(learning_rate=0.1, weight_decay=1e-4),
        solve=dict(quadratic=dict(learning_rate=0.1, **NO_DECAY), rosenbrock=dict(learning_rate=3e-3, **NO_DECAY)),
        covers=(perp_adamw,),
    ),
    Case(
        "adam+independent_weight_decay",
        adam_independent_weight_decay,
        dict(learning_rate=0.1, weight_decay=1e-4),
        solve=dict(quadratic=dict(learning_rate=1e-2), rosenbrock=dict(learning_rate=1e-2)),
        covers=(independent_weight_decay,),
    ),
    Case(
        "clip_by_coordinate+sgd",
        clip_by_coordinate_sgd,
        dict(learning_rate=0.1, max_abs=1.0),
        # a complex number has no coordinate-wise order to clip by (jnp.clip refuses it)
        solve=dict(quadratic=dict(learning_rate=0.1), rosenbrock=dict(learning_rate=1e-3), complex=None),
        covers=(clip_by_coordinate,),
        complex_params="refused",
    ),
    Case(
        "entropy_sgd (linearized grad_fn)",
        entropy_sgd_linearized,
        dict(learning_rate=0.1, inner_steps=3, inner_lr=0.5, gamma=1.0, gamma_growth=1e-3, noise=1e-4, seed=0),
        # No scoping in the 20k-step runs: gamma (1 + 1e-3)^20000 would make the inner loop unstable.
        solve=dict(
            quadratic=dict(learning_rate=0.1, gamma_growth=0.0),
            rosenbrock=dict(learning_rate=2e-4, gamma_growth=0.0),
        ),
        covers=(entropy_sgd, scale_by_entropy_sgd),
        static_args=("inner_steps", "seed"),
    ),
    Case(
        # Needs params (the battery passes them); learning_rate is a multiplier of the adaptive step.
        "delta_sgd",
        delta_sgd,
        dict(learning_rate=1.0, initial_step_size=0.2, delta=0.1, gamma=2.0, initial_theta=1.0),
        # The paper's eta_0 = 0.2 is sized for networks: from Rosenbrock's classic start (gradient
        # norm 232) the first step throws the iterate to x ~ -4, where it crawls along the valley at
        # eta ~ 1/L ~ 2e-4 for the rest of the run. The adaptive rule itself is left as it is.
        solve=dict(quadratic=dict(), rosenbrock=dict(initial_step_size=1e-3)),
        covers=(delta_sgd, scale_by_delta_sgd),
    ),
    # Low-rank methods: the battery's 2-D kernels (3 × 4, 4 × 3) are projected at rank 2 and
    # refreshed every 2 steps; the convergence problems' vectors go to the inner Adam. They project
    # real matrices only: on the complex problem its matrix goes to the inner Adam (real_matrices).
    Case(
        "galore",
        galore,
        dict(learning_rate=0.1, rank=2, update_proj_gap=2, scale=0.25, label_fn=None),
        solve=dict(quadratic=dict(learning_rate=0.1), rosenbrock=dict(learning_rate=3e-3),
                   complex=dict(learning_rate=0.1, label_fn=real_matrices)),
        covers=(galore, scale_by_galore),
        static_args=LOW_RANK_STATIC,
        complex_params="vectors",
    ),
    Case(
        "fira",
        fira,
        dict(learning_rate=0.1, rank=2, update_proj_gap=2, weight_decay=1e-4, label_fn=None),
        solve=dict(quadratic=dict(learning_rate=0.1, **NO_DECAY), rosenbrock=dict(learning_rate=3e-3, **NO_DECAY),
                   complex=dict(learning_rate=0.1, label_fn=real_matrices, **NO_DECAY)),
        covers=(fira, scale_by_fira),
        static_args=LOW_RANK_STATIC,
        complex_params="vectors",
    ),
    Case(
        "apollo",
        apollo,
        dict(learning_rate=0.1, rank=2, update_proj_gap=2, weight_decay=1e-4),
        solve=dict(quadratic=dict(learning_rate=0.1, **NO_DECAY), rosenbrock=dict(learning_rate=3e-3, **NO_DECAY),
                   complex=dict(learning_rate=0.1, label_fn=real_matrices, **NO_DECAY)),
        covers=(apollo, scale_by_apollo),
        static_args=LOW_RANK_STATIC,
        complex_params="vectors",
    ),
    Case(
        # rank 1, one tensor-wise factor, update × √128
        "apollo_mini",
        apollo_mini,
        dict(learning_rate=0.01, update_proj_gap=2, weight_decay=1e-4),
        solve=dict(quadratic=dict(learning_rate=0.01, **NO_DECAY), rosenbrock=dict(learning_rate=3e-4, **NO_DECAY),
                   complex=dict(learning_rate=0.01, label_fn=real_matrices, **NO_DECAY)),
        covers=(apollo_mini,),
        static_args=("update_proj_gap", "seed"),
        complex_params="vectors",
    ),
    Case(
        # the low-rank moments (2 × 3, 2 × 4) and the bias's in 8 bits: blocks of 4, from 4 values up
        "q_galore",
        q_galore,
        dict(learning_rate=0.1, rank=2, update_proj_gap=2, weight_decay=1e-4, min_8bit_size=4, adam_block_size=4),
        solve=dict(quadratic=dict(learning_rate=0.1, **NO_DECAY), rosenbrock=dict(learning_rate=3e-3, **NO_DECAY),
                   complex=dict(learning_rate=0.1, label_fn=real_matrices, **NO_DECAY)),
        covers=(q_galore, scale_by_q_galore),
        static_args=LOW_RANK_STATIC + ("queue_size", "gamma_proj", "proj_group_size", "min_8bit_size",
                                       "adam_block_size"),
        complex_params="vectors",
    ),
    Case(
        # 8-bit moments switched on for the battery's tiny tensors (12 values: 3 blocks of 4; the quadratic's
        # 6-value matrix: a partial block); Rosenbrock's 3 values in blocks of 2 (the convergence runs).
        "adam_8bit (scale_by_adam_8bit)",
        adam_8bit,
        dict(learning_rate=0.1, block_size=4, min_8bit_size=4),
        solve=dict(quadratic=dict(learning_rate=0.1), rosenbrock=dict(learning_rate=3e-3, block_size=2, min_8bit_size=2)),
        covers=(scale_by_adam_8bit,),
        static_args=("block_size", "min_8bit_size"),
    ),
    Case(
        "gradnorm_lorp",
        gradnorm_lorp,
        dict(learning_rate=0.1, rank=2, update_proj_gap=2, weight_decay=1e-4),
        solve=dict(quadratic=dict(learning_rate=0.1, **NO_DECAY), rosenbrock=dict(learning_rate=3e-3, **NO_DECAY),
                   complex=dict(learning_rate=0.1, label_fn=real_matrices, **NO_DECAY)),
        covers=(gradnorm_lorp, scale_by_gradnorm_lorp, weight_normalized),
        static_args=LOW_RANK_STATIC,
        affine_in_lr=False,  # the learning rate acts inside the weight normalization
        complex_params="vectors",
    ),
    Case(
        # No convergence runs: the weights live on a per-group int8 grid (spacing max|w| / 127 ~ 0.02
        # here), so the loss stalls at the grid's resolution, not at the optimizer's.
        "int8_weights(q_galore)",
        int8_q_galore,
        dict(learning_rate=0.1, rank=2, update_proj_gap=2, group_size=4, seed=0),
        solve={},
        covers=(int8_weights,),
        static_args=("rank", "update_proj_gap", "group_size", "seed"),
        affine_in_lr=False,  # the step lands on the int8 grid
        complex_params="vectors",
    ),
    Case(
        "stable_spam",
        stable_spam,
        dict(learning_rate=0.1, weight_decay=1e-4),
        # Every moment reset (1000 steps) restarts Adam's step sizes (the paper follows each reset
        # with a warm-up, which a constant rate lacks): Rosenbrock's valley is then crossed too slowly
        # (loss 6e-3 at lr 3e-3), so its run leaves the resets out; the quadratic keeps them.
        solve=dict(quadratic=dict(learning_rate=1e-2, **NO_DECAY),
                   rosenbrock=dict(learning_rate=3e-3, reset_interval=None, **NO_DECAY),
                   complex=dict(learning_rate=1e-2, **NO_DECAY)),
        covers=(stable_spam, scale_by_stable_spam),
        static_args=("reset_interval",),
    ),
    Case(
        # TrAct on the first 2-D leaf (fed a fixed batch of 8 inputs) then SGD; Rosenbrock and the complex
        # problem have no real matrix: plain SGD there.
        "tract",
        tract,
        dict(learning_rate=0.1, first_layer=first_matrix, l=0.1),
        solve=dict(quadratic=dict(learning_rate=0.1), rosenbrock=dict(learning_rate=1e-3),
                   complex=dict(learning_rate=0.1, first_layer=first_real_matrix)),
        covers=(tract, scale_by_tract),
        static_args=("first_layer",),
        complex_params="vectors",
        extras=tract_extras,
    ),
    Case(
        # f = identity: the surrogate is <g, p>/eta + |p - p_t|^2 (over N entries), minimized at
        # p_t - g / (2 eta) by 10 Armijo steps.
        "sso",
        sso,
        dict(learning_rate=1.0, eta=1.0, m=10),
        solve=dict(quadratic=dict(eta=1.0), rosenbrock=dict(eta=500.0), complex=None),
        covers=(sso, scale_by_sso),
        static_args=("m",),
        complex_params="refused",
        extras=sso_extras,
    ),
    Case(
        # The exact Hessian (d <= 28 here); on the battery's random gradients the loss is linear, so the
        # step is -gamma g / |g| with gamma doubling.
        "gradient_normalized_smoothness",
        gradient_normalized_smoothness,
        dict(learning_rate=1.0),
        solve=dict(quadratic=dict(), rosenbrock=dict(), complex=None),
        covers=(gradient_normalized_smoothness, scale_by_gradient_normalized_smoothness),
        static_args=("rank", "num_samples", "cg_iters", "seed"),
        complex_params="refused",
        extras=gns_extras,
    ),
    Case(
        # The first 2-D leaf is a hidden layer trained on its local target (fed a fixed batch); the
        # convergence problems have no such layer (their gradient is not a layer's): plain SGD there.
        "tpsgd",
        tpsgd,
        dict(learning_rate=0.1, hidden_layers=first_hidden_layer, num_classes=3),
        solve=dict(quadratic=dict(learning_rate=0.1, hidden_layers=no_hidden_layer),
                   rosenbrock=dict(learning_rate=1e-3, hidden_layers=no_hidden_layer)),
        covers=(tpsgd, scale_by_target_projection),
        static_args=("hidden_layers", "num_classes", "seed"),
        extras=tpsgd_extras,
    ),
    # LoRA-Pro on a tree without LoRA factors is its Adam for the other leaves (AdamW form);
    # tests/finetune/test_lora_pro.py checks the factors' rule against float64 references.
    Case(
        "lora_pro",
        lora_pro,
        dict(learning_rate=0.1, scale=2.0, weight_decay=1e-4),
        solve=dict(quadratic=dict(learning_rate=0.1, **NO_DECAY), rosenbrock=dict(learning_rate=3e-3, **NO_DECAY),
                   complex=None),
        covers=(lora_pro, scale_by_lora_pro),
        static_args=("step_offset",),
        complex_params="refused",
    ),
    Case(
        "lora_ggpo(adam)",
        lora_ggpo_adam,
        dict(learning_rate=0.1, sigma=0.03, beta=0.01, seed=0),
        solve=dict(quadratic=dict(learning_rate=0.1), rosenbrock=dict(learning_rate=3e-3),
                   complex=dict(learning_rate=0.1)),
        covers=(lora_ggpo,),
        static_args=("seed",),
    ),
    Case(
        "kernels_as_matrices(adam)",
        kernels_as_matrices_adam,
        dict(learning_rate=0.1),
        solve=dict(quadratic=dict(learning_rate=0.1), rosenbrock=dict(learning_rate=3e-3),
                   complex=dict(learning_rate=0.1)),
        covers=(kernels_as_matrices,),
    ),
    Case(
        "ist(adam)",
        ist_adam,
        dict(learning_rate=0.1, seed=0),
        solve=dict(quadratic=dict(learning_rate=0.1), rosenbrock=dict(learning_rate=3e-3),
                   complex=dict(learning_rate=0.1)),
        covers=(ist,),
        static_args=("seed",),
    ),
    Case(
        "snella_allocation(adam)",
        snella_allocation_adam,
        dict(learning_rate=0.1, total_steps=100),
        solve=dict(quadratic=dict(learning_rate=0.1), rosenbrock=dict(learning_rate=3e-3),
                   complex=dict(learning_rate=0.1)),
        covers=(snella_allocation,),
        static_args=("total_steps",),
    ),
]
IDS = [c.name for c in TRANSFORMS]


def _params():
    """Dense-like kernels in float32 and bfloat16 and a bfloat16 bias, non-zero and fixed.

    Conv kernels are tested in test_adamp.py; one tree with both dtypes lets
    every check below share a single compiled step per case.
    """
    rng = np.random.default_rng(0)
    return {
        "dense": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
        "dense_bf16": jnp.asarray(rng.normal(size=(4, 3)), jnp.bfloat16),
        "bias": jnp.asarray(rng.normal(size=(4,)), jnp.bfloat16),
    }


def _grads(params, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)


def _assert_trees_close(actual, expected, like):
    """Close to float32 precision on float32 leaves of ``like``, to bfloat16 precision on bfloat16 ones."""

    def close(a, e, p):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        if p.dtype == jnp.bfloat16:  # 8-bit mantissa: a few roundings of 2**-8
            np.testing.assert_allclose(a, e, rtol=2e-2, atol=2e-2 * np.abs(e).max())
        else:
            np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6 * max(np.abs(e).max(), 1.0))

    jax.tree.map(close, actual, expected, like)


@pytest.fixture(scope="module", params=TRANSFORMS, ids=IDS)
def case(request) -> Case:
    return request.param


# optax's test_optimizers_accept_extra_args: every update must take (and ignore) this.
EXTRA_ARGS = {"unexpected_extra_args_your_optimizer_doesnt_expect": 1}


@pytest.fixture(scope="module")
def stepper(case):
    """The case's transformation and one jitted training step, which counts its traces.

    The step donates the params and the state, as a training loop does: it
    fails on its first call if ``init`` returned one buffer twice (XLA refuses
    to donate a buffer twice) or a state that aliases the params.
    """
    tx = case.make()
    traces = [0]

    @functools.partial(jit, donate_argnums=(0, 1))
    def step(params, state, grads):
        traces[0] += 1  # Python side effect: runs only while tracing
        updates, state = tx.update(grads, state, params, **EXTRA_ARGS, **case.extra(linear_loss(grads), params, grads))
        return optax.apply_updates(params, updates), state, updates

    return tx, step, traces


def _fresh_step(stepper, params, grads):
    """One step from ``tx.init`` on a copy of ``params`` (the step donates its inputs)."""
    tx, step, _ = stepper
    params = jax.tree.map(jnp.copy, params)
    return step(params, tx.init(params), grads)


def _dtypes(tree):
    return jax.tree.map(lambda x: x.dtype, tree)


# --- (a) and (b): three steps of the compiled step


@pytest.fixture(scope="module")
def three_steps(stepper):
    """Three donated steps; what the checks read is copied out before it is donated."""
    tx, step, traces = stepper
    params = _params()
    state = tx.init(params)
    history = [(jax.tree.map(np.asarray, params), _dtypes(params), _dtypes(state), None)]
    for seed in range(3):
        params, state, updates = step(params, state, _grads(params, seed))
        history.append((jax.tree.map(np.asarray, params), _dtypes(params), _dtypes(state), _dtypes(updates)))
    return dict(traces=traces[0], cache_size=step._cache_size(), history=history)


def test_jits_once_across_steps(three_steps):
    assert three_steps["traces"] == 1
    assert three_steps["cache_size"] == 1


def test_keeps_param_dtypes_bfloat16_included(three_steps):
    values0, dtypes, state_dtypes, _ = three_steps["history"][0]
    assert set(jax.tree.leaves(dtypes)) == {jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)}
    for values, param_dtypes, step_state_dtypes, update_dtypes in three_steps["history"][1:]:
        assert param_dtypes == dtypes
        assert update_dtypes == dtypes
        assert step_state_dtypes == state_dtypes
        assert all(np.isfinite(np.asarray(v, np.float32)).all() for v in jax.tree.leaves(values))
    last = three_steps["history"][-1][0]
    for a, b in zip(jax.tree.leaves(values0), jax.tree.leaves(last)):
        assert not np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32)), "a parameter did not move"


def test_update_takes_unexpected_keyword_arguments(case):
    # (the compiled step passes one too; this compares against a call without, by tracing only)
    tx = case.make()
    params = _params()
    state = tx.init(params)
    grads = _grads(params, 0)
    needed = case.extra(linear_loss(grads), params, grads)
    plain = jax.eval_shape(lambda: tx.update(grads, state, params, **needed))
    extra = jax.eval_shape(lambda: tx.update(grads, state, params, **needed, **EXTRA_ARGS))
    assert jax.tree.structure(extra) == jax.tree.structure(plain)


# --- (c) inject_hyperparams


def test_inject_hyperparams_learning_rate_drives_the_step(case, stepper):
    params = _params()
    grads = _grads(params, 1)
    injected = optax.inject_hyperparams(case.factory, static_args=case.static_args)(**case.hparams)
    update = jit(lambda g, s, p: injected.update(g, s, p, **case.extra(linear_loss(g), p, g)))
    state = injected.init(params)
    lr = float(state.hyperparams["learning_rate"])

    def with_lr(value):
        s = state._replace(hyperparams={**state.hyperparams, "learning_rate": jnp.asarray(value, jnp.float32)})
        return update(grads, s, params)

    (u1, s1), (u2, _), (u0, _) = with_lr(lr), with_lr(2 * lr), with_lr(0.0)
    _, expected_state, expected = _fresh_step(stepper, params, grads)
    _assert_trees_close(u1, expected, like=params)
    # optax's check: the same new state too (the inner state, leaf by leaf; not the dtypes: optax's
    # own Adam under inject_hyperparams promotes a bfloat16 moment to the float32 hyperparameters')
    assert jax.tree.structure(s1.inner_state) == jax.tree.structure(expected_state)
    for a, e in zip(jax.tree.leaves(s1.inner_state), jax.tree.leaves(expected_state)):
        a, e = (np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x,
                           np.complex128 if jnp.iscomplexobj(x) else np.float64) for x in (a, e))
        np.testing.assert_allclose(a, e, rtol=2e-2, atol=2e-2 * max(np.abs(e).max(initial=0), 1.0))
    assert update._cache_size() == 1  # new hyperparameter values, same program
    # The first step is affine in the learning rate, u(lr) = -lr d + c (c is the
    # learning-rate-free part, e.g. independent weight decay): doubling it moves
    # the step by exactly u(lr) - u(0).
    if case.affine_in_lr:
        _assert_trees_close(jax.tree.map(lambda b, c: 2 * b - c, u1, u0), u2, like=params)
    assert not np.allclose(np.asarray(u2["dense"]), np.asarray(u1["dense"]))


# Arguments the public factories need (beyond their defaults) to be built alone; the
# scale_by_* directions of gradnorm_lorp work on its reparameterized tree, so they are
# checked inside weight_normalized.
FACTORY_ARGS: dict[Callable, dict[str, Any]] = {
    independent_weight_decay: dict(weight_decay=1e-4),
    clip_by_coordinate: dict(max_abs=1.0),
    scale_by_entropy_sgd: dict(inner_steps=2),
    entropy_sgd: dict(learning_rate=0.1, inner_steps=2),
    weight_normalized: dict(inner=optax.sgd(0.1)),
    int8_weights: dict(tx=optax.sgd(0.1), group_size=4),
    tract: dict(learning_rate=0.1, first_layer="dense"),
    scale_by_tract: dict(first_layer="dense"),
    tpsgd: dict(learning_rate=0.1, hidden_layers=["dense"], num_classes=3),
    scale_by_target_projection: dict(hidden_layers=["dense"], num_classes=3),
    lora_ggpo: dict(inner=optax.sgd(0.1)),
    kernels_as_matrices: dict(inner=optax.sgd(0.1)),
    scale_by_adam_8bit: dict(block_size=4, min_8bit_size=4),
    ist: dict(inner=optax.sgd(0.1)),
    snella_allocation: dict(inner=optax.sgd(0.1), total_steps=10),
}


def _entropy_sgd_extras(loss, params, grads):
    return {"grad_fn": lambda x, k: grads}


# Keyword arguments of update that the public factories need, from (loss, params, grads)
FACTORY_EXTRAS: dict[Callable, Callable[[Callable, Any, Any], dict]] = {
    entropy_sgd: _entropy_sgd_extras,
    scale_by_entropy_sgd: _entropy_sgd_extras,
    tract: tract_extras,
    scale_by_tract: tract_extras,
    tpsgd: tpsgd_extras,
    scale_by_target_projection: tpsgd_extras,
    sso: sso_extras,
    scale_by_sso: sso_extras,
    gradient_normalized_smoothness: gns_extras,
    scale_by_gradient_normalized_smoothness: gns_extras,
}
# ints that index a shape or a period, or seed a key: static under inject_hyperparams
# (optax's test lists its own: warmup_steps, rank, update_proj_gap, ...)
STATIC_INTS = ("rank", "update_proj_gap", "seed", "inner_steps", "reset_interval", "channel_axis", "queue_size",
               "gamma_proj", "group_size", "proj_group_size", "m", "max_backtracks", "num_samples", "cg_iters",
               "max_search", "num_classes", "step_offset", "block_size", "min_8bit_size", "adam_block_size",
               "rl_steps", "interval", "total_steps", "init_warmup", "final_warmup", "mask_interval")


def _covered_factories():
    seen = []
    for c in TRANSFORMS:
        seen += [f for f in c.covers if f not in seen]
    return seen


def gradnorm_lorp_direction(learning_rate=0.1, rank=2, update_proj_gap=2, scale=0.25, seed=0):
    """scale_by_gradnorm_lorp where it runs: inside weight_normalized, before the learning rate."""
    return weight_normalized(optax.chain(scale_by_gradnorm_lorp(rank, update_proj_gap, scale, seed=seed),
                                         optax.scale_by_learning_rate(learning_rate)))


@pytest.mark.parametrize("factory", _covered_factories(), ids=lambda f: f.__name__)
def test_every_public_factory_works_under_inject_hyperparams(factory):
    # Traced, not compiled: the update runs under jax.eval_shape, so every injected
    # hyperparameter reaches the factory's argument checks as a tracer.
    if factory is scale_by_gradnorm_lorp:
        factory = gradnorm_lorp_direction
    kwargs = dict(FACTORY_ARGS.get(factory, {}))
    parameters = inspect.signature(factory).parameters
    if "learning_rate" in parameters and parameters["learning_rate"].default is inspect.Parameter.empty:
        kwargs.setdefault("learning_rate", 0.1)
    static = tuple(name for name in STATIC_INTS if name in parameters)
    injected = optax.inject_hyperparams(factory, static_args=static)(**kwargs)
    params = _params()
    grads = _grads(params, 0)
    make_extras = FACTORY_EXTRAS.get(factory, lambda loss, p, g: {})
    extra = make_extras(linear_loss(grads), params, grads)
    state = injected.init(params)
    updates, new_state = jax.eval_shape(lambda s: injected.update(grads, s, params, **extra), state)
    # (shapes, not dtypes: with float32 hyperparameters a bfloat16 leaf's update is float32, as optax's own)
    assert jax.tree.map(lambda u: u.shape, updates) == jax.tree.map(lambda p: p.shape, params)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    # complex params: inject_hyperparams casts the hyperparameters to complex64, which the
    # argument checks must take (optax's Adam does)
    # (TrAct's first layer is a real kernel named by its path: the complex vector problem has none, and a path
    # that matches nothing is an error; its refusal of complex kernels is tested in test_tract.py)
    if factory not in (tract, scale_by_tract) and not any(
            factory in c.covers and c.complex_params == "refused" for c in TRANSFORMS):
        cparams = {"v": jnp.asarray([1.0, 2j, -1.0], jnp.complex64)}
        cinjected = optax.inject_hyperparams(factory, static_args=static)(**kwargs)
        cextra = make_extras(linear_loss(cparams), cparams, cparams)
        cupdates, _ = jax.eval_shape(lambda s: cinjected.update(cparams, s, cparams, **cextra), cinjected.init(cparams))
        assert cupdates["v"].dtype == jnp.complex64
    # and an int left out of static_args gets an error that says which argument and what to do
    if static:
        loose = optax.inject_hyperparams(factory, static_args=static[1:])(**kwargs)
        with pytest.raises(ValueError, match=rf"{static[0]} must be static.*static_args=\('{static[0]}',\)"):
            jax.eval_shape(lambda: loose.update(grads, loose.init(params), params, **extra))


# --- (d) MultiSteps


def test_multisteps_updates_every_other_step(case, stepper):
    tx = stepper[0]
    params = _params()
    g1, g2, g3 = _grads(params, 1), _grads(params, 2), _grads(params, 3)
    ms = optax.MultiSteps(tx, every_k_schedule=2)
    mean = jax.tree.map(lambda a, b: ((a.astype(jnp.float32) + b) / 2).astype(a.dtype), g1, g2)
    # the extras describe the step the inner transformation takes: the one on the mean gradient
    update = jit(lambda g, s, p, m: ms.update(g, s, p, **case.extra(linear_loss(m), p, m)))
    state = ms.init(params)
    u1, state = update(g1, state, params, mean)
    u2, state = update(g2, state, params, mean)
    u3, state = update(g3, state, params, mean)
    for u in (u1, u3):  # odd steps: accumulate only
        assert all(not np.any(np.asarray(leaf, np.float32)) for leaf in jax.tree.leaves(u))
    expected = _fresh_step(stepper, params, mean)[2]  # one inner step on the mean gradient
    _assert_trees_close(u2, expected, like=params)
    assert update._cache_size() == 1


# --- (f) the state's structure: map_params, empty trees, nnx


def test_map_params_maps_over_the_state(case):
    """optax's no-op map, then the sharding-spec use: each leaf's spec in place of the params' copies."""
    tx = case.make()
    params = _params()
    state = tx.init(params)
    same = optax.tree.map_params(tx, lambda v: v, state)
    assert jax.tree.structure(same) == jax.tree.structure(state)
    assert all(a is b for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(state)))

    names = {k: k for k in params}  # stands for the params' PartitionSpecs
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731  (as for any optax.masked state)
    specs = optax.tree.map_params(tx, lambda v, name: v if masked(v) else name, state, names,
                                  transform_non_params=lambda _: "replicated", is_leaf=masked)
    assert jax.tree.structure(specs) == jax.tree.structure(jax.tree.map(lambda _: "", state))
    for path, name in jax.tree_util.tree_flatten_with_path(specs)[0]:  # each name lands on its own param
        assert name == "replicated" or f"['{name}']" in jax.tree_util.keystr(path), (name, path)


def test_empty_tree(case):
    tx = case.make()
    state = tx.init({})
    updates, new_state = tx.update({}, state, {}, **case.extra(linear_loss({}), {}, {}))
    assert updates == {}
    assert jax.tree.structure(new_state) == jax.tree.structure(state)


def test_two_updates_inside_nnx_optimizer(case):
    from flax import nnx

    class Model(nnx.Module):
        def __init__(self):
            params = _params()
            self.dense = nnx.Param(params["dense"])
            self.bias = nnx.Param(params["bias"])

    model = Model()
    tx = case.make()  # its update jitted: one compile costs less than two eager updates
    # (extras hold functions, which a jitted update cannot take as arguments: those cases run eagerly)
    update = tx.update if case.extras is not None else jit(tx.update)
    opt = nnx.Optimizer(model, optax.GradientTransformationExtraArgs(tx.init, update), wrt=nnx.Param)
    structure = jax.tree.structure(nnx.as_pure(opt.opt_state))
    before = np.asarray(model.dense[...])
    for seed in (1, 2):  # the state goes through nnx's variables in between
        g = _grads(_params(), seed)
        grads = nnx.grad(lambda m: jnp.sum(m.dense * g["dense"]) + jnp.sum(m.bias * g["bias"]))(model)
        pure_grads = nnx.as_pure(nnx.state(grads, nnx.Param))
        opt.update(model, grads, **case.extra(linear_loss(pure_grads), nnx.as_pure(nnx.state(model, nnx.Param)),
                                              pure_grads))
    assert jax.tree.structure(nnx.as_pure(opt.opt_state)) == structure
    after = np.asarray(model.dense[...])
    assert np.isfinite(after).all() and not np.array_equal(after, before)


# --- (e) convergence
#
# Both problems keep one coordinate per parameter tensor out of the loss, so
# their minimizers form a line (a PSD quadratic and Rosenbrock padded with a free
# coordinate), the minimum value being 0. The ⊥ methods (⊥Grad, ⊥AdamW) never
# step along the weights by design: on a problem with a single minimizer they
# stop wherever the gradient becomes parallel to w, at a wrong norm, so they
# could not be tested on it. The free coordinate lets them fix the norm; the
# other methods are unaffected (its gradient is 0).
#
# Threshold: a final loss below 1e-3 puts every coordinate of the quadratic
# (unit curvature) within sqrt(1e-3) ~ 0.03 of its target, the 3e-2 tolerance
# of optax's contrib convergence test; on Rosenbrock it gives |x - 1| < 0.032
# and |y - x^2| < 0.0032. Both start far above it (losses 41.5 and 24.2).

_f32 = np.float32
_Q_TARGET = {"w": _f32([[1.0, -2.0, 3.0], [-1.0, 0.5, 0.0]]), "b": _f32([1.0, -1.0, 0.0])}
_Q_WEIGHT = {"w": _f32([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]), "b": _f32([1.0, 1.0, 0.0])}  # 0: not in the loss
_Q_START = {"w": _f32([[-1.0, 1.0, 0.5], [2.0, 1.0, 1.0]]), "b": _f32([-1.0, 2.0, 1.0])}


def quadratic(p):
    return sum(jnp.sum(_Q_WEIGHT[k] * jnp.square(p[k] - _Q_TARGET[k])) for k in p)


def rosenbrock(p):  # p[2] does not enter the loss
    return jnp.square(1.0 - p[0]) + 100.0 * jnp.square(p[1] - jnp.square(p[0]))


# optax's complex64 parabola (targets times 1 ± i), with a free coordinate per tensor as above
_c64 = np.complex64
_C_TARGET = {"v": _c64([1.0, -1.0, 0.0]) * (1 + 1j), "m": _c64([[1.0, -2.0], [0.5, 0.0]]) * (1 - 1j)}
_C_WEIGHT = {"v": _f32([1.0, 1.0, 0.0]), "m": _f32([[1.0, 1.0], [1.0, 0.0]])}
_C_START = {"v": _c64([-1.0, 2.0, 1.0]), "m": _c64([[2.0, 1.0], [-1.0, 1.0]])}


def complex_quadratic(p):
    return sum(jnp.sum(_C_WEIGHT[k] * jnp.square(jnp.abs(p[k] - _C_TARGET[k]))) for k in p)


PROBLEMS = {
    "quadratic": (quadratic, _Q_START),
    "rosenbrock": (rosenbrock, _f32([-1.2, 1.0, 1.0])),  # the classic start, plus the free coordinate
    "complex": (complex_quadratic, _C_START),  # its own settings, or the quadratic's
}
STEPS = 20_000
THRESHOLD = 1e-3


def test_problems_start_far_from_the_threshold():
    assert float(jax.jit(quadratic)(_Q_START)) == pytest.approx(41.5)
    assert float(jax.jit(rosenbrock)(PROBLEMS["rosenbrock"][1])) == pytest.approx(24.2)
    assert float(jax.jit(complex_quadratic)(_C_START)) == pytest.approx(32.5)


@pytest.fixture(scope="module")
def final_losses(case):
    """Loss after STEPS steps on every problem, in one compiled program."""

    def solve(loss, start, tx):
        def step(carry, _):
            params, state = carry
            # complex gradients are conjugated before they are descended (as in optax's tests)
            grads = jax.tree.map(jnp.conj, jax.grad(loss)(params))
            updates, state = tx.update(grads, state, params, **case.extra(loss, params, grads))
            return (optax.apply_updates(params, updates), state), None

        (params, _), _ = jax.lax.scan(step, (start, tx.init(start)), length=STEPS)
        return loss(params)

    settings = {name: case.solve.get(name, case.solve.get("quadratic")) for name in PROBLEMS}

    @jit
    def run():
        return {
            name: solve(loss, start, case.make(**settings[name]))
            for name, (loss, start) in PROBLEMS.items() if settings[name] is not None
        }

    return {name: float(v) for name, v in run().items()}


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_converges(case, problem, final_losses):
    if problem not in final_losses:
        pytest.skip(f"{case.name} has no convergence runs (see its Case)")
    final = final_losses[problem]
    assert final < THRESHOLD, f"{case.name} on {problem}: loss {final:.3g} after {STEPS} steps"


def test_complex_parameters_are_supported_or_refused_clearly(case):
    if case.complex_params == "supported":  # the complex quadratic (with a matrix) converges: test_converges
        assert case.solve.get("complex", case.solve.get("quadratic")) is not None
    elif case.complex_params == "vectors":
        with pytest.raises(ValueError, match=r"\['w'\].*complex64"):
            case.make().init({"w": jnp.zeros((3, 4), jnp.complex64), "b": jnp.zeros((4,), jnp.complex64)})
    else:
        params = {"b": jnp.ones((4,), jnp.complex64)}
        tx = case.make()
        with pytest.raises(ValueError, match="complex"):
            tx.update(params, tx.init(params), params)


# --- the battery covers every public transformation


NOT_TRANSFORMS = {optimizer_state_bytes, state_bytes_report, stochastic_round_int8, stochastic_round_uint8, conv_patches,
                  select_leaf, target_projection_grad, conv_projection, create_dynamic_map, quantize_codes,
                  quantize_blockwise, dequantize_blockwise, init_limiter_state}


def test_every_public_transform_is_in_the_battery():
    covered = {f for c in TRANSFORMS for f in c.covers} | NOT_TRANSFORMS
    missing = []
    modules = [(package, info) for package in (jaxopt_lab.transforms, jaxopt_lab.lowrank)
               for info in pkgutil.iter_modules(package.__path__)]
    for package, info in modules:
        if info.name.startswith("_") or info.ispkg:  # (lowrank.projectors: bases, not transformations)
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, obj in inspect.getmembers(module, inspect.isfunction):
            if obj.__module__ == module.__name__ and not name.startswith("_") and obj not in covered:
                missing.append(f"{module.__name__}.{name}")
    assert not missing, f"add a Case to TRANSFORMS (or to its covers) for: {missing}"
