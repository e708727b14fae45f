"""Stage 3 (LoRA correction) on tiny random Llama and GPT-2 models, checked in fp64."""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from emloc_kernels import LowRankLinear
from emloc_kernels.conventions import out_in_weight, weight_probe
from emloc_kernels.correction import correct_adapter, correct_lora, lora_scaling, merge_adapter

# sizes are deliberately not multiples of 8/16
LLAMA = dict(
    hidden_size=40,
    intermediate_size=75,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=97,
    max_position_embeddings=32,
)
GPT2 = dict(n_embd=36, n_layer=2, n_head=4, n_inner=70, vocab_size=97, n_positions=32, bos_token_id=0, eos_token_id=0)
LORA = {
    # rank/alpha patterns and rsLoRA change the per-module scaling
    "llama": dict(
        r=6,
        lora_alpha=12,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        rank_pattern={"down_proj": 4},
        alpha_pattern={"v_proj": 5},
    ),
    "gpt2": dict(r=5, lora_alpha=7, use_rslora=True, target_modules=["c_attn", "c_proj", "c_fc"]),
}


def make_original(arch: str) -> nn.Module:
    """The same random model every call (so each test can have a fresh copy)."""
    torch.manual_seed(1 if arch == "llama" else 2)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA)) if arch == "llama" else GPT2LMHeadModel(GPT2Config(**GPT2))
    return model.eval()


def block_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, Conv1D)) and (".layers." in n or ".h." in n)
    ]


def make_emulator(original: nn.Module, keep: set[str] = frozenset()) -> nn.Module:
    """Each block linear → LowRankLinear from a truncated SVD (rank ≈ min(out, in)/3); ``keep`` stays dense."""
    emulator = copy.deepcopy(original)
    modules = {}
    for name, module in block_linears(emulator):
        if name in keep:
            continue
        conv1d = isinstance(module, Conv1D)
        w = module.weight.detach().double()
        w = w.T if conv1d else w
        rank = max(1, min(w.shape) // 3)
        u_, s_, vh = torch.linalg.svd(w, full_matrices=False)
        u = (u_[:, :rank] * s_[:rank].sqrt()).float().contiguous()
        v = (s_[:rank].sqrt()[:, None] * vh[:rank]).float().contiguous()
        bias = None if module.bias is None else module.bias.detach().clone()
        emulator.set_submodule(name, LowRankLinear.from_factors(u, v, bias))
        modules[name] = {
            "in_features": w.shape[1],
            "out_features": w.shape[0],
            "rank": rank,
            "ratio": 0.5,
            "bias": bias is not None,
            "transposed": conv1d,
            "quant": None,
            "group_size": 0,
            "original_probe": weight_probe(out_in_weight(module)),
        }
    emulator.emloc_metadata = {
        "format_version": 1,
        "library_version": "test",
        "original_model": "tiny-original",
        "architecture": type(original).__name__,
        "calibration": {},
        "modules": modules,
    }
    return emulator


def make_lora(emulator: nn.Module, arch: str) -> PeftModel:
    """A LoRA on (a copy of) the emulator with random nonzero A and B, as if trained (B small, as
    after training from zero, so the correction is comparable to the LoRA)."""
    peft_model = get_peft_model(copy.deepcopy(emulator), LoraConfig(**LORA[arch]))
    generator = torch.Generator().manual_seed(3)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=generator) * (0.3 if "lora_A" in name else 0.01)
    return peft_model


def save_emulator(emulator: nn.Module, directory: Path) -> None:
    emulator.save_pretrained(directory)
    (directory / "emloc.json").write_text(json.dumps(emulator.emloc_metadata))


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def setup(request, tmp_path_factory):
    """Original, emulator, trained LoRA, and the same three saved to directories."""
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    original = make_original(arch)
    emulator = make_emulator(original)
    peft_model = make_lora(emulator, arch)
    peft_model.save_pretrained(root / "adapter")
    save_emulator(emulator, root / "emulator")
    original.save_pretrained(root / "original", max_shard_size="40KB")  # sharded, with an index
    assert (root / "original" / "model.safetensors.index.json").is_file()
    return dict(arch=arch, root=root, original=original, emulator=emulator, peft_model=peft_model)


def lora_tensors(directory: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    state = load_file(str(directory / "adapter_model.safetensors"))
    prefix, suffix = "base_model.model.", ".lora_A.weight"
    return {
        k[len(prefix) : -len(suffix)]: (state[k], state[k.replace("lora_A", "lora_B")])
        for k in state
        if k.endswith(suffix)
    }


def dense_weight(model: nn.Module, path: str) -> torch.Tensor:
    module = model.get_submodule(path)
    if isinstance(module, LowRankLinear):
        return module.u.double() @ module.v.double()
    return module.weight.detach().double().T if isinstance(module, Conv1D) else module.weight.detach().double()


def tree_hash(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------- the correction identity


def test_unclamped_correction_is_exact_on_span_of_a(setup, tmp_path):
    """x Wᵀ + s·x A_o B_c == x W_Eᵀ + s·x A B for x in span(A), per module, in fp64."""
    peft_model, emulator, original = setup["peft_model"], setup["emulator"], setup["original"]
    report = correct_adapter(
        setup["root"] / "adapter", emulator, original, tmp_path / "out", clamp=None, progress=False
    )
    corrected = lora_tensors(tmp_path / "out")
    lora_trained = lora_tensors(setup["root"] / "adapter")
    assert sorted(corrected) == sorted(n for n, _ in block_linears(original)) == sorted(report["modules"])
    generator = torch.Generator().manual_seed(4)
    for path, (a_o, b_c) in corrected.items():
        lora_a, lora_b = (t.double() for t in lora_trained[path])
        scaling = peft_model.base_model.model.get_submodule(path).scaling["default"]  # PEFT's own value
        assert report["modules"][path]["scaling"] == pytest.approx(scaling)
        assert a_o.shape == lora_a.shape and b_c.shape == lora_b.shape and a_o.dtype == torch.float32
        x = (lora_a.T @ torch.randn(lora_a.shape[0], 7, generator=generator, dtype=torch.float64)).T  # rows in span(A)
        lhs = x @ dense_weight(original, path).T + scaling * (x @ a_o.double().T) @ b_c.double().T
        rhs = x @ dense_weight(emulator, path).T + scaling * (x @ lora_a.T) @ lora_b.T
        assert (lhs - rhs).norm() <= 1e-5 * rhs.norm(), path
        # the correction is not trivially zero: the emulator differs from the original
        assert report["modules"][path]["correction_ratio"] > 1e-3
        assert report["modules"][path]["rows_clamped"] == 0
        # A_o has orthonormal rows
        eye = torch.eye(a_o.shape[0], dtype=torch.float64)
        torch.testing.assert_close(a_o.double() @ a_o.double().T, eye, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rank,n_in,n_out", [(5, 37, 29), (8, 19, 53)])
def test_correct_lora_identity_per_dtype_noncontiguous(dtype, tol, rank, n_in, n_out):
    """The pure per-module function, with strided inputs in each adapter dtype."""
    g = torch.Generator().manual_seed(rank * n_in)
    lora_a = torch.randn(n_in, rank, generator=g).to(dtype).T  # ρ×in, non-contiguous
    lora_b = torch.randn(rank, n_out, generator=g).to(dtype).T  # out×ρ, non-contiguous
    delta = torch.randn(n_in, n_out, generator=g).T * 0.05  # out×in, non-contiguous
    assert not (lora_a.is_contiguous() or lora_b.is_contiguous() or delta.is_contiguous())
    scaling = 1.7
    a_o, b_c, stats = correct_lora(lora_a, lora_b, delta, scaling, clamp=None)
    assert a_o.dtype == b_c.dtype == dtype and a_o.shape == lora_a.shape and b_c.shape == lora_b.shape
    a, b, d = lora_a.double().T, lora_b.double().T, delta.double()
    x = (a @ torch.randn(rank, 6, generator=g, dtype=torch.float64)).T
    lhs = x @ d.T + scaling * (x @ a_o.double().T) @ b_c.double().T  # x(W − W_E)ᵀ + s x A_o B_c
    rhs = scaling * x @ a @ b
    assert (lhs - rhs).norm() <= tol * rhs.norm()
    assert stats["rows"] == rank and stats["rows_clamped"] == 0


def test_clamp_bounds_every_row_and_handles_zero_rows():
    """With L, applied correction rows satisfy c_i/b_i ≤ L; unclamped rows are untouched; b_i = 0 → no correction."""
    g = torch.Generator().manual_seed(7)
    rank, n_in, n_out, scaling, limit = 6, 31, 23, 0.5, 3.0
    lora_a = torch.randn(rank, n_in, generator=g)
    lora_a[4] = lora_a[5]  # A has rank 5: one direction with Σ_a = 0, hence a zero row of B_o
    lora_b = torch.randn(n_out, rank, generator=g) * torch.logspace(-2, 0, rank)  # rows of very different size
    delta = torch.randn(n_out, n_in, generator=g)
    a_o, b_c, stats = correct_lora(lora_a, lora_b, delta, scaling, clamp=limit)
    a_o64, a, b = a_o.double(), lora_a.double().T, lora_b.double().T
    b_o = a_o64 @ a @ b  # A B = A_o B_o and A_o has orthonormal columns
    c = a_o64 @ delta.double().T / scaling
    applied = b_o - b_c.double().T
    b_row, c_row, applied_row = b_o.abs().mean(1), c.abs().mean(1), applied.abs().mean(1)
    zero = b_row < 1e-5
    assert zero.sum() == 1 and torch.isfinite(b_c).all()
    assert applied_row[zero].max() < 1e-5  # no correction where the LoRA has no magnitude
    assert (applied_row[~zero] <= limit * b_row[~zero] * (1 + 1e-5)).all()
    over = c_row > limit * b_row
    assert stats["rows_clamped"] == int(over.sum()) >= 2
    torch.testing.assert_close(applied[~over], c[~over], atol=1e-5, rtol=1e-5)  # rows within L are exact
    direction = torch.nn.functional.cosine_similarity(applied[over & ~zero], c[over & ~zero], dim=1)
    torch.testing.assert_close(direction, torch.ones_like(direction), atol=1e-5, rtol=0)  # clamping only rescales
    assert stats["applied_norm"] < stats["correction_norm"]


def test_clamp_in_adapter_report(setup, tmp_path):
    """A small L clamps rows of real modules; the report counts them and no row exceeds L."""
    limit = 0.15
    report = correct_adapter(
        setup["root"] / "adapter", setup["emulator"], setup["original"], tmp_path / "out", clamp=limit, progress=False
    )
    corrected, trained = lora_tensors(tmp_path / "out"), lora_tensors(setup["root"] / "adapter")
    clamped_total = 0
    for path, (a_o, b_c) in corrected.items():
        lora_a, lora_b = (t.double() for t in trained[path])
        b_o = a_o.double() @ lora_a.T @ lora_b.T
        applied = b_o - b_c.double().T
        ratio = applied.abs().mean(1) / b_o.abs().mean(1)
        assert (ratio <= limit + 1e-4).all(), path
        clamped_total += report["modules"][path]["rows_clamped"]
        assert report["modules"][path]["applied_ratio"] <= report["modules"][path]["correction_ratio"]
    assert report["totals"]["rows_clamped"] == clamped_total > 0
    assert report["totals"]["rows"] == sum(t[0].shape[0] for t in corrected.values())
    assert json.loads((tmp_path / "out" / "correction_report.json").read_text()) == report


# --------------------------------------------------------------------------- the written adapter


def test_loads_with_vanilla_peft_and_matches_direct_lora_keys(setup, tmp_path):
    arch = setup["arch"]
    out = tmp_path / "out"
    correct_adapter(setup["root"] / "adapter", setup["emulator"], setup["original"], out, progress=False)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-original"  # the model has no name: the emulator's record
    assert config["fan_in_fan_out"] is (arch == "gpt2")
    assert config["r"] == LORA[arch]["r"] and config["lora_alpha"] == LORA[arch]["lora_alpha"]

    direct = get_peft_model(make_original(arch), LoraConfig(**LORA[arch]))
    saved = load_file(str(out / "adapter_model.safetensors"))
    expected = get_peft_model_state_dict(direct)
    assert sorted(saved) == sorted(expected)
    assert all(saved[k].shape == expected[k].shape for k in saved)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(make_original(arch), out)
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message) or "key" in str(w.message).lower()]
    for key, tensor in saved.items():
        path, which = key[len("base_model.model.") :].rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        layer = loaded.base_model.model.get_submodule(path)
        torch.testing.assert_close(getattr(layer, which)["default"].weight, tensor, atol=0, rtol=0)
        assert layer.fan_in_fan_out is (arch == "gpt2")

    # merging gives W + s·B_c A_o in each module (stored transposed for Conv1D)
    merged = merge_adapter(make_original(arch), out)
    reference = make_original(arch)
    for path, (a_o, b_c) in lora_tensors(out).items():
        scaling = loaded.base_model.model.get_submodule(path).scaling["default"]
        expect = dense_weight(reference, path) + scaling * b_c.double() @ a_o.double()
        torch.testing.assert_close(dense_weight(merged, path), expect, atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, PeftModel) for m in merged.modules())
    from_dir = merge_adapter(setup["root"] / "original", out)  # loads the class named in config.json
    assert type(from_dir) is type(merged)
    for path, _ in block_linears(reference):
        torch.testing.assert_close(dense_weight(from_dir, path), dense_weight(merged, path), atol=1e-6, rtol=1e-6)


def test_paths_models_and_peft_model_agree_inputs_untouched(setup, tmp_path):
    """Directory inputs, model inputs and a PeftModel adapter give the same adapter; inputs unchanged."""
    root = setup["root"]
    before = {name: tree_hash(root / name) for name in ("adapter", "emulator", "original")}
    original_state = {k: v.clone() for k, v in setup["original"].state_dict().items()}
    runs = {
        "paths": (root / "adapter", root / "emulator", root / "original"),
        "paths_again": (root / "adapter", root / "emulator", root / "original"),
        "models": (root / "adapter", setup["emulator"], setup["original"]),
        "peft": (setup["peft_model"], setup["peft_model"], setup["original"]),
    }
    results = {}
    for name, (adapter, emulator, original) in runs.items():
        correct_adapter(adapter, emulator, original, tmp_path / name, progress=False)
        results[name] = load_file(str(tmp_path / name / "adapter_model.safetensors"))
    assert tree_hash(tmp_path / "paths") == tree_hash(tmp_path / "paths_again")  # deterministic, byte for byte
    for name in ("models", "peft"):
        assert results[name].keys() == results["paths"].keys()
        for key in results[name]:
            torch.testing.assert_close(results[name][key], results["paths"][key], atol=1e-6, rtol=1e-6)
    assert {name: tree_hash(root / name) for name in before} == before
    assert all(torch.equal(v, original_state[k]) for k, v in setup["original"].state_dict().items())
    config = json.loads((tmp_path / "paths" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(root / "original")


def test_original_checkpoint_without_model_prefix(tmp_path, capfd):
    """A checkpoint that stores ``h.0...`` for the LM model's ``transformer.h.0...`` (as the hub's
    GPT-2 does) is matched by its unique suffix; the progress bar reports the modules."""
    original = make_original("gpt2")
    emulator = make_emulator(original)
    make_lora(emulator, "gpt2").save_pretrained(tmp_path / "adapter")
    stripped = tmp_path / "original"
    original.config.save_pretrained(stripped)
    state = {
        k.removeprefix("transformer."): v.contiguous()
        for k, v in original.state_dict().items()
        if k != "lm_head.weight"
    }
    save_file(state, str(stripped / "model.safetensors"))
    correct_adapter(tmp_path / "adapter", emulator, original, tmp_path / "from_model", progress=False)
    capfd.readouterr()
    correct_adapter(tmp_path / "adapter", emulator, stripped, tmp_path / "from_dir", progress=True)
    assert "LoRA correction" in capfd.readouterr().err
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("from_model", "from_dir"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adapter_dtype_is_kept(tmp_path):
    """A bf16 adapter comes back in bf16 (the math itself is fp32)."""
    original = make_original("llama")
    emulator = make_emulator(original)
    peft_model = make_lora(emulator, "llama").to(torch.bfloat16)
    peft_model.save_pretrained(tmp_path / "adapter")
    correct_adapter(tmp_path / "adapter", emulator, original, tmp_path / "out", progress=False)
    state = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert {t.dtype for t in state.values()} == {torch.bfloat16}


# --------------------------------------------------------------------------- errors


def no_leftovers(directory: Path) -> bool:
    return not any(p.name.startswith(".out.") or p.name == "out" for p in directory.iterdir())


def test_existing_out_dir_refused_then_replaced(setup, tmp_path):
    args = (setup["root"] / "adapter", setup["emulator"], setup["original"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError, match="out_dir .* exists.*--overwrite"):
        correct_adapter(*args, out, progress=False)
    with pytest.raises(FileExistsError, match="not written by emloc_kernels"):  # a foreign directory
        correct_adapter(*args, out, overwrite=True, progress=False)
    assert [p.name for p in out.iterdir()] == ["stale.txt"]
    (out / "stale.txt").unlink()
    out.rmdir()
    correct_adapter(*args, out, progress=False)
    (out / "stale.txt").write_text("old")
    correct_adapter(*args, out, overwrite=True, progress=False)  # one the library wrote is replaced
    assert sorted(p.name for p in out.iterdir()) == [
        ".emloc_output.json",
        "adapter_config.json",
        "adapter_model.safetensors",
        "correction_report.json",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary siblings left
    with pytest.raises(ValueError, match="is, contains or lies inside the input"):
        correct_adapter(*args, setup["root"] / "adapter", overwrite=True, progress=False)
    with pytest.raises(ValueError, match="is, contains or lies inside the input"):
        correct_adapter(*args, setup["root"], overwrite=True, progress=False)


def test_shape_mismatch_and_other_architecture(setup, tmp_path):
    arch = setup["arch"]
    adapter = setup["root"] / "adapter"
    # same architecture, other width: adapter/emulator shapes do not fit the original
    torch.manual_seed(0)
    wider = (
        LlamaForCausalLM(LlamaConfig(**{**LLAMA, "hidden_size": 48}))
        if arch == "llama"
        else GPT2LMHeadModel(GPT2Config(**{**GPT2, "n_embd": 44}))
    )
    with pytest.raises(ValueError, match="must belong to the same model"):
        correct_adapter(adapter, setup["emulator"], wider, tmp_path / "out", progress=False)
    # an original of another architecture
    other = make_original("gpt2" if arch == "llama" else "llama")
    with pytest.raises(ValueError, match="emulator was built from a .* but the original is a"):
        correct_adapter(adapter, setup["emulator"], other, tmp_path / "out", progress=False)
    assert no_leftovers(tmp_path)


def test_unknown_target_names(setup, tmp_path):
    state = load_file(str(setup["root"] / "adapter" / "adapter_model.safetensors"))
    renamed = {k.replace(".layers.1.", ".layers.7.").replace(".h.1.", ".h.7."): v for k, v in state.items()}
    bad = tmp_path / "adapter"
    bad.mkdir()
    save_file(renamed, str(bad / "adapter_model.safetensors"))
    (bad / "adapter_config.json").write_text((setup["root"] / "adapter" / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match=r"targets .*\.7\..*which the emulator .* does not have"):
        correct_adapter(bad, setup["emulator"], setup["original"], tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match=r"targets .*\.7\..*which the emulator .* does not have"):
        correct_adapter(bad, setup["root"] / "emulator", setup["root"] / "original", tmp_path / "out", progress=False)
    # the emulator has the module but the original does not
    shorter = copy.deepcopy(setup["original"])
    blocks = shorter.model.layers if setup["arch"] == "llama" else shorter.transformer.h
    del blocks[1]
    with pytest.raises(ValueError, match=r"targets .*\.1\..*which the original .* does not have"):
        correct_adapter(setup["root"] / "adapter", setup["emulator"], shorter, tmp_path / "out", progress=False)
    assert no_leftovers(tmp_path)


def test_linear_the_emulator_kept_dense_passes_through(tmp_path):
    """W_E = W for a linear the emulator did not compress: its LoRA is kept as it is."""
    original = make_original("llama")
    dense = "model.layers.1.mlp.down_proj"
    emulator = make_emulator(original, keep={dense})
    peft_model = make_lora(emulator, "llama")
    peft_model.save_pretrained(tmp_path / "adapter")
    save_emulator(emulator, tmp_path / "emulator")
    trained = lora_tensors(tmp_path / "adapter")
    for i, source in enumerate((emulator, tmp_path / "emulator")):
        report = correct_adapter(tmp_path / "adapter", source, original, tmp_path / f"out{i}", progress=False)
        corrected = lora_tensors(tmp_path / f"out{i}")
        assert report["unchanged"] == [dense] and dense not in report["modules"]
        assert all(torch.equal(a, b) for a, b in zip(corrected[dense], trained[dense]))
        other = "model.layers.1.mlp.up_proj"
        assert not torch.equal(corrected[other][1], trained[other][1])
        PeftModel.from_pretrained(make_original("llama"), tmp_path / f"out{i}")


def test_bad_arguments(setup, tmp_path):
    args = (setup["root"] / "adapter", setup["emulator"], setup["original"])
    for clamp in (0, -1.0, float("nan"), float("inf"), "3", True):
        with pytest.raises(ValueError, match="clamp must be a positive finite number or None"):
            correct_adapter(*args, tmp_path / "out", clamp=clamp, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        correct_adapter(tmp_path / "empty", setup["emulator"], setup["original"], tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="has no emloc.json"):
        correct_adapter(args[0], setup["root"] / "original", setup["original"], tmp_path / "out", progress=False)
    with pytest.raises(TypeError, match="is a LowRankLinear: pass the original model, not the emulator"):
        correct_adapter(*args[:2], setup["emulator"], tmp_path / "out", progress=False)
    with pytest.raises(TypeError, match="emulator must be a model or a directory"):
        correct_adapter(args[0], 3, setup["original"], tmp_path / "out", progress=False)
    bare = copy.deepcopy(setup["emulator"])
    bare.emloc_metadata = {}
    with pytest.raises(ValueError, match="cannot tell whether the original stores .* as a Conv1D"):
        correct_adapter(args[0], bare, setup["root"] / "original", tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="lora_b out×ρ"):
        correct_lora(torch.randn(4, 9), torch.randn(7, 3), torch.randn(7, 9), 1.0)
    with pytest.raises(ValueError, match="weight_delta must be out×in"):
        correct_lora(torch.randn(4, 9), torch.randn(7, 4), torch.randn(9, 7), 1.0)
    with pytest.raises(ValueError, match="scaling must be finite and nonzero"):
        correct_lora(torch.randn(4, 9), torch.randn(7, 4), torch.randn(7, 9), 0.0)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantised_emulator_uses_dequantised_weight(quant, tmp_path):
    """With packed factors, W_E is the dequantised u·v: the identity holds against it."""
    from emloc_kernels import build_emulator, load_emulator
    from emloc_kernels import save_emulator as save

    original = make_original("llama")
    calibration = torch.randint(0, LLAMA["vocab_size"], (3, 13), generator=torch.Generator().manual_seed(5))
    emulator = build_emulator(copy.deepcopy(original), calibration, 0.5, quant=quant, group_size=64, progress=False)
    save(emulator, tmp_path / "emulator")
    peft_model = make_lora(emulator, "llama")
    peft_model.save_pretrained(tmp_path / "adapter")
    from_dir = correct_adapter(
        tmp_path / "adapter", tmp_path / "emulator", original, tmp_path / "a", clamp=None, progress=False
    )
    correct_adapter(
        tmp_path / "adapter", load_emulator(tmp_path / "emulator"), original, tmp_path / "b", clamp=None, progress=False
    )
    corrected, same = lora_tensors(tmp_path / "a"), lora_tensors(tmp_path / "b")
    trained = lora_tensors(tmp_path / "adapter")
    generator = torch.Generator().manual_seed(6)
    for path, (a_o, b_c) in corrected.items():
        torch.testing.assert_close(same[path][1], b_c)
        lora_a, lora_b = (t.double() for t in trained[path])
        scaling = from_dir["modules"][path]["scaling"]
        w_e = emulator.get_submodule(path).dense_weight(torch.float64)
        x = (lora_a.T @ torch.randn(lora_a.shape[0], 5, generator=generator, dtype=torch.float64)).T
        lhs = x @ dense_weight(original, path).T + scaling * (x @ a_o.double().T) @ b_c.double().T
        rhs = x @ w_e.T + scaling * (x @ lora_a.T) @ lora_b.T
        assert (lhs - rhs).norm() <= 1e-5 * rhs.norm(), path


def test_lora_scaling_follows_peft():
    config = {
        "r": 8,
        "lora_alpha": 16,
        "rank_pattern": {"down_proj": 4},
        "alpha_pattern": {r"layers\.1\.mlp\.up_proj": 3},
    }
    assert lora_scaling(config, "model.layers.0.self_attn.q_proj") == (8, 2.0)
    assert lora_scaling(config, "model.layers.0.mlp.down_proj") == (4, 4.0)
    assert lora_scaling(config, "model.layers.1.mlp.up_proj") == (8, 3 / 8)
    assert lora_scaling(config, "model.layers.0.mlp.up_proj") == (8, 2.0)
    assert lora_scaling({"r": 9, "lora_alpha": 6, "use_rslora": True}, "x") == (9, 2.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_models_on_cuda_match_cpu(setup, tmp_path):
    """Models on the GPU give the same corrected update s·B_c A_o as on the CPU (SVD signs may differ)."""
    adapter = setup["root"] / "adapter"
    correct_adapter(adapter, setup["emulator"], setup["original"], tmp_path / "cpu", progress=False)
    emulator, original = copy.deepcopy(setup["emulator"]).cuda(), copy.deepcopy(setup["original"]).cuda()
    correct_adapter(adapter, emulator, original, tmp_path / "cuda", progress=False)
    cpu, cuda = lora_tensors(tmp_path / "cpu"), lora_tensors(tmp_path / "cuda")
    assert cpu.keys() == cuda.keys()
    for path, (a_o, b_c) in cuda.items():
        assert a_o.device.type == "cpu"
        torch.testing.assert_close(b_c @ a_o, cpu[path][1] @ cpu[path][0], atol=1e-5, rtol=1e-5)


def test_refuses_an_original_other_than_the_emulators(setup, tmp_path):
    """Same architecture and shapes, other weights: refused, from a directory and as a model;
    the emulator's own original in another dtype is accepted."""
    adapter, emulator = setup["root"] / "adapter", setup["root"] / "emulator"
    other = make_original(setup["arch"])
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1e-3 * torch.randn_like(p))  # a fine-tuned variant
    other.save_pretrained(tmp_path / "other")
    for candidate in (tmp_path / "other", other):
        with pytest.raises(ValueError, match="is not the model the emulator was built from"):
            correct_adapter(adapter, emulator, candidate, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    half = copy.deepcopy(setup["original"]).to(torch.bfloat16)
    correct_adapter(adapter, emulator, half, tmp_path / "out", progress=False)


def test_an_emulator_or_incomplete_checkpoint_is_no_original(setup, tmp_path):
    from safetensors.torch import load_file, save_file

    from emloc_kernels.conventions import load_model

    with pytest.raises(ValueError, match="is an emulator .* pass the original model"):
        load_model(setup["root"] / "emulator")
    with pytest.raises(ValueError, match="is an emulator"):
        merge_adapter(setup["root"] / "emulator", setup["root"] / "adapter")
    setup["original"].save_pretrained(tmp_path / "cut")
    state = load_file(str(tmp_path / "cut" / "model.safetensors"))
    del state[next(k for k in state if "mlp" in k or ".c_fc." in k)]
    save_file(state, str(tmp_path / "cut" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="1 tensors of the model are missing .* initialise them at random"):
        load_model(tmp_path / "cut")
