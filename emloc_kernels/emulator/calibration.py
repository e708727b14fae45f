"""Calibration input handling and the per-block streaming machinery of stage 1."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import nn

from ..conventions import padding


def _tokenize(texts: list[str], tokenizer: Any, max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded batch (padding is masked out of the statistics; right keeps positions)."""
    with padding(tokenizer, "right"):
        return dict(tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length))


SANE_MAX_LENGTH = 10**7  # above this a tokenizer's model_max_length is transformers' "unset" placeholder


def max_positions(config: Any) -> int | None:
    """The longest sequence ``config``'s model takes (``max_position_embeddings`` or GPT-2's
    ``n_positions``), or None when the config names none."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _vocab_size(model: nn.Module) -> int | None:
    embeddings = cast(Any, model).get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    size = getattr(embeddings, "num_embeddings", None)
    return size if isinstance(size, int) else None


def check_token_batch(batch: dict[str, torch.Tensor], what: str, vocab: int | None, positions: int | None) -> None:
    """Refuse token ids the model cannot embed and sequences longer than its positions."""
    ids = batch["input_ids"]
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{what}: input_ids must be integer token ids, got dtype {ids.dtype}")
    if positions is not None and ids.shape[-1] > positions:
        raise ValueError(
            f"{what} has sequences of {ids.shape[-1]} tokens; the model takes at most {positions} positions: "
            "shorten them (calibration texts are truncated to fit)"
        )
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (vocab is not None and high >= vocab):
        bad = low if low < 0 else high
        allowed = f"0 to {vocab - 1} (the model's vocabulary has {vocab} ids)" if vocab is not None else "≥ 0"
        raise ValueError(f"{what} holds token id {bad}; token ids must be {allowed}")


def as_batches(
    calibration: Any, tokenizer=None, max_length: int = 512, texts_per_batch: int = 8, model: nn.Module | None = None
) -> list[dict[str, torch.Tensor]]:
    """Normalise calibration data to a list of ``{"input_ids", "attention_mask"?}`` batches.

    Accepts texts (with ``tokenizer``), token tensors ``(T,)``/``(B, T)``, or dicts of tensors.
    With ``model``, texts are truncated to the positions it takes (``max_length``, the
    config's maximum positions and the tokenizer's ``model_max_length``, the smallest), and
    token ids outside its vocabulary or sequences longer than its positions are refused.
    """
    vocab = positions = None
    if model is not None:
        vocab, positions = _vocab_size(model), max_positions(getattr(model, "config", None))
    if isinstance(calibration, (torch.Tensor, dict, str)):
        calibration = [calibration]
    if not isinstance(calibration, Iterable):
        raise TypeError(
            f"calibration must be texts, token tensors or dicts of tensors, got {type(calibration).__name__}"
        )
    items = list(calibration)
    texts = bool(items) and all(isinstance(i, str) for i in items)
    if texts:
        if tokenizer is None:
            raise ValueError("calibration texts need a tokenizer: build_emulator(..., tokenizer=tok)")
        limit = max_length if positions is None else min(max_length, positions)
        tokenizer_limit = getattr(tokenizer, "model_max_length", None)
        if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < min(limit, SANE_MAX_LENGTH):
            limit = tokenizer_limit
        items = [
            _tokenize(items[i : i + texts_per_batch], tokenizer, limit) for i in range(0, len(items), texts_per_batch)
        ]
    batches = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            raise TypeError("calibration mixes texts with token batches; give one kind")
        elif isinstance(item, torch.Tensor):
            item = {"input_ids": item}
        elif not isinstance(item, dict) or "input_ids" not in item:
            raise TypeError(
                f"each calibration item must be a str, a tensor or a dict with 'input_ids'; got {type(item).__name__}"
            )
        batch = {k: v if v.ndim > 1 else v[None] for k, v in item.items() if isinstance(v, torch.Tensor)}
        if batch["input_ids"].numel() == 0:
            continue
        if model is not None:
            what = f"calibration batch {index}" + (" (tokenized texts)" if texts else "")
            check_token_batch(batch, what, vocab, positions)
        batches.append(batch)
    if not batches:
        raise ValueError("calibration is empty: give at least one non-empty text or token batch")
    return batches


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's repeated blocks: the longest ``ModuleList`` whose children share one class."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of repeated blocks to build an emulator from")
    return best


def to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor inside nested tuples/lists/dicts."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


class _Captured(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, batches: list[dict]) -> list[list[tuple]]:
    """For each batch, the ``(hidden, args, kwargs)`` each block receives.

    The model runs with every block replaced by a pass-through that records its call, so
    only the embeddings and what the model computes outside its blocks (masks, rotary
    tables) are evaluated, and the blocks' own tensors may still be on the meta device;
    per-block arguments (e.g. sliding-window masks) are kept apart.
    """
    calls: list[list[tuple]] = []

    def recorder(index: int) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            hidden = args[0] if args else kwargs.pop("hidden_states")
            calls[-1].append((hidden, args[1:], kwargs))
            if index == len(blocks) - 1:
                raise _Captured
            return hidden

        return forward

    for i, block in enumerate(blocks):
        block.forward = recorder(i)
    try:
        # the first materialised tensor: a streamed model's blocks are on the meta device
        device = next(p.device for p in model.parameters() if not p.is_meta)
        for batch in batches:
            calls.append([])
            try:
                model(**to_device(batch, device), use_cache=False)
            except _Captured:
                pass
    finally:
        for block in blocks:
            del block.forward
    return calls


HELDOUT_EVERY = 4  # every 4th calibration sample is held out to choose shrinkage and report error


def batch_token_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Boolean (B, T) mask of real tokens."""
    mask = token_mask(batch)
    return torch.ones(batch["input_ids"].shape, dtype=torch.bool) if mask is None else mask


def token_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Boolean (B, T) mask of real tokens, or None when there is no padding."""
    mask = batch.get("attention_mask")
    if mask is None or bool(mask.all()):
        return None
    return mask.bool()
