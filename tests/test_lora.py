"""Stage 2: PEFT adapts the emulator's LowRankLinear modules with no extra call; the fused path's
allow-list against PEFT's own forward; the opt-in fused path for plain linears; plain-loop LoRA."""

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import emloc_kernels as ek
from emloc_kernels import LowRankLinear
from emloc_kernels.modules import peft_layers
from emloc_kernels.modules.fused import fused_lora
from emloc_kernels.modules.peft_layers import DenseLoraLinear, LowRankLoraLinear


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
    )
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
    assert (
        json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-original"
    )


def test_all_linear_covers_every_emulated_linear(emulator):
    pm = get_peft_model(emulator, LoraConfig(r=2, target_modules="all-linear"))
    wrapped = sum(isinstance(m, LowRankLoraLinear) for m in pm.modules())
    assert wrapped == len(emulator.emloc_metadata["modules"]) == 14


def _spy_fused(monkeypatch) -> list:
    """Record the calls of the fused path of our PEFT layers."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        return peft_layers.fused_lora.__wrapped__(*args, **kwargs)

    spy.__wrapped__ = fused_lora
    monkeypatch.setattr(peft_layers, "fused_lora", spy)
    return calls


def test_fused_layer_matches_peft_forward_and_trains(emulator, monkeypatch):
    pm = get_peft_model(emulator, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for m in pm.modules():
        if isinstance(m, LowRankLoraLinear):
            torch.nn.init.normal_(m.lora_B["default"].weight)
    layer = pm.base_model.model.model.layers[1].mlp.up_proj
    x = torch.randn(3, 5, layer.in_features)
    calls = _spy_fused(monkeypatch)
    fused = layer(x)
    assert len(calls) == 1
    peft_out = PeftLoraLinear.forward(layer, x)  # PEFT's own forward: base layer + its LoRA modules
    assert len(calls) == 1
    torch.testing.assert_close(fused, peft_out, rtol=1e-5, atol=1e-5)
    ids = torch.randint(0, 97, (2, 9))
    loss = pm(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in pm.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for n, p in pm.named_parameters() if n.endswith((".u", ".v")))


class _Toy(torch.nn.Module):
    """One linear with a bias: a plain ``nn.Linear`` or a :class:`LowRankLinear`."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        if kind == "dense":
            self.lin = torch.nn.Linear(12, 10)
        else:
            self.lin = LowRankLinear.from_factors(torch.randn(10, 4), torch.randn(4, 12), torch.randn(10))

    def forward(self, x):
        return self.lin(x)


def _toy_lora(kind: str, **config):
    pm = get_peft_model(_Toy(kind), LoraConfig(r=4, lora_alpha=6, target_modules=["lin"], **config))
    if kind == "dense":
        assert ek.apply_fused_lora(pm) == 1
    layer = pm.base_model.model.lin
    assert type(layer) is (DenseLoraLinear if kind == "dense" else LowRankLoraLinear)
    return pm, layer


def _randomise(layer):
    torch.manual_seed(1)
    for name, p in layer.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(p)


@pytest.mark.parametrize("kind", ["dense", "lowrank"])
def test_plain_adapter_takes_the_fused_path(kind, monkeypatch):
    pm, layer = _toy_lora(kind)
    _randomise(layer)
    calls = _spy_fused(monkeypatch)
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(layer(x), PeftLoraLinear.forward(layer, x), rtol=1e-5, atol=1e-5)
    assert len(calls) == 1


def _second_adapter(pm, layer):
    pm.add_adapter("other", LoraConfig(r=2, lora_alpha=3, target_modules=["lin"]))
    _randomise(layer)


EXCLUDED = {
    # feature: (LoraConfig options, setup(pm, layer), forward kwargs)
    "dropout": ({"lora_dropout": 0.5}, lambda pm, layer: pm.train(), {}),
    "lora_bias": ({"lora_bias": True}, None, {}),
    "dora": ({"use_dora": True}, None, {}),
    "two_active_adapters": (
        {},
        lambda pm, layer: (_second_adapter(pm, layer), pm.base_model.set_adapter(["default", "other"])),
        {},
    ),
    "mixed_batch": ({}, _second_adapter, {"adapter_names": ["default", "other", "__base__"]}),
    "disabled": ({}, lambda pm, layer: pm.base_model.disable_adapter_layers(), {}),
}


@pytest.mark.parametrize("feature", list(EXCLUDED))
@pytest.mark.parametrize("kind", ["dense", "lowrank"])
def test_excluded_features_take_peft_forward(kind, feature, monkeypatch):
    """Each feature outside the fused path's allow-list gives PEFT's own output (the fused op,
    which ignores the feature, would differ) and never calls the fused op."""
    if kind == "lowrank" and feature == "dora":
        pytest.skip("DoRA needs the base layer's dense weight, which an emulator layer does not have")
    options, setup, kwargs = EXCLUDED[feature]
    pm, layer = _toy_lora(kind, **options)
    _randomise(layer)
    if setup is not None:
        setup(pm, layer)
    calls = _spy_fused(monkeypatch)
    x = torch.randn(3, 5, 12)
    torch.manual_seed(2)
    got = layer(x, **kwargs)
    torch.manual_seed(2)
    want = PeftLoraLinear.forward(layer, x, **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert calls == []
    if feature != "disabled":  # the feature changes the result: the fused op could not have given it
        pm.base_model.enable_adapter_layers()
        assert not torch.allclose(
            want,
            fused_lora(
                layer.get_base_layer(),
                x,
                layer.lora_A["default"].weight,
                layer.lora_B["default"].weight,
                layer.scaling["default"],
            ),
        )


def test_merge_into_emulator_raises_clear_error(emulator):
    pm = get_peft_model(emulator, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(NotImplementedError, match="correct_adapter"):
        pm.merge_and_unload()


def test_import_leaves_peft_layers_of_plain_linears_alone():
    """Importing emloc_kernels changes nothing for modules that are not ours."""
    pm = get_peft_model(tiny_llama(1), LoraConfig(r=3, target_modules=["o_proj", "up_proj"]))
    layers = [m for m in pm.modules() if isinstance(m, PeftLoraLinear)]
    assert len(layers) == 4 and all(type(m) is PeftLoraLinear for m in layers)


def test_import_in_a_fresh_process_leaves_peft_alone():
    code = (
        "import torch, emloc_kernels\n"
        "from peft import LoraConfig, get_peft_model\n"
        "from peft.tuners.lora.layer import Linear\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 4))\n"
        "pm = get_peft_model(m, LoraConfig(r=2, target_modules=['0']))\n"
        "assert type(pm.base_model.model[0]) is Linear, type(pm.base_model.model[0])\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_apply_and_remove_fused_lora_on_plain_linears():
    model = tiny_llama(1)
    pm = get_peft_model(model, LoraConfig(r=3, target_modules=["o_proj"]))
    layer = pm.base_model.model.model.layers[0].self_attn.o_proj
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    ids = torch.randint(0, 97, (2, 6))
    before = pm(ids).logits
    assert ek.apply_fused_lora(pm) == 2 and ek.apply_fused_lora(pm) == 0
    assert isinstance(layer, DenseLoraLinear)
    torch.testing.assert_close(pm(ids).logits, before, rtol=1e-4, atol=1e-4)
    assert ek.remove_fused_lora(pm) == 2
    assert type(layer) is PeftLoraLinear
    ek.apply_fused_lora(pm)
    merged = pm.merge_and_unload()
    torch.testing.assert_close(merged(ids).logits, before, rtol=1e-4, atol=1e-4)


def test_users_own_mapping_for_our_type_wins(emulator):
    class Mine(PeftLoraLinear):
        pass

    config = LoraConfig(r=2, target_modules=["q_proj"])
    config._register_custom_module({LowRankLinear: Mine})
    pm = get_peft_model(emulator, config)
    assert type(pm.base_model.model.model.layers[0].self_attn.q_proj) is Mine


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


def test_top_blocks_lora_trains_the_last_blocks_without_autograd_below(arch, tiny_model):
    from emloc_kernels.recipe.models import attach_lora

    if arch == "bert":
        pytest.skip("the recipe's LoRA (task_type CAUSAL_LM) is for causal LMs")

    def three_blocks():
        return tiny_model(arch, **({"n_layer": 3} if arch == "gpt2" else {"num_hidden_layers": 3}))

    model = three_blocks()
    path, blocks = next((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList))
    assert len(blocks) == 3
    full = {n for n, p in attach_lora(three_blocks(), 4, 4.0, seed=0).named_parameters() if p.requires_grad}
    peft_model = attach_lora(model, 4, 4.0, seed=0, top_blocks=1)
    trained = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    # every linear of the last block, none elsewhere: what "all-linear" puts in a block
    assert {n.replace(f"{path}.2.", f"{path}.#.") for n in trained} == {
        n.replace(f"{path}.0.", f"{path}.#.") for n in full if f"{path}.0." in n
    }
    needs_grad = {}
    for i in (1, 2):
        blocks[i].register_forward_hook(lambda m, a, out, i=i: needs_grad.__setitem__(i, out[0].requires_grad))
    peft_model.train()
    x = torch.randint(3, 100, (2, 7))
    peft_model(input_ids=x, labels=x).loss.backward()
    assert needs_grad == {1: False, 2: True}  # no autograd through the blocks below
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad)
    assert all(p.grad.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)  # B starts at 0
    for bad in (0, 4):
        with pytest.raises(ValueError, match="top_blocks must be between 1 and the model's 3 blocks"):
            attach_lora(three_blocks(), 4, 4.0, seed=0, top_blocks=bad)


def test_adapter_on_the_top_blocks_replays_the_blocks_below_and_is_written_back_whole(arch, tiny_model, tmp_path):
    """The refinement's model: the blocks below the top one hold no weights (the adapter's
    layers there merged, their outputs replayed from one inference pass), yet it is the same
    function as the adapter on the original, batch by batch in the stored order; the adapter
    written back has the input's tensors below and the trained ones on top."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from emloc_kernels.conventions import ADAPTER_WEIGHTS
    from emloc_kernels.emulator.calibration import find_blocks
    from emloc_kernels.recipe.models import attach_lora
    from emloc_kernels.recipe.task import next_token_logits
    from emloc_kernels.recipe.top_blocks import attach_adapter_top_blocks, write_refined_adapter

    if arch == "bert":
        pytest.skip("the recipe's LoRA (task_type CAUSAL_LM) is for causal LMs")

    def three_blocks():
        return tiny_model(arch, **({"n_layer": 3} if arch == "gpt2" else {"num_hidden_layers": 3}))

    trained = attach_lora(three_blocks(), 4, 4.0, seed=0)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)  # as after training: B is no longer zero
    trained.save_pretrained(str(tmp_path / "adapter"))

    def batch(size, length):
        mask = torch.ones(size, length, dtype=torch.long)
        mask[0, : length // 2] = 0  # a left-padded row
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        return {
            "input_ids": torch.randint(3, 100, (size, length)),
            "attention_mask": mask,
            "position_ids": position_ids,
        }

    def logits(m, b):
        with torch.no_grad():
            return next_token_logits(m, b)

    first, second = batch(2, 7), batch(3, 5)
    cpu = torch.device("cpu")
    model = attach_adapter_top_blocks(
        three_blocks, tmp_path / "adapter", 1, [first, second, first], tmp_path / "in", cpu
    )
    blocks = model.get_base_model().get_submodule(find_blocks(three_blocks())[0])
    assert [sum(p.numel() for p in b.parameters()) == 0 for b in blocks] == [True, True, False]
    top = {id(p) for n, p in blocks[2].named_parameters() if "lora_" in n}
    assert top and {id(p) for p in model.parameters() if p.requires_grad} == top
    reference = PeftModel.from_pretrained(three_blocks(), str(tmp_path / "adapter"))
    for b in (first, second):
        torch.testing.assert_close(logits(model, b), logits(reference, b), rtol=1e-5, atol=1e-5)

    with torch.no_grad():  # a refinement of the top block
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    write_refined_adapter(model, tmp_path / "adapter", tmp_path / "refined")
    refined = PeftModel.from_pretrained(three_blocks(), str(tmp_path / "refined"))
    torch.testing.assert_close(logits(refined, first), logits(model, first), rtol=1e-5, atol=1e-5)
    before, after = load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS), load_file(tmp_path / "refined" / ADAPTER_WEIGHTS)
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".2." in k for k in changed)

    with pytest.raises(RuntimeError, match="a batch too many"):
        logits(model, first)
    model = attach_adapter_top_blocks(three_blocks, tmp_path / "adapter", 1, [first, second], tmp_path / "in", cpu)
    with pytest.raises(RuntimeError, match="in the order they were stored"):
        logits(model, second)
