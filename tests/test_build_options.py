"""Stage-1 options beyond the paper: error-propagating build, shrinkage, rank allocation."""

from __future__ import annotations

import copy

import pytest
import torch

from emloc_kernels.emulator import build_emulator
from emloc_kernels.emulator.build import SHRINKAGE_GRID
from emloc_kernels.emulator.svd import (
    WhitenedSVD,
    Whitening,
    allocate_ranks,
    output_error,
    rank_for,
    regression_target,
    truncated_factors,
)

RATIO = 0.3


def calibration(vocab: int = 101, samples: int = 16, length: int = 24, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (4, length), generator=g) for _ in range(samples // 4)]


def fresh_gram(n: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    return x, x.T @ x


def test_regression_target_is_the_weight_when_inputs_agree():
    """X_E = X_O: the reduced-rank regression is the paper's whitened SVD."""
    w = torch.randn(24, 40, dtype=torch.float64)
    _, gram = fresh_gram(40, 200, 0)
    whitening = Whitening.from_gram(gram, shrinkage=1e-3)
    torch.testing.assert_close(regression_target(w, gram, whitening), w, rtol=1e-8, atol=1e-8)
    u, v = WhitenedSVD.of(regression_target(w, gram, whitening), whitening).factors(9)
    paper = truncated_factors(w, 9, whitening)
    torch.testing.assert_close(u @ v, paper.u @ paper.v, rtol=1e-6, atol=1e-6)


def test_regression_target_minimises_the_output_error():
    """Unconstrained target: no other weight maps X_E closer to X_O Wᵀ (checked by perturbing)."""
    g = torch.Generator().manual_seed(3)
    xo = torch.randn(300, 20, generator=g, dtype=torch.float64)
    xe = xo + 0.3 * torch.randn(300, 20, generator=g, dtype=torch.float64)
    w = torch.randn(12, 20, generator=g, dtype=torch.float64)
    whitening = Whitening.from_gram(xe.T @ xe)
    m = regression_target(w, xo.T @ xe, whitening)
    best = output_error(w, m, xo.T @ xo, xo.T @ xe, xe.T @ xe)
    direct = ((xe @ m.T - xo @ w.T).norm() / (xo @ w.T).norm()).item()
    assert best == pytest.approx(direct, rel=1e-6)
    assert best < output_error(w, w, xo.T @ xo, xo.T @ xe, xe.T @ xe)
    for _ in range(5):
        worse = m + 1e-3 * torch.randn(m.shape, generator=g, dtype=torch.float64)
        assert output_error(w, worse, xo.T @ xo, xo.T @ xe, xe.T @ xe) > best


def test_propagate_equals_plain_when_only_the_first_compressed_block_differs(tiny_model):
    """Compressing only block 0, both streams enter it with the same activations."""
    calib = calibration()
    plain = build_emulator(tiny_model("llama"), calib, RATIO, targets=r"layers\.0\.", progress=False)
    prop = build_emulator(tiny_model("llama"), calib, RATIO, targets=r"layers\.0\.", propagate=True, progress=False)
    for name in plain.emloc_metadata["modules"]:
        a, b = plain.get_submodule(name), prop.get_submodule(name)
        torch.testing.assert_close(a.u @ a.v, b.u @ b.v, rtol=1e-4, atol=1e-5)


def end_error(original, emulator, batches) -> float:
    with torch.no_grad():
        num = den = 0.0
        for ids in batches:
            ref = original(input_ids=ids).logits
            num += (emulator(input_ids=ids).logits - ref).square().sum().item()
            den += ref.square().sum().item()
    return (num / den) ** 0.5


def test_propagation_lowers_the_end_of_model_error(tiny_model):
    """Later blocks learn to undo earlier blocks' error: the model's output moves closer."""
    calib = calibration(samples=32, length=40)
    original = tiny_model("llama", num_hidden_layers=4)
    plain = build_emulator(copy.deepcopy(original), calib, RATIO, progress=False)
    prop = build_emulator(copy.deepcopy(original), calib, RATIO, propagate=True, progress=False)
    e_plain, e_prop = end_error(original, plain, calib), end_error(original, prop, calib)
    assert e_prop < 0.99 * e_plain, (e_prop, e_plain)


def test_rank_allocation_keeps_the_parameter_budget(tiny_model):
    calib = calibration()
    uniform = build_emulator(tiny_model("llama"), calib, RATIO, progress=False)
    allocated = build_emulator(tiny_model("llama"), calib, RATIO, allocate="block", progress=False)

    def params(model, block):
        return sum(
            i["rank"] * (i["in_features"] + i["out_features"])
            for n, i in model.emloc_metadata["modules"].items()
            if f"layers.{block}." in n
        )

    ranks_u = {n: i["rank"] for n, i in uniform.emloc_metadata["modules"].items()}
    ranks_a = {n: i["rank"] for n, i in allocated.emloc_metadata["modules"].items()}
    assert ranks_a != ranks_u  # the spectra of a random model's linears differ
    for block in (0, 1):
        assert 0.97 * params(uniform, block) <= params(allocated, block) <= params(uniform, block)
    for n, info in allocated.emloc_metadata["modules"].items():
        assert (
            1
            <= info["rank"]
            <= info["in_features"] * info["out_features"] // (info["in_features"] + info["out_features"])
        )
        assert allocated.get_submodule(n).rank == info["rank"]


def test_dense_top_blocks_keep_the_original_weights_within_the_parameter_budget(tiny_model):
    from emloc_kernels import LowRankLinear
    from emloc_kernels.emulator.build import dense_top_blocks

    def linear_params(model):
        return sum(
            m.rank * (m.in_features + m.out_features) if isinstance(m, LowRankLinear) else m.weight.numel()
            for m in model.model.layers.modules()
            if isinstance(m, torch.nn.Linear)
        )

    calib = calibration()
    original = tiny_model("llama", num_hidden_layers=4)
    ratio = dense_top_blocks(original, 0.5, 1)
    assert list(ratio.values()) == [pytest.approx((0.5 * 4 - 1) / 3)]
    emulator = build_emulator(copy.deepcopy(original), calib, ratio, progress=False)
    uniform = build_emulator(copy.deepcopy(original), calib, 0.5, progress=False)
    for i, block in enumerate(emulator.model.layers):
        for name, m in block.named_modules():
            if isinstance(m, torch.nn.Linear):
                assert isinstance(m, LowRankLinear) == (i < 3), (i, name)
                if i == 3:  # the original's own weights
                    assert torch.equal(m.weight, original.model.layers[3].get_submodule(name).weight)
    # the same budget as the uniform ratio, up to rounding the ranks down
    assert 0.97 * linear_params(uniform) <= linear_params(emulator) <= linear_params(uniform)
    with pytest.raises(ValueError, match="dense top blocks must be from 1 to 3 .the model has 4 blocks., got 4"):
        dense_top_blocks(original, 0.5, 4)
    with pytest.raises(ValueError, match="2 dense blocks of 4 hold more parameters than ratio 0.5 keeps of all"):
        dense_top_blocks(original, 0.5, 2)


def test_allocate_ranks_prefers_the_steeper_spectrum():
    flat = torch.ones(10)
    steep = torch.tensor([10.0, 8, 6, 1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    ranks = allocate_ranks(
        {"flat": flat, "steep": steep}, {"flat": 5, "steep": 5}, budget=40, caps={"flat": 10, "steep": 10}
    )
    assert ranks["flat"] + ranks["steep"] == 8
    assert ranks["steep"] >= 3 and ranks["flat"] >= 1
    assert sum(r * 5 for r in ranks.values()) <= 40


def test_shrinkage_is_chosen_on_held_out_samples_and_reported(tiny_model):
    calib = calibration(samples=16)
    model = build_emulator(tiny_model("llama"), calib, RATIO, shrinkage="auto", progress=False)
    infos = model.emloc_metadata["modules"].values()
    assert all(i["shrinkage"] in SHRINKAGE_GRID for i in infos)
    assert all(i["heldout_error"] is not None and i["heldout_error"] > 0 for i in infos)
    assert model.emloc_metadata["build"]["shrinkage"] == "auto"


def test_heldout_error_measures_unseen_samples(tiny_model):
    """Few calibration tokens per input: the held-out error exceeds the error on the fit data."""
    calib = calibration(samples=8, length=6)
    model = build_emulator(tiny_model("llama"), calib, RATIO, progress=False)
    infos = list(model.emloc_metadata["modules"].values())
    assert sum(i["heldout_error"] for i in infos) > 1.2 * sum(i["calibration_error"] for i in infos)


def test_shrinkage_helps_on_unseen_tokens_with_scarce_calibration():
    """Fewer tokens than inputs: a ridge generalises better than the bare floor."""
    n, r = 64, 8
    g = torch.Generator().manual_seed(5)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64)
    w = torch.randn(32, n, generator=g, dtype=torch.float64)
    seen = torch.randn(40, n, generator=g, dtype=torch.float64) @ mix
    unseen = torch.randn(2000, n, generator=g, dtype=torch.float64) @ mix
    gu = unseen.T @ unseen

    def heldout(gamma):
        f = truncated_factors(w, r, Whitening.from_gram(seen.T @ seen, shrinkage=gamma))
        return output_error(w, f.u @ f.v, gu, gu, gu)

    assert min(heldout(gm) for gm in SHRINKAGE_GRID) < heldout(0.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"allocate": "global"}, "allocate"), ({"shrinkage": -1.0}, "shrinkage"), ({"shrinkage": "yes"}, "shrinkage")],
)
def test_bad_build_options(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_emulator(tiny_model("llama"), calibration(), RATIO, progress=False, **kwargs)


def test_rank_for_unchanged():
    assert rank_for(576, 1536, 0.4) == 167
