"""Transfer beyond the paper: activation-aware correction and layer-streamed transfer, on a tiny
random Llama (hidden 64, 2 blocks)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from emloc_kernels import LowRankLinear
from emloc_kernels.conventions import out_in_weight, weight_probe
from emloc_kernels.correction import correct_adapter, correct_lora
from emloc_kernels.transfer import (
    collect_grams,
    correct_adapter_aware,
    correct_lora_aware,
    reduced_rank_lora,
    transfer_adapter,
)

LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 101,
    "max_position_embeddings": 64,
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS}


def make_original() -> nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()


def make_emulator(original: nn.Module, rank: int = 24) -> nn.Module:
    """Each block linear → its rank-``rank`` truncated SVD as a LowRankLinear."""
    emulator = copy.deepcopy(original)
    for name, module in [(n, m) for n, m in emulator.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]:
        u_, s_, vh = torch.linalg.svd(module.weight.detach().double(), full_matrices=False)
        u = (u_[:, :rank] * s_[:rank].sqrt()).float().contiguous()
        v = (s_[:rank].sqrt()[:, None] * vh[:rank]).float().contiguous()
        emulator.set_submodule(name, LowRankLinear.from_factors(u, v, None))
    return emulator


def make_lora(base: nn.Module, seed: int = 3) -> PeftModel:
    """A LoRA with random nonzero A and B, as if trained."""
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**LORA))
    generator = torch.Generator().manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=generator) * (0.3 if "lora_A" in name else 0.05)
    return peft_model.eval()


def calibration(n: int = 5, batch: int = 2, length: int = 48) -> list[dict[str, torch.Tensor]]:
    """Token batches (one with right padding): 5·2·48 − pad > 96 tokens, so every G is full rank."""
    generator = torch.Generator().manual_seed(7)
    batches = []
    for i in range(n):
        ids = torch.randint(3, LLAMA["vocab_size"], (batch, length), generator=generator)
        mask = torch.ones_like(ids)
        if i == 0:
            mask[1, length // 2 :] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def products(directory: Path, scaling: float = 2.0) -> dict[str, torch.Tensor]:
    """``s·lora_B·lora_A`` of each module of a saved adapter (fp64)."""
    state = load_file(str(directory / "adapter_model.safetensors"))
    out = {}
    for k in state:
        if k.endswith(".lora_A.weight"):
            path = k[len("base_model.model.") : -len(".lora_A.weight")]
            out[path] = scaling * state[k.replace("lora_A", "lora_B")].double() @ state[k].double()
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def perfect(tmp_path_factory):
    """Original, a dense copy of it as a perfect emulator (W_E = W), a LoRA trained on it."""
    root = tmp_path_factory.mktemp("perfect")
    original = make_original()
    emulator = copy.deepcopy(original)
    peft_model = make_lora(emulator)
    peft_model.save_pretrained(root / "adapter")
    return {"root": root, "original": original, "emulator": emulator, "peft_model": peft_model}


# --------------------------------------------------------------------------- (a) activation-aware correction


def test_aware_correction_with_identity_gram_is_the_papers():
    torch.manual_seed(0)
    lora_a, lora_b, delta = torch.randn(4, 30), torch.randn(20, 4) * 0.1, torch.randn(20, 30)
    a_paper, b_paper, _ = correct_lora(lora_a, lora_b, delta.double(), 2.0, clamp=None)
    for gram in (None, torch.eye(30, dtype=torch.float64)):
        a_aware, b_aware, _ = correct_lora_aware(lora_a, lora_b, delta.double(), 2.0, gram, lam=1.0, mu=0.0)
        assert rel(b_aware.double() @ a_aware.double(), b_paper.double() @ a_paper.double()) < 1e-6


def test_aware_correction_is_the_least_squares_fit_on_span_of_a():
    """With λ = 1, μ = 0 the correction makes the residual X(Δᵀ − s A_o D) orthogonal to X A_o."""
    torch.manual_seed(1)
    lora_a, lora_b = torch.randn(4, 30, dtype=torch.float64), torch.randn(20, 4, dtype=torch.float64) * 0.1
    delta, x = (
        torch.randn(20, 30, dtype=torch.float64),
        torch.randn(200, 30, dtype=torch.float64) @ torch.randn(30, 30, dtype=torch.float64),
    )
    s = 2.0
    a_o, b_new, _ = correct_lora_aware(lora_a, lora_b, delta, s, x.T @ x)
    # output mismatch to emulator+LoRA: x(W + s A_o B′) − x(W_E + s A B) = x Δᵀ + s x (A_o B′ − A B)
    mismatch = x @ delta.T + s * x @ (b_new @ a_o - lora_b @ lora_a).T
    assert (x @ a_o.T).T @ mismatch / mismatch.norm() / x.norm() == pytest.approx(torch.zeros(4, 20), abs=1e-10)
    a_half, b_half, _ = correct_lora_aware(lora_a, lora_b, delta, s, x.T @ x, lam=0.5)
    assert rel(b_half @ a_half - lora_b @ lora_a, 0.5 * (b_new @ a_o - lora_b @ lora_a)) < 1e-10
    _, b_ridge, _ = correct_lora_aware(lora_a, lora_b, delta, s, x.T @ x, mu=10.0)
    assert (b_ridge @ a_o - lora_b @ lora_a).norm() < (b_new @ a_o - lora_b @ lora_a).norm()


def test_aware_correction_argument_errors():
    a, b, d = torch.randn(4, 30), torch.randn(20, 4), torch.randn(20, 30)
    with pytest.raises(ValueError, match="gram"):
        correct_lora_aware(a, b, d, 1.0, torch.eye(20))
    with pytest.raises(ValueError, match="mu"):
        correct_lora_aware(a, b, d, 1.0, mu=-1.0)
    with pytest.raises(ValueError, match="lam"):
        correct_lora_aware(a, b, d, 1.0, lam=float("nan"))


def test_collect_grams_shares_g_and_matches_the_inputs():
    model = make_original()
    batches = calibration(2)
    grams = collect_grams(model, batches, progress=False)
    layer = "model.layers.1."
    assert grams[layer + "self_attn.q_proj"] is grams[layer + "self_attn.v_proj"]
    assert grams[layer + "mlp.gate_proj"] is grams[layer + "mlp.up_proj"]
    rows = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: rows.append(a[0]))
    with torch.no_grad():
        for b in batches:
            model(**b)
    handle.remove()
    x = torch.cat([r[b["attention_mask"].bool()] for r, b in zip(rows, batches)]).double()
    assert rel(grams[layer + "mlp.down_proj"].double(), x.T @ x) < 1e-5


def test_correct_adapter_aware_writes_a_peft_adapter(tmp_path):
    original = make_original()
    emulator = make_emulator(original)
    peft_model = make_lora(emulator)
    peft_model.save_pretrained(tmp_path / "adapter")
    report = correct_adapter_aware(
        tmp_path / "adapter",
        emulator,
        original,
        calibration(),
        tmp_path / "aware",
        lam={"mlp": 1.0},
        mu=0.01,
        progress=False,
    )
    assert report["modules"]["model.layers.0.mlp.down_proj"]["lam"] == 1.0
    assert report["modules"]["model.layers.0.self_attn.q_proj"]["lam"] == 0.0
    got, given = products(tmp_path / "aware"), products(tmp_path / "adapter")
    assert rel(got["model.layers.0.self_attn.q_proj"], given["model.layers.0.self_attn.q_proj"]) < 1e-5
    assert rel(got["model.layers.0.mlp.up_proj"], given["model.layers.0.mlp.up_proj"]) > 1e-2
    assert json.loads((tmp_path / "aware" / "adapter_config.json").read_text())["r"] == 4
    PeftModel.from_pretrained(make_original(), str(tmp_path / "aware"))
    with pytest.raises(ValueError, match="lam pattern"):
        correct_adapter_aware(
            tmp_path / "adapter",
            emulator,
            original,
            calibration(),
            tmp_path / "x",
            lam={"nomatch": 1.0},
            progress=False,
        )


# --------------------------------------------------------------------------- (b) layer-streamed transfer


def test_reduced_rank_lora_matches_the_rank_constrained_least_squares():
    """For a target that is exactly rank ρ on X, the fit returns it; otherwise it beats the
    plain truncated-SVD of the unconstrained solution."""
    torch.manual_seed(2)
    x = torch.randn(300, 24, dtype=torch.float64) @ torch.randn(24, 24, dtype=torch.float64)
    exact = torch.randn(16, 3, dtype=torch.float64) @ torch.randn(3, 24, dtype=torch.float64)
    a, b, _ = reduced_rank_lora(exact @ x.T @ x, x.T @ x, 3, 0.5, ridge=0.0)
    assert rel(0.5 * b @ a, exact) < 1e-8
    full = torch.randn(16, 24, dtype=torch.float64)
    r_target = x @ full.T
    a, b, _ = reduced_rank_lora(r_target.T @ x, x.T @ x, 3, 1.0, ridge=0.0)
    u, s, vh = torch.linalg.svd(full)
    naive = (u[:, :3] * s[:3]) @ vh[:3]
    assert (r_target - x @ (b @ a).T).norm() < (r_target - x @ naive.T).norm()
    with pytest.raises(ValueError, match="rank"):
        reduced_rank_lora(full, x.T @ x, 0, 1.0)


@pytest.mark.parametrize("lam", [1.0, 0.0])
def test_transfer_with_perfect_emulator_returns_the_lora(perfect, tmp_path, lam):
    report = transfer_adapter(
        perfect["root"] / "adapter",
        perfect["emulator"],
        perfect["original"],
        calibration(),
        tmp_path / "out",
        lam=lam,
        ridge=0.0,
        progress=False,
    )
    got, given = products(tmp_path / "out"), products(perfect["root"] / "adapter")
    assert set(got) == set(given) and len(got) == 14
    for path in given:
        assert rel(got[path], given[path]) < 1e-4, path
    assert report["totals"]["relative_residual"] < 1e-6


def test_transfer_output_loads_and_matches_emulator_with_lora(perfect, tmp_path):
    transfer_adapter(
        perfect["root"] / "adapter",
        perfect["peft_model"],
        perfect["original"],
        calibration(),
        tmp_path / "out",
        progress=False,
    )  # the emulator given as the PeftModel holding the LoRA
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    loaded = PeftModel.from_pretrained(make_original(), str(tmp_path / "out")).eval()
    ids = torch.randint(3, 101, (2, 20), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        want = perfect["peft_model"](input_ids=ids).logits
        got = loaded(input_ids=ids).logits
        plain = perfect["original"](input_ids=ids).logits
    assert (got - want).abs().max() < 1e-3 * (want - plain).abs().max()


def test_transfer_reduces_the_mismatch_to_emulator_with_lora(tmp_path):
    """With a real low-rank emulator, λ = 1 brings original + new LoRA closer to emulator + LoRA
    (the last hidden state on the calibration tokens) than the LoRA as trained, or the paper's correction."""
    original = make_original()
    emulator = make_emulator(original, rank=40)
    peft_model = make_lora(emulator)
    peft_model.save_pretrained(tmp_path / "adapter")
    batches = calibration()
    transfer_adapter(tmp_path / "adapter", emulator, original, batches, tmp_path / "out", lam=1.0, progress=False)
    correct_adapter(tmp_path / "adapter", emulator, original, tmp_path / "paper", clamp=None, progress=False)

    def last_hidden(model):
        with torch.no_grad():
            return torch.cat(
                [model(**b, output_hidden_states=True).hidden_states[-1][b["attention_mask"].bool()] for b in batches]
            )

    want = last_hidden(peft_model)
    errors = {
        name: (last_hidden(PeftModel.from_pretrained(make_original(), str(tmp_path / name))) - want).norm()
        for name in ("adapter", "out", "paper")
    }
    assert errors["out"] < 0.7 * errors["adapter"] and errors["out"] < errors["paper"], errors


def test_transfer_moves_one_block_of_each_model_at_a_time(perfect, tmp_path):
    """Every block's parameters are moved (``_apply``) to the work device and back around its own
    forwards; no other block of the same model is moved in between."""
    events: list[tuple[str, int, str]] = []
    patched = []
    for role, model in (("emulator", perfect["emulator"]), ("original", perfect["original"])):
        for i, block in enumerate(model.model.layers):

            def apply(fn, recurse=True, _block=block, _i=i, _role=role):
                events.append((_role, _i, "move"))
                return type(_block)._apply(_block, fn, recurse)

            def pre(module, args, kwargs, _i=i, _role=role):
                if "forward" not in module.__dict__:  # not capture_block_inputs' pass-through recorder
                    events.append((_role, _i, "forward"))

            block._apply = apply
            patched.append((block, block.register_forward_pre_hook(pre, with_kwargs=True)))
    try:
        transfer_adapter(
            perfect["root"] / "adapter",
            perfect["emulator"],
            perfect["original"],
            calibration(2),
            tmp_path / "out",
            device="cpu",
            progress=False,
        )
    finally:
        for block, handle in patched:
            del block._apply
            handle.remove()
    for role in ("emulator", "original"):
        mine = [(i, kind) for r, i, kind in events if r == role]
        assert mine, role
        on_device = None
        for i, kind in mine:
            if kind == "move":
                if on_device is None:
                    on_device = i
                else:
                    assert on_device == i, f"{role}: block {i} moved while block {on_device} is on the work device"
                    on_device = None
            else:
                assert on_device == i, f"{role}: block {i} ran without being the one block on the work device"
        assert on_device is None, f"{role}: block {on_device} was left on the work device"
        assert sorted({i for i, kind in mine if kind == "move"}) == [0, 1]


def test_transfer_argument_errors(perfect, tmp_path):
    with pytest.raises(ValueError, match="ridge"):
        transfer_adapter(
            perfect["root"] / "adapter",
            perfect["emulator"],
            perfect["original"],
            calibration(1),
            tmp_path / "a",
            ridge=-1.0,
            progress=False,
        )
    with pytest.raises(ValueError, match="lam"):
        transfer_adapter(
            perfect["root"] / "adapter",
            perfect["emulator"],
            perfect["original"],
            calibration(1),
            tmp_path / "b",
            lam={"no_such_module": 1.0},
            progress=False,
        )
    with pytest.raises(ValueError, match="same object"):
        transfer_adapter(
            perfect["root"] / "adapter",
            perfect["original"],
            perfect["original"],
            calibration(1),
            tmp_path / "c",
            progress=False,
        )
    with pytest.raises(ValueError, match="lies inside the input"):
        transfer_adapter(
            perfect["root"] / "adapter",
            perfect["emulator"],
            perfect["original"],
            calibration(1),
            perfect["root"] / "adapter",
            progress=False,
        )
    # an emulator whose build probed another original's weights
    stranger, path = copy.deepcopy(perfect["emulator"]), "model.layers.1.mlp.up_proj"
    other = torch.randn_like(out_in_weight(stranger.get_submodule(path)))
    stranger.emloc_metadata = {"original_model": "another", "modules": {path: {"original_probe": weight_probe(other)}}}
    with pytest.raises(
        ValueError, match=rf"{path}: the original is not the model the emulator was built from \(another\)"
    ):
        transfer_adapter(
            perfect["root"] / "adapter", stranger, perfect["original"], calibration(1), tmp_path / "d", progress=False
        )


def test_transfer_ignores_padding(tmp_path):
    """A right-padded row gives the same transfer as the same tokens unpadded in their own batch."""
    original = make_original()
    emulator = make_emulator(original, rank=40)
    make_lora(emulator).save_pretrained(tmp_path / "adapter")
    padded = calibration()
    first = padded[0]
    length = int(first["attention_mask"][1].sum())
    unpadded = [{"input_ids": first["input_ids"][:1]}, {"input_ids": first["input_ids"][1:, :length]}, *padded[1:]]
    for name, batches in (("padded", padded), ("unpadded", unpadded)):
        transfer_adapter(tmp_path / "adapter", emulator, original, batches, tmp_path / name, progress=False)
    got, want = products(tmp_path / "padded"), products(tmp_path / "unpadded")
    for path in want:
        assert rel(got[path], want[path]) < 1e-4, path


def test_transfer_handles_conv1d_originals(tmp_path):
    """GPT-2 stores its linears as Conv1D (in×out): with a perfect emulator the LoRA comes back,
    and the adapter loads on the original with fan_in_fan_out set."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    original = GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=2, n_head=4, n_inner=48, vocab_size=101, n_positions=64)
    ).eval()
    peft_model = get_peft_model(
        copy.deepcopy(original),
        LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
    )
    generator = torch.Generator().manual_seed(3)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=generator) * (0.3 if "lora_A" in name else 0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    transfer_adapter(
        tmp_path / "adapter",
        copy.deepcopy(original),
        original,
        calibration(),
        tmp_path / "out",
        ridge=0.0,
        progress=False,
    )
    got, want = products(tmp_path / "out"), products(tmp_path / "adapter")
    assert len(want) == 8
    # c_attn and c_fc read a LayerNorm output, which has zero mean over features: no data can
    # pin down the LoRA along the all-ones direction, so compare on the centred inputs
    centre = torch.eye(32, dtype=torch.float64) - 1 / 32
    for path in want:
        proj = centre if path.endswith(("c_attn", "c_fc")) else torch.eye(got[path].shape[1], dtype=torch.float64)
        assert rel(got[path] @ proj, want[path] @ proj) < 1e-4, path
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    PeftModel.from_pretrained(original, str(tmp_path / "out"))
