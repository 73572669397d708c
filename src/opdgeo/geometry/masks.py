"""Principal and low-magnitude masks and their overlap with the update (SPEC §1).

The localization diagnostic of Zhu et al. 2025 ("The Path Not Taken", §4), as used by
Shen et al. 2026 §3.2: does the bf16-visible update fall on the entries that carry the
principal (top singular) structure of W0, or on its low-magnitude entries? The random
baseline of ``mask_overlap`` is ``alpha``.

Selection rule shared by both masks (our choice, deterministic): exactly
``n_sel = floor(alpha * N + 1/2)`` entries are selected out of ``N`` (round half up);
among equal scores the entry with the lower flat (row-major) index is selected first.
"""

from __future__ import annotations

import math

import torch

__all__ = ["principal_mask", "low_magnitude_mask", "mask_overlap"]


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
    return alpha


def _count(alpha: float, numel: int) -> int:
    return min(numel, int(math.floor(alpha * numel + 0.5)))


def _select_top(score: torch.Tensor, n_sel: int) -> torch.Tensor:
    """Bool mask of the ``n_sel`` largest entries of ``score``; ties to the lower index.

    O(N): one ``kthvalue`` for the threshold, then the threshold ties in index order.
    """
    flat = score.reshape(-1)
    numel = flat.numel()
    if n_sel <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if n_sel >= numel:
        return torch.ones_like(score, dtype=torch.bool)
    # the n_sel-th largest = the (numel - n_sel + 1)-th smallest
    threshold = torch.kthvalue(flat, numel - n_sel + 1).values
    mask = flat > threshold
    need = n_sel - int(mask.sum())
    ties = torch.nonzero(flat == threshold).squeeze(1)  # ascending flat indices
    mask[ties[:need]] = True
    return mask.reshape(score.shape)


def principal_mask(
    U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, *, rank: int = 64, alpha: float = 0.3
) -> torch.Tensor:
    """Top-``alpha`` fraction of the entries of the rank-r reconstruction of W0, by magnitude.

    Formula (SPEC §1)::

        W0_r = U[:, :r] diag(S[:r]) V[:, :r]ᵀ
        M_princ = the floor(alpha * m * n + 1/2) entries with the largest |W0_r|
                  (ties: lower row-major index first)

    Args:
        U: ``[m, k]`` left singular vectors of W0, descending singular values, ``k >= rank``.
        S: ``[p]`` singular values of W0, descending, ``p >= rank`` (``Subspaces.S`` holds
            all ``min(m, n)`` of them).
        V: ``[n, k']`` right singular vectors, ``k' >= rank``; same dtype family and device.
        rank: ``r``, an int with ``1 <= r <= min(m, n)`` and at most the number of
            columns of ``U`` and ``V`` (default 64, SPEC §1).
        alpha: selected fraction in ``[0, 1]`` (default 0.3, SPEC §1, our choice).

    Returns:
        ``[m, n]`` bool tensor on the inputs' device.

    Raises:
        TypeError: an input is not a tensor, or ``rank`` is not an int.
        ValueError: wrong ndim, inconsistent shapes or devices, ``rank`` out of range
            (the message gives the numbers), ``alpha`` outside ``[0, 1]``, or non-finite
            factors (the caller reports the matrix as non-finite instead).

    Numerical note: the reconstruction is formed in the factors' dtype (float64 from
    ``top_singular_subspaces`` by default), so the ranking of near-equal magnitudes is not
    decided by float32 rounding.

    Source: Zhu et al. 2025 §4 (principal mask); Shen et al. 2026 §3.2.
    """
    for name, x in (("U", U), ("S", S), ("V", V)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch tensor; got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be floating point; got {x.dtype}")
    if U.ndim != 2 or V.ndim != 2 or S.ndim != 1:
        raise ValueError(
            "expected U [m, k], S [p], V [n, k]; "
            f"got shapes {tuple(U.shape)}, {tuple(S.shape)}, {tuple(V.shape)}"
        )
    if not (U.device == S.device == V.device):
        raise ValueError(f"U, S and V must be on one device; got {U.device}, {S.device}, {V.device}")
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int; got {type(rank).__name__}")
    alpha = _check_alpha(alpha)
    m, n = U.shape[0], V.shape[0]
    if not 1 <= rank <= min(m, n):
        raise ValueError(
            f"rank must be in [1, min(m, n)] = [1, {min(m, n)}] for a {m}x{n} matrix; got {rank}"
        )
    if rank > min(U.shape[1], V.shape[1], S.shape[0]):
        raise ValueError(
            f"rank {rank} exceeds the factors given: U has {U.shape[1]} columns, "
            f"V {V.shape[1]}, S {S.shape[0]} values"
        )
    dtype = torch.promote_types(torch.promote_types(U.dtype, V.dtype), S.dtype)
    Ur = U[:, :rank].to(dtype)
    Sr = S[:rank].to(dtype)
    Vr = V[:, :rank].to(dtype)
    if not (torch.isfinite(Ur).all() and torch.isfinite(Sr).all() and torch.isfinite(Vr).all()):
        raise ValueError("U, S, V contain non-finite values")
    recon = (Ur * Sr) @ Vr.T  # [m, n]
    return _select_top(recon.abs_(), _count(alpha, m * n))


def low_magnitude_mask(w0: torch.Tensor, *, alpha: float = 0.3) -> torch.Tensor:
    """Bottom-``alpha`` fraction of the entries of W0 by magnitude.

    Formula (SPEC §1)::

        M_low = the floor(alpha * N + 1/2) entries with the smallest |w0|
                (ties: lower row-major index first), N = w0.numel()

    Args:
        w0: origin weights, any shape, any floating dtype (magnitudes compared exactly:
            bf16/fp16 are widened to float32, which holds them exactly).
        alpha: selected fraction in ``[0, 1]`` (default 0.3, SPEC §1, our choice).

    Returns:
        Bool tensor of ``w0``'s shape.

    Raises:
        TypeError: ``w0`` is not a tensor.
        ValueError: ``w0`` not floating point, ``alpha`` outside ``[0, 1]``, or ``w0``
            contains NaN/Inf (the caller reports the matrix as non-finite instead).

    Source: Zhu et al. 2025 §4 (low-magnitude mask); Shen et al. 2026 §3.2.
    """
    if not isinstance(w0, torch.Tensor):
        raise TypeError(f"w0 must be a torch tensor; got {type(w0).__name__}")
    if not w0.is_floating_point():
        raise ValueError(f"w0 must be floating point; got {w0.dtype}")
    alpha = _check_alpha(alpha)
    mag = w0.to(torch.promote_types(w0.dtype, torch.float32)).abs()
    if not torch.isfinite(mag).all():
        raise ValueError("w0 contains non-finite values")
    # bottom-n of |w0| = top-n of -|w0|; ties still go to the lower index
    return _select_top(mag.neg_(), _count(alpha, w0.numel()))


def mask_overlap(mask: torch.Tensor, update_mask: torch.Tensor) -> float:
    """Fraction of the updated entries that fall inside ``mask``.

    Formula (SPEC §1)::

        overlap(M) = |M ∩ M_upd| / |M_upd|

    Its random baseline is the fraction selected by ``mask`` (``alpha``).

    Args:
        mask: bool tensor (e.g. ``principal_mask`` or ``low_magnitude_mask``).
        update_mask: bool tensor of the same shape and device (``bf16_visible_mask``).

    Returns:
        Python float in ``[0, 1]``; ``nan`` when ``update_mask`` is empty (no visible
        update: the overlap is undefined, and means over matrices should skip it).

    Raises:
        TypeError: an input is not a tensor.
        ValueError: an input is not bool, or the shapes or devices differ.

    Source: Zhu et al. 2025 §4; Shen et al. 2026 §3.2 (Table 1, overlap columns).
    """
    for name, x in (("mask", mask), ("update_mask", update_mask)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch tensor; got {type(x).__name__}")
        if x.dtype != torch.bool:
            raise ValueError(f"{name} must be a bool tensor; got {x.dtype}")
    if mask.shape != update_mask.shape:
        raise ValueError(
            "mask and update_mask must have the same shape; "
            f"got {tuple(mask.shape)} and {tuple(update_mask.shape)}"
        )
    if mask.device != update_mask.device:
        raise ValueError(
            f"mask and update_mask must be on one device; got {mask.device} and {update_mask.device}"
        )
    n_upd = int(torch.count_nonzero(update_mask))
    if n_upd == 0:
        return float("nan")
    return int(torch.count_nonzero(mask & update_mask)) / n_upd
