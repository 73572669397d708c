"""Top-k singular subspaces of a fine-tuned matrix, warm-started from its base's (SPEC §1).

W+ = W0 + ΔW with ΔW small, so the base's top-k right singular vectors are an excellent
starting block for block subspace iteration on W+; each step ends with a Rayleigh–Ritz
projection, and the iteration stops on a residual bound measured against the spectral
gap (Wedin's sin θ theorem). Where the gap is too small for the iteration to converge
within the cost of a dense decomposition, nothing is iterated and the caller falls back
to ``top_singular_subspaces``: the result is always either converged to the stated
tolerance or absent, never approximate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["WARM_TOL", "WarmStart", "iteration_budget", "update_norm_estimate", "warm_top_subspaces"]

#: Stopping tolerance on the Wedin bound of sin Θ between the computed and the exact top-k
#: subspaces (radians): 1e-10 rad = 5.7e-9 degrees, three orders below the 1e-5 degree
#: accuracy the principal angles are held to (each angle moves by at most Θ).
WARM_TOL = 1e-10

# Cost model of the budget, in GEMM-equivalent flops, measured with one thread on the
# 2-core AMD EPYC (AVX-512) development box: the dense route's p x p eigenproblem (LAPACK
# dsytrd, dsterf, MRRR vectors for the top k and the near-null cluster, their
# back-transformation; ``spectrum._gram_parts``) costs ~8 p^3 at k = p/4 (1.34 s against
# 0.34 s for a 2048^3 GEMM), and the QR / small SVD of an m x k block ~6x its flop count
# (LAPACK's Householder kernels run at ~1/6 of GEMM speed on these CPUs).
_EIGH_FLOPS = 8.0
_HOUSEHOLDER_SLOWDOWN = 6.0


@dataclass(frozen=True)
class WarmStart:
    """Outcome of ``warm_top_subspaces``.

    Attributes:
        U: ``[m, k]`` left singular vectors of W+ (``None`` unless converged).
        S: ``[k]`` the top-k singular values (Ritz values), descending (``None`` unless converged).
        V: ``[n, k]`` right singular vectors (``None`` unless converged).
        converged: the bound reached ``tol``.
        iterations: subspace-iteration steps taken (0 when declined up front).
        bound: the last Wedin bound on sin Θ (``inf`` when none was computed).
        predicted: iterations the prior rate predicted (``inf`` when the gap is closed).
        reason: ``"converged"``, ``"gap"`` (no gap guaranteed: declined), ``"budget"`` (the
            prediction exceeds the budget: declined), ``"stalled"`` (the observed rate
            would exceed the budget: stopped), or ``"full"`` (k = min(m, n): nothing to
            iterate).
    """

    U: torch.Tensor | None
    S: torch.Tensor | None
    V: torch.Tensor | None
    converged: bool
    iterations: int
    bound: float
    predicted: float
    reason: str


def iteration_budget(m: int, n: int, k: int) -> int:
    """Iterations that cost less than one dense decomposition of an ``m x n`` matrix.

    Formula (GEMM-equivalent flops, constants measured on the development CPU, see
    ``_EIGH_FLOPS``)::

        dense = m n p + 2 m n k + 8 p^3              (syrk, GEMM on k columns, eigenproblem)
        step  = 4 m n k + 6 (2 n k^2 + 2 m k^2 + 2 k^3) (two GEMMs, QR of V, SVD of W V)
        budget = floor(dense / step)

    Args:
        m, n: the matrix's shape; ``k``: the block size, ``1 <= k``.

    Returns:
        The budget, at least 0.
    """
    p = min(m, n)
    dense = 1.0 * m * n * p + 2.0 * m * n * k + _EIGH_FLOPS * p**3
    step = 4.0 * m * n * k + _HOUSEHOLDER_SLOWDOWN * (2.0 * n * k * k + 2.0 * m * k * k + 2.0 * k**3)
    return max(0, int(dense // step))


def update_norm_estimate(w0: torch.Tensor, w1: torch.Tensor, *, iters: int = 8, seed: int = 0) -> float:
    """An estimate of ``||W+ − W0||_2`` by power iteration, without forming the difference.

    Formula: ``x <- Dᵀ D x / ||Dᵀ D x||`` with ``D x = W+ x − W0 x``; returns ``||D x||`` after
    ``iters`` steps (a lower bound that approaches ``||D||_2``; the warm start uses it only
    to predict its cost, never to certify a result). Costs ``4 iters`` matrix-vector products
    of each matrix: negligible next to any decomposition.

    Args:
        w0, w1: ``[m, n]`` floating tensors (computed in float64); ``iters >= 1``; ``seed``
            of the start vector.

    Returns:
        The estimate, a float >= 0.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(w0.shape[1], 1, generator=g, dtype=torch.float64).to(w0.device)
    a, b = w0.to(torch.float64), w1.to(torch.float64)
    est = 0.0
    for _ in range(iters):
        x = x / torch.linalg.vector_norm(x).clamp_min(torch.finfo(torch.float64).tiny)
        y = b @ x - a @ x  # [m, 1]
        est = float(torch.linalg.vector_norm(y))
        if est == 0.0:
            return 0.0
        x = b.mT @ y - a.mT @ y  # [n, 1]
    return est


def _prior(sigma0: torch.Tensor, k: int, delta: float, tol: float) -> float:
    """Iterations predicted: with σ_{k+1}(W+) <= alpha = σ_{k+1}(W0) + δ and σ_k(W+) >= lo =
    σ_k(W0) − δ (Weyl, δ = ||ΔW||_2), the error contracts by (alpha / lo)² per step from the
    Wedin bound min(1, δ / (lo − alpha)) on the base-to-tuned rotation; ``inf`` without a gap."""
    s = sigma0.to(torch.float64)
    alpha = float(s[k]) + delta
    lo = float(s[k - 1]) - delta
    if not lo > alpha:
        return math.inf
    start = min(1.0, delta / (lo - alpha))  # Wedin: sin Θ(base, tuned) <= ||ΔW|| / gap
    rate = (alpha / lo) ** 2
    if start <= tol or rate <= 0.0:
        return 1.0  # one step certifies it
    return 1.0 + math.ceil(math.log(tol / start) / math.log(rate))


def warm_top_subspaces(
    w: torch.Tensor,
    V0: torch.Tensor,
    k: int,
    *,
    sigma0: torch.Tensor,
    delta_fro: float,
    delta_norm: float | None = None,
    S: torch.Tensor | None = None,
    tol: float = WARM_TOL,
    max_iter: int | None = None,
) -> WarmStart:
    """Top-k singular triplets of W+ by block subspace iteration from the base's V0.

    Algorithm (float64; Golub & Van Loan, *Matrix Computations* 4th ed., §8.2.4 orthogonal
    iteration and §10.1 Rayleigh–Ritz, applied to WᵀW). Starting from ``V = V0[:, :k]``,
    repeat::

        V = qr(V).Q                              [n, k]
        W V = Ũ diag(σ̃) Zᵀ   (thin SVD)          Rayleigh–Ritz on span(V)
        U = Ũ,  V = V Z                          so W V = U diag(σ̃) exactly
        R = Wᵀ U − V diag(σ̃)                     [n, k], the only non-zero residual
        bound = ||R||_F / (σ̃_k − α)
        stop when bound <= tol;  else V = Wᵀ U (= R + V diag(σ̃))

    Stopping rule (Wedin 1972, sin θ theorem for singular subspaces): if the Ritz values
    are at least ``α + δ`` and the rest of the spectrum is at most ``α``, the largest
    angle Θ between the computed and the exact top-k subspaces (left and right) satisfies
    ``sin Θ <= sqrt(||W V − U Σ̃||_F² + ||Wᵀ U − V Σ̃||_F²) / δ``. Here α stands for
    σ_{k+1}(W+), the value the rest of the spectrum converges to: exact when ``S`` (all
    singular values of W+) is given, else its Weyl upper bound ``σ_{k+1}(W0) + ||ΔW||_F``.

    Declining up front (no work): with ``δ = ||ΔW||_2`` (``delta_norm``), Weyl's bounds
    ``σ_k(W+) >= σ_k(W0) − δ =: lo`` and ``σ_{k+1}(W+) <= σ_{k+1}(W0) + δ =: a``, the
    iteration's error contracts by ``(a / lo)²`` per step from at most
    ``min(1, δ / (lo − a))``; if ``lo <= a`` (reason ``"gap"``) or the
    predicted count exceeds ``max_iter`` (reason ``"budget"``, default
    ``iteration_budget(m, n, k)``: cheaper than the dense route) the caller should use the
    dense decomposition. The iteration also stops (``"stalled"``) when the observed
    contraction of the bound predicts more steps than the budget has left.

    Args:
        w: ``[m, n]`` floating tensor W+ (computed in float64).
        V0: ``[n, >=k]`` the base's top right singular vectors, descending (orthonormal).
        k: subspace size, ``1 <= k <= min(m, n)``.
        sigma0: ``[min(m, n)]`` all singular values of W0, descending.
        delta_fro: ``||W+ − W0||_F`` (``>= ||ΔW||_2``): the rigorous α when ``S`` is absent.
        delta_norm: ``||ΔW||_2`` or an estimate of it (``update_norm_estimate``) for the
            prediction of the cost only (default ``delta_fro``).
        S: optional ``[min(m, n)]`` singular values of W+ (sharpens α).
        tol: the bound to reach (default ``WARM_TOL``).
        max_iter: iteration budget (default ``iteration_budget``).

    Returns:
        ``WarmStart``; ``U``, ``S``, ``V`` are set only when ``converged``.

    Raises:
        ValueError: shapes or ``k`` out of range, negative or non-finite ``delta_fro``.

    Source: SPEC §1 (principal angles of the top-k subspaces); Wedin, BIT 12 (1972) 99–111.
    """
    delta_norm = delta_fro if delta_norm is None else delta_norm
    _check_inputs(w, V0, k, sigma0, delta_fro, delta_norm)
    m, n = w.shape
    if k == min(m, n):
        return WarmStart(None, None, None, False, 0, math.inf, math.inf, "full")
    predicted = _prior(sigma0, k, delta_norm, tol)
    budget = iteration_budget(m, n, k) if max_iter is None else int(max_iter)
    alpha = float(S[k]) if S is not None else float(sigma0[k]) + delta_fro
    if math.isinf(predicted):
        return WarmStart(None, None, None, False, 0, math.inf, predicted, "gap")
    if predicted > budget:
        return WarmStart(None, None, None, False, 0, math.inf, predicted, "budget")
    return _iterate(w.to(torch.float64), V0[:, :k].to(torch.float64), alpha, tol, budget, predicted)


def _check_inputs(w, V0, k, sigma0, delta_fro, delta_norm) -> None:
    if w.ndim != 2 or V0.ndim != 2 or V0.shape[0] != w.shape[1]:
        raise ValueError(f"w must be [m, n] and V0 [n, >=k]; got {tuple(w.shape)} and {tuple(V0.shape)}")
    p = min(w.shape)
    if not 1 <= k <= min(p, V0.shape[1]):
        raise ValueError(f"k must be in [1, {min(p, V0.shape[1])}]; got {k}")
    if sigma0.ndim != 1 or sigma0.shape[0] != p:
        raise ValueError(f"sigma0 must hold all {p} singular values of W0; got shape {tuple(sigma0.shape)}")
    for label, value in (("delta_fro", delta_fro), ("delta_norm", delta_norm)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{label} must be a finite number >= 0; got {value}")


def _iterate(w, V, alpha: float, tol: float, budget: int, predicted: float) -> WarmStart:
    """The loop of ``warm_top_subspaces`` (its docstring)."""
    bounds: list[float] = []
    for it in range(1, budget + 1):
        V = torch.linalg.qr(V).Q  # [n, k]
        Ub, sig, Zh = torch.linalg.svd(w @ V, full_matrices=False)  # Rayleigh–Ritz, [m, k] [k] [k, k]
        V = V @ Zh.mT  # [n, k]; now W V = Ub diag(sig)
        nxt = w.mT @ Ub  # [n, k]
        R = nxt - V * sig
        gap = float(sig[-1]) - alpha
        bound = float(torch.linalg.matrix_norm(R)) / gap if gap > 0 else math.inf
        bounds.append(bound)
        if bound <= tol:
            return WarmStart(Ub.contiguous(), sig, V.contiguous(), True, it, bound, predicted, "converged")
        if len(bounds) >= 3 and math.isfinite(bounds[-2]) and bounds[-2] > 0:
            rate = bound / bounds[-2]
            left = math.inf if rate >= 1.0 else math.log(tol / bound) / math.log(rate)
            if it + left > budget:
                break
        V = nxt
    return WarmStart(None, None, None, False, len(bounds), bounds[-1] if bounds else math.inf, predicted, "stalled")
