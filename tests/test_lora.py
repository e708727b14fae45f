"""Stage 2: PEFT adapts the emulator's LowRankLinear modules with no extra call; plain-loop LoRA."""
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import emloc_kernels as ek
from emloc_kernels.modules.peft_layers import DenseLoraLinear, LowRankLoraLinear


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97)
    model = LlamaForCausalLM(cfg)
    model.config.name_or_path = model.name_or_path = "tiny-original"
    return model


@pytest.fixture
def emulator():
    model = tiny_llama()
    return ek.build_emulator(model, torch.randint(0, 97, (4, 11)), 0.4, progress=False)


def test_peft_adapts_lowrank_modules_as_whole_linears(emulator, tmp_path):
    names = ["q_proj", "down_proj"]
    pm = get_peft_model(emulator, LoraConfig(r=4, lora_alpha=8, target_modules=names))
    layers = {n: m for n, m in pm.named_modules() if isinstance(m, LowRankLoraLinear)}
    assert len(layers) == 4 and all(n.endswith(tuple(names)) for n in layers)
    layer = next(iter(layers.values()))
    base = layer.get_base_layer()
    assert layer.lora_A["default"].weight.shape == (4, base.in_features)
    assert layer.lora_B["default"].weight.shape == (base.out_features, 4)
    pm.save_pretrained(tmp_path / "ad")
    keys = set(load_file(tmp_path / "ad" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-original"


def test_all_linear_covers_every_emulated_linear(emulator):
    pm = get_peft_model(emulator, LoraConfig(r=2, target_modules="all-linear"))
    wrapped = sum(isinstance(m, LowRankLoraLinear) for m in pm.modules())
    assert wrapped == len(emulator.emloc_metadata["modules"]) == 14


def test_fused_layer_matches_peft_unfused_path_and_trains(emulator):
    pm = get_peft_model(emulator, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for m in pm.modules():
        if isinstance(m, LowRankLoraLinear):
            torch.nn.init.normal_(m.lora_B["default"].weight)
    layer = pm.base_model.model.model.layers[1].mlp.up_proj
    x = torch.randn(3, 5, layer.in_features)
    fused = layer(x)
    unfused = super(LowRankLoraLinear, layer).forward(x)  # PEFT's own path
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
    ids = torch.randint(0, 97, (2, 9))
    loss = pm(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in pm.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for n, p in pm.named_parameters() if n.endswith((".u", ".v")))


def test_dropout_takes_the_unfused_path(emulator):
    pm = get_peft_model(emulator, LoraConfig(r=4, lora_dropout=0.5, target_modules=["v_proj"]))
    layer = pm.base_model.model.model.layers[0].self_attn.v_proj
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(2, 7, layer.in_features)
    assert layer._fusable_adapter((), {}) is None
    pm.eval()  # dropout off: the result must equal the no-dropout math
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    ref = layer.get_base_layer()(x) + layer.scaling["default"] * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


def test_merge_into_emulator_raises_clear_error(emulator):
    pm = get_peft_model(emulator, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(NotImplementedError, match="correct_adapter"):
        pm.merge_and_unload()


def test_dense_lora_layer_on_plain_linear_merges():
    model = tiny_llama(1)
    pm = get_peft_model(model, LoraConfig(r=3, target_modules=["o_proj"]))
    layer = pm.base_model.model.model.layers[0].self_attn.o_proj
    assert isinstance(layer, DenseLoraLinear)
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    ids = torch.randint(0, 97, (2, 6))
    before = pm(ids).logits
    merged = pm.merge_and_unload()
    torch.testing.assert_close(merged(ids).logits, before, rtol=1e-4, atol=1e-4)


def test_plain_loop_lora_saves_a_peft_adapter(emulator, tmp_path):
    ek.add_lora(emulator, r=4, alpha=8, targets=["q_proj", "v_proj"])
    trainable = [p for p in emulator.parameters() if p.requires_grad]
    assert len(trainable) == 8
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(0, 97, (2, 8))
    for _ in range(3):
        emulator(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    out = ek.save_lora(emulator, tmp_path / "ad")
    original = tiny_llama()
    direct = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    loaded = PeftModel.from_pretrained(original, out)
    assert set(load_file(out / "adapter_model.safetensors")) == {
        k.replace(".default", "") for k in direct.state_dict() if "lora_" in k
    }
    wq = loaded.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    mine = emulator.model.layers[0].self_attn.q_proj.lora_B.weight
    torch.testing.assert_close(wq, mine)
    with pytest.raises(FileExistsError):
        ek.save_lora(emulator, out)


def test_add_lora_rejects_unknown_targets(emulator):
    with pytest.raises(ValueError, match="nope"):
        ek.add_lora(emulator, targets=["q_proj", "nope"])
