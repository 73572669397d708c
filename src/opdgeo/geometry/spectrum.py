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
# Values whose Gram eigenvalue falls below (this fraction of σ_1)² form the near-null
# cluster, whose values come from one Rayleigh–Ritz step (``_gram_parts``); the values
# above it are √λ_i with error <= ~eps·σ_1/(2·_CLUSTER_RATIO). Measured with 1e-2 on
# graded, clustered, rank-deficient spectra and tight clusters straddling the threshold:
# <= 5e-15·σ_1; the cost is the cluster's eigenvectors and an ``[M, c]`` svdvals.
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

    Route (float64, ``p >= 128``): the Gram route of ``top_singular_subspaces`` with no
    top vectors — every eigenvalue of ``WᵀW`` (``dsytrd`` + ``dsterf``, no vectors), and
    eigenvectors for the near-null cluster only (values below 1e-2·σ_1), whose values come
    from one Rayleigh–Ritz ``svdvals`` of ``W V_c``; error ~eps·σ_1 in the cluster and
    <= ~eps·σ_1²/(2σ_i) <= 50·eps·σ_1 above it (``_gram_parts``), down to exactly singular
    matrices; float32 and small matrices take ``torch.linalg.svdvals`` (LAPACK ``gesdd``
    with ``jobz='N'``, backward stable). Why not ``svdvals`` everywhere: MKL's and
    OpenBLAS's Householder bidiagonalization runs far below GEMM speed on the development
    CPUs (measured on the 2-core AMD EPYC AVX2 box: ``svdvals`` 20 s on a 6144 x 2048
    float64 matrix against 9.3 s for the Gram route with every vector; on the AVX-512
    box ``bench/RESULTS.md`` has the figures). ``eigvalsh(WᵀW)`` alone would be cheaper
    still but loses the smallest values (error ~eps·σ_1²/σ_i, unbounded as σ_i → 0): the
    cluster's Rayleigh–Ritz step is what keeps them. The values are the same bits as
    those ``top_singular_subspaces`` returns for any k.

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
        parts = _gram_parts(w, 0)
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

    1. ``G = WᵀW`` (``[n, n]``, BLAS ``syrk``), reduced to tridiagonal form ``G = Q T Qᵀ``
       (LAPACK ``sytrd``); every eigenvalue λ_i of T (``sterf``, no vectors);
    2. eigenvectors of T for the top k and for the near-null cluster only (``stemr``,
       MRRR by index range), taken back through Q (``ormqr`` with ``sytrd``'s reflectors);
    3. ``Y = W V_k`` (one GEMM on k columns), ``U_k = Y / ||Y[:, i]||``; values: ``√λ_i``,
       the cluster's from one ``svdvals`` of ``W V_c`` (see ``_gram_parts``).

    Why: a full SVD with vectors (``gesdd``) costs a bidiagonalization of the whole
    ``m x n`` matrix plus the back-transformations; the Gram route reduces the work to
    BLAS-3 products and an ``n x n`` tridiagonalization, and forms only the vectors some
    metric reads (``bench/RESULTS.md`` has the measured ratios against numpy's thin SVD).

    Accuracy: the values above the cluster carry ~eps·σ_1²/(2σ_i) (<= 50·eps·σ_1), the
    cluster's ~eps·σ_1, down to exactly singular matrices. The top-k subspace from ``G``
    is accurate to ~eps·σ_1² / (σ_k² - σ_{k+1}²), a factor ~σ_1/(2σ_k) worse than a direct
    SVD; so the Gram route is used only when ``σ_k >= 1e-3·σ_1``, otherwise (and for
    float32, small matrices and ``k = min(m, n)`` rank-deficient cases) this falls back
    to ``torch.linalg.svd``. CUDA and other devices: ``torch.linalg.eigh`` with every
    vector.

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
    """The Gram route's pieces, in the ``M >= N`` orientation: ``vecs`` [N, k] the top-k
    eigenvectors of ``aᵀa``, ``y = a @ vecs`` [M, k], ``sigma`` [k] their refined values
    ``||y[:, i]||``, all three in descending order of ``sigma``, and ``S`` all singular
    values, descending (see ``_gram_parts`` for where each comes from)."""

    vecs: torch.Tensor
    y: torch.Tensor
    sigma: torch.Tensor
    S: torch.Tensor


def _syrk(x):
    """Lower triangle of ``xᵀx`` of a float64 numpy ``[M, N]`` array by BLAS ``dsyrk``
    (half a GEMM's flops), Fortran-ordered, without copying a C- or Fortran-ordered ``x``."""
    import numpy as np
    from scipy.linalg import blas

    if x.flags.f_contiguous:
        return blas.dsyrk(1.0, x, trans=1, lower=1)
    return blas.dsyrk(1.0, np.ascontiguousarray(x).T, trans=0, lower=1)  # (xᵀ)(xᵀ)ᵀ, xᵀ Fortran-ordered


def _gram_eigen_lapack(a, k: int, cluster_ratio: float):
    """Eigenvalues of ``G = aᵀa`` (all, ascending) and the eigenvectors of the top ``k``
    and of the near-null cluster (eigenvalues below ``(cluster_ratio·√λ_max)²``), for a
    float64 numpy ``a`` ``[M, N]``, by LAPACK through scipy: ``dsyrk``, ``dsytrd``
    (``G = Q T Qᵀ``), ``dsterf`` (every eigenvalue of T, no vectors), ``dstemr`` (MRRR:
    eigenvectors of T for the two index ranges only) and ``dormqr`` (Q's Householder
    reflectors applied to those vectors only, as ``dormtr`` does for a lower ``dsytrd``).

    Returns ``(lam [N] ascending, vecs [N, w], c)``: columns ``[:c]`` the cluster's vectors
    and the last ``min(k, N)`` columns the top ones, both ascending (they overlap when
    ``c + k > N``).
    """
    import numpy as np
    from scipy.linalg import lapack

    N = a.shape[1]
    gram = _syrk(a)
    lwork, info = lapack.dsytrd_lwork(N, lower=1)
    packed, d, e, tau, info = lapack.dsytrd(gram, lower=1, lwork=int(lwork), overwrite_a=1)
    if info != 0:
        raise RuntimeError(f"LAPACK dsytrd failed (info={info})")
    lam, info = lapack.dsterf(d.copy(), e.copy())
    if info != 0:
        raise RuntimeError(f"LAPACK dsterf failed (info={info})")
    top = float(np.sqrt(max(lam[-1], 0.0)))
    if not top > 0:  # a zero matrix: no vectors to form
        return lam, np.zeros((N, 0)), 0
    c = int(np.searchsorted(lam, (cluster_ratio * top) ** 2))
    e_n = np.concatenate([e, [0.0]])  # dstemr's workspace length for e
    blocks = []
    # the cluster's vectors in a call of their own whatever k is, so that its values (and
    # so all values) are the same bits for every k; the top k are the last k columns
    for lo, hi in ((1, c), (max(c + 1, N - k + 1), N)):
        if hi < lo:
            continue
        found, _, z, info = lapack.dstemr(d.copy(), e_n.copy(), 2, 0.0, 0.0, lo, hi)  # 2: by index
        if info != 0 or found != hi - lo + 1:
            raise RuntimeError(f"LAPACK dstemr failed (info={info}, {found} of {hi - lo + 1} vectors)")
        blocks.append(np.asfortranarray(z[:, :found]))
    reflectors = np.asfortranarray(packed[1:, :N - 1])
    for z in blocks:  # one back-transformation per block, again for bits independent of k
        if N > 1:
            # Q = H(1)...H(N-1) acts on rows 2..N: dormtr's call of dormqr for uplo = 'L'
            _, work, info = lapack.dormqr("L", "N", reflectors, tau, z[1:, :], -1)
            out, _, info = lapack.dormqr("L", "N", reflectors, tau, z[1:, :], int(work[0]), overwrite_c=1)
            if info != 0:
                raise RuntimeError(f"LAPACK dormqr failed (info={info})")
            z[1:, :] = out
    z = np.asfortranarray(np.concatenate(blocks, axis=1)) if blocks else np.zeros((N, 0))
    return lam, z, c


def _gram_parts(w: torch.Tensor, k: int) -> _GramParts | None:
    """Eigenproblem of ``WᵀW`` (of ``W Wᵀ`` for a wide matrix): all singular values and the
    top ``k`` vectors (``k = 0``: values only); None for a zero matrix.

    Where each value comes from (``a`` = W in the ``M >= N`` orientation, σ_1 its largest):

    - the near-null cluster, eigenvalue below ``(_CLUSTER_RATIO·σ_1)²``: the singular
      values of ``a V_c`` over the cluster's vectors (Rayleigh–Ritz; ~eps·σ_1 like a direct
      SVD, down to exactly singular matrices: the span is accurate where single vectors are
      mixed);
    - every other value, ``σ_i >= _CLUSTER_RATIO·σ_1``: ``√λ_i`` of the Gram matrix, whose
      eigenvalues are backward stable to ~eps·σ_1², so ``σ_i`` carries ~eps·σ_1²/(2σ_i) <=
      eps·σ_1/(2·_CLUSTER_RATIO) = 50·eps·σ_1 at the threshold (measured <= 5e-15·σ_1 on
      graded, clustered, straddling and rank-deficient spectra). In the normalized
      spectral shift over p values this is a relative error of at most
      ~√p·50·eps·σ_1/||σ|| / NSS <= 7e-13/NSS for p = 4096: inside SPEC's 1e-6 for any NSS
      above 1e-6. No value depends on ``k``: the values are the same bits with or without
      vectors (the cluster's vectors come from a call of their own).

    The top-k vectors are returned with their refined values ``||a v_i||`` (the norms that
    make ``a v_i / ||a v_i||`` unit vectors).

    Only the wanted vectors are formed (MRRR for two index ranges, the back-transformation
    and the GEMM ``a V`` on ``c + k`` columns, not ``N``): on the 2-vCPU AMD EPYC (AVX-512)
    box, one thread, this cut one side of a 6144 x 2048 matrix at k = 512 from 3.5 s (all
    vectors through ``dsyevd`` and ``a V`` on every column) to 2.1 s, and of a square
    2048 x 2048 one from 2.35 s to 1.7 s. CUDA and other devices: ``torch.linalg.eigh``
    with every vector and every value refined as ``||a v_i||`` outside the cluster.
    """
    a = w if w.shape[0] >= w.shape[1] else w.T  # [M, N] with M >= N
    N = a.shape[1]
    k = min(k, N)
    lapack = a.device.type == "cpu" and a.dtype == torch.float64
    if lapack:
        lam_np, z, c = _gram_eigen_lapack(a.detach().numpy(), k, _CLUSTER_RATIO)
        lam = torch.from_numpy(lam_np)
        vecs = torch.from_numpy(z)
    else:
        lam, vecs = torch.linalg.eigh(a.mT @ a)
        top = float(lam[-1].clamp(min=0).sqrt())
        c = int(torch.searchsorted(lam, torch.tensor((_CLUSTER_RATIO * top) ** 2, dtype=lam.dtype, device=lam.device)))
    if not bool(lam[-1] > 0):
        return None
    S = lam.clamp(min=0).sqrt()
    if not lapack:
        y = a @ vecs  # torch.linalg.eigh formed every vector: every value refined
        S = torch.linalg.vector_norm(y, dim=0)
        y_cluster, y_top = y[:, :c], y[:, N - k:]
    else:  # two GEMMs, so that the cluster's columns are the same bits whatever k is
        y_cluster = a @ vecs[:, :c]
        y_top = a @ vecs[:, vecs.shape[1] - k:]
    if c:
        S[:c] = torch.linalg.svdvals(y_cluster)
    S = torch.sort(S, descending=True).values
    top_vecs = vecs[:, vecs.shape[1] - k:]
    sigma = torch.linalg.vector_norm(y_top, dim=0)
    order = torch.argsort(sigma, descending=True)
    return _GramParts(vecs=top_vecs[:, order].contiguous(), y=y_top[:, order], sigma=sigma[order], S=S)


def _gram_subspaces(w: torch.Tensor, k: int) -> Subspaces | None:
    """Gram-eigh route of ``top_singular_subspaces``; None when it would be inaccurate."""
    tall = w.shape[0] >= w.shape[1]
    parts = _gram_parts(w, k)
    if parts is None:
        return None
    if not bool(parts.sigma[-1] >= _GRAM_MIN_RATIO * parts.sigma[0]):
        return None
    left = (parts.y / parts.sigma).contiguous()  # [M, k], unit columns
    right = parts.vecs  # [N, k]
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
