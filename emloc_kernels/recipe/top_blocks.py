"""Training an adapter further on the original's top blocks, within the original's inference
memory.

The blocks below the top ones are frozen, so what enters the top blocks is fixed per batch.
One inference pass of the original, with the adapter's LoRA pairs below merged into its
weights (a pair at a time from the file), writes those inputs to a file, batch by batch;
training then loads the original again without its lower blocks and replays them, so it holds
the top blocks, the embeddings and the head, not the whole original."""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, cast

import torch
from torch import nn

from ..conventions import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LORA_A_KEY, LORA_B_KEY, PEFT_KEY_PREFIX, out_in_weight
from ..correction import check_plain_lora, lora_scaling
from ..emulator.calibration import find_blocks
from .models import check_top_blocks, train_top_blocks_only
from .task import next_token_logits

if TYPE_CHECKING:
    from peft import PeftModel


class BlockInputs:
    """Tensors appended to a file and read back whole, in order, with plain file reads (the
    pages of a memory map would count as the process's memory)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: list[tuple[int, torch.Size, torch.dtype]] = []
        self.served = 0
        path.write_bytes(b"")

    def append(self, tensor: torch.Tensor) -> None:
        with self.path.open("ab") as f:
            offset = f.tell()  # the file's end
            f.write(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().data)
        self.entries.append((offset, tensor.shape, tensor.dtype))

    def next(self) -> torch.Tensor:
        """The next stored tensor; a RuntimeError once all have been served."""
        if self.served == len(self.entries):
            raise RuntimeError(f"the top blocks' inputs of {len(self.entries)} batches are all used: a batch too many")
        offset, shape, dtype = self.entries[self.served]
        out = torch.empty(shape, dtype=dtype)
        with self.path.open("rb") as f:
            f.seek(offset)
            f.readinto(out.view(torch.uint8).numpy().data)
        self.served += 1
        return out


class _Replay(nn.Module):
    """In place of the last block below the top ones: the stored hidden states of the next
    batch (checked against the shape of the batch it is given)."""

    def __init__(self, inputs: BlockInputs) -> None:
        super().__init__()
        self.inputs = inputs

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        stored = self.inputs.next()
        if stored.shape != hidden_states.shape:
            raise RuntimeError(
                f"the top blocks' stored input has shape {tuple(stored.shape)}, the batch given "
                f"{tuple(hidden_states.shape)}: the batches must come in the order they were stored"
            )
        return stored.to(hidden_states.device)


class _Skip(nn.Module):
    """In place of the other blocks below: nothing computed (their output is replayed)."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class _Stop(Exception):
    pass


def _stand_in(block: nn.Module, stub: nn.Module) -> nn.Module:
    """``stub`` with the block's plain attributes, which the model's forward may read
    (``attention_type`` chooses a layer's mask)."""
    for key, value in vars(block).items():
        if not key.startswith("_") and key != "training" and isinstance(value, (str, int, float, bool)):
            setattr(stub, key, value)
    return stub


def merge_lora_below(model: nn.Module, adapter: str | Path, below: int) -> None:
    """Add the LoRA pairs of the PEFT adapter directory ``adapter`` on the first ``below`` blocks
    of ``model`` into their weights in place, one pair at a time from the file (no copy of the
    adapter, nor of a weight, in memory)."""
    from safetensors import safe_open

    adapter = Path(adapter)
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    check_plain_lora(config, "merged")
    name, _ = find_blocks(model)
    lower = tuple(f"{name}.{i}." for i in range(below))
    with safe_open(str(adapter / ADAPTER_WEIGHTS), framework="pt") as f, torch.no_grad():
        for key in f.keys():
            path = key[len(PEFT_KEY_PREFIX) : -len(LORA_A_KEY)]
            if not (key.startswith(PEFT_KEY_PREFIX) and key.endswith(LORA_A_KEY) and path.startswith(lower)):
                continue
            weight = out_in_weight(model.get_submodule(path))
            lora_a = f.get_tensor(key).to(weight)
            lora_b = f.get_tensor(PEFT_KEY_PREFIX + path + LORA_B_KEY).to(weight)
            weight.addmm_(lora_b, lora_a, alpha=lora_scaling(config, path)[1])


def attach_adapter_top_blocks(
    load_original: Callable[[], nn.Module],
    adapter: str | Path,
    top_blocks: int,
    batches: Iterable[dict],
    store: Path,
    device: torch.device,
) -> PeftModel:
    """The original (``load_original()``: on the CPU, its weights read when first used, as
    transformers maps a safetensors file) on ``device`` with the adapter ``adapter``, trainable
    on its last ``top_blocks`` blocks, for training on ``batches`` (encoded as
    :func:`next_token_logits` takes them) in that order, each once.

    First, inference: the original with the adapter's layers below merged into its weights
    writes the inputs of the top blocks on ``batches`` to the file ``store`` (the blocks below
    run as in inference), and leaves memory. Then the original again, its blocks below dropped
    before it moves to ``device`` (so never read): the model replays those inputs, one batch per
    forward pass. (With 16-bit weights the merge rounds them, as PEFT's ``merge_and_unload``
    does.) :func:`write_refined_adapter` writes the whole adapter back."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors import safe_open

    model = load_original()
    n = check_top_blocks(model, top_blocks)
    below = n - top_blocks
    if below:
        inputs = _write_top_block_inputs(model.to(device), adapter, below, batches, store)
        del model
        gc.collect()
        model = load_original()
        _, blocks = find_blocks(model)
        for i in range(below):
            blocks[i] = _stand_in(blocks[i], _Replay(inputs) if i == below - 1 else _Skip())
    model.to(device)
    cast(Any, model).config.use_cache = False
    # the adapter's target linears are found in the top blocks only: their tensors are loaded
    config = LoraConfig.from_pretrained(str(adapter))
    config.inference_mode = False
    peft_model = get_peft_model(model, config)
    wanted = set(get_peft_model_state_dict(peft_model))
    with safe_open(str(Path(adapter) / ADAPTER_WEIGHTS), framework="pt") as f:
        missing = sorted(wanted - set(f.keys()))
        if missing:
            raise ValueError(f"adapter {adapter} has no tensors {missing[:3]} for the model's top blocks")
        set_peft_model_state_dict(peft_model, {k: f.get_tensor(k) for k in wanted})
    train_top_blocks_only(model)
    return peft_model


def _write_top_block_inputs(
    model: nn.Module, adapter: str | Path, below: int, batches: Iterable[dict], store: Path
) -> BlockInputs:
    """The inputs of the blocks above the first ``below`` on ``batches``, with the adapter's
    layers there merged into ``model``'s weights: an inference pass that stops at them."""
    merge_lora_below(model, adapter, below)
    _, blocks = find_blocks(model)
    inputs = BlockInputs(store)

    def keep(module: nn.Module, args: Any, output: Any) -> None:
        inputs.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop  # the top blocks and the head are not needed

    model.eval()
    handle = blocks[below - 1].register_forward_hook(keep)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    next_token_logits(model, batch)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return inputs


def write_refined_adapter(peft_model: PeftModel, adapter: str | Path, directory: str | Path) -> None:
    """The adapter directory ``adapter`` written to ``directory`` with the tensors of the layers
    ``peft_model`` (from :func:`attach_adapter_top_blocks`) has trained replaced by theirs."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    adapter, directory = Path(adapter), Path(directory)
    tensors = load_file(adapter / ADAPTER_WEIGHTS)
    trained = get_peft_model_state_dict(peft_model)
    unknown = sorted(set(trained) - set(tensors))
    if unknown:
        raise ValueError(f"{adapter} has no tensors {unknown[:3]}: the model was not attached to this adapter")
    for key, value in trained.items():
        tensors[key] = value.detach().to("cpu", tensors[key].dtype).contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    shutil.copy2(adapter / ADAPTER_CONFIG, directory / ADAPTER_CONFIG)
