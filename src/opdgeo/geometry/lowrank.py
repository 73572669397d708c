"""Top of the spectrum of an update ΔW: top-k SVD, stable rank, Hill index (SPEC §2).

The trajectory diagnostics need only the top of the spectrum of each ΔW_t = W_t − W0
(σ1 for the stable rank, the top-k singular values for the Hill index, the top-K right
singular vectors for Sim_K) plus ‖ΔW_t‖_F, which is exact and cheap. A full SVD of a
6144 × 2048 matrix costs O(m n²); the randomized subspace iteration here costs
O(m n l) per iteration with l = k + oversample, so about 10-30× less for the same
accuracy on the spectra that trained updates have. On small matrices it is the other way
round (a fixed cost per iteration, a handful of iterations): ``top_svd`` takes the exact
thin SVD up to ``EXACT_SVD_MAX_DIM`` and the randomized one above.

Numerical notes on ``randomized_top_svd``: the iteration runs in float32 by default
(twice the matmul throughput of float64; its rounding only perturbs the subspace, which
enters the Ritz values quadratically); the final Rayleigh-Ritz step ``Qᵀ w`` and the
small SVD are float64, so the returned values carry float64 accuracy within the captured
subspace. Scaling by ‖w‖_F keeps tiny (or huge) updates inside the float32 range. Inside
the loop ``orth`` is a Cholesky QR on a float64 Gram matrix (only the span matters
there, and it is ~5× cheaper than Householder on tall blocks); the final basis is
re-orthonormalized by Householder QR in float64. Stopping rule: the singular values of
Z = AᵀQ are the Ritz values of the current subspace, so each iteration checks
convergence for free; Ritz values increase monotonically towards σ_j, and their change
per iteration bounds the remaining error up to the factor 1/(1 − ρ), ρ the
per-iteration contraction. A larger oversampling costs more per iteration but converges
in fewer: 64 was the fastest for k = 32 on trained-like spectra (bench/trajectory.py).
"""

from __future__ import annotations

import math

import torch

__all__ = ["EXACT_SVD_MAX_DIM", "top_svd", "randomized_top_svd", "exact_svd", "stable_rank", "stable_rank_of",
           "hill_alpha"]

# Absolute floor of the convergence test, in units of the current σ1 estimate: changes of
# the Ritz values below this are rounding noise of the float32 iteration (eps32 ≈ 6e-8
# times a small factor), so a test below it would never pass on rank-deficient updates.
_RITZ_NOISE_FLOOR = 1e-6

EXACT_SVD_MAX_DIM = 192
"""``top_svd`` takes the exact float64 thin SVD when min(m, n) ≤ this, the randomized one
above. Measured (bench/svd_route.py, bench/RESULTS.md; k = 32 so l = 96, one thread,
torch 2.13 CPU, two runs): the exact SVD took 0.05-0.47 of the randomized time at
min(m, n) = 128-160 and 0.3-0.8 at 192 (square, 1024 × 192 and 192 × 1024; slow i^-0.3
and fast i^-1 power-law spectra), 0.5-1.3 at 224-256 (break-even), and 1.1-14× at
384-1024, where the randomized route wins."""


def _check_matrix(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor; got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D matrix; got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"expected a floating-point matrix; got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"expected a non-empty matrix; got shape {tuple(w.shape)}")


def _orth(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of ``y`` (thin Householder QR)."""
    q, _ = torch.linalg.qr(y)
    return q


def _orth_fast(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, R)`` with ``Y = Q R``, Q's columns orthonormal to ~κ(Y)² eps64, by Cholesky QR.

    R = chol(YᵀY) from a float64 Gram matrix, Q = Y R⁻¹: two BLAS-3 passes instead of a
    Householder QR, which is several times slower on tall m × l blocks. Inside the
    subspace iteration only the span matters and each step re-orthonormalizes, so the
    loss of orthogonality (κ(Y)² · 1e-16) is harmless. The singular values of R are
    those of Y. Falls back to Householder when the Gram matrix is numerically singular.
    """
    y64 = y.to(torch.float64)
    gram = y64.T @ y64  # [l, l]
    r, info = torch.linalg.cholesky_ex(gram, upper=True)
    if int(info) != 0 or not bool(torch.isfinite(r).all()):
        q, r = torch.linalg.qr(y64)
        return q.to(y.dtype), r
    q = torch.linalg.solve_triangular(r, y64, upper=True, left=False)  # Y R⁻¹
    return q.to(y.dtype), r


def _check_svd_args(w: torch.Tensor, k, oversample, n_iter, tol, dtype) -> None:
    """Validate the arguments of :func:`randomized_top_svd` / :func:`top_svd` (their Raises)."""
    _check_matrix(w)
    m, n = w.shape
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(m, n):
        raise ValueError(f"k must be an integer in [1, min(m, n) = {min(m, n)}]; got {k!r}")
    if isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 0:
        raise ValueError(f"oversample must be an integer >= 0; got {oversample!r}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0:
        raise ValueError(f"n_iter must be an integer >= 0; got {n_iter!r}")
    if not (isinstance(tol, (int, float)) and tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a finite number > 0; got {tol!r}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64; got {dtype}")


def _float64_and_norm(w: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(w in float64, ‖w‖_F)``; raises ValueError on a non-finite entry (one pass)."""
    w64 = w.to(torch.float64)
    scale = float(torch.linalg.matrix_norm(w64))  # non-finite iff an entry is (or the norm overflows)
    if not math.isfinite(scale):
        raise ValueError("matrix has non-finite entries (or a norm beyond float64)")
    return w64, scale


def _zero_top_svd(m: int, n: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The convention for a zero matrix: S = 0, the first k coordinate vectors as U and V."""
    eye_m = torch.eye(m, k, dtype=torch.float64, device=device)
    eye_n = torch.eye(n, k, dtype=torch.float64, device=device)
    return eye_m, torch.zeros(k, dtype=torch.float64, device=device), eye_n


def _exact_top(w64: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top k of :func:`exact_svd` (float64), contiguous."""
    u, s, v = exact_svd(w64)
    return u[:, :k].contiguous(), s[:k].contiguous(), v[:, :k].contiguous()


def _subspace_basis(a: torch.Tensor, k: int, l: int, n_iter: int, tol: float, seed: int) -> torch.Tensor:
    """``Q [m, l]``, an orthonormal basis that captures the top-k left singular subspace of ``a``.

    The subspace iteration of :func:`randomized_top_svd` in ``a``'s dtype: Q = orth(A Ω),
    then Z = AᵀQ, Q = orth(A orth(Z)) until the top-k Ritz values σ(Z) stop moving
    (``tol`` relative plus the float32 noise floor) or ``n_iter`` iterations.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    omega = torch.randn(a.shape[1], l, generator=gen, dtype=a.dtype).to(a.device)  # [n, l]
    q, _ = _orth_fast(a @ omega)  # [m, l]
    prev = None
    for _ in range(n_iter):
        qz, r = _orth_fast(a.T @ q)  # Aᵀq = qz r: [n, l]; σ(r) are the Ritz values
        ritz = torch.linalg.svdvals(r)[:k]
        if prev is not None:
            change = (ritz - prev).abs()
            if bool((change <= tol * ritz + _RITZ_NOISE_FLOOR * ritz[0]).all()):  # scale-free test
                break
        prev = ritz
        q, _ = _orth_fast(a @ qz)
    return q


def _rayleigh_ritz(q: torch.Tensor, w64: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k ``(U, S, V)`` of ``w64`` within span(q), all in float64."""
    q64 = _orth(q.to(torch.float64))  # re-orthonormalize in float64 so U is orthonormal to 1e-15
    b = q64.T @ w64  # [l, n] Rayleigh-Ritz in float64
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    u = q64 @ ub[:, :k]  # [m, k]
    return u, s[:k].contiguous(), vh[:k].T.contiguous()


def randomized_top_svd(
    w: torch.Tensor,
    k: int,
    *,
    oversample: int = 64,
    n_iter: int = 40,
    tol: float = 1e-4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k singular triplets of ``w`` by randomized subspace iteration.

    Algorithm (Halko, Martinsson & Tropp 2011, "Finding structure with randomness",
    SIAM Review 53(2), Alg. 4.4 with the stopping rule of the module docstring), with
    l = k + oversample::

        A   = w in ``dtype`` (divided by ‖w‖_F first if that is outside [1e-15, 1e15])
        Q   = orth(A Ω),   Ω ~ N(0, 1)^{n×l}   (seeded)
        repeat:  Z = Aᵀ Q;  Q = orth(A orth(Z))      until the top-k σ(Z) settle
        B   = Qᵀ w   (float64, l × n);   B = Û Σ Vᵀ
        U = Q Û[:, :k],   S = Σ[:k],   V = V[:, :k]

    It stops when every top-k Ritz value moved by at most ``tol * σ̂_j + 1e-6 * σ̂_1``
    since the previous iteration, or after ``n_iter`` iterations. The iteration runs in
    ``dtype``; the Rayleigh-Ritz step and the small SVD are float64 (numerical notes in
    the module docstring). When l ≥ min(m, n) the randomized path gives no saving and an
    exact float64 SVD is returned instead. :func:`top_svd` picks the cheaper of this and
    an exact SVD by the matrix's size; the trajectory uses that.

    Defaults (oversample = 64, tol = 1e-4, n_iter = 40) meet, against a full float64
    SVD and for k = 32: σ1 to 1e-4 relative, the top-32 singular values to 1e-3
    relative and Sim_16 to 1e-3 absolute, on geometric and power-law spectra, flat tops,
    clusters straddling k, low-rank-plus-noise and rank-deficient matrices (tested in
    ``tests/test_geometry_trajectory.py``; worst measured: 3e-5 on the top-32 values).

    Args:
        w: ``[m, n]`` floating-point matrix, finite; any device.
        k: number of singular triplets, ``1 <= k <= min(m, n)``.
        oversample: extra sketch columns, ``>= 0``; l = min(k + oversample, min(m, n)).
        n_iter: maximum number of power (subspace) iterations, ``>= 0``.
        tol: relative convergence tolerance on the top-k Ritz values, ``> 0``.
        seed: seed of the Gaussian test matrix (drawn on the CPU, so results do not
            depend on the device).
        dtype: precision of the iteration, ``torch.float32`` or ``torch.float64``.

    Returns:
        ``(U, S, V)``, float64 on ``w``'s device: ``U [m, k]`` and ``V [n, k]`` with
        orthonormal columns, ``S [k]`` descending, ``w ≈ U diag(S) Vᵀ`` on the top.
        A zero matrix gives ``S = 0`` and the first k coordinate vectors as ``U``, ``V``;
        singular vectors of zero (or repeated) singular values are arbitrary.

    Raises:
        TypeError: ``w`` is not a floating-point tensor, or ``dtype`` is not float32/64.
        ValueError: ``w`` not 2-D, empty or non-finite; ``k``, ``oversample``,
            ``n_iter`` or ``tol`` out of range.
    """
    _check_svd_args(w, k, oversample, n_iter, tol, dtype)
    m, n = w.shape
    w64, scale = _float64_and_norm(w)
    if scale == 0.0:
        return _zero_top_svd(m, n, k, w.device)
    l = min(k + oversample, min(m, n))
    if l >= min(m, n):  # no saving: exact float64 SVD
        return _exact_top(w64, k)
    if 1e-15 < scale < 1e15:  # entries safely inside the float32 range: no scaled copy
        a = w64.to(dtype)  # [m, n]
    else:
        a = (w64 / scale).to(dtype)  # [m, n], ‖a‖_F = 1
    q = _subspace_basis(a, k, l, n_iter, tol, seed)
    return _rayleigh_ritz(q, w64, k)


def top_svd(
    w: torch.Tensor,
    k: int,
    *,
    oversample: int = 64,
    n_iter: int = 40,
    tol: float = 1e-4,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k singular triplets of ``w`` by the cheaper of two routes, each as accurate as
    the randomized contract: the trajectory's (and so the training monitor's) SVD.

    Route: min(m, n) ≤ ``EXACT_SVD_MAX_DIM`` (192) — the exact float64 thin SVD
    (:func:`exact_svd`, LAPACK gesdd), truncated to k; otherwise
    :func:`randomized_top_svd` with these settings (float32 iteration). The exact route
    is at least as accurate (it is the reference the randomized one is tested against),
    and on small matrices cheaper: see ``EXACT_SVD_MAX_DIM`` for the measured crossover.
    The two routes agree to the randomized contract (σ1 1e-4, top-32 values 1e-3
    relative, Sim_16 1e-3), not bitwise.

    Args:
        w, k, oversample, n_iter, tol, seed: as :func:`randomized_top_svd`.

    Returns:
        ``(U [m, k], S [k], V [n, k])`` float64 on ``w``'s device; a zero matrix gives
        ``S = 0`` and coordinate vectors, as :func:`randomized_top_svd`.

    Raises:
        TypeError, ValueError: as :func:`randomized_top_svd`.
    """
    _check_svd_args(w, k, oversample, n_iter, tol, torch.float32)
    m, n = w.shape
    if min(m, n) > EXACT_SVD_MAX_DIM:
        return randomized_top_svd(w, k, oversample=oversample, n_iter=n_iter, tol=tol, seed=seed)
    w64, scale = _float64_and_norm(w)
    if scale == 0.0:
        return _zero_top_svd(m, n, k, w.device)
    return _exact_top(w64, k)


def exact_svd(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``w = U diag(S) Vᵀ`` in float64 (LAPACK gesdd), computed on the tall side.

    The reference the randomized path is measured against. A wide matrix is decomposed
    as its transpose (gesdd is ~3× slower on wide inputs), so
    ``U [m, r]``, ``S [r]``, ``V [n, r]`` with r = min(m, n).

    Args:
        w: ``[m, n]`` floating-point matrix.

    Returns:
        ``(U, S, V)`` in float64, S descending.
    """
    _check_matrix(w)
    w64 = w.to(torch.float64)
    if w64.shape[0] < w64.shape[1]:
        u, s, vh = torch.linalg.svd(w64.T, full_matrices=False)  # wᵀ = u s vh  ⇒  w = vhᵀ s uᵀ
        return vh.T, s, u
    u, s, vh = torch.linalg.svd(w64, full_matrices=False)
    return u, s, vh.T


def stable_rank(fro_norm_sq: float, sigma1: float) -> float:
    """Stable rank ‖ΔW‖_F² / σ1(ΔW)² from the two norms.

    Formula (SPEC §2; Rudelson & Vershynin 2007)::

        srank = ‖ΔW‖_F² / σ1²,   1 <= srank <= rank(ΔW)

    Args:
        fro_norm_sq: squared Frobenius norm ‖ΔW‖_F², finite, ``>= 0``.
        sigma1: largest singular value σ1 (spectral norm), finite, ``>= 0``.

    Returns:
        The stable rank as a float; NaN when ``sigma1 == 0`` (a zero update has no
        direction, so its stable rank is undefined; our convention).

    Raises:
        ValueError: a negative or non-finite argument, or σ1² > ‖ΔW‖_F² beyond rounding
            (1e-6 relative), which no matrix has.
    """
    fro_norm_sq = float(fro_norm_sq)
    sigma1 = float(sigma1)
    for label, value in (("fro_norm_sq", fro_norm_sq), ("sigma1", sigma1)):
        if not (math.isfinite(value) and value >= 0.0):
            raise ValueError(f"{label} must be finite and >= 0; got {value}")
    if sigma1 == 0.0:
        return float("nan")
    if sigma1 * sigma1 > fro_norm_sq * (1.0 + 1e-6):
        raise ValueError(f"sigma1**2 = {sigma1 * sigma1:g} exceeds fro_norm_sq = {fro_norm_sq:g}")
    return fro_norm_sq / (sigma1 * sigma1)


def stable_rank_of(w: torch.Tensor) -> float:
    """Stable rank ‖w‖_F² / ‖w‖_2² of a matrix, exactly, in float64.

    Convenience for :func:`stable_rank` (same formula and conventions); uses an exact
    spectral norm, so it costs a full SVD. The trajectory uses :func:`stable_rank` with
    σ1 from :func:`top_svd` instead.

    Args:
        w: ``[m, n]`` floating-point matrix, finite.

    Returns:
        The stable rank; NaN for a zero matrix.

    Raises:
        TypeError, ValueError: as :func:`randomized_top_svd` for a bad matrix.
    """
    _check_matrix(w)
    w64 = w.to(torch.float64)
    if not bool(torch.isfinite(w64).all()):
        raise ValueError("matrix has non-finite entries")
    fro_sq = float(w64.pow(2).sum())
    sigma1 = float(torch.linalg.matrix_norm(w64, ord=2))
    return stable_rank(fro_sq, min(sigma1, math.sqrt(fro_sq)))


def hill_alpha(singular_values, k: int = 32) -> float:
    """Hill tail index of the top-k singular values.

    Formula (SPEC §2; Hill 1975, "A simple general approach to inference about the tail
    of a distribution", Ann. Statist. 3(5), with the k-th value as the threshold)::

        α̂ = [ (1/(k−1)) Σ_{i=1}^{k−1} log(σ_i / σ_k) ]⁻¹,   σ_1 >= ... >= σ_k

    For samples of a Pareto law P(X > x) = (x/x_m)^−α, 1/α̂ is the mean of k − 1
    independent Exp(α) variables (Rényi representation), so α̂ has standard error
    ≈ α / √(k − 1). Larger α̂ = lighter tail (a flatter top of the spectrum).

    Args:
        singular_values: 1-D tensor or sequence, at least ``k`` values, finite and
            ``>= 0``; sorted descending here (only the top k are used).
        k: number of top values, ``>= 2`` (k = 32 is our choice; the paper gives none).

    Returns:
        α̂ as a float: NaN when σ_k == 0 (the tail threshold is zero: rank < k),
        +inf when σ_1 == σ_k (no tail: all top-k values equal).

    Raises:
        ValueError: ``k < 2``, fewer than ``k`` values, a negative or non-finite value,
            or a non-1-D input.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"k must be an integer >= 2; got {k!r}")
    s = torch.as_tensor(singular_values).detach().to(device="cpu", dtype=torch.float64)
    if s.dim() != 1:
        raise ValueError(f"singular_values must be 1-D; got shape {tuple(s.shape)}")
    if s.numel() < k:
        raise ValueError(f"hill_alpha needs at least k = {k} singular values; got {s.numel()}")
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError("singular values must be finite and >= 0")
    top = torch.sort(s, descending=True).values[:k]
    sigma_k = float(top[-1])
    if sigma_k == 0.0:
        return float("nan")
    mean_log = float(torch.log(top[:-1] / sigma_k).mean())
    if mean_log == 0.0:
        return float("inf")
    return 1.0 / mean_log
