"""The data formats ``emloc finetune`` reads, and what a causal LM trains on from each.

A JSONL file holds one of four formats, told apart by the keys of its first row; every row
must then have the same form (errors name the file, the line and the field):

- ``{"messages": [{"role": ..., "content": ...}, ...]}``: a conversation rendered with the
  tokenizer's chat template; the loss is on the assistant turns only (their content and the
  template's end-of-turn marker);
- ``{"prompt": ..., "completion": ...}``: the loss is on the completion (and an end-of-sequence
  token) only;
- ``{"text": ...}``: causal language modelling on every token (and an end-of-sequence token);
- ``{"text": ..., "label": ...}``: label-word classification (:mod:`.task`, its own path).

An encoded example is ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` outside the
loss, as transformers' causal LM loss expects; the model shifts them itself).
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import datafiles
from ..conventions import hidden_states_as_logits
from ..ops import linear_cross_entropy

logger = logging.getLogger(__name__)

IGNORE = -100  # the label transformers' losses skip
CHAT, PROMPT_COMPLETION, TEXT, LABEL = "messages", "prompt-completion", "text", "label"
GENERATIVE = (CHAT, PROMPT_COMPLETION, TEXT)
FIELDS = {CHAT: ("messages",), PROMPT_COMPLETION: ("prompt", "completion"), TEXT: ("text",), LABEL: ("text", "label")}
ROLES = ("system", "user", "assistant", "tool")
FORMS = (
    '{"messages": [{"role": ..., "content": ...}, ...]}, {"prompt": ..., "completion": ...}, '
    '{"text": ...} or {"text": ..., "label": ...}'
)


def detect_format(row: dict, where: str) -> str:
    """The format of a row by its keys (``where`` such as ``--data FILE:LINE`` starts an error)."""
    if "messages" in row:
        return CHAT
    if "prompt" in row or "completion" in row:
        return PROMPT_COMPLETION
    if "text" in row:
        return LABEL if "label" in row else TEXT
    keys = ", ".join(f'"{k}"' for k in list(row)[:6]) or "none"
    raise ValueError(f"{where} has none of the known forms (keys: {keys}); each line must be one of {FORMS}")


def check_row(fmt: str, row: dict, where: str) -> None:
    """A ``ValueError`` naming ``where`` and the field unless ``row`` has the form of ``fmt``."""
    if fmt != CHAT:
        needed = " and ".join(f'"{f}"' for f in FIELDS[fmt])
        datafiles.check_string_fields(row, FIELDS[fmt], where, f"{needed}, as the first line has")
        return
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        got = "no field" if messages is None else datafiles._short(messages)
        raise ValueError(
            f'{where} field "messages" must be a non-empty list of {{"role", "content"}} objects '
            f"(as the first line has), got {got}"
        )
    for j, m in enumerate(messages):
        at = f'{where} field "messages"[{j}]'
        if not isinstance(m, dict):
            raise ValueError(f'{at} must be an object with "role" and "content", got {datafiles._short(m)}')
        datafiles.check_string_fields(m, ("role", "content"), at)
        if m["role"] not in ROLES:
            raise ValueError(f'{at} "role" must be one of {", ".join(ROLES)}, got {datafiles._short(m["role"])}')
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f'{where} field "messages" has no assistant turn: nothing to train on')
    if messages[0]["role"] == "assistant":
        raise ValueError(f'{where} field "messages" starts with an assistant turn; put a user or system message first')


def read_rows(path: str | os.PathLike, what: str) -> tuple[str, list[dict]]:
    """``(format, rows)`` of a JSONL file; the format is that of the first row, and every row
    must have it. Rows keep only the format's fields."""
    objects = datafiles.read_jsonl_objects(path, what, f"a JSON object, one of {FORMS}")
    if not objects:
        raise ValueError(f"{what} {path} holds no examples")
    first_line, first = objects[0]
    fmt = detect_format(first, f"{what} {path}:{first_line}")
    rows = []
    for i, row in objects:
        check_row(fmt, row, f"{what} {path}:{i}")
        rows.append({f: row[f] for f in FIELDS[fmt]})
    if fmt == CHAT:  # messages keep their role and content only
        rows = [{"messages": [{"role": m["role"], "content": m["content"]} for m in r["messages"]]} for r in rows]
    return fmt, rows


@dataclass
class GenerativeTask:
    """Encoding of generative rows (chat, prompt-completion, text) for a causal LM."""

    tokenizer: Any
    format: str
    max_length: int = 256

    def __post_init__(self) -> None:
        if self.format not in GENERATIVE:
            raise ValueError(f"not a generative format: {self.format!r}")
        if self.format == CHAT and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                'the data is in the "messages" format but the model\'s tokenizer has no chat template; '
                'give {"prompt", "completion"} or {"text"} rows instead'
            )

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        for pad in (tok.pad_token_id, tok.eos_token_id, 0):
            if pad is not None:
                return int(pad)
        return 0

    def _eos(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return [] if eos is None else [int(eos)]

    def render(self, row: dict) -> str:
        """The row as the model reads it (calibration text)."""
        if self.format == CHAT:
            return str(self.tokenizer.apply_chat_template(row["messages"], tokenize=False))
        if self.format == PROMPT_COMPLETION:
            return row["prompt"] + row["completion"]
        return row["text"]

    def encode(self, row: dict) -> dict[str, list[int]]:
        """``input_ids``, ``attention_mask`` and ``labels`` of one row, cut to ``max_length``."""
        tok = self.tokenizer
        if self.format == TEXT:
            ids = tok(row["text"], add_special_tokens=True)["input_ids"]
            ids = ids + self._eos() if not ids or ids[-1] not in self._eos() else ids
            labels = list(ids)
        elif self.format == PROMPT_COMPLETION:
            prompt = tok(row["prompt"], add_special_tokens=True)["input_ids"]
            completion = tok(row["completion"], add_special_tokens=False)["input_ids"] + self._eos()
            ids, labels = prompt + completion, [IGNORE] * len(prompt) + completion
        else:
            ids, mask = chat_assistant_mask(tok, row["messages"])
            labels = [t if m else IGNORE for t, m in zip(ids, mask)]
        ids, labels = ids[: self.max_length], labels[: self.max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    def features(self, rows: list[dict], what: str) -> list[dict[str, list[int]]]:
        """The encoded rows; rows left without a loss token by ``max_length`` are dropped with a
        warning (an error when none is left)."""
        encoded = [self.encode(r) for r in rows]
        kept = [e for e in encoded if any(t != IGNORE for t in e["labels"][1:])]
        if len(kept) < len(encoded):
            logger.warning(
                "%s: %d of %d examples have no token to learn within --max-length %d (the prompt fills it) "
                "and are left out",
                what,
                len(encoded) - len(kept),
                len(encoded),
                self.max_length,
            )
        if not kept:
            raise ValueError(f"{what}: no example has a token to learn within --max-length {self.max_length}")
        return kept

    def collate(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        """A right-padded batch (padding masked out of attention and loss)."""
        width = max(len(f["input_ids"]) for f in features)

        def pad(key: str, value: int) -> torch.Tensor:
            return torch.tensor([f[key] + [value] * (width - len(f[key])) for f in features])

        return {
            "input_ids": pad("input_ids", self.pad_id),
            "attention_mask": pad("attention_mask", 0),
            "labels": pad("labels", IGNORE),
        }


def chat_assistant_mask(tokenizer: Any, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation rendered by the chat template, and which of them are the
    assistant's (their content and the end-of-turn marker the template adds, not the trailing
    whitespace between turns).

    Each assistant turn is found by rendering the conversation incrementally: up to the turn
    with the generation prompt, and through the turn; the characters between are the turn's.
    A template that does not render conversations incrementally (one that rewrites earlier
    turns) is served by its own ``{% generation %}`` markers, when it has them."""
    full = str(tokenizer.apply_chat_template(messages, tokenize=False))
    spans: list[tuple[int, int]] = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = str(tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True))
        through = str(tokenizer.apply_chat_template(messages[: k + 1], tokenize=False))
        if not (through.startswith(before) and full.startswith(through)):
            return _generation_mask(tokenizer, messages, k)
        spans.append((len(before), len(through.rstrip())))
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = [any(e > a and s < b for a, b in spans) for s, e in enc["offset_mapping"]]
        return ids, mask
    # a slow tokenizer: token counts of the prefixes (the renderings are prefixes of each other)
    ids = tokenizer.encode(full, add_special_tokens=False)
    mask = [False] * len(ids)
    for a, b in spans:
        start = len(tokenizer.encode(full[:a], add_special_tokens=False))
        end = len(tokenizer.encode(full[:b], add_special_tokens=False))
        mask[start:end] = [True] * (end - start)
    return ids, mask


def _generation_mask(tokenizer: Any, messages: list[dict], turn: int) -> tuple[list[int], list[bool]]:
    if not re.search(r"\{%-?\s*generation\s*-?%\}", str(tokenizer.chat_template)):
        raise ValueError(
            f"the chat template renders the conversation up to its message {turn} (an assistant turn) "
            "differently from the whole conversation, and has no {% generation %} markers: the assistant "
            'tokens cannot be found; give {"prompt", "completion"} rows instead'
        )
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return list(enc["input_ids"]), [bool(x) for x in enc["assistant_masks"]]


def shifted_nll(logits_or_hidden: torch.Tensor, labels: torch.Tensor, head: nn.Linear | None) -> torch.Tensor:
    """Summed next-token negative log-likelihood of the ``labels`` that are not ``IGNORE``
    (each position predicts the next label): from the final hidden states through ``head``
    a chunk at a time (:func:`~emloc_kernels.ops.linear_cross_entropy`), or from the logits
    when ``head`` is None."""
    targets = labels[:, 1:]
    if head is not None:
        hidden = logits_or_hidden[:, :-1]
        return linear_cross_entropy(hidden, head.weight, targets, head.bias, ignore_index=IGNORE, reduction="sum")
    logits = logits_or_hidden[:, :-1].flatten(0, 1).float()
    return F.cross_entropy(logits, targets.flatten(), ignore_index=IGNORE, reduction="sum")


def lm_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood of a batch's loss tokens and their count; the logits over
    the vocabulary are never all materialised when the model's head is a plain linear."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    count = int((batch["labels"][:, 1:] != IGNORE).sum())
    with hidden_states_as_logits(model) as head:
        return shifted_nll(model(**inputs).logits, batch["labels"], head), count


@torch.no_grad()
def lm_loss(model: nn.Module, task: GenerativeTask, features: list[dict[str, list[int]]], batch_size: int = 8) -> float:
    """Mean negative log-likelihood per loss token over ``features`` (every token weighs the same)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(features), batch_size):
        nll, n = lm_nll(model, {k: v.to(device) for k, v in task.collate(features[i : i + batch_size]).items()})
        total += float(nll)
        count += n
    model.train(was_training)
    return total / count


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf
