"""Label-word classification with a causal LM: the task the main job trains and scores.

A prompt template with ``{text}`` is followed by the label as the next word; an example is
scored among the dataset's labels by the next-token log-probability of each label's first
token (only the last position's logits are computed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import datafiles
from ..conventions import hidden_states_as_logits, padding


def read_jsonl(path: str | os.PathLike, what: str) -> list[dict]:
    """Lines ``{"text": ..., "label": ...}``; errors name the file, the line and the field."""
    rows = datafiles.read_jsonl(path, what, ("text", "label"))
    if not rows:
        raise ValueError(f"{what} {path} holds no examples")
    return rows


def fill_prompt(prompt: str, text: str) -> str:
    """``prompt`` with each ``{text}`` replaced by ``text``; other braces are literal (no ``str.format``)."""
    return prompt.replace("{text}", text)


@dataclass
class LabelTask:
    tokenizer: object
    prompt: str
    labels: list[str]
    label_ids: torch.Tensor  # first token of " " + label, one per label
    max_length: int = 256

    @classmethod
    def create(cls, tokenizer: Any, prompt: str, labels: list[str], max_length: int = 256) -> "LabelTask":
        if not isinstance(prompt, str) or "{text}" not in prompt:
            raise ValueError(
                f"prompt must contain the placeholder {{text}} (other braces are kept as written), got {prompt!r}"
            )
        labels = sorted(set(labels))
        if any(not label.strip() for label in labels):
            raise ValueError("labels must be words: an empty or blank label cannot be scored as a next token")
        if len(labels) < 2:
            raise ValueError(f"need at least two distinct labels, got {labels}")
        ids = [tokenizer.encode(" " + label, add_special_tokens=False)[0] for label in labels]
        if len(set(ids)) != len(ids):
            raise ValueError(f"labels {labels} share their first token; use labels whose first words differ")
        return cls(tokenizer, prompt, labels, torch.tensor(ids), max_length)

    def fill(self, text: str) -> str:
        """The prompt with ``text``; a text too long for ``max_length`` tokens loses its end, so
        that the prompt's question (after ``{text}``) survives the truncation."""
        full = fill_prompt(self.prompt, text)
        tok: Any = self.tokenizer
        excess = len(tok(full)["input_ids"]) - self.max_length
        if excess <= 0:
            return full
        ids = tok.encode(text, add_special_tokens=False)
        keep = max(0, len(ids) - excess)
        while True:
            full = fill_prompt(self.prompt, tok.decode(ids[:keep]))
            if keep == 0 or len(tok(full)["input_ids"]) <= self.max_length:
                return full  # (with keep == 0 the prompt alone is too long: the tokenizer cuts it)
            keep = max(0, keep - 8)

    def encode(self, rows: list[dict], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Left-padded prompts, so every example's next token is at the last position."""
        with padding(self.tokenizer, "left") as tok:
            enc = tok(
                [self.fill(r["text"]) for r in rows],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
            )
        mask = enc["attention_mask"]
        batch = {
            "input_ids": enc["input_ids"],
            "attention_mask": mask,
            "position_ids": (mask.cumsum(-1) - 1).clamp_min(0),
            "targets": torch.tensor([self.label_ids[self.labels.index(r["label"])] for r in rows]),
        }
        return {k: v.to(device) for k, v in batch.items()}

    def check_labels(self, rows: list[dict], what: str) -> None:
        unknown = sorted({r["label"] for r in rows} - set(self.labels))
        if unknown:
            raise ValueError(f"{what} has labels {unknown} that the training data lacks ({self.labels})")


def next_token_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, vocab) logits at the last position only."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=1,
        use_cache=False,
    )
    return out.logits[:, -1, :]


def loss_on(
    model: nn.Module, batch: dict[str, torch.Tensor], anchor: tuple[nn.Module, torch.Tensor] | None = None
) -> torch.Tensor:
    """Cross-entropy of the label's first token (full vocabulary).  With ``anchor = (head,
    offsets)`` the model's logits are its final hidden states (:func:`hidden_states_as_logits`),
    moved by ``offsets`` (B, hidden) before the output head."""
    if anchor is None:
        return F.cross_entropy(next_token_logits(model, batch).float(), batch["targets"])
    head, offsets = anchor
    hidden = next_token_logits(model, batch)
    return F.cross_entropy(head(hidden + offsets.to(hidden.dtype)).float(), batch["targets"])


NO_PLAIN_HEAD = (
    "anchored training needs a model whose logits are a plain linear head of its hidden states "
    "(--no-anchor, anchor=False: train without it)"
)


@torch.no_grad()
def last_hidden_states(model: nn.Module, task: "LabelTask", rows: list[dict], batch_size: int = 32) -> torch.Tensor:
    """(len(rows), hidden) fp32: each example's final hidden state at the position that predicts
    its label (the output head's input).  Needs a model with a plain output head."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    with hidden_states_as_logits(model) as head:
        if head is None:
            raise ValueError(NO_PLAIN_HEAD)
        for i in range(0, len(rows), batch_size):
            out.append(next_token_logits(model, task.encode(rows[i : i + batch_size], device)).float().cpu())
    model.train(was_training)
    return torch.cat(out)


def lm_loss_on(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Causal-LM cross-entropy: every non-padded position predicts the next token (the loss of
    ordinary fine-tuning; its logits over every position are what ``emloc plan`` budgets for)."""
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        labels=labels,
        use_cache=False,
    )
    return out.loss


@torch.no_grad()
def accuracy(
    model: nn.Module, task: LabelTask, rows: list[dict], batch_size: int = 32, device: torch.device | str | None = None
) -> float:
    """Fraction of ``rows`` whose label's first token out-scores the other labels'."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    ids = task.label_ids.to(device)
    correct = 0
    for i in range(0, len(rows), batch_size):
        batch = task.encode(rows[i : i + batch_size], device)
        scores = next_token_logits(model, batch)[:, ids]
        correct += int((ids[scores.argmax(-1)] == batch["targets"]).sum())
    model.train(was_training)
    return correct / len(rows)
