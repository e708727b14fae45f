"""Stage 1b: distilling the emulator toward its original (emulator/distill.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from emloc_kernels.emulator import build_emulator, load_emulator, save_emulator
from emloc_kernels.emulator.calibration import as_batches
from emloc_kernels.emulator.distill import distill_emulator, fold_lora, teacher_states
from emloc_kernels.lora import LoraLinear
from emloc_kernels.modules import LowRankLinear

RATIO, RESERVE = 0.3, 2


def calibration(vocab: int = 101, samples: int = 16, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Texts of varied lengths, right-padded in batches of 4."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(samples // 4):
        lengths = torch.randint(8, 24, (4,), generator=g)
        ids = torch.randint(3, vocab, (4, 24), generator=g)
        mask = (torch.arange(24)[None] < lengths[:, None]).long()
        batches.append({"input_ids": ids * mask, "attention_mask": mask})
    return batches


def kl_to(model: torch.nn.Module, batches: list[dict], reference: list[torch.Tensor]) -> float:
    """Mean KL(original ‖ model) over the real tokens of ``batches``."""
    total = n = 0.0
    with torch.no_grad():
        for b, ref in zip(batches, reference):
            mask = b["attention_mask"].bool()
            log_q = model(**b).logits[mask].log_softmax(-1)
            total += F.kl_div(log_q, ref[mask].log_softmax(-1), log_target=True, reduction="sum").item()
            n += int(mask.sum())
    return total / n


def test_fold_equals_the_lora_it_replaces():
    g = torch.Generator().manual_seed(0)
    base = LowRankLinear.from_factors(torch.randn(13, 5, generator=g), torch.randn(5, 11, generator=g), torch.randn(13))
    lora = LoraLinear(base, 3, alpha=6.0)
    torch.nn.init.normal_(lora.lora_B.weight, generator=g)  # B starts at zero: make the update real
    x = torch.randn(2, 7, 11, generator=g)[:, ::2]  # non-contiguous
    folded = fold_lora(lora)
    assert folded.rank == 8
    torch.testing.assert_close(folded(x), lora(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded.u[:, :5], base.u)  # the emulator's own factors are kept as they were


def test_distillation_brings_the_emulator_closer_and_keeps_the_byte_budget(tiny_model):
    batches = as_batches(calibration())
    original = tiny_model("llama", hidden_size=48, intermediate_size=96)
    with torch.no_grad():
        reference = [original(**b).logits for b in batches]
    teacher = teacher_states(original, batches)
    plain = build_emulator(tiny_model("llama", hidden_size=48, intermediate_size=96), batches, RATIO, progress=False)
    emulator = build_emulator(original, batches, RATIO, reserve_rank=RESERVE, progress=False)
    modules = emulator.emloc_metadata["modules"]
    assert all(modules[n]["rank"] == max(1, i["rank"] - RESERVE) for n, i in plain.emloc_metadata["modules"].items())
    before = kl_to(emulator, batches, reference)
    result = distill_emulator(emulator, batches, teacher, rank=RESERVE, steps=60, lr=1e-2, progress=False)
    after = kl_to(emulator, batches, reference)
    assert after < 0.7 * before, (before, after)
    assert result["heldout_kl_before"] is not None and len(result["losses"]) == 60
    assert {n: i["rank"] for n, i in modules.items()} == {
        n: i["rank"] for n, i in plain.emloc_metadata["modules"].items()
    }
    param_bytes = lambda m: sum(p.numel() for n, p in m.named_parameters() if n.endswith((".u", ".v")))  # noqa: E731
    assert param_bytes(emulator) == param_bytes(plain)
    assert all(type(m) is LowRankLinear for m in emulator.modules() if isinstance(m, LowRankLinear))
    assert not any(p.requires_grad for n, p in emulator.named_parameters() if n.endswith((".u", ".v")))


def test_a_distilled_emulator_saves_and_loads(tiny_model, tmp_path):
    batches = as_batches(calibration())
    model = tiny_model("llama")
    teacher = teacher_states(model, batches)
    build_emulator(model, batches, RATIO, reserve_rank=RESERVE, progress=False)
    distill_emulator(model, batches, teacher, rank=RESERVE, steps=3, progress=False)
    save_emulator(model, tmp_path / "emu")
    loaded = load_emulator(tmp_path / "emu")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batches[0]).logits, model(**batches[0]).logits)
    assert loaded.emloc_metadata["build"]["distill"]["steps"] == 3


def test_distillation_refuses_what_it_cannot_use(tiny_model):
    batches = as_batches(calibration())
    model = tiny_model("llama")
    teacher = teacher_states(model, batches)
    with pytest.raises(ValueError, match="no emulated linears"):
        distill_emulator(model, batches, teacher, steps=1, progress=False)
    build_emulator(model, batches, RATIO, progress=False, quant="int8")
    with pytest.raises(ValueError, match="distil before quantising"):
        distill_emulator(model, batches, teacher, steps=1, progress=False)
    with pytest.raises(ValueError, match="same calibration batches"):
        distill_emulator(model, batches[:1], teacher, steps=1, progress=False)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        distill_emulator(model, batches, teacher, steps=0, progress=False)


def test_quantising_after_the_build_equals_quantising_in_it(tiny_model):
    """A distilled emulator is quantised afterwards: the result must be the build's own int4."""
    from emloc_kernels.emulator.build import quantize_emulator

    batches = as_batches(calibration())
    in_build = build_emulator(tiny_model("llama"), batches, RATIO, quant="int4", group_size=64, progress=False)
    after = quantize_emulator(build_emulator(tiny_model("llama"), batches, RATIO, progress=False), "int4", 64)
    with torch.no_grad():
        torch.testing.assert_close(after(**batches[0]).logits, in_build(**batches[0]).logits, rtol=0, atol=0)
    assert after.emloc_metadata["modules"] == in_build.emloc_metadata["modules"]
    assert after.config.quantization_config.to_dict() == in_build.config.quantization_config.to_dict()


def test_distillation_trains_under_no_grad(tiny_model):
    """Callers inside ``torch.no_grad()`` (as the build is) still get a trained update."""
    batches = as_batches(calibration())
    model = tiny_model("llama")
    teacher = teacher_states(model, batches)
    build_emulator(model, batches, RATIO, reserve_rank=RESERVE, progress=False)
    with torch.no_grad():
        result = distill_emulator(model, batches, teacher, rank=RESERVE, steps=2, progress=False)
        assert not torch.is_grad_enabled()
    assert result["heldout_kl_after"] != result["heldout_kl_before"]


def test_the_build_computes_the_original_outputs_the_distillation_needs(tiny_model):
    """build_emulator(distill=...) passes the distillation texts through the original blocks
    and the final norm: the same emulator as teacher states taken before a reserved build."""
    from emloc_kernels.emulator.distill import Distillation

    batches, texts = as_batches(calibration()), as_batches(calibration(seed=7, samples=8))
    manual = tiny_model("llama")
    teacher = teacher_states(manual, texts)
    build_emulator(manual, batches, RATIO, reserve_rank=RESERVE, progress=False)
    distill_emulator(manual, texts, teacher, rank=RESERVE, steps=4, progress=False)
    built = build_emulator(
        tiny_model("llama"), batches, RATIO, distill=Distillation(steps=4, rank=RESERVE, texts=texts), progress=False
    )
    assert built.emloc_metadata["build"]["distill"]["heldout_kl_before"] == pytest.approx(
        manual.emloc_metadata["build"]["distill"]["heldout_kl_before"], rel=1e-5
    )
    with torch.no_grad():
        torch.testing.assert_close(built(**batches[0]).logits, manual(**batches[0]).logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="reserve_rank or distill"):
        build_emulator(tiny_model("llama"), batches, RATIO, reserve_rank=1, distill=Distillation(), progress=False)


def test_small_linears_get_back_only_the_ranks_they_gave(tiny_model):
    """A reserve larger than a linear's rank leaves it rank 1: the distillation then adds back
    only what the build took, so the byte budget holds there too."""
    batches = as_batches(calibration())
    plain = build_emulator(tiny_model("llama"), batches, RATIO, progress=False)
    ranks = {n: i["rank"] for n, i in plain.emloc_metadata["modules"].items()}
    reserve = max(ranks.values()) - 1  # larger than the smaller linears' ranks
    assert min(ranks.values()) < reserve
    model = tiny_model("llama")
    teacher = teacher_states(model, batches)
    build_emulator(model, batches, RATIO, reserve_rank=reserve, progress=False)
    distill_emulator(model, batches, teacher, rank=reserve, steps=1, progress=False)
    assert {n: i["rank"] for n, i in model.emloc_metadata["modules"].items()} == ranks
    assert not any("reserved_rank" in i for i in model.emloc_metadata["modules"].values())


def test_kl_is_that_of_the_models_own_logits(tiny_model):
    """The distillation's KL (made through the head a chunk at a time) has the value and the
    gradient of the KL between the emulator's own logits and the original's, over real tokens."""
    from emloc_kernels.emulator import distill

    batches = as_batches(calibration())
    model = tiny_model("llama")
    teacher = teacher_states(model, batches)
    teacher_logits = [model.lm_head(t) for t in teacher]
    build_emulator(model, batches, RATIO, progress=False)
    for p in model.parameters():
        p.requires_grad_(False)
    norm = model.model.norm.weight.requires_grad_()
    batch = batches[0]
    loss = distill._kl(model.model, model.lm_head, batch, teacher[0], torch.device("cpu"))
    (grad,) = torch.autograd.grad(loss, norm)
    mask = batch["attention_mask"].bool()
    log_q = torch.log_softmax(model(**batch).logits[mask], -1)
    log_p = torch.log_softmax(teacher_logits[0][mask], -1).detach()
    want = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    (want_grad,) = torch.autograd.grad(want, norm)
    assert 0 < mask.sum() < mask.numel() and want > 0
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-7)
