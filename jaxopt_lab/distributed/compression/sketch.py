r"""Sketch / de-sketch compression of each tensor, with optional Gaussian noise for differential privacy.

Song, Wang, Yu & Zhang, "Sketching for First Order Method: Efficient Algorithm
for Low-Bandwidth Channel and Vulnerability" (ICML 2023),
https://arxiv.org/abs/2210.08371: a worker sends :math:`R x` for a sketching
matrix :math:`R \in \mathbb R^{s \times d}`, :math:`s \ll d`, with
:math:`\mathbb E[R^\top R] = I`, and the receiver de-sketches with
:math:`R^\top`. The matrices are drawn from a random seed shared by the workers
and the server (here: ``seed`` and the step), so :math:`R` is never sent, and
since every worker uses the same :math:`R_t` at step :math:`t`, the mean of the
de-sketched payloads is the de-sketch of the mean of the sketches (linearity),
which is the paper's server-side ``desk(mean(sk(Δ_c)))``.

Sketches (one per tensor of :math:`n` entries, :math:`s` rows):

* ``"gaussian"``: :math:`R = G / \sqrt s`, :math:`G_{ij} \sim N(0, 1)` i.i.d.
  (formed densely: :math:`s \cdot n` numbers per tensor per step, refused above
  ``GAUSSIAN_MAX_ENTRIES``; for large tensors use the two below).
* ``"srht"`` (subsampled randomized Hadamard transform):
  :math:`R = \sqrt{m/s}\, P H D` with :math:`m` the next power of two
  :math:`\ge n` (the tensor is zero-padded to :math:`m`), :math:`D` random
  signs, :math:`H` the orthonormal Walsh–Hadamard matrix, :math:`P` the first
  :math:`s` rows of a random permutation (rows sampled without replacement);
  applied in :math:`O(m \log m)`.
* ``"countsketch"``: column :math:`j` of :math:`R` has a single nonzero, a
  random sign :math:`\sigma_j`, in a random row :math:`h(j) \in [s]`.

All three have :math:`\mathbb E[R^\top R] = I`, so the decoded tensor
:math:`R^\top R x` is unbiased, and :math:`\mathbb E \lVert R x\rVert^2 =
\lVert x\rVert^2` (Johnson–Lindenstrauss; the Gaussian one has
:math:`\mathrm{Var}(\lVert Rx\rVert^2/\lVert x\rVert^2) = 2/s`).

Differential privacy (the paper's remedy for its gradient-leakage attack:
"adding additional random noises in gradient information"): with
``dp=(epsilon, delta)`` and ``clip_norm`` :math:`C`, the whole tree is first
clipped to norm :math:`C`, then Gaussian noise :math:`N(0, \sigma^2 I_d)` is
added to it and the noisy tree is sketched. :math:`\sigma` is the classical
Gaussian mechanism's (Dwork & Roth, "The Algorithmic Foundations of
Differential Privacy", 2014, Theorem A.1, which the paper's privacy analysis
builds on): :math:`\sigma = C \sqrt{2 \ln(1.25/\delta)} / \epsilon` for
:math:`\epsilon \in (0, 1)`, with the :math:`\ell_2` sensitivity of one
worker's clipped update taken as :math:`C` (add/remove adjacency, as in
DP-SGD / DP-FedAvg; pass ``clip_norm = 2C`` for replace-one adjacency). The
guarantee is per release (one call); compose over steps yourself (the paper
uses composition over its :math:`T` iterations), e.g. by passing the
per-step budget. Noise is added before the sketch, so the guarantee holds
for any :math:`R` by post-processing; no claim on :math:`R` is needed.

Why not the paper's own :math:`\sigma`: it could not be read here. Searched
(2026-12-05): the abstract in the project's paper notes (it says only that
the algorithm is made differentially private "by adding additional random
noises in gradient information", no formula); the stored web pages for the
paper's DP theorem (a full-text mirror of arXiv 2210.08371 is indexed from its
beginning only: title and abstract); the public code index and GitHub text
search for the title and for an official repository (none: the paper lists no
code; only citations of it were found). If the paper's calibration differs
(e.g. composition over its :math:`T` rounds, or a sensitivity measured after
the sketch), it should become the default with this one kept as an option.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_lab.distributed.compression.base import Compressor, as_nbytes, leaf_keys

SKETCHES = ("gaussian", "srht", "countsketch")
GAUSSIAN_MAX_ENTRIES = 1 << 27  # 512 MiB of float32: a dense Gaussian R larger than this is refused


class SketchState(NamedTuple):
    """Sketching keeps no state (the matrices come from the seed and the step)."""


def sketch_rows(n: int, ratio) -> int:
    """Rows :math:`s = \\max(1, \\lceil \\text{ratio} \\cdot n \\rceil)` of a tensor of ``n`` entries."""
    if not isinstance(ratio, Fraction):
        ratio = Fraction(repr(float(ratio)))
    return max(1, math.ceil(ratio * n))


def dp_sigma(epsilon: float, delta: float, clip_norm: float) -> float:
    r"""Gaussian-mechanism noise scale :math:`\sigma = C \sqrt{2 \ln(1.25/\delta)} / \epsilon`.

    Dwork & Roth (2014), Theorem A.1: adding :math:`N(0, \sigma^2 I)` to a
    function of :math:`\ell_2` sensitivity :math:`C` is
    :math:`(\epsilon, \delta)`-differentially private for :math:`\epsilon \in (0, 1)`.
    """
    for name, v in (("epsilon", epsilon), ("delta", delta), ("clip_norm", clip_norm)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon must be in (0, 1) (the Gaussian mechanism's theorem), got {epsilon!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm!r}")
    return clip_norm * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def fwht(x: jax.Array) -> jax.Array:
    """Orthonormal Walsh–Hadamard transform of a vector whose length is a power of two (``H x / sqrt(m)``)."""
    m = x.shape[0]
    h = 1
    while h < m:
        y = x.reshape(-1, 2, h)
        x = jnp.stack([y[:, 0] + y[:, 1], y[:, 0] - y[:, 1]], axis=1).reshape(m)
        h *= 2
    return x / jnp.sqrt(jnp.asarray(m, x.dtype))


def sketch_ingredients(kind: str, key: jax.Array, s: int, n: int) -> dict:
    """The random draws that define :math:`R` for one tensor (what a float64 reference rebuilds :math:`R` from).

    ``gaussian``: ``{"g": (s, n)}``; ``srht``: ``{"signs": (m,), "rows": (s,)}``;
    ``countsketch``: ``{"buckets": (n,), "signs": (n,)}``.
    """
    if kind == "gaussian":
        return {"g": jax.random.normal(key, (s, n), jnp.float32)}
    k1, k2 = jax.random.split(key)
    if kind == "srht":
        m = _next_pow2(n)
        if s > m:
            raise ValueError(f"srht needs rows s <= the padded size {m}, got s={s}")
        signs = jax.random.rademacher(k1, (m,), jnp.float32)
        rows = jax.random.permutation(k2, m)[:s]
        return {"signs": signs, "rows": rows}
    buckets = jax.random.randint(k1, (n,), 0, s)
    signs = jax.random.rademacher(k2, (n,), jnp.float32)
    return {"buckets": buckets, "signs": signs}


def apply_sketch(kind: str, ing: dict, x: jax.Array, s: int) -> jax.Array:
    """:math:`R x` for a flat float32 vector ``x`` of length n."""
    n = x.shape[0]
    if kind == "gaussian":
        return ing["g"] @ x / jnp.sqrt(jnp.float32(s))
    if kind == "srht":
        m = ing["signs"].shape[0]
        y = fwht(jnp.pad(x, (0, m - n)) * ing["signs"])
        return jnp.sqrt(jnp.float32(m / s)) * y[ing["rows"]]
    return jax.ops.segment_sum(ing["signs"] * x, ing["buckets"], num_segments=s)


def apply_desketch(kind: str, ing: dict, y: jax.Array, n: int) -> jax.Array:
    """:math:`R^\\top y` for a sketch ``y`` of length s, a flat vector of length n."""
    s = y.shape[0]
    if kind == "gaussian":
        return ing["g"].T @ y / jnp.sqrt(jnp.float32(s))
    if kind == "srht":
        m = ing["signs"].shape[0]
        z = jnp.zeros((m,), y.dtype).at[ing["rows"]].set(y)
        return (jnp.sqrt(jnp.float32(m / s)) * ing["signs"] * fwht(z))[:n]
    return ing["signs"] * y[ing["buckets"]]


def sketch_keys(seed: int, step, num_leaves: int) -> list[jax.Array]:
    """The shared keys of step ``step``'s sketching matrices, one per leaf (same on every worker)."""
    key = jax.random.fold_in(jax.random.key(seed), jnp.asarray(step, jnp.int32))
    return leaf_keys(key, num_leaves)


def sketch(
    kind: str = "gaussian",
    ratio: float = 0.1,
    seed: int = 0,
    refresh: bool = True,
    dp: tuple[float, float] | None = None,
    clip_norm: float | None = None,
    noise_sigma: float | None = None,
) -> Compressor:
    r"""Send :math:`y = R\,\tilde x` per tensor, decode :math:`R^\top y` (Song et al. 2023).

    Per tensor of :math:`n` entries, :math:`s = \max(1, \lceil \rho n\rceil)`
    rows (:math:`\rho` = ``ratio``). :math:`R` (``kind``: ``"gaussian"``,
    ``"srht"``, ``"countsketch"``; see the module docstring) is drawn from a
    key derived from ``seed``, the step passed to ``compress`` (``refresh``:
    a fresh :math:`R_t` each step, the paper's scheme; else step 0's for good)
    and the leaf's index, never from the per-worker key, so all workers and
    the server share it without sending it. :math:`\tilde x = x` without
    privacy; with ``clip_norm`` :math:`C`, :math:`\tilde x = x \min(1, C /
    \lVert x\rVert)` (norm over the whole tree), plus
    :math:`N(0, \sigma^2 I)` noise drawn from the per-worker key where
    :math:`\sigma` is ``noise_sigma`` or, with ``dp=(epsilon, delta)``,
    :func:`dp_sigma` (the Gaussian mechanism; see the module docstring).

    Bytes: :math:`s` values of the tensor's itemsize per tensor (the seed is
    shared, :math:`R` not sent). Stateless, so it also fits ``choco_gossip``.

    Args:
      kind: ``"gaussian"``, ``"srht"`` or ``"countsketch"``.
      ratio: :math:`\rho \in (0, 1]`, sketch rows per entry.
      seed: the shared seed of the sketching matrices.
      refresh: draw a new :math:`R` each step (default, the paper) or keep step 0's.
      dp: ``(epsilon, delta)`` for the Gaussian mechanism; needs ``clip_norm``.
      clip_norm: :math:`C > 0`, clip the tree's norm to it before noise (or None).
      noise_sigma: :math:`\sigma \ge 0` given directly (exclusive with ``dp``); needs ``clip_norm``.
    """
    if kind not in SKETCHES:
        raise ValueError(f"kind must be one of {SKETCHES}, got {kind!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if not isinstance(refresh, bool):
        raise ValueError(f"refresh must be a bool, got {refresh!r}")
    if clip_norm is not None and (isinstance(clip_norm, bool) or not isinstance(clip_norm, (int, float))
                                  or not 0 < clip_norm < math.inf):
        raise ValueError(f"clip_norm must be None or a finite number > 0, got {clip_norm!r}")
    if dp is not None and noise_sigma is not None:
        raise ValueError(f"give dp or noise_sigma, not both: dp={dp!r}, noise_sigma={noise_sigma!r}")
    sigma = 0.0
    if dp is not None:
        if clip_norm is None:
            raise ValueError(f"dp={dp!r} needs clip_norm (the sensitivity), got None")
        try:
            epsilon, delta = dp
        except (TypeError, ValueError):
            raise ValueError(f"dp must be a pair (epsilon, delta), got {dp!r}") from None
        sigma = dp_sigma(epsilon, delta, clip_norm)
    elif noise_sigma is not None:
        if isinstance(noise_sigma, bool) or not isinstance(noise_sigma, (int, float)) \
                or not 0 <= noise_sigma < math.inf:
            raise ValueError(f"noise_sigma must be a finite number >= 0, got {noise_sigma!r}")
        if clip_norm is None:
            raise ValueError(f"noise_sigma={noise_sigma!r} needs clip_norm (noise without clipping has no guarantee)")
        sigma = float(noise_sigma)

    def init_fn(tree):
        del tree
        return SketchState()

    def compress_fn(tree, state, key, step):
        leaves, treedef = jax.tree.flatten(tree)
        flat = [x.ravel().astype(jnp.float32) for x in leaves]
        if clip_norm is not None:
            norm = jnp.sqrt(sum(jnp.sum(jnp.square(v)) for v in flat))
            factor = jnp.where(norm > clip_norm, clip_norm / jnp.where(norm > 0, norm, 1.0), 1.0)
            flat = [v * factor for v in flat]
        if sigma > 0:
            flat = [v + sigma * jax.random.normal(k, v.shape, jnp.float32)
                    for v, k in zip(flat, leaf_keys(key, len(flat)))]
        rkeys = sketch_keys(seed, step if refresh else 0, len(flat))
        decoded, nbytes = [], 0
        for x, v, rk in zip(leaves, flat, rkeys):
            n = v.shape[0]
            if n == 0:
                decoded.append(x)
                continue
            s = sketch_rows(n, ratio)
            if kind == "gaussian" and s * n > GAUSSIAN_MAX_ENTRIES:
                raise ValueError(
                    f"a gaussian sketch of a tensor of shape {x.shape} materializes s x n = {s} x {n} = {s * n} "
                    f"float32 entries (more than {GAUSSIAN_MAX_ENTRIES}); use kind='srht' or 'countsketch', "
                    "which apply R without forming it")
            ing = sketch_ingredients(kind, rk, s, n)
            y = apply_sketch(kind, ing, v, s).astype(x.dtype)  # the payload, in the tensor's dtype
            decoded.append(apply_desketch(kind, ing, y.astype(jnp.float32), n).reshape(x.shape).astype(x.dtype))
            nbytes += s * np.dtype(x.dtype).itemsize
        return jax.tree.unflatten(treedef, decoded), state, as_nbytes(nbytes)

    return Compressor(init_fn, compress_fn)
