"""Shared fixtures: the real SmolLM2 material (skipped cleanly when it is not installed) and
the skip of ``cuda``-marked tests on machines without a GPU."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_dir():
    """Directory of SmolLM2-135M-Instruct as safetensors (converted once into the cache)."""
    from emloc_kernels.recipe.demo import smollm2_path

    try:
        return smollm2_path()
    except FileNotFoundError as e:  # material packages not installed on this machine
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def load_smollm2(smollm2_dir):
    """A loader of fresh fp32 SmolLM2 copies (the emulator build works in place)."""
    from transformers import AutoModelForCausalLM

    def load() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()

    return load


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def reviews() -> list[str]:
    """Twelve short Rotten Tomatoes review sentences (a fixed shuffle)."""
    from emloc_kernels.recipe.demo import rotten_tomatoes

    try:
        train, _ = rotten_tomatoes(seed=0)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return [r["text"] for r in train if len(r["text"]) < 160][:12]


# Tiny random models of each supported architecture (hidden 64, 2 blocks, odd intermediate
# sizes): ``(config class, model class, config kwargs)``.
_DECODER = dict(
    hidden_size=64,
    intermediate_size=147,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=101,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
)
TINY = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _DECODER),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _DECODER),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**_DECODER, "head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**_DECODER, "sliding_window": 8}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**_DECODER, "num_key_value_heads": 1, "head_dim": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**_DECODER, "intermediate_size": 139, "pad_token_id": 0}),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(
            n_embd=64, n_layer=2, n_head=4, n_inner=150, vocab_size=101, n_positions=64, bos_token_id=1, eos_token_id=2
        ),
    ),
    "bert": (
        "BertConfig",
        "BertForMaskedLM",
        dict(
            hidden_size=64,
            intermediate_size=139,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=101,
            max_position_embeddings=64,
        ),
    ),
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test with an ``arch`` argument runs once per architecture of ``TINY``."""
    if "arch" in metafunc.fixturenames:
        metafunc.parametrize("arch", list(TINY))


@pytest.fixture
def tiny_model():
    """``make(arch, seed=0, **config_overrides)``: a fresh tiny random model in eval mode (fp32)."""
    import transformers

    def make(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
        config_cls, model_cls, kwargs = TINY[arch]
        torch.manual_seed(seed)
        config = getattr(transformers, config_cls)(**{**kwargs, **overrides})
        return getattr(transformers, model_cls)(config).eval()

    return make


@pytest.fixture(scope="session")
def save_tiny_llama(smollm2_dir):
    """``save(directory, **config)``: a tiny random Llama (seed 0; 2 blocks, hidden 64, tied
    embeddings unless overridden) with SmolLM2's tokenizer, saved as a model directory."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)

    def save(directory, **overrides) -> None:
        torch.manual_seed(0)
        config = dict(
            hidden_size=64,
            intermediate_size=112,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tokenizer),
            tie_word_embeddings=True,
        )
        LlamaForCausalLM(LlamaConfig(**{**config, **overrides})).save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    return save
