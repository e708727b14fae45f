"""Stage 2 without PEFT: a minimal LoRA for plain training loops.

The adapters it saves are ordinary PEFT LoRA adapters (same keys and config), so they go
through :func:`emloc_kernels.correct_adapter` and load with ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import save_file
from torch import nn

from .conventions import ADAPTER_WEIGHTS, PEFT_KEY_PREFIX, replace_submodule
from .files import copy_tokenizer, write_dir_atomically
from .modules.fused import fusable, fused_lora


class LoraLinear(nn.Module):
    """``base(x) + s·x Aᵀ Bᵀ`` around an ``nn.Linear`` or :class:`LowRankLinear`, fused when possible.

    Attribute names (``base_layer``, ``lora_A``, ``lora_B``) follow PEFT so that state-dict
    keys match PEFT's.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"r must be a positive integer, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.base_layer, self.r, self.scaling = base, r, alpha / r
        kw = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base, a = self.base_layer, self.lora_A.weight
        if not isinstance(self.dropout, nn.Identity) or not fusable(base):  # dropout: the LoRA branch sees other inputs
            return base(x) + (self.scaling * self.lora_B(self.lora_A(self.dropout(x.to(a.dtype))))).to(x.dtype)
        return fused_lora(base, x, a, self.lora_B.weight, self.scaling)


def _matches(name: str, targets: str | list[str]) -> bool:
    if targets == "all-linear":
        return True
    return any(name == t or name.endswith("." + t) for t in targets)


def add_lora(
    model: nn.Module, r: int = 8, alpha: float = 8.0, targets: str | list[str] = "all-linear", dropout: float = 0.0
) -> nn.Module:
    """Wrap the targeted linears of ``model`` in :class:`LoraLinear` and freeze everything else.

    ``targets``: ``"all-linear"`` (every linear but the output head) or module-name suffixes
    such as ``["q_proj", "v_proj"]`` (PEFT's convention).  Modifies ``model`` in place.
    """
    head = cast(Any, model).get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    chosen = [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head and _matches(n, targets)
    ]
    if not chosen:
        raise ValueError(f"targets {targets!r} match no linear layer of {type(model).__name__}")
    if targets != "all-linear":
        unknown = [t for t in targets if not any(_matches(n, [t]) for n in chosen)]
        if unknown:
            raise ValueError(f"targets {unknown} match no linear layer of {type(model).__name__}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        replace_submodule(model, name, LoraLinear(cast(nn.Linear, model.get_submodule(name)), r, alpha, dropout))
    model.emloc_lora = {  # type: ignore[assignment]  # torch types Module.__setattr__ as Tensor | Module; any value works
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in chosen}),
    }
    return model


def save_lora(
    model: nn.Module, out_dir: str | os.PathLike, *, base_model_name_or_path: str | None = None, overwrite: bool = False
) -> Path:
    """Write the LoRA of :func:`add_lora` as a PEFT adapter directory."""
    settings = getattr(model, "emloc_lora", None)
    if settings is None:
        raise ValueError("model has no LoRA from emloc_kernels.add_lora")
    tensors = {
        f"{PEFT_KEY_PREFIX}{name}.{part}.weight": getattr(m, part).weight.detach().contiguous().cpu()
        for name, m in model.named_modules()
        if isinstance(m, LoraLinear)
        for part in ("lora_A", "lora_B")
    }
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "emloc_metadata", None) or {}, "get", lambda k, d=None: d)(
            "original_model"
        ) or getattr(getattr(model, "config", None), "name_or_path", None)
    from peft import LoraConfig

    config = LoraConfig(
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
        r=settings["r"],
        lora_alpha=settings["lora_alpha"],
        lora_dropout=settings["lora_dropout"],
        target_modules=settings["target_modules"],
        inference_mode=True,
    )

    def writer(tmp: Path) -> None:
        save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        config.save_pretrained(str(tmp))  # PEFT writes its own adapter_config.json
        copy_tokenizer(base_model_name_or_path, tmp)

    return write_dir_atomically(out_dir, writer, overwrite=overwrite, kind="adapter")
