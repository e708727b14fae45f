"""Anchored LoRA training (``--anchor``): the loss on the emulator is taken around the
original's final hidden states, ``h_O(x) + [h_E(x; LoRA) − h_E(x)]``."""

from __future__ import annotations

import copy

import pytest
import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from emloc_kernels.conventions import hidden_states_as_logits
from emloc_kernels.recipe.finetune import anchor_rounds, batch_schedule, train, train_in_rounds
from emloc_kernels.recipe.models import attach_lora
from emloc_kernels.recipe.task import LabelTask, last_hidden_states, loss_on

ROWS = [
    {"text": t, "label": label}
    for t, label in [
        ("a warm, funny and moving film", "positive"),
        ("dull, long and badly acted", "negative"),
        ("one of the best of the year", "positive"),
        ("a mess from start to finish", "negative"),
        ("clever and charming", "positive"),
        ("i wanted my two hours back", "negative"),
    ]
]


@pytest.fixture
def pair(save_tiny_llama, smollm2_tokenizer, tmp_path):
    """(original, emulator, task): a tiny random Llama with SmolLM2's tokenizer, and a copy whose
    block linears are perturbed as an emulator's are (embeddings and head untouched)."""
    from transformers import AutoModelForCausalLM

    save_tiny_llama(tmp_path / "model")
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    emulator = copy.deepcopy(original)
    with torch.no_grad():
        for name, m in emulator.named_modules():
            if isinstance(m, torch.nn.Linear) and ".layers." in name:
                m.weight.add_(0.3 * m.weight.std() * torch.randn_like(m.weight))
    task = LabelTask.create(smollm2_tokenizer, "Review: {text}\nSentiment:", ["positive", "negative"], 64)
    return original, emulator, task


def test_anchored_loss_of_the_emulator_is_the_originals_before_training(pair):
    original, emulator, task = pair
    batch = task.encode(ROWS)
    offsets = last_hidden_states(original, task, ROWS) - last_hidden_states(emulator, task, ROWS)
    assert offsets.abs().max() > 1e-2  # the emulator differs where the head reads it
    want = loss_on(original, batch)
    assert not torch.allclose(loss_on(emulator, batch), want, atol=1e-3)
    with hidden_states_as_logits(emulator) as head:
        got = loss_on(emulator, batch, (head, offsets))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_anchored_training_with_a_perfect_emulator_is_plain_training(pair):
    """Offsets of zero (emulator = original) change nothing: same losses, same adapter."""
    original, _, task = pair
    kw = dict(steps=4, batch_size=3, lr=1e-2, seed=0, device=torch.device("cpu"), progress=False)
    plain = attach_lora(copy.deepcopy(original), 4, 4.0, seed=0)
    anchored = attach_lora(copy.deepcopy(original), 4, 4.0, seed=0)
    offsets = {i: torch.zeros(64) for b in batch_schedule(len(ROWS), 4, 3, 0) for i in b}
    losses = train(plain, task, ROWS, **kw)
    assert train(anchored, task, ROWS, offsets=offsets, **kw) == pytest.approx(losses, rel=1e-5)
    for (name, p), q in zip(plain.named_parameters(), anchored.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
    assert losses[-1] != losses[0]


def test_anchored_training_starts_from_the_originals_loss(pair):
    """The first step's loss (LoRA still zero) of anchored training on the emulator is the
    original's loss on that batch."""
    original, emulator, task = pair
    schedule = batch_schedule(len(ROWS), 2, 3, seed=0)
    used = sorted({i for b in schedule for i in b})
    picked = [ROWS[i] for i in used]
    offsets = dict(zip(used, last_hidden_states(original, task, picked) - last_hidden_states(emulator, task, picked)))
    lora = attach_lora(emulator, 4, 4.0, seed=0)
    losses = train(
        lora,
        task,
        ROWS,
        steps=2,
        batch_size=3,
        lr=1e-2,
        seed=0,
        device=torch.device("cpu"),
        progress=False,
        offsets=offsets,
    )
    want = loss_on(original, task.encode([ROWS[i] for i in schedule[0]]))
    assert losses[0] == pytest.approx(want.item(), rel=1e-5)


def test_schedule_passes_over_every_row_before_repeating():
    batches = batch_schedule(10, 7, 3, seed=4)
    assert [len(b) for b in batches] == [3] * 7
    flat = [i for b in batches for i in b]
    assert sorted(flat[:9]) == sorted(set(flat[:9])) and set(flat[:10]) == set(range(10))
    assert batch_schedule(10, 7, 3, seed=4) == batches != batch_schedule(10, 7, 3, seed=5)


def _rounds_kw(original, emulator, task, anchored=True):
    """train_in_rounds' models: fresh LoRAs on copies of ``emulator``; the anchor from
    ``original`` with the adapter state merged in."""

    def original_states(lora, rows):
        model = attach_lora(copy.deepcopy(original), 4, 4.0, seed=0)
        if lora is not None:
            set_peft_model_state_dict(model, lora)
        return last_hidden_states(model.merge_and_unload(), task, rows)

    return dict(
        lora_on_emulator=lambda: attach_lora(copy.deepcopy(emulator), 4, 4.0, seed=0),
        original_states=original_states if anchored else None,
        lr=1e-2,
        device=torch.device("cpu"),
        progress=False,
    )


def test_rounds_split_the_schedule_evenly():
    schedule = batch_schedule(10, 7, 3, seed=0)
    for n in (1, 2, 3, 7, 9):
        rounds = anchor_rounds(schedule, n)
        assert [b for r in rounds for b in r] == schedule and len(rounds) == min(n, 7)
        assert max(map(len, rounds)) - min(map(len, rounds)) <= 1


def test_rounds_with_a_perfect_emulator_are_plain_training(pair):
    """Each round's anchor is zero when the emulator is the original: three rounds (the model
    reloaded, LoRA and optimizer state carried) train as one plain run."""
    original, _, task = pair
    schedule = batch_schedule(len(ROWS), 6, 3, seed=0)
    plain = attach_lora(copy.deepcopy(original), 4, 4.0, seed=0)
    losses = train(
        plain, task, ROWS, steps=6, batch_size=3, lr=1e-2, seed=0, device=torch.device("cpu"), progress=False
    )
    model, got = train_in_rounds(task, ROWS, anchor_rounds(schedule, 3), **_rounds_kw(original, original, task))
    assert got == pytest.approx(losses, rel=1e-4)
    for (name, p), q in zip(plain.named_parameters(), model.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def test_every_round_starts_from_the_originals_loss_with_the_lora_so_far(pair):
    """The loss at a round's first step is the original's, with the LoRA trained in the earlier
    rounds merged in, on that batch: the anchor is refreshed, not the first round's."""
    original, emulator, task = pair
    rounds = anchor_rounds(batch_schedule(len(ROWS), 4, 3, seed=0), 2)
    kw = _rounds_kw(original, emulator, task)
    first, _ = train_in_rounds(task, ROWS, rounds[:1], **kw)
    _, losses = train_in_rounds(task, ROWS, rounds, **kw)
    lora = get_peft_model_state_dict(first)
    merged = attach_lora(copy.deepcopy(original), 4, 4.0, seed=0)
    set_peft_model_state_dict(merged, lora)
    want = loss_on(merged.merge_and_unload(), task.encode([ROWS[i] for i in rounds[1][0]]))
    assert losses[len(rounds[0])] == pytest.approx(want.item(), rel=1e-4)
    # with the first round's anchor kept instead, the emulator's LoRA effect stands in: not exact
    _, stale = train_in_rounds(task, ROWS, [rounds[0] + rounds[1]], **kw)
    assert stale[len(rounds[0])] != pytest.approx(want.item(), rel=1e-3)
