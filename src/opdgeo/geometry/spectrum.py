"""Exact singular values and top singular subspaces; normalized spectral shift (SPEC §1).

The randomized low-rank SVD, stable rank and Hill index of the trajectory diagnostics
(SPEC §2) live in ``geometry/lowrank.py``; this module is the exact (deterministic, full
accuracy) part used by the pairwise diagnostics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Subspaces", "singular_values", "top_singular_subspaces", "normalized_spectral_shift", "relative_gap"]

# The Gram path is used only while σ_k / σ_1 stays above this bound: it loses a factor
# σ_1 / σ_k in the accuracy of the top-k subspace compared with a direct SVD (see
# ``top_singular_subspaces``), so 1e-3 keeps that loss <= 1e3 * eps64 ~ 2e-13.
_GRAM_MIN_RATIO = 1e-3
# Columns whose refined value ||W v_i|| falls below this fraction of σ_1 form the
# near-null cluster, whose values come from one Rayleigh–Ritz step (``_gram_parts``). Its
# values then carry ~ eps·σ_1/_CLUSTER_RATIO at worst (the cluster's vectors lean towards a
# vector of value σ_j outside it by ~ eps·σ_1²/σ_j²). Measured with 1e-2 on graded,
# clustered, rank-deficient spectra and tight clusters straddling the threshold: <= 7e-15·σ_1
# (with 1e-3: up to 3e-13·σ_1); the cost is an ``[M, c]`` svdvals over the c values below.
_CLUSTER_RATIO = 1e-2
# Below this size a direct SVD is as cheap as anything else; keep one simple path.
_GRAM_MIN_SIDE = 128


@dataclass(frozen=True)
class Subspaces:
    """Top-k singular subspaces of an ``m x n`` matrix plus its whole spectrum.

    Attributes:
        U: ``[m, k]`` left singular vectors, columns orthonormal, in the order of ``S``.
        S: ``[min(m, n)]`` all singular values, descending.
        V: ``[n, k]`` right singular vectors (not ``Vᵀ``), so ``W ≈ U diag(S[:k]) Vᵀ``.
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor

    @property
    def k(self) -> int:
        """Number of singular vector pairs held."""
        return self.U.shape[1]


def _check_matrix(w: torch.Tensor, dtype: torch.dtype) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch tensor; got {type(w).__name__}")
    if w.ndim != 2:
        raise ValueError(f"w must be a 2-D matrix; got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"w must be floating point; got {w.dtype}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64; got {dtype}")
    if w.numel() == 0:
        raise ValueError(f"w must be non-empty; got shape {tuple(w.shape)}")


def _check_finite(w: torch.Tensor) -> None:
    if not torch.isfinite(w).all():
        raise ValueError("w contains non-finite values")


def singular_values(w: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """All singular values of a matrix, descending.

    Formula: ``σ_1 >= ... >= σ_p >= 0``, ``p = min(m, n)``, with ``W = U diag(σ) Vᵀ``.

    Route (float64, ``p >= 128``): the Gram route of ``top_singular_subspaces`` — the
    eigenvectors ``v_i`` of ``WᵀW`` and the Rayleigh-refined values ``σ_i = ||W v_i||₂``,
    with the near-null cluster (values below 1e-2·σ_1) resolved by a Rayleigh–Ritz step
    on its columns — which has absolute error ~ eps·σ_1 on every σ_i, like a direct SVD,
    down to exactly singular matrices; float32 and small matrices take
    ``torch.linalg.svdvals`` (LAPACK ``gesdd`` with ``jobz='N'``, backward stable). Why not
    ``svdvals`` everywhere: MKL's and OpenBLAS's Householder bidiagonalization runs far
    below GEMM speed on the development CPUs (measured on the 2-core AMD EPYC AVX2 box:
    ``svdvals`` 20 s on a 6144 x 2048 float64 matrix against 9.3 s for the Gram route; on
    the AVX-512 box ``bench/RESULTS.md`` has the figures). ``eigvalsh(WᵀW)`` alone would be
    cheaper still but loses small singular values (error ~ eps·σ_1²/σ_i), so it is not used.

    Args:
        w: ``[m, n]`` floating tensor, any floating dtype and device.
        dtype: computation and result dtype, ``torch.float64`` (default, SPEC §1) or
            ``torch.float32``.

    Returns:
        ``[min(m, n)]`` tensor of ``dtype`` on ``w``'s device, descending.

    Raises:
        TypeError: ``w`` is not a tensor.
        ValueError: ``w`` is not a non-empty 2-D floating matrix, ``dtype`` is not
            float32/float64, or ``w`` has NaN/Inf (the caller reports non-finite
            matrices itself).

    Source: SPEC §1 (normalized spectral shift needs all singular values).
    """
    _check_matrix(w, dtype)
    w = w.to(dtype)
    _check_finite(w)
    if dtype == torch.float64 and min(w.shape) >= _GRAM_MIN_SIDE:
        parts = _gram_parts(w)
        if parts is not None:
            return parts.S
    return torch.linalg.svdvals(w)


def relative_gap(S: torch.Tensor, k: int) -> float:
    """Relative spectral gap at k: how well the top-k singular subspaces are determined.

    Formula::

        gap_k = (σ_k − σ_{k+1}) / σ_1,   σ_{p+1} := 0   (p = min(m, n), k = p allowed)

    By Wedin's sin θ theorem a perturbation E rotates the top-k subspaces by at most
    ~ ||E||₂ / (σ_k − σ_{k+1}), so where ``gap_k`` is not large against ``||E||₂ / σ_1``
    the largest principal angle follows the gap rather than the update.

    Args:
        S: ``[p]`` singular values, descending (``Subspaces.S``).
        k: ``1 <= k <= p``.

    Returns:
        Python float in ``[0, 1]``; ``nan`` when ``σ_1`` is 0 or a value is non-finite.

    Raises:
        ValueError: ``S`` not 1-D or ``k`` out of range.

    Source: SPEC §1 (principal angles of the top-k subspaces); Wedin, BIT 12 (1972).
    """
    if S.ndim != 1 or not 1 <= k <= S.shape[0]:
        raise ValueError(f"k must be in [1, {S.shape[0] if S.ndim == 1 else '?'}] for S of shape {tuple(S.shape)}; got {k}")
    s = S.detach().to("cpu", torch.float64)
    top, at, after = float(s[0]), float(s[k - 1]), float(s[k]) if k < s.shape[0] else 0.0
    if not (math.isfinite(top) and math.isfinite(at) and math.isfinite(after)) or top <= 0.0:
        return float("nan")
    return (at - after) / top


def top_singular_subspaces(w: torch.Tensor, k: int, *, dtype: torch.dtype = torch.float64) -> Subspaces:
    """Exact top-k singular vectors of a matrix and all its singular values.

    Formula: with ``W = U diag(σ) Vᵀ`` (σ descending), return ``U[:, :k]``, all σ and
    ``V[:, :k]``; ``k`` is capped at ``min(m, n)`` (SPEC §1).

    Algorithm (float64, ``p = min(m, n) >= 128``; written for ``m >= n``, the wide case
    works on ``Wᵀ`` and swaps the roles of U and V):

    1. ``G = WᵀW`` (``[n, n]``, BLAS ``syrk``) and its full eigendecomposition
       ``G = V diag(λ) Vᵀ`` (LAPACK ``syevd``; ``_gram_eigh`` says through which library);
    2. ``Y = W V`` (one GEMM) and ``σ_i = ||Y[:, i]||₂`` (Rayleigh refinement);
    3. ``U_k = Y[:, :k] / σ[:k]``.

    Why: a full SVD with vectors (``gesdd``) costs a bidiagonalization of the whole
    ``m x n`` matrix plus the back-transformations; the Gram route reduces the work to
    BLAS-3 products (``syrk``, one GEMM) and an ``n x n`` symmetric eigenproblem. Measured
    with one thread for the Qwen3-1.7B shapes it costs 0.4-0.5x numpy's thin SVD
    (``bench/RESULTS.md``).

    Accuracy: the eigenvalues of ``G`` have absolute error ~ eps·σ_1², i.e. σ_i would carry
    ~ eps·σ_1²/σ_i, which is large for small σ_i; step 2 recomputes every σ_i as
    ``||W v_i||``, which has absolute error ~ eps·σ_1 like a direct SVD (the error of
    ``v_i`` enters only to second order), so the normalized spectral shift over all
    values is as accurate as with an SVD. This holds while the eigenvalue errors stay
    below the spacing of the λ_i (measured <= 3e-15·σ_1 on graded and clustered spectra
    down to σ_i = 1e-5·σ_1); values below ``1e-2·σ_1`` (the near-null cluster, whose
    individual eigenvectors are mixed) are the singular values of ``W V_c`` over the
    cluster's vectors ``V_c`` (Rayleigh–Ritz: the span is accurate where the single vectors
    are not), ~ eps·σ_1 again, down to exactly singular matrices. The top-k subspace from
    ``G`` is accurate to ~ eps·σ_1² / (σ_k² - σ_{k+1}²), a factor ~ σ_1/(2σ_k) worse than a
    direct SVD; so the Gram route is used only when ``σ_k >= 1e-3·σ_1``, otherwise (and
    for float32, small matrices and ``k = min(m, n)`` rank-deficient cases) this falls
    back to ``torch.linalg.svd``.

    Args:
        w: ``[m, n]`` floating tensor, any floating dtype and device.
        k: number of singular vector pairs, ``k >= 1``; capped at ``min(m, n)``.
        dtype: ``torch.float64`` (default, SPEC §1: near-identical matrices make float32
            angles unreliable) or ``torch.float32`` (always a direct SVD).

    Returns:
        ``Subspaces(U [m, k'], S [min(m, n)], V [n, k'])`` with ``k' = min(k, m, n)``, in
        ``dtype`` on ``w``'s device. Signs of singular vectors are arbitrary.

    Raises:
        TypeError: ``w`` is not a tensor or ``k`` not an int.
        ValueError: ``w`` is not a non-empty 2-D floating matrix, ``k < 1``, ``dtype``
            not float32/float64, or ``w`` has NaN/Inf.

    Source: SPEC §1 (principal angles of the top-k subspaces, k = 512; all singular values
    for the spectral shift; rank-r reconstruction for the principal mask).
    """
    _check_matrix(w, dtype)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int; got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    w = w.to(dtype)
    _check_finite(w)
    m, n = w.shape
    p = min(m, n)
    k = min(k, p)

    if dtype == torch.float64 and p >= _GRAM_MIN_SIDE:
        result = _gram_subspaces(w, k)
        if result is not None:
            return result
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    return Subspaces(U=U[:, :k].contiguous(), S=S, V=Vh[:k].T.contiguous())


@dataclass(frozen=True)
class _GramParts:
    """The Gram route's pieces, in the ``M >= N`` orientation: ``vecs`` [N, N] eigenvectors
    of ``aᵀa`` (in eigh's order), ``y = a @ vecs`` [M, N], ``sigma`` [N] the refined values
    ``||y[:, i]||`` (eigh's order), ``order`` the permutation sorting ``sigma`` descending,
    and ``S`` all singular values, descending (``sigma`` with the near-null cluster's
    values replaced by its Rayleigh–Ritz values, see ``_gram_parts``)."""

    vecs: torch.Tensor
    y: torch.Tensor
    sigma: torch.Tensor
    S: torch.Tensor
    order: torch.Tensor


def _syrk(x):
    """``xᵀx`` of a float64 numpy ``[M, N]`` array by BLAS ``dsyrk`` (half a GEMM's flops;
    only the upper triangle is set), without copying a C- or Fortran-ordered ``x``."""
    import numpy as np
    from scipy.linalg import blas

    if x.flags.f_contiguous:
        return blas.dsyrk(1.0, x, trans=1)
    return blas.dsyrk(1.0, np.ascontiguousarray(x).T, trans=0)  # (xᵀ)(xᵀ)ᵀ, xᵀ Fortran-ordered


def _gram_eigh(a: torch.Tensor) -> torch.Tensor:
    """All eigenvectors ``[N, N]`` of ``aᵀa`` (any order) for ``a`` ``[M, N]``.

    CPU float64: ``dsyrk`` and LAPACK ``dsyevd`` through scipy (``scipy.linalg.eigh``,
    ``driver="evd"``). Why not torch's: measured with torch 2.13 on the 2-vCPU AMD EPYC
    development box (one thread), torch's ``a.T @ a`` plus ``torch.linalg.eigh`` (MKL) took
    0.42 + 2.9 s for a 2048 x 2048 Gram matrix against 0.5 + 1.6 s for scipy's (OpenBLAS)
    ``dsyrk`` + ``dsyevd`` — the same LAPACK algorithm, so the same accuracy. Other devices
    and dtypes: ``torch.linalg.eigh``.
    """
    if a.device.type == "cpu" and a.dtype == torch.float64:
        from scipy.linalg import eigh

        gram = _syrk(a.detach().numpy())  # upper triangle of aᵀa, Fortran-ordered
        _, vecs = eigh(gram, lower=False, driver="evd", overwrite_a=True, check_finite=False)
        return torch.from_numpy(vecs)
    return torch.linalg.eigh(a.mT @ a)[1]


def _gram_parts(w: torch.Tensor) -> _GramParts | None:
    """``eigh(WᵀW)`` (or of ``W Wᵀ`` for a wide matrix), the refined values and the
    near-null cluster's values; None for a zero matrix.

    The refined value ``||W v_i||`` is accurate to ~eps·σ_1 while the eigenvalue errors of
    ``WᵀW`` (~eps·σ_1²) stay below the spacing of λ_i = σ_i² (measured: <= 3e-15·σ_1 down
    to σ_i = 1e-5·σ_1). Below, the individual eigenvectors are mixed within the near-null
    cluster, but their span is not: the cluster's values (refined value < ``_CLUSTER_RATIO``
    ·σ_1) are the singular values of ``W V_c`` (a Rayleigh–Ritz step on the cluster's
    columns of ``y``, an ``[M, c]`` ``svdvals``), accurate to ~eps·σ_1 like a direct SVD
    (errors enter only through the cluster's coupling to the rest, to second order).
    """
    a = w if w.shape[0] >= w.shape[1] else w.T  # [M, N] with M >= N
    vecs = _gram_eigh(a)  # [N, N]
    y = a @ vecs  # [M, N]; column i = σ_i u_i
    sigma = torch.linalg.vector_norm(y, dim=0)  # [N], refined singular values
    order = torch.argsort(sigma, descending=True)
    top = sigma[order[0]]
    if not bool(top > 0):
        return None
    S = sigma
    cluster = sigma < _CLUSTER_RATIO * top
    if bool(cluster.any()):
        S = sigma.clone()
        S[cluster] = torch.linalg.svdvals(y[:, cluster])
    S = torch.sort(S, descending=True).values
    return _GramParts(vecs=vecs, y=y, sigma=sigma, S=S, order=order)


def _gram_subspaces(w: torch.Tensor, k: int) -> Subspaces | None:
    """Gram-eigh route of ``top_singular_subspaces``; None when it would be inaccurate."""
    tall = w.shape[0] >= w.shape[1]
    parts = _gram_parts(w)
    if parts is None:
        return None
    top = parts.order[:k]
    if not bool(parts.sigma[top[-1]] >= _GRAM_MIN_RATIO * parts.sigma[top[0]]):
        return None
    left = (parts.y[:, top] / parts.sigma[top]).contiguous()  # [M, k], unit columns
    right = parts.vecs[:, top].contiguous()  # [N, k]
    if tall:
        return Subspaces(U=left, S=parts.S, V=right)
    return Subspaces(U=right, S=parts.S, V=left)


def normalized_spectral_shift(s0: torch.Tensor, s1: torch.Tensor) -> float:
    """Normalized spectral shift between two spectra (spectral drift).

    Formula (SPEC §1)::

        NSS = ||σ(W+) - σ(W0)||₂ / ||σ(W0)||₂

    over all singular values, each spectrum sorted descending (both inputs are sorted
    here, so any order is accepted), computed in float64.

    Args:
        s0: ``[p]`` singular values of W0 (floating, any device).
        s1: ``[p]`` singular values of W+, same length.

    Returns:
        Python float >= 0. Zero-norm origin: ``0.0`` when both spectra are all zero,
        ``inf`` when only ``s0`` is; ``nan`` if either input has NaN.

    Raises:
        TypeError: an input is not a tensor.
        ValueError: an input is not 1-D floating point, or the lengths differ.

    Source: SPEC §1; Shen et al. 2026 §3.2 (spectral drift); Zhu et al. 2025 §4.
    Expected levels in the paper: SFT ~1e-3, OPD ~1e-4, RLVR ~1e-5.
    """
    for name, x in (("s0", s0), ("s1", s1)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch tensor; got {type(x).__name__}")
        if x.ndim != 1 or not x.is_floating_point():
            raise ValueError(f"{name} must be a 1-D floating tensor; got shape {tuple(x.shape)}, {x.dtype}")
    if s0.shape[0] != s1.shape[0]:
        raise ValueError(f"s0 and s1 must have the same length; got {s0.shape[0]} and {s1.shape[0]}")
    a = torch.sort(s0.detach().to("cpu", torch.float64), descending=True).values
    b = torch.sort(s1.detach().to("cpu", torch.float64), descending=True).values
    num = float(torch.linalg.vector_norm(b - a))
    den = float(torch.linalg.vector_norm(a))
    if den == 0.0 and num == num:  # zero-norm origin, no NaN
        return 0.0 if num == 0.0 else float("inf")
    return num / den if den != 0.0 else float("nan")
