"""Fused low-rank / LoRA ops (one dispatch point: :func:`emloc_kernels.ops.gemm.use_triton`)."""

from .gemm import aligned_rows, force_reference
from .linear_loss import linear_cross_entropy, linear_kl_div
from .lowrank_lora import dense_lora, lowrank_lora
from .reference import dense_lora_reference, lowrank_lora_reference

__all__ = [
    "lowrank_lora",
    "dense_lora",
    "lowrank_lora_reference",
    "dense_lora_reference",
    "aligned_rows",
    "force_reference",
    "linear_cross_entropy",
    "linear_kl_div",
]
