"""linear_cross_entropy / linear_kl_div: loss and every gradient against the whole-logits
reference in fp64, over several chunks, odd sizes, strided inputs and ignored targets."""

from __future__ import annotations

import pytest
import torch

from emloc_kernels.ops import linear_cross_entropy, linear_kl_div, linear_loss
from emloc_kernels.ops.linear_loss import chunk_rows
from emloc_kernels.ops.reference import linear_cross_entropy_reference, linear_kl_div_reference

LEAD, HIDDEN, VOCAB = (3, 17), 13, 37  # 51 rows: chunks of 18 (below), the last one short
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of a few rows, so that these small inputs take several."""
    monkeypatch.setattr(linear_loss, "MIN_CHUNK_ROWS", 16)


def _inputs(dtype: torch.dtype, bias: bool, strided: bool, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = 2 * HIDDEN if strided else HIDDEN
    hidden = torch.randn(*LEAD, width, generator=g)[..., ::2] if strided else torch.randn(*LEAD, width, generator=g)
    t = {
        "hidden": hidden.to(dtype),
        "weight": (torch.randn(VOCAB, HIDDEN, generator=g) * HIDDEN**-0.5).to(dtype),
        "teacher": torch.randn(*LEAD, HIDDEN, generator=g).to(dtype),
        "targets": torch.randint(0, VOCAB, LEAD, generator=g),
    }
    if bias:
        t["bias"] = torch.randn(VOCAB, generator=g).to(dtype)
    t["targets"][0, ::3] = -100
    for k in ("hidden", "weight", "bias"):
        if k in t:
            t[k].requires_grad_(True)
    return t


def _grads(loss: torch.Tensor, t: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss * 1.7, [t[k] for k in ("hidden", "weight", "bias") if k in t]))


def test_several_chunks_run() -> None:
    rows = LEAD[0] * LEAD[1]
    assert 1 < rows / chunk_rows(rows, HIDDEN, VOCAB) < 4 and rows % chunk_rows(rows, HIDDEN, VOCAB)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    "dtype,bias,strided",
    [(torch.float32, True, False), (torch.float32, False, True), (torch.bfloat16, True, True)],
)
@pytest.mark.parametrize("loss", ["ce", "kl"])
def test_matches_the_whole_logits(loss: str, dtype: torch.dtype, bias: bool, strided: bool, reduction: str) -> None:
    t = _inputs(dtype, bias, strided, seed=hash((loss, str(dtype), bias, strided)) % 1000)
    t64 = {k: v.detach().double().requires_grad_(v.requires_grad) if v.is_floating_point() else v for k, v in t.items()}
    if loss == "ce":
        got = linear_cross_entropy(t["hidden"], t["weight"], t["targets"], t.get("bias"), reduction=reduction)
        want = linear_cross_entropy_reference(
            t64["hidden"], t64["weight"], t64["targets"], t64.get("bias"), reduction=reduction
        )
    else:
        got = linear_kl_div(t["hidden"], t["weight"], t["teacher"], t.get("bias"), reduction=reduction)
        want = linear_kl_div_reference(t64["hidden"], t64["weight"], t64["teacher"], t64.get("bias"), reduction)
    tol = TOL[dtype]
    assert got.dtype == torch.float32 and float(want.detach()) > 0.1
    assert abs(float(got.detach()) - float(want.detach())) <= tol * abs(float(want.detach()))
    for g, w in zip(_grads(got, t), _grads(want, t64)):
        assert g.dtype == dtype and g.shape == w.shape
        assert (g.double() - w).norm() <= tol * w.norm(), (g.double() - w).norm() / w.norm()


def test_ignored_rows_have_no_gradient_and_none_left_gives_zero() -> None:
    t = _inputs(torch.float32, False, False, seed=3)
    (grad,) = torch.autograd.grad(linear_cross_entropy(t["hidden"], t["weight"], t["targets"]), [t["hidden"]])
    ignored = t["targets"] == -100
    assert ignored.any() and grad[ignored].abs().max() == 0 and grad[~ignored].abs().min() > 0
    none = torch.full(LEAD, -100)
    loss = linear_cross_entropy(t["hidden"], t["weight"], none)
    assert float(loss) == 0.0


def test_no_gradient_work_without_grad() -> None:
    t = _inputs(torch.float32, True, False, seed=4)
    with torch.no_grad():
        loss = linear_cross_entropy(t["hidden"], t["weight"], t["targets"], t["bias"])
    assert not loss.requires_grad
    assert torch.allclose(
        loss, linear_cross_entropy_reference(t["hidden"], t["weight"], t["targets"], t["bias"]).detach(), rtol=1e-5
    )


def test_bad_arguments_are_named() -> None:
    t = _inputs(torch.float32, False, False, seed=5)
    with pytest.raises(ValueError, match="reduction must be one of mean, sum"):
        linear_cross_entropy(t["hidden"], t["weight"], t["targets"], reduction="none")
    with pytest.raises(ValueError, match="does not match the head's weight"):
        linear_kl_div(t["hidden"], t["weight"].t(), t["teacher"])
    with pytest.raises(ValueError, match="targets .* must have the shape"):
        linear_cross_entropy(t["hidden"], t["weight"], t["targets"][0])
