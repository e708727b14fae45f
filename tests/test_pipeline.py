"""The three stages together: build_emulator → PEFT LoRA → correct_adapter, per architecture
and on a real SmolLM2 layer; the correction's identity (without clamping,
x(W + s·A_o B_c) = x(W_E + s·A B) for x in span(A)) checked per module in fp64."""

import copy

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from emloc_kernels import LowRankLinear, build_emulator, correct_adapter, save_emulator


def trained_lora(emulator, targets, seed=7):
    """A PEFT LoRA on a copy of the emulator with random nonzero A and B, as if trained."""
    peft_model = get_peft_model(copy.deepcopy(emulator), LoraConfig(r=4, lora_alpha=6, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=g) * (0.3 if "lora_A" in name else 0.02)
    return peft_model


def check_identity(adapter_dir, corrected_dir, emulator, original_weight, scaling):
    """For x in span(A): x Wᵀ + s·x A_o B_c == x W_Eᵀ + s·x A B, per module (fp64)."""
    trained, corrected = (
        load_file(adapter_dir / "adapter_model.safetensors"),
        load_file(corrected_dir / "adapter_model.safetensors"),
    )
    assert set(trained) == set(corrected) and trained
    g = torch.Generator().manual_seed(11)
    for key in (k for k in trained if k.endswith("lora_A.weight")):
        path = key[len("base_model.model.") : -len(".lora_A.weight")]
        a, b = trained[key].double(), trained[key.replace("lora_A", "lora_B")].double()
        a_o, b_c = corrected[key].double(), corrected[key.replace("lora_A", "lora_B")].double()
        if not isinstance(emulator.get_submodule(path), LowRankLinear):  # kept dense (e.g. BERT's MLM head)
            assert torch.equal(a_o, a) and torch.equal(b_c, b), path
            continue
        x = (a.T @ torch.randn(a.shape[0], 6, generator=g, dtype=torch.float64)).T
        w_e = emulator.get_submodule(path).dense_weight(torch.float64)
        lhs = x @ original_weight(path).T + scaling * (x @ a_o.T) @ b_c.T
        rhs = x @ w_e.T + scaling * (x @ a.T) @ b.T
        assert (lhs - rhs).norm() <= 1e-6 * rhs.norm(), path
        assert (w_e - original_weight(path)).norm() > 1e-3 * w_e.norm(), path  # the emulator really differs


def test_identity_on_each_architecture(arch, tiny_model, tmp_path):
    original = tiny_model(arch)
    calibration = [torch.randint(3, 101, (1, n), generator=torch.Generator().manual_seed(n)) for n in (19, 23)]
    emulator = build_emulator(copy.deepcopy(original), calibration, 0.4, progress=False)
    save_emulator(emulator, tmp_path / "emulator")
    trained_lora(emulator, "all-linear").save_pretrained(tmp_path / "adapter")
    correct_adapter(
        tmp_path / "adapter", tmp_path / "emulator", original, tmp_path / "corrected", clamp=None, progress=False
    )

    def weight(path):
        info = emulator.emloc_metadata["modules"][path]
        w = original.get_submodule(path).weight.detach().double()
        return w.T if info["transposed"] else w

    check_identity(tmp_path / "adapter", tmp_path / "corrected", emulator, weight, 6 / 4)
    PeftModel.from_pretrained(original, tmp_path / "corrected")  # vanilla PEFT loads it on the original


def test_identity_on_a_real_smollm2_layer(load_smollm2, smollm2_dir, smollm2_tokenizer, reviews, tmp_path):
    original = load_smollm2()
    targets = r"layers\.7\."
    emulator = build_emulator(
        load_smollm2(), reviews, 0.4, tokenizer=smollm2_tokenizer, targets=targets, progress=False
    )
    assert len(emulator.emloc_metadata["modules"]) == 7
    save_emulator(emulator, tmp_path / "emulator")
    lora = trained_lora(emulator, ["q_proj", "down_proj"])
    lora.save_pretrained(tmp_path / "adapter")
    # the original given as its directory: read module by module from safetensors
    correct_adapter(
        tmp_path / "adapter", tmp_path / "emulator", smollm2_dir, tmp_path / "corrected", clamp=None, progress=False
    )
    check_identity(
        tmp_path / "adapter",
        tmp_path / "corrected",
        emulator,
        lambda p: original.get_submodule(p).weight.detach().double(),
        6 / 4,
    )
