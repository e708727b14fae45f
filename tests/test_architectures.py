"""Stage 1 on tiny random models of every supported architecture (configs in conftest.TINY):
build, forward, module paths, save/load, padding and shared Gram matrices."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import emloc_kernels.emulator.build as build_module
from emloc_kernels import LowRankLinear
from emloc_kernels.emulator import build_emulator, load_emulator, save_emulator
from emloc_kernels.emulator.svd import Whitening, rank_for

RATIO = 0.4
VOCAB = 101
_LLAMA_LIKE = (
    "model.layers",
    [
        {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"},
        {"self_attn.o_proj"},
        {"mlp.gate_proj", "mlp.up_proj"},
        {"mlp.down_proj"},
    ],
)
# blocks' path, and the block linears grouped by the input they read
LAYOUT = {
    "llama": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "phi3": ("model.layers", [{"self_attn.qkv_proj"}, {"self_attn.o_proj"}, {"mlp.gate_up_proj"}, {"mlp.down_proj"}]),
    "gpt2": ("transformer.h", [{"attn.c_attn"}, {"attn.c_proj"}, {"mlp.c_fc"}, {"mlp.c_proj"}]),
    "bert": (
        "bert.encoder.layer",
        [
            {"attention.self.query", "attention.self.key", "attention.self.value"},
            {"attention.output.dense"},
            {"intermediate.dense"},
            {"output.dense"},
        ],
    ),
}


def expected_paths(arch: str) -> set[str]:
    prefix, groups = LAYOUT[arch]
    return {f"{prefix}.{i}.{rel}" for i in range(2) for group in groups for rel in group}


def dense(module: nn.Module) -> torch.Tensor:
    """out×in weight of a linear (``Conv1D`` stores in×out) or of an emulator module."""
    if isinstance(module, LowRankLinear):
        return module.dense_weight(torch.float64)
    return (module.weight.T if isinstance(module, Conv1D) else module.weight).double()


def calibration(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (2, 13), generator=g), torch.randint(3, VOCAB, (1, 9), generator=g)]


def logits(model: nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def test_build_forward_paths_save_load(arch, tiny_model, tmp_path):
    original = tiny_model(arch)
    emulator = build_emulator(tiny_model(arch), calibration(), RATIO, progress=False)
    paths = expected_paths(arch)
    prefix = LAYOUT[arch][0] + "."
    assert {
        n for n, m in original.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and n.startswith(prefix)
    } == paths
    assert {n for n, m in emulator.named_modules() if isinstance(m, LowRankLinear)} == paths
    assert sorted(emulator.emloc_metadata["modules"]) == sorted(paths)
    for name in paths:
        w, layer, info = (
            dense(original.get_submodule(name)),
            emulator.get_submodule(name),
            emulator.emloc_metadata["modules"][name],
        )
        n_out, n_in = w.shape
        assert (layer.out_features, layer.in_features, layer.rank) == (n_out, n_in, rank_for(n_in, n_out, RATIO))
        assert info["transposed"] == (arch == "gpt2") and info["bias"] == (layer.bias is not None)
        assert 0 < (layer.dense_weight(torch.float64) - w).norm() / w.norm() < 1
    # everything outside the block linears is untouched
    emulated = {n for p in paths for n in (f"{p}.weight", f"{p}.u", f"{p}.v")}
    kept = {n: p for n, p in emulator.state_dict().items() if n not in emulated}
    reference = original.state_dict()
    assert kept.keys() <= reference.keys() and all(torch.equal(p, reference[n]) for n, p in kept.items())

    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))
    ref, out = logits(original, ids), logits(emulator, ids)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert 0 < ((out - ref).norm() / ref.norm()).item() < 1

    loaded = load_emulator(save_emulator(emulator, tmp_path / arch))
    assert loaded.emloc_metadata == emulator.emloc_metadata
    assert {n for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)} == paths
    assert torch.equal(logits(loaded, ids), out)


def test_padding_not_in_gram(arch, tiny_model, monkeypatch):
    """A right-padded dict batch gives the same Gram matrices as the same sequences unpadded."""
    grams: list[torch.Tensor] = []
    real = Whitening.from_gram
    monkeypatch.setattr(
        Whitening, "from_gram", classmethod(lambda cls, g, *a, **k: grams.append(g.clone()) or real(g, *a, **k))
    )
    g = torch.Generator().manual_seed(2)
    lengths = (11, 6, 9)
    sequences = [torch.randint(3, VOCAB, (1, n), generator=g) for n in lengths]
    # padded positions hold random tokens (not a pad id), so they would change G if counted
    padded = torch.randint(3, VOCAB, (3, 11), generator=g)
    mask = torch.zeros(3, 11, dtype=torch.long)
    for row, (seq, n) in enumerate(zip(sequences, lengths)):
        padded[row, :n], mask[row, :n] = seq[0], 1

    def run(batches) -> tuple[list[torch.Tensor], dict]:
        grams.clear()
        model = build_emulator(tiny_model(arch), batches, RATIO, progress=False)
        return list(grams), model.emloc_metadata["calibration"]

    unpadded, info = run(sequences)
    masked, masked_info = run([{"input_ids": padded, "attention_mask": mask}])
    assert info == {"samples": 3, "tokens": 26} and masked_info == info
    assert len(masked) == len(unpadded) == 8
    for a, b in zip(masked, unpadded):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
    unmasked, _ = run([{"input_ids": padded, "attention_mask": torch.ones_like(mask)}])
    assert not torch.allclose(unmasked[0], unpadded[0], rtol=1e-2)  # the padded rows would show


def test_linears_reading_one_input_share_one_gram(arch, tiny_model, monkeypatch):
    seen = []
    compress = build_module._compress_block

    def spy(model, mine, leader, fit, held, **kw):
        seen.append((dict(leader), {lead: fit[lead] + held[lead] for lead in fit}))
        return compress(model, mine, leader, fit, held, **kw)

    monkeypatch.setattr(build_module, "_compress_block", spy)
    model = tiny_model(arch)
    prefix, groups = LAYOUT[arch]
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in expected_paths(arch)}
    for name, rows in inputs.items():  # fires only while blocks run for real (not during input capture)
        model.get_submodule(name).register_forward_pre_hook(
            lambda m, args, rows=rows: rows.append(args[0].reshape(-1, args[0].shape[-1]))
        )
    build_emulator(model, calibration(), RATIO, progress=False)
    assert len(seen) == 2
    for i, (leaders, grams) in enumerate(seen):
        block = f"{prefix}.{i}."
        found: dict[str, set[str]] = {}
        for name, leader in leaders.items():
            found.setdefault(leader, set()).add(name.removeprefix(block))
        assert sorted(map(sorted, found.values())) == sorted(map(sorted, groups))
        assert all(leader.removeprefix(block) in members for leader, members in found.items())
        assert set(grams) == set(found)  # one G per group, kept under its leader
        for leader, members in found.items():
            for member in members:
                x = torch.cat(inputs[block + member]).double()
                torch.testing.assert_close(
                    grams[leader].oo.double(), x.T @ x, rtol=1e-5, atol=1e-5 * x.square().sum().item()
                )
