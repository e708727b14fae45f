"""Helper of test_distributed.py: the Trainer-based training stage of ``emloc finetune`` on a
tiny random Llama with SmolLM2's tokenizer, under ``torchrun`` (any number of processes) or
plain Python; rank 0 saves the trained LoRA weights.

Usage: python distributed_train.py TOKENIZER_DIR OUT_FILE BATCH_SIZE GRAD_ACCUM STEPS
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from emloc_kernels.recipe.data import PROMPT_COMPLETION, GenerativeTask
from emloc_kernels.recipe.finetune import FinetuneSettings, train_with_trainer
from emloc_kernels.recipe.models import attach_lora


def main() -> None:
    tokenizer_dir, out, batch_size, grad_accum, steps = sys.argv[1:6]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=len(tok),
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    peft_model = attach_lora(model, 4, 4.0, seed=0)
    task = GenerativeTask(tok, PROMPT_COMPLETION, max_length=32)
    # completions of different lengths: the loss is a mean over tokens of the whole global batch
    rows = [
        {"prompt": f"Count to {n}:", "completion": " " + " ".join(str(i) for i in range(1, n + 1))}
        for n in range(1, 25)
    ]
    s = FinetuneSettings(
        steps=int(steps),
        batch_size=int(batch_size),
        grad_accum=int(grad_accum),
        lr=1e-2,
        log_steps=1,
        save_steps=1000,
        progress=False,
    )
    with tempfile.TemporaryDirectory() as checkpoints:
        train_with_trainer(s, peft_model, task, task.features(rows, "rows"), Path(checkpoints), torch.device("cpu"))
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        weights = {n: p.detach().contiguous() for n, p in peft_model.named_parameters() if p.requires_grad}
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        save_file(weights, out, metadata={"world_size": str(world)})


if __name__ == "__main__":
    main()
