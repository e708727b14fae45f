"""Stage 1: ranks, whitened SVD, build errors, streaming and save/load.

The real-model tests use SmolLM2-135M with two of its 30 blocks compressed (the other
blocks still run, so the streaming path is the real one) on twelve Rotten Tomatoes reviews.
"""

from __future__ import annotations

import copy
import gc
import math
import re
import weakref
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
import transformers
from safetensors import safe_open
from torch import nn

from emloc_kernels import LowRankLinear
from emloc_kernels.emulator import build as emloc_build
from emloc_kernels.emulator import build_emulator, load_emulator, save_emulator
from emloc_kernels.emulator.calibration import as_batches, token_mask
from emloc_kernels.emulator.svd import Whitening, calibration_error, rank_for, truncated_factors

RATIO = 0.4
SMOL_TARGETS = r"\.layers\.(0|29)\."


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if type(m) is nn.Linear and ".layers." in n}


def relative_error(x: torch.Tensor, weight: torch.Tensor, emulated: torch.Tensor) -> float:
    """``‖X(W−W_E)ᵀ‖/‖XWᵀ‖`` computed directly from the activations, in fp64."""
    x, w = x.double(), weight.double()
    return ((x @ (w - emulated.double()).T).norm() / (x @ w.T).norm()).item()


def capture_inputs(model: nn.Module, names: list[str], batches: list[dict]) -> dict[str, torch.Tensor]:
    """Rows (real tokens only) that each named linear receives when ``model`` runs on ``batches``."""
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    mask: list[torch.Tensor | None] = [None]

    def hook(name):
        def pre_hook(module, args):
            x = args[0].detach()
            rows[name].append((x[mask[0]] if mask[0] is not None else x).reshape(-1, x.shape[-1]))

        return pre_hook

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for batch in batches:
                mask[0] = token_mask(batch)
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(r) for n, r in rows.items()}


@pytest.fixture(scope="module")
def smol(load_smollm2, smollm2_tokenizer, reviews):
    """SmolLM2 with blocks 0 and 29 compressed at ratio 0.4, a fresh original and the calibration."""
    emulator = build_emulator(
        load_smollm2(), reviews, RATIO, tokenizer=smollm2_tokenizer, targets=SMOL_TARGETS, progress=False
    )
    return SimpleNamespace(
        emulator=emulator,
        original=load_smollm2(),
        batches=as_batches(reviews, smollm2_tokenizer),
        tokenizer=smollm2_tokenizer,
    )


def random_calibration(vocab: int, lengths=(13, 9), seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (1, n), generator=g) for n in lengths]


# ---------------------------------------------------------------- ranks


@pytest.mark.parametrize("ratio", [0.05, 0.3, 0.4, 0.7, 0.99, 1 / 3])
def test_rank_for_is_exact_floor(ratio):
    """Integer reference; float arithmetic alone gives 12·30·0.7/42 = 5.999… → 5."""
    exact_ratio = Fraction(repr(ratio))
    for n_in in (1, 2, 3, 6, 12, 15, 37, 64, 150, 192, 576, 1536):
        for n_out in (1, 5, 12, 30, 45, 60, 101, 192, 576, 1536):
            expected = max(1, math.floor(Fraction(n_in * n_out) * exact_ratio / (n_in + n_out)))
            assert rank_for(n_in, n_out, ratio) == expected, (n_in, n_out, ratio)


def test_rank_per_module_smollm2(smol):
    metadata, original = smol.emulator.emloc_metadata, smol.original
    targeted = [n for n in block_linears(original) if re.search(SMOL_TARGETS, n)]
    assert len(targeted) == 14 and sorted(metadata["modules"]) == sorted(targeted)
    for name in targeted:
        n_out, n_in = original.get_submodule(name).weight.shape
        rank = (n_in * n_out * 2) // (5 * (n_in + n_out))  # ratio 0.4 = 2/5, integer arithmetic
        info, layer = metadata["modules"][name], smol.emulator.get_submodule(name)
        assert (info["in_features"], info["out_features"], info["rank"], info["ratio"]) == (n_in, n_out, rank, RATIO)
        assert isinstance(layer, LowRankLinear) and layer.u.shape == (n_out, rank) and layer.v.shape == (rank, n_in)
        assert RATIO - (n_in + n_out) / (n_in * n_out) < info["kept_fraction"] <= RATIO
        assert not info["transposed"] and info["bias"] is False and info["quant"] is None
    # everything else is untouched
    for name, module in block_linears(smol.emulator).items():
        assert name not in targeted and torch.equal(module.weight, original.get_submodule(name).weight)
    assert torch.equal(smol.emulator.lm_head.weight, original.lm_head.weight)
    tokens = sum(int(b["attention_mask"].sum()) for b in smol.batches)
    assert metadata["calibration"] == {"samples": 12, "tokens": tokens}
    assert metadata["architecture"] == "LlamaForCausalLM"


# ---------------------------------------------------------------- exact reproduction


def test_low_rank_weights_reproduced(tiny_model):
    """Weights of rank ≤ r are reproduced to fp32 rounding at ratio 0.99 (and so are the logits).
    The calibration spans every input dimension (240 tokens > 147 inputs of down_proj):
    with fewer, the weight outside their span is set by the ridge alone and its error by the
    BLAS's rounding (5e-5 on one CPU, 1e-5 on another)."""
    original = tiny_model("llama")
    g = torch.Generator().manual_seed(3)
    for module in block_linears(original).values():
        n_out, n_in = module.weight.shape
        k = rank_for(n_in, n_out, 0.99) - 2
        with torch.no_grad():
            module.weight.copy_(torch.randn(n_out, k, generator=g) @ torch.randn(k, n_in, generator=g) / n_in)
    calibration = random_calibration(101, (60, 60, 60, 60))
    emulator = build_emulator(copy.deepcopy(original), calibration, 0.99, progress=False)
    assert len(emulator.emloc_metadata["modules"]) == 14
    for name, module in block_linears(original).items():
        layer = emulator.get_submodule(name)
        assert isinstance(layer, LowRankLinear) and layer.rank == rank_for(
            module.in_features, module.out_features, 0.99
        )
        w = module.weight.double()
        assert (layer.dense_weight(torch.float64) - w).norm() / w.norm() < 1e-5, name
        assert emulator.emloc_metadata["modules"][name]["calibration_error"] < 1e-5
    ids = torch.randint(0, 101, (2, 17), generator=g)
    with torch.no_grad():
        ref, out = original(input_ids=ids).logits, emulator(input_ids=ids).logits
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


def test_calibration_spanning_fewer_dims_than_rank_reproduced(tiny_model):
    """Full-rank weights, but only 15 calibration tokens (< every rank at 0.99): the emulator
    reproduces each layer exactly on its calibration inputs, hence the calibration logits."""
    original = tiny_model("llama")
    calibration = random_calibration(101, (9, 6))
    emulator = build_emulator(copy.deepcopy(original), calibration, 0.99, progress=False)
    names = list(block_linears(original))
    inputs = capture_inputs(original, names, [{"input_ids": c} for c in calibration])
    for name in names:
        w, layer = original.get_submodule(name).weight, emulator.get_submodule(name)
        assert layer.rank > 15 and inputs[name].shape[0] == 15
        emulated = layer.dense_weight(torch.float64)
        assert (emulated - w.double()).norm() / w.double().norm() > 0.1  # the weight itself is not reproduced
        assert relative_error(inputs[name], w, emulated) < 1e-5, name
        # the report reads the fp32 Gram matrix, whose rounding floor is ~1e-5 here (the ridge alone gave ~4e-4)
        assert emulator.emloc_metadata["modules"][name]["calibration_error"] < 1e-4, name
    with torch.no_grad():
        for ids in calibration:
            ref, out = original(input_ids=ids).logits, emulator(input_ids=ids).logits
            assert ((out - ref).norm() / ref.norm()).item() < 1e-5


# ---------------------------------------------------------------- whitening on real activations


WHITENING_PROBES = [
    "model.layers.2.self_attn.q_proj",
    "model.layers.7.self_attn.o_proj",
    "model.layers.15.mlp.up_proj",
    "model.layers.24.mlp.down_proj",
    "model.layers.28.self_attn.v_proj",
]


@pytest.fixture(scope="module")
def smol_inputs(smol):
    """Real activations entering the compressed linears and a few others (padding excluded)."""
    return capture_inputs(
        smol.original, sorted(smol.emulator.emloc_metadata["modules"]) + WHITENING_PROBES, smol.batches
    )


def test_whitened_beats_plain_svd_on_smollm2_activations(smol, smol_inputs):
    for name in WHITENING_PROBES:
        x, w = smol_inputs[name], smol.original.get_submodule(name).weight.detach()
        gram = x.T @ x
        rank = rank_for(w.shape[1], w.shape[0], RATIO)
        whitened = truncated_factors(w, rank, Whitening.from_gram(gram))
        plain = truncated_factors(w, rank, Whitening.identity(w.shape[1]))
        e_whitened = relative_error(x, w, whitened.u @ whitened.v)
        e_plain = relative_error(x, w, plain.u @ plain.v)
        assert e_whitened < 0.8 * e_plain, (name, e_whitened, e_plain)
        assert whitened.error == pytest.approx(e_whitened, rel=1e-4)
        assert calibration_error(w, whitened.u @ whitened.v, gram) == pytest.approx(e_whitened, rel=1e-4)


def test_report_error_matches_direct_computation(smol, smol_inputs):
    for name in smol.emulator.emloc_metadata["modules"]:
        direct = relative_error(
            smol_inputs[name],
            smol.original.get_submodule(name).weight,
            smol.emulator.get_submodule(name).dense_weight(torch.float64),
        )
        assert 1e-4 < direct < 1
        assert smol.emulator.emloc_metadata["modules"][name]["calibration_error"] == pytest.approx(direct, rel=1e-3)


# ---------------------------------------------------------------- save / load


def test_save_load_smollm2(smol, tmp_path, monkeypatch):
    path = save_emulator(smol.emulator, tmp_path / "emu")
    with safe_open(str(next(path.glob("*.safetensors"))), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    for name in smol.emulator.emloc_metadata["modules"]:
        # the factors, and no dense weight: only the empty one that stops a dense load (emulator.hf)
        assert {f"{name}.u", f"{name}.v"} <= shapes.keys() and shapes[f"{name}.weight"] == [0]
    # loading reads only the emulator directory: no original, no calibration, no build
    read = []
    real_safe_open = transformers.modeling_utils.safe_open
    monkeypatch.setattr(
        transformers.modeling_utils,
        "safe_open",
        lambda f, *a, **k: read.append(Path(f)) or real_safe_open(f, *a, **k),
    )
    monkeypatch.setattr(emloc_build, "build_emulator", None)
    loaded = load_emulator(path)
    assert read and all(f.parent == path for f in read)
    assert loaded.emloc_metadata == smol.emulator.emloc_metadata
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    batch = smol.batches[0]
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, smol.emulator(**batch).logits)


def test_save_refuses_existing_path_and_overwrites(tiny_model, tmp_path):
    emulator = build_emulator(tiny_model("llama"), random_calibration(101), RATIO, progress=False)
    target = tmp_path / "emu"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError, match="exists.*--overwrite"):
        save_emulator(emulator, target)
    with pytest.raises(FileExistsError, match="not written by emloc_kernels"):
        save_emulator(emulator, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["stale.txt"]
    (target / "stale.txt").unlink()
    target.rmdir()
    save_emulator(emulator, target)
    (target / "stale.txt").write_text("old")
    save_emulator(emulator, target, overwrite=True)
    assert not (target / "stale.txt").exists() and (target / "emloc.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emu"]  # no temporary siblings left
    assert load_emulator(target).emloc_metadata == emulator.emloc_metadata


@pytest.mark.parametrize("existing", [False, True])
def test_failed_save_leaves_nothing(tiny_model, tmp_path, monkeypatch, existing):
    emulator = build_emulator(tiny_model("llama"), random_calibration(101), RATIO, progress=False)
    target = tmp_path / "emu"
    if existing:
        save_emulator(emulator, target)
        before = {p.name: p.read_bytes() for p in target.iterdir()}

    def broken(directory, *args, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(emulator, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_emulator(emulator, target, overwrite=existing)
    if existing:
        assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == (["emu"] if existing else [])


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("ratio", [0, 1, -0.1, 1.5, "0.5", {r"q_proj": 0.4, r"v_proj": 1.5}, {r"proj": 0}])
def test_bad_ratio(tiny_model, ratio):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"ratio.*must be a number in \(0, 1\)"):
        build_emulator(model, random_calibration(101), ratio, progress=False)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(targets=["q_proj", "no_such_proj"]), "no_such_proj"),
        (dict(targets="lm_head"), "lm_head"),
        (dict(ratio={"q_proj": 0.4, "no_such_proj": 0.3}), "no_such_proj"),
        (dict(targets="q_proj", ratio={"up_proj": 0.3}), "up_proj"),
    ],
)
def test_pattern_matching_nothing(tiny_model, kwargs, pattern):
    with pytest.raises(ValueError, match=f"{pattern!r}.*matches no"):
        build_emulator(tiny_model("llama"), random_calibration(101), progress=False, **{"ratio": RATIO, **kwargs})


@pytest.mark.parametrize(
    "calibration",
    [
        [],
        torch.empty(0, dtype=torch.long),
        [torch.empty(2, 0, dtype=torch.long)],
        {"input_ids": torch.empty(1, 0, dtype=torch.long)},
    ],
)
def test_empty_calibration(tiny_model, calibration):
    with pytest.raises(ValueError, match="calibration is empty"):
        build_emulator(tiny_model("llama"), calibration, RATIO, progress=False)


def test_calibration_texts_need_tokenizer(tiny_model):
    with pytest.raises(ValueError, match="tokenizer"):
        build_emulator(tiny_model("llama"), ["a review"], RATIO, progress=False)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_calibration_activations(tiny_model, value):
    model = tiny_model("llama")
    with torch.no_grad():
        model.get_input_embeddings().weight[7] = value
    calibration = [torch.tensor([[5, 9, 7, 11, 12]])]
    with pytest.raises(ValueError, match="NaN or inf"):
        build_emulator(model, calibration, RATIO, progress=False)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())


# ---------------------------------------------------------------- streaming


def test_streaming_moves_one_block_at_a_time(tiny_model, monkeypatch):
    """Each block goes to ``device``, runs every calibration batch, and goes home before the next one."""
    model = tiny_model("llama", num_hidden_layers=3)
    events = []
    for i, block in enumerate(model.model.layers):
        real_to = block.to
        monkeypatch.setattr(
            block, "to", lambda *a, i=i, real_to=real_to, **k: events.append((i, "to", a)) or real_to(*a, **k)
        )
        block.register_forward_pre_hook(lambda m, args, i=i: events.append((i, "forward", ())))
    for name, module in model.named_children():
        monkeypatch.setattr(module, "to", lambda *a, name=name, **k: pytest.fail(f"{name} was moved"))
    monkeypatch.setattr(model, "to", lambda *a, **k: pytest.fail("the whole model was moved"))
    build_emulator(model, random_calibration(101, (7, 5, 6)), RATIO, device="cpu", progress=False)
    start = next(n for n, e in enumerate(events) if e[1] == "to")
    cpu = torch.device("cpu")
    expected = [e for i in range(3) for e in [(i, "to", (cpu,)), *[(i, "forward", ())] * 3, (i, "to", (cpu,))]]
    assert events[start:] == expected


def test_replaced_linears_do_not_outlive_their_block(tiny_model):
    """When block i+1 starts, the original linears of block i are gone (on a GPU they would
    otherwise pile up there; on the CPU the original would sit beside the emulator)."""
    model = tiny_model("llama", num_hidden_layers=3)
    originals = [
        [weakref.ref(m) for m in block.modules() if isinstance(m, torch.nn.Linear)] for block in model.model.layers
    ]
    alive = {}

    def check(i):
        def hook(module, args):
            gc.collect()
            alive[i] = sum(r() is not None for r in originals[i - 1])  # the last call: block i streaming

        return hook

    for i in (1, 2):
        model.model.layers[i].register_forward_pre_hook(check(i))
    build_emulator(model, random_calibration(101, (7, 5)), RATIO, progress=False)
    assert alive == {1: 0, 2: 0}


@pytest.mark.cuda
def test_streaming_peak_gpu_memory(tiny_model):
    """A CPU model built on the GPU: peak GPU memory does not grow with the number of blocks
    (one block at a time), and the result matches a CPU build."""

    def build(layers):
        model = tiny_model(
            "llama",
            hidden_size=256,
            intermediate_size=700,
            num_attention_heads=8,
            num_key_value_heads=4,
            num_hidden_layers=layers,
            vocab_size=1001,
        )
        block_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
        reference = build_emulator(copy.deepcopy(model), random_calibration(1001, (40, 31)), RATIO, progress=False)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        build_emulator(model, random_calibration(1001, (40, 31)), RATIO, device="cuda", progress=False)
        return model, reference, torch.cuda.max_memory_allocated() - base, block_bytes

    build(4)  # warm-up: library workspaces (cuBLAS, cuSOLVER) are allocated once
    _, _, shallow_peak, _ = build(4)
    model, reference, deep_peak, block_bytes = build(32)
    # all 32 blocks on the GPU would add 28 blocks' bytes over the 4-block build
    assert deep_peak < shallow_peak + 2 * block_bytes, (deep_peak, shallow_peak, block_bytes)
    assert all(p.device.type == "cpu" for p in model.parameters())
    for name, info in model.emloc_metadata["modules"].items():
        assert info["calibration_error"] == pytest.approx(
            reference.emloc_metadata["modules"][name]["calibration_error"], rel=1e-2, abs=1e-4
        )


def test_save_and_load_bad_paths(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="no emloc_metadata"):
        save_emulator(tiny_model("llama"), tmp_path / "plain")
    assert not (tmp_path / "plain").exists()
    with pytest.raises(FileNotFoundError, match="not an emulator directory"):
        load_emulator(tmp_path / "missing")


def test_build_records_a_probe_of_each_original_weight(tiny_model, tmp_path):
    from emloc_kernels.conventions import matches_probe, out_in_weight

    original, other = tiny_model("llama"), tiny_model("llama", seed=1)
    weights = {n: out_in_weight(m).detach().clone() for n, m in original.named_modules() if isinstance(m, nn.Linear)}
    others = {n: out_in_weight(m).detach() for n, m in other.named_modules() if isinstance(m, nn.Linear)}
    save_emulator(build_emulator(original, random_calibration(101), RATIO, progress=False), tmp_path / "emu")
    modules = load_emulator(tmp_path / "emu").emloc_metadata["modules"]
    assert modules
    for name, info in modules.items():
        assert matches_probe(weights[name], info["original_probe"])
        assert matches_probe(weights[name].bfloat16(), info["original_probe"])
        assert not matches_probe(others[name], info["original_probe"])


def test_calibration_without_tokens_is_refused_and_too_few_warn(tiny_model):
    ids = torch.randint(3, 101, (2, 7), generator=torch.Generator().manual_seed(0))
    empty = [{"input_ids": ids, "attention_mask": torch.zeros_like(ids)}]
    with pytest.raises(ValueError, match="calibration holds no tokens"):
        build_emulator(tiny_model("llama"), empty, RATIO, progress=False)
    with pytest.warns(RuntimeWarning, match="calibration has 3 tokens, fewer than the .* inputs"):
        build_emulator(tiny_model("llama"), [ids[:1, :3]], RATIO, progress=False)


def test_load_refuses_damaged_or_foreign_weight_files(tiny_model, tmp_path):
    emulator = build_emulator(tiny_model("llama"), random_calibration(101), RATIO, progress=False)
    save_emulator(emulator, tmp_path / "emu")
    (file,) = (tmp_path / "emu").glob("*.safetensors")
    extra = tmp_path / "emu" / "model-extra.safetensors"
    safetensors.torch.save_file({"model.norm.weight": torch.zeros(16)}, str(extra))
    with pytest.raises(ValueError, match="are not among the files of this emulator"):
        load_emulator(tmp_path / "emu")
    extra.unlink()
    data = bytearray(file.read_bytes())
    data[-5] ^= 1  # one bit of a tensor
    file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="differs from the checksum"):
        load_emulator(tmp_path / "emu")
    load_emulator(tmp_path / "emu", verify=False)  # the opt-out loads the (flipped) data
    file.write_bytes(bytes(data[:100]))
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_emulator(tmp_path / "emu", verify=False)
