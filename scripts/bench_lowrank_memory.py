"""Optimizer-state memory of the low-rank methods on LLaMA-shaped models, from shapes alone.

    python scripts/bench_lowrank_memory.py

Nothing is trained or allocated: each optimizer's ``init`` is traced with
``jax.eval_shape`` on ``ShapeDtypeStruct`` parameters and the state is
measured with :func:`jaxopt_lab.lowrank.optimizer_state_bytes` (every array
of the state, counters and projectors included, at the dtype our code stores:
float32 moments and bases, uint8-packed int4 bases, int32 DCT indices, uint32
keys; Q-GaLore's Adam moments, as its official optimizer's, uint8 codes plus a
float32 absmax per block of 2048 for every state tensor of 4096 values or more). Models: the LLaMA configurations of the GaLore paper's pre-training
table (hidden / intermediate / heads / layers; vocabulary 32000; untied
embedding and head), ranks 128 / 256 / 256 / 512. The attention (q, k, v, o)
and MLP (gate, up, down) matrices are projected; embeddings, head and norms
get plain Adam, as in the papers.

The paper's own figures (GaLore, Table 2) are a *memory estimate* of weights
plus optimizer states in BF16, so the last columns put ours on that basis
too: every float leaf at 2 bytes, weights included (``est. bf16``).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_lab import lowrank
from jaxopt_lab.lowrank import optimizer_state_bytes

# name: (hidden, intermediate, heads, layers, rank), as the official GaLore repository's
# configs/llama_*.json (1B: 32 heads, 24 layers, 1.34B parameters) and its ranks
MODELS = {
    "60M": (512, 1376, 8, 8, 128),
    "130M": (768, 2048, 12, 12, 256),
    "350M": (1024, 2736, 16, 24, 256),
    "1B": (2048, 5461, 32, 24, 512),
}
VOCAB = 32000
# GaLore paper, Table 2 ("memory estimate": weights + optimizer states, BF16), in GB
PAPER_GB = {"Full-Rank": {"60M": 0.36, "130M": 0.76, "350M": 2.06, "1B": 7.80},
            "GaLore": {"60M": 0.24, "130M": 0.52, "350M": 1.22, "1B": 4.38}}


def llama_params(hidden: int, intermediate: int, layers: int, dtype=jnp.float32) -> dict:
    """Abstract parameters of a LLaMA decoder (heads only split q/k/v; they do not change shapes)."""
    s = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
    block = {"q": s(hidden, hidden), "k": s(hidden, hidden), "v": s(hidden, hidden), "o": s(hidden, hidden),
             "gate": s(hidden, intermediate), "up": s(hidden, intermediate), "down": s(intermediate, hidden),
             "attn_norm": s(hidden), "mlp_norm": s(hidden)}
    return {"embed": s(VOCAB, hidden), "layers": [dict(block) for _ in range(layers)], "final_norm": s(hidden),
            "head": s(hidden, VOCAB)}


def methods(rank: int) -> dict[str, optax.GradientTransformation]:
    """Each method as it would train: the transform's defaults, this rank."""
    has = lambda name: hasattr(lowrank, name)
    out = {
        "Adam (optax.adam)": optax.adam(1e-3),
        "GaLore": lowrank.galore(1e-3, rank=rank),
        "Fira": lowrank.fira(1e-3, rank=rank),
        "Q-GaLore (int4 projector, 8-bit Adam)": lowrank.q_galore(1e-3, rank=rank) if has("q_galore")
        else lowrank.galore(1e-3, rank=rank, projector="int4_svd"),
        "GaLore-DCT (indices)": lowrank.galore(1e-3, rank=rank, projector="dct"),
        "APOLLO (random, key)": lowrank.apollo(1e-3, rank=rank) if has("apollo")
        else lowrank.galore(1e-3, rank=rank, projector="random"),
    }
    if has("apollo_mini"):
        out["APOLLO-Mini (rank 1)"] = lowrank.apollo_mini(1e-3)
    return out


def bf16_estimate_bytes(tree) -> int:
    """Bytes with every floating-point leaf at 2 bytes (BF16) and other leaves as stored."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jnp.issubdtype(dtype, jnp.floating):
            total += int(np.prod(leaf.shape, dtype=np.int64)) * 2
        else:
            total += optimizer_state_bytes(leaf)
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = ap.parse_args()
    print("Optimizer state of LLaMA-shaped models (jax.eval_shape of tx.init; nothing allocated). GB = 1e9 bytes.")
    print("q, k, v, o, gate, up, down projected; embeddings, head and norms on plain Adam.\n")
    print("| model (rank) | params | method | state GB (as stored) | × Adam | est. bf16 weights+state GB "
          "| paper's estimate GB (GaLore Table 2) |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for name in args.models:
        hidden, intermediate, _, layers, rank = MODELS[name]
        params = llama_params(hidden, intermediate, layers)
        n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
        adam_bytes = None
        for method, tx in methods(rank).items():
            state = jax.eval_shape(tx.init, params)
            nbytes = optimizer_state_bytes(state)
            adam_bytes = nbytes if adam_bytes is None else adam_bytes
            estimate = 2 * n_params + bf16_estimate_bytes(state)
            paper = {"Adam": "Full-Rank", "GaLore": "GaLore"}.get(method.split(" ")[0])
            paper_cell = f"{PAPER_GB[paper][name]:.2f} ({paper})" if paper else "-"
            print(f"| {name} (r={rank}) | {n_params / 1e6:.1f}M | {method} | {nbytes / 1e9:.3f} | "
                  f"{nbytes / adam_bytes:.3f} | {estimate / 1e9:.2f} | {paper_cell} |")
    print("\nThe GaLore paper's abstract: up to 65.5% less memory in optimizer states (its own setting); "
          "for Fira, Q-GaLore and APOLLO see their papers.")


if __name__ == "__main__":
    main()
