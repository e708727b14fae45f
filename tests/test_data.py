"""The generative data formats: which tokens carry the loss, and clear errors for bad rows
(SmolLM2's tokenizer, which has a chat template)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from emloc_kernels.recipe.data import (
    CHAT,
    IGNORE,
    LABEL,
    PROMPT_COMPLETION,
    TEXT,
    GenerativeTask,
    _generation_mask,
    chat_assistant_mask,
    lm_loss,
    lm_nll,
    read_rows,
)

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": " Blue, or\nperhaps green."},
]


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def loss_runs(encoded: dict) -> list[list[int]]:
    """The maximal runs of consecutive loss tokens."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(encoded["input_ids"], encoded["labels"]):
        inside = label != IGNORE
        if inside:
            assert label == token  # the model shifts the labels itself
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = inside
    return runs


def write(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_prompt_completion_loss_on_the_completion_only(tok):
    row = {"prompt": "Question: what is two plus two?\nAnswer:", "completion": " Four, of course."}
    enc = GenerativeTask(tok, PROMPT_COMPLETION).encode(row)
    prompt = tok(row["prompt"])["input_ids"]
    completion = tok(row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert enc["input_ids"] == prompt + completion
    assert enc["labels"] == [IGNORE] * len(prompt) + completion
    assert enc["attention_mask"] == [1] * len(enc["input_ids"])


def test_chat_loss_on_the_assistant_turns_only(tok):
    enc = GenerativeTask(tok, CHAT).encode({"messages": CONVERSATION})
    assert tok.decode(enc["input_ids"]) == tok.apply_chat_template(CONVERSATION, tokenize=False)
    # exactly the two answers, each with its end-of-turn marker; no system, user or role header
    assert [tok.decode(r) for r in loss_runs(enc)] == [
        "Hello! How can I help?<|im_end|>",
        " Blue, or\nperhaps green.<|im_end|>",
    ]


def test_chat_mask_agrees_with_the_templates_generation_markers(tok):
    """A template with {% generation %} markers around the assistant's content and end-of-turn
    gives the same mask through transformers' assistant mask as through incremental rendering."""
    marked = tok.chat_template.replace(
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
        "{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}{% generation %}"
        "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}"
        "{% endif %}{{ '\n' }}",
    )
    assert "generation" in marked
    copy = AutoTokenizer.from_pretrained(tok.name_or_path)
    copy.chat_template = marked
    incremental = chat_assistant_mask(copy, CONVERSATION)
    assert incremental == chat_assistant_mask(tok, CONVERSATION)
    assert _generation_mask(copy, CONVERSATION, 2) == incremental


def test_template_that_rewrites_history_without_markers_is_refused(tok):
    copy = AutoTokenizer.from_pretrained(tok.name_or_path)
    copy.chat_template = (  # numbers the turns from the end: a prefix renders differently
        "{% for message in messages %}{{ (messages|length - loop.index)|string + message['role'] + ': ' "
        "+ message['content'] + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    with pytest.raises(ValueError, match=r"message 2 \(an assistant turn\).*no \{% generation %\} markers"):
        chat_assistant_mask(copy, CONVERSATION)


def test_text_loss_on_every_token_and_an_end(tok):
    enc = GenerativeTask(tok, TEXT).encode({"text": "A plain sentence to model."})
    assert enc["labels"] == enc["input_ids"] == tok("A plain sentence to model.")["input_ids"] + [tok.eos_token_id]


def test_max_length_cuts_and_drops_rows_without_loss(tok, caplog):
    task = GenerativeTask(tok, PROMPT_COMPLETION, max_length=6)
    short = {"prompt": "Hi", "completion": " there"}
    long = {"prompt": "one two three four five six seven eight", "completion": " nine"}
    with caplog.at_level("WARNING"):
        features = task.features([short, long], "--data")
    assert len(features) == 1 and "1 of 2 examples" in caplog.text
    assert all(len(f["input_ids"]) <= 6 for f in features)
    with pytest.raises(ValueError, match="no example has a token to learn"):
        task.features([long], "--data")


def test_collate_pads_outside_attention_and_loss(tok):
    task = GenerativeTask(tok, TEXT)
    features = task.features([{"text": "short"}, {"text": "a somewhat longer line of text"}], "--data")
    batch = task.collate(features)
    n = len(features[0]["input_ids"])
    assert batch["input_ids"].shape[0] == 2
    assert (batch["attention_mask"][0, n:] == 0).all() and (batch["labels"][0, n:] == IGNORE).all()
    assert (batch["attention_mask"][1] == 1).all()


def tiny_llama(tok, seed: int, **config) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    sizes = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2)
    return LlamaForCausalLM(LlamaConfig(**sizes, num_key_value_heads=1, vocab_size=len(tok), **config))


ROWS = [{"prompt": "Say yes:", "completion": " yes"}, {"prompt": "Count:", "completion": " one two three four"}]


def test_lm_loss_is_the_models_own_token_mean(tok):
    model = tiny_llama(tok, 0).eval()
    task = GenerativeTask(tok, PROMPT_COMPLETION)
    features = task.features(ROWS, "--data")
    batch = task.collate(features)
    with torch.no_grad():
        expected = model(**batch).loss  # token mean over the batch
    assert lm_loss(model, task, features, batch_size=1) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("plain_head", [True, False])
def test_lm_nll_and_its_gradient_are_the_models_own(tok, plain_head):
    model = tiny_llama(tok, 1, tie_word_embeddings=False)
    if not plain_head:
        model.config.logit_scale = 0.5  # a head this module cannot apply itself: the logits path
    task = GenerativeTask(tok, PROMPT_COMPLETION)
    batch = task.collate(task.features(ROWS, "--data"))
    head = model.lm_head
    widths = []
    model.register_forward_hook(lambda m, args, out: widths.append(out.logits.shape[-1]))
    nll, count = lm_nll(model, batch)
    got = torch.autograd.grad(nll / count, [head.weight, model.model.norm.weight])
    assert model.lm_head is head and widths == [32 if plain_head else len(tok)]
    expected = model(**batch).loss
    want = torch.autograd.grad(expected, [head.weight, model.model.norm.weight])
    assert count == int((batch["labels"][:, 1:] != IGNORE).sum())
    assert float(nll / count) == pytest.approx(float(expected), rel=1e-5)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-7)


def test_format_comes_from_the_first_row(tmp_path):
    cases = {
        CHAT: {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "id": 3},
        PROMPT_COMPLETION: {"prompt": "a", "completion": "b"},
        TEXT: {"text": "a", "source": "x"},
        LABEL: {"text": "a", "label": "positive"},
    }
    for fmt, row in cases.items():
        got, rows = read_rows(write(tmp_path / f"{fmt}.jsonl", [row, row]), "--data")
        assert got == fmt and len(rows) == 2
        assert "id" not in rows[0] and "source" not in rows[0]  # other keys are dropped


GOOD_CHAT = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}


@pytest.mark.parametrize(
    "first, bad, message",
    [
        ({"prompt": "a", "completion": "b"}, {"prompt": "a"}, r':3 has no field "completion"'),
        ({"prompt": "a", "completion": "b"}, {"text": "a"}, r':3 has no field "prompt"'),
        ({"text": "a"}, {"text": 5}, r':3 field "text" must be a string, got 5'),
        ({"text": "a", "label": "x"}, {"text": "a"}, r':3 has no field "label"'),
        (GOOD_CHAT, {"text": "a"}, r':3 field "messages" must be a non-empty list'),
        (GOOD_CHAT, {"messages": []}, r':3 field "messages" must be a non-empty list'),
        (GOOD_CHAT, {"messages": ["hi"]}, r':3 field "messages"\[0\] must be an object'),
        (GOOD_CHAT, {"messages": [{"role": "user"}]}, r':3 field "messages"\[0\] has no field "content"'),
        (
            GOOD_CHAT,
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ["b"]}]},
            r':3 field "messages"\[1\] field "content" must be a string',
        ),
        (GOOD_CHAT, {"messages": [{"role": "bot", "content": "a"}]}, r':3 field "messages"\[0\] "role" must be one of'),
        (GOOD_CHAT, {"messages": [{"role": "user", "content": "a"}]}, r":3 .*has no assistant turn"),
        (GOOD_CHAT, "[1, 2]", r":3 must be a JSON object"),
        (
            GOOD_CHAT,
            {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
            r':3 field "messages" starts with an assistant turn',
        ),
        ({"question": "a"}, {"question": "a"}, r':1 has none of the known forms \(keys: "question"\)'),
    ],
)
def test_bad_rows_name_the_file_line_and_field(tmp_path, first, bad, message):
    path = write(tmp_path / "train.jsonl", [first, first, bad])
    with pytest.raises(ValueError, match=re.escape("--data " + path) + message):
        read_rows(path, "--data")


def test_chat_rows_need_a_chat_template(tok):
    copy = AutoTokenizer.from_pretrained(tok.name_or_path)
    copy.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        GenerativeTask(copy, CHAT)
