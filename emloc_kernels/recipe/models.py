"""Loading a causal LM and its tokenizer, and attaching the recipe's LoRA (a leaf module:
the training run and the fresh-process memory measurement both build on it)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from peft import PeftModel


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_model(path: str | Path, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM

    # as an nn.Module: transformers wraps PreTrainedModel.to in functools.wraps, which mypy sees unbound
    model = cast(nn.Module, AutoModelForCausalLM.from_pretrained(path, dtype=dtype)).to(device)
    model.eval()
    return model, load_tokenizer(path)


def attach_lora(model: nn.Module, rank: int, alpha: float, seed: int) -> PeftModel:
    """PEFT LoRA on every linear, lean for memory: non-reentrant gradient checkpointing."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cast(Any, model).config.use_cache = False
    cast(Any, model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # PEFT annotates lora_alpha as int; a float alpha scales by alpha / r all the same
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")  # type: ignore[arg-type]
    return get_peft_model(model, config)
