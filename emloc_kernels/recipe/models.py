"""Loading a causal LM and its tokenizer, and attaching the recipe's LoRA (a leaf module:
the training run and the fresh-process memory measurement both build on it)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ..conventions import LINEAR_TYPES, set_checkpointing

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


def attach_lora(model: nn.Module, rank: int, alpha: float, seed: int, top_blocks: int | None = None) -> PeftModel:
    """PEFT LoRA on every linear, lean for memory: non-reentrant gradient checkpointing.

    ``top_blocks``: LoRA on the linears of the last N decoder blocks only (PEFT's
    ``layers_to_transform``); the blocks below run without autograd, so training keeps the
    activations of N blocks and stores no gradient below them."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    m = cast(Any, model)
    m.config.use_cache = False
    layers: list[int] | None = None
    targets: str | list[str] = "all-linear"
    if top_blocks is not None:
        n = check_top_blocks(model, top_blocks)
        layers = list(range(n - top_blocks, n))
        # PEFT takes layers_to_transform with a list of module names only: those "all-linear" means
        head = m.get_output_embeddings()
        linears = {name for name, mod in model.named_modules() if isinstance(mod, LINEAR_TYPES) and mod is not head}
        targets = sorted({name.rsplit(".", 1)[-1] for name in linears})
    # PEFT annotates lora_alpha as int; a float alpha scales by alpha / r all the same
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]
        lora_dropout=0.0,
        target_modules=targets,
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )
    if layers is None:
        set_checkpointing(model, True)
        return get_peft_model(model, config)
    peft_model = get_peft_model(model, config)
    train_top_blocks_only(model)
    return peft_model


def check_top_blocks(model: nn.Module, top_blocks: int) -> int:
    """The model's number of decoder blocks; a ValueError unless ``top_blocks`` is 1 to it."""
    n = int(cast(Any, model).config.num_hidden_layers)
    if not 1 <= top_blocks <= n:
        raise ValueError(f"top_blocks must be between 1 and the model's {n} blocks, got {top_blocks}")
    return n


def train_top_blocks_only(model: nn.Module) -> None:
    """Checkpointing for a PEFT model whose LoRA sits on its top blocks: switched on after PEFT,
    whose input-grad hook would not be removable, the embeddings' output then needs no gradient
    (non-reentrant checkpointing works without), so autograd neither runs nor recomputes
    through the blocks below the trained ones."""
    set_checkpointing(model, True)
    if hasattr(model, "disable_input_require_grads"):
        cast(Any, model).disable_input_require_grads()
