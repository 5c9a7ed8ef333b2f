"""Parameter-efficient fine-tuning: LoRA adapters as flax nnx modules (:mod:`~jaxopt_lab.finetune.lora`),
their gradient rules as optax transforms that find the (A, B) pairs by path (LoRA-Pro, LoRA-GGPO,
IST, SNELLA's allocation), data-driven initialisation (EVA), singular-value fine-tuning (SVFit),
low-rank compression (WeLore), kernelized sparse updates (SNELLA), and loading a pretrained run
(:mod:`~jaxopt_lab.finetune.pretrained`)."""

from jaxopt_lab.finetune.eva import EVAResult, IncrementalPCA, distribute_ranks, eva_init
from jaxopt_lab.finetune.lora import (
    LoRAConfig,
    LoRALinear,
    LoRAPair,
    apply_lora,
    freeze_base,
    linear_paths,
    lora_pairs,
    merge_lora,
    trainable_labels,
    trainable_report,
    unmerge_lora,
)
from jaxopt_lab.finetune.lora_conv import LoRAConv
from jaxopt_lab.finetune.lora_ggpo import LoRAGGPOState, lora_ggpo, remove_perturbation
from jaxopt_lab.finetune.svfit import SVFitConv, SVFitLinear, apply_svfit, freeze_all_but_singular_values, merge_svfit
from jaxopt_lab.finetune.welore import WeLoreConv, WeLoreLinear, WeLoreReport, apply_welore, freeze_all_but_low_rank
from jaxopt_lab.finetune.lora_pro import ScaleByLoRAProState, lora_pro, scale_by_lora_pro
from jaxopt_lab.finetune.ist import ISTState, ist
from jaxopt_lab.finetune.snella import (
    SNELLA_TRAIN_ALSO,
    SNELLAAllocationState,
    SNELLAConv,
    SNELLALinear,
    apply_snella,
    snella_allocation,
    snella_kernel,
)

__all__ = [
    "EVAResult",
    "IncrementalPCA",
    "distribute_ranks",
    "eva_init",
    "LoRAGGPOState",
    "ScaleByLoRAProState",
    "lora_ggpo",
    "lora_pro",
    "remove_perturbation",
    "scale_by_lora_pro",
    "SVFitConv",
    "SVFitLinear",
    "apply_svfit",
    "freeze_all_but_singular_values",
    "merge_svfit",
    "WeLoreConv",
    "WeLoreLinear",
    "WeLoreReport",
    "apply_welore",
    "freeze_all_but_low_rank",
    "LoRAConfig",
    "LoRALinear",
    "LoRAConv",
    "LoRAPair",
    "apply_lora",
    "freeze_base",
    "linear_paths",
    "lora_pairs",
    "merge_lora",
    "trainable_labels",
    "trainable_report",
    "unmerge_lora",
    "ISTState",
    "ist",
    "SNELLA_TRAIN_ALSO",
    "SNELLAAllocationState",
    "SNELLAConv",
    "SNELLALinear",
    "apply_snella",
    "snella_allocation",
    "snella_kernel",
]
