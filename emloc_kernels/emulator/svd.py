"""Activation-aware (whitened) truncated SVD of one linear layer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

EIG_FLOOR = 1e-7  # relative ridge: G/f + εI, f = trace(G)/in


def rank_for(in_features: int, out_features: int, ratio: float) -> int:
    """Rank that keeps ``ratio`` of the layer's parameters: ``floor(in·out·ratio/(in+out))``.

    Exact rational arithmetic on the ratio as written: in floats, 12·30·0.7/42 gives 5.999….
    """
    exact = Fraction(in_features * out_features) * Fraction(repr(float(ratio))) / (in_features + out_features)
    return max(1, math.floor(exact))


@dataclass
class Whitening:
    """A square root ``S`` of the calibration Gram matrix (``S Sᵀ = G``), lower triangular.

    Any ``S`` with ``S Sᵀ = G`` gives the same optimal emulator, because
    ``‖X(W−W_E)ᵀ‖² = tr((W−W_E) G (W−W_E)ᵀ) = ‖(W−W_E) S‖²``.  We take the Cholesky factor of
    ``G/f + εI`` (``f = trace(G)/in``) rather than ``Q diag(√λ)``: the ridge ``ε = 1e-7`` plays
    the role of the eigenvalue floor for rank-deficient ``G`` (few tokens, dead features),
    ``S⁻¹`` is applied by a triangular solve, and at ``in = 1536`` it is ~30× faster than
    ``eigh`` on a CPU.
    """

    lower: torch.Tensor
    ridge: float = 0.0  # lower·lowerᵀ = G + ridge·I

    @classmethod
    def from_gram(cls, gram: torch.Tensor, dtype: torch.dtype = torch.float64, shrinkage: float = 0.0) -> "Whitening":
        """Cholesky factor of ``G + γ·tr(G)/n·I`` (``γ = shrinkage``, at least the floor ε).

        Shrinkage keeps a whitening learnt from few tokens from trusting directions that the
        calibration data barely saw: it generalises to unseen tokens (chosen on held-out data).
        """
        g = gram.to(dtype)
        n = g.shape[0]
        f = (torch.trace(g) / n).clamp_min(torch.finfo(torch.float32).tiny)
        eps = max(EIG_FLOOR, float(shrinkage))
        for _ in range(8):
            # g/f + eps·I with two n×n matrices alive rather than five (at n = 11008 in fp64,
            # 1 GB each); "+ 0.0" turns -0.0 into 0.0 as the sum with eps·I does off the diagonal
            ridged = (g / f).add_(0.0)
            ridged.diagonal().add_(eps)
            lower, info = torch.linalg.cholesky_ex(ridged)
            del ridged
            if int(info) == 0:
                return cls(lower=lower.mul_(f.sqrt()), ridge=eps * f.item())
            eps *= 10  # not positive definite in floating point: grow the ridge
        raise RuntimeError("Cholesky factorisation of the calibration Gram matrix failed even with a ridge of 0.1")

    @classmethod
    def identity(
        cls, n: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
    ) -> "Whitening":
        """``S = I``: plain SVD, the baseline the whitened form must beat."""
        return cls(lower=torch.eye(n, dtype=dtype, device=device))


@dataclass
class Factors:
    u: torch.Tensor  # out×r
    v: torch.Tensor  # r×in
    error: float  # ‖X(W−uv)ᵀ‖/‖XWᵀ‖ on the calibration activations


@dataclass
class WhitenedSVD:
    """``M S = U Σ Vᵀ`` of a target weight ``M`` whitened by ``S``: every rank's optimum at once.

    ``uu``, ``sigma`` and ``vh`` are kept as the SVD made them (fp32, half the memory of the
    whitening's fp64 while a block's fits wait for their ranks); :meth:`factors` works in the
    whitening's dtype.
    """

    uu: torch.Tensor
    sigma: torch.Tensor
    vh: torch.Tensor
    whitening: Whitening

    @classmethod
    def of(cls, target: torch.Tensor, whitening: Whitening) -> "WhitenedSVD":
        s = whitening.lower
        ws = target.to(s.dtype) @ s
        # the SVD itself runs in fp32 (2× faster; its rounding is far below the truncation error);
        # on CUDA through cuSOLVER's QR-based gesvd: the default may pick the Jacobi solver, whose
        # tolerance left a 10× higher error floor on near-exact fits than LAPACK's
        driver = "gesvd" if ws.is_cuda else None
        uu, sigma, vh = torch.linalg.svd(ws.float(), full_matrices=False, driver=driver)
        return cls(uu, sigma, vh, whitening)

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``u = U_r Σ_r^½``, ``v = Σ_r^½ V_rᵀ S⁻¹``."""
        dtype = self.whitening.lower.dtype
        root = self.sigma[:rank].to(dtype).sqrt()
        u = self.uu[:, :rank].to(dtype) * root
        # v S = Σ^½ V_rᵀ  ⇔  Sᵀ vᵀ = V_r Σ^½ (Sᵀ upper triangular)
        v = torch.linalg.solve_triangular(self.whitening.lower.T, self.vh[:rank].to(dtype).T * root, upper=True).T
        return u, v


def truncated_factors(weight: torch.Tensor, rank: int, whitening: Whitening) -> Factors:
    """``W S = U Σ Vᵀ``; ``u = U_r Σ_r^½``, ``v = Σ_r^½ V_rᵀ S⁻¹`` (in whitening's dtype)."""
    s = whitening.lower
    w = weight.to(s.dtype)
    u, v = WhitenedSVD.of(w, whitening).factors(rank)
    # ‖X Dᵀ‖² = tr(D G Dᵀ) = ‖D S‖² − ridge·‖D‖²: the discarded σ² would also count the ridge,
    # which dominates when G is rank deficient (fewer calibration tokens than inputs)
    d = w - u @ v
    lost = (d @ s).square().sum() - whitening.ridge * d.square().sum()
    total = (w @ s).square().sum() - whitening.ridge * w.square().sum()
    error = (lost.clamp_min(0) / total.clamp_min(torch.finfo(total.dtype).tiny)).sqrt().item()
    return Factors(u=u, v=v, error=error)


def regression_target(weight: torch.Tensor, cross: torch.Tensor, whitening: Whitening) -> torch.Tensor:
    """``M = W (G_OE + ρI)(G_EE + ρI)⁻¹``: the dense weight that best maps the emulator's inputs
    to the original's outputs, ``min ‖X_E Mᵀ − X_O Wᵀ‖² + ρ‖M − W‖²``.

    ``cross`` is ``G_OE = X_Oᵀ X_E``; ``whitening`` factors ``G_EE + ρI`` (its ``ridge`` is ρ), so
    the ridge pulls ``M`` toward ``W`` rather than toward zero.  With ``X_E = X_O``, ``M = W``.
    """
    s = whitening.lower
    w = weight.to(s.dtype)
    g_oe = cross.to(s.dtype) + whitening.ridge * torch.eye(cross.shape[0], dtype=s.dtype, device=s.device)
    # Mᵀ = (G_EE + ρI)⁻¹ (G_OE + ρI)ᵀ Wᵀ
    return torch.cholesky_solve(g_oe.T @ w.T, s).T


def output_error(
    weight: torch.Tensor, emulated: torch.Tensor, g_oo: torch.Tensor, g_oe: torch.Tensor, g_ee: torch.Tensor
) -> float:
    """``‖X_E W_Eᵀ − X_O Wᵀ‖_F / ‖X_O Wᵀ‖_F`` from the Gram matrices alone (fp64)."""
    w, e = weight.double(), emulated.double()
    # without error propagation the three are one matrix: one fp64 copy (in×in) serves all
    oo = g_oo.double()
    oe = oo if g_oe is g_oo else g_oe.double()
    ee = oo if g_ee is g_oo else oe if g_ee is g_oe else g_ee.double()
    total = torch.einsum("ij,ij->", w @ oo, w)
    lost = torch.einsum("ij,ij->", e @ ee, e) - 2 * torch.einsum("ij,ij->", w @ oe, e) + total
    return (lost.clamp_min(0) / total.clamp_min(torch.finfo(total.dtype).tiny)).sqrt().item()


def calibration_error(weight: torch.Tensor, emulated: torch.Tensor, gram: torch.Tensor) -> float:
    """``‖X(W−W_E)ᵀ‖_F / ‖XWᵀ‖_F`` from ``G = XᵀX`` alone (fp64)."""
    g, w = gram.double(), weight.double()
    d = w - emulated.double()
    return (torch.trace(d @ g @ d.T) / torch.trace(w @ g @ w.T)).clamp_min(0).sqrt().item()


def allocate_ranks(
    spectra: dict[str, torch.Tensor], costs: dict[str, int], budget: int, caps: dict[str, int]
) -> dict[str, int]:
    """Ranks that spend ``budget`` parameters where they remove the most relative output error.

    ``spectra[m]`` are module ``m``'s whitened singular values (descending), ``costs[m]`` the
    parameters one rank costs (``in + out``), ``caps[m]`` its largest useful rank.  Greedy on
    ``σ²_{k+1} / Σσ² / cost``: each module's gains fall with ``k``, so taking increments in
    order of gain per parameter keeps every module's choice a prefix of its spectrum.  Every
    module keeps at least rank 1.
    """
    ranks = {m: 1 for m in spectra}
    left = budget - sum(costs.values())
    gains = []
    for m, sigma in spectra.items():
        energy = sigma.double().square()
        share = energy / energy.sum().clamp_min(torch.finfo(torch.float64).tiny)
        gains += [(g / costs[m], m) for g in share[1 : caps[m]].tolist()]
    closed: set[str] = set()
    for _, m in sorted(gains, key=lambda t: -t[0]):
        if m in closed:
            continue
        if costs[m] > left:
            closed.add(m)  # its later increments cost the same and gain less
            continue
        ranks[m] += 1
        left -= costs[m]
    return ranks
