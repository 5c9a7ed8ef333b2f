"""Models as ``flax.nnx`` modules, built by name through :data:`MODELS`.

Every model takes its sizes as keyword arguments plus ``rngs: nnx.Rngs``, holds
only ``nnx.Param`` state (unless built with dropout), and returns logits.
"""

from jaxopt_lab.models.cnn import CNN
from jaxopt_lab.models.ghost_batch_norm import GhostBatchNorm
from jaxopt_lab.models.gpt import GPT, GPT_PRESETS, TransformerBlock
from jaxopt_lab.models.kat import KAT
from jaxopt_lab.models.mlp import MLP
from jaxopt_lab.models.modular_transformer import ModularTransformer

MODELS: dict[str, type] = {
    "mlp": MLP,
    "cnn": CNN,
    "gpt": GPT,
    "modular_transformer": ModularTransformer,
    "kat": KAT,
}

__all__ = [
    "CNN",
    "GPT",
    "GPT_PRESETS",
    "GhostBatchNorm",
    "KAT",
    "MLP",
    "MODELS",
    "ModularTransformer",
    "TransformerBlock",
]
