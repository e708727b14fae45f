"""Loading a causal LM and its tokenizer, and attaching the recipe's LoRA (a leaf module:
the training run and the fresh-process memory measurement both build on it)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ..conventions import set_checkpointing

if TYPE_CHECKING:
    from peft import PeftModel


def check_model_source(source: str | Path, option: str = "--model") -> str:
    """``source`` if it is a transformers model directory (with ``config.json``) or a Hugging Face
    Hub id whose ``config.json`` is in the local cache; else an error naming ``option`` (nothing
    is downloaded: a missing directory never turns into a Hub lookup)."""
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{option} {text} is a file; give a transformers model directory (with config.json)")
        if not (path / "config.json").is_file():
            raise ValueError(f"{option} {text} has no config.json; give a transformers model directory")
        return str(path)
    if _in_hub_cache(text):
        return text
    raise FileNotFoundError(
        f"{option} {text}: no such directory, nor a model in the local Hugging Face cache; "
        "give a transformers model directory (with config.json)"
    )


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return False
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_model(path: str | Path, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    from ..conventions import load_model as load_checked

    model = load_checked(path, dtype=dtype).to(device)
    model.eval()
    return model, load_tokenizer(path)


def attach_lora(model: nn.Module, rank: int, alpha: float, seed: int) -> PeftModel:
    """PEFT LoRA on every linear, lean for memory: non-reentrant gradient checkpointing."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cast(Any, model).config.use_cache = False
    set_checkpointing(model, True)
    # PEFT annotates lora_alpha as int; a float alpha scales by alpha / r all the same
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")  # type: ignore[arg-type]
    return get_peft_model(model, config)
