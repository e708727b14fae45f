"""Fused low-rank / LoRA ops (one dispatch point per op)."""
from .lowrank_lora import dense_lora, lowrank_lora

__all__ = ["lowrank_lora", "dense_lora"]
