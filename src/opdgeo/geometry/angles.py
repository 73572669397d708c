"""Principal angles between subspaces (SPEC §1, principal-angle rotation)."""

from __future__ import annotations

import math

import torch

__all__ = ["principal_angles"]

# sin²θ_max below this (θ_max < 44.97°): every cos²θ_i = 1 - sin²θ_i is >= 1/2 with a
# margin of 1e-3, far beyond the rounding of the two SVDs (~k·eps, also in float32), so
# the arcsin/arccos switch would pick arcsin for every angle and the cosines are not
# needed (our shortcut; the result is unchanged).
_ALL_SMALL_SIN2 = 0.5 - 1e-3


def _check_bases(A, B) -> None:
    """The input checks of ``principal_angles`` (its Raises section)."""
    for name, x in (("A", A), ("B", B)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch tensor; got {type(x).__name__}")
        if x.ndim != 2:
            raise ValueError(f"{name} must be 2-D [m, k]; got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be floating point; got {x.dtype}")
        if x.shape[1] > x.shape[0]:
            raise ValueError(
                f"{name} has {x.shape[1]} columns but only {x.shape[0]} rows; "
                "it cannot have orthonormal columns"
            )
    if A.shape[0] != B.shape[0]:
        raise ValueError(f"A and B must have the same number of rows; got {A.shape[0]} and {B.shape[0]}")
    if A.device != B.device:
        raise ValueError(f"A and B must be on the same device; got {A.device} and {B.device}")


def principal_angles(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Principal angles between the column spaces of two orthonormal bases, ascending.

    Formula (Björck & Golub 1973; sine-cosine form of Knyazev & Argentati 2002, as in
    ``scipy.linalg.subspace_angles``). With ``k = min(k_A, k_B)`` and the narrower basis
    projected out by the wider one (``B`` when ``k_A >= k_B``)::

        cos θ_i = σ_i(Aᵀ B)                       (descending σ -> ascending θ)
        sin θ_i = σ_{k+1-i}(B - A (Aᵀ B))        (ascending σ  -> ascending θ)
        θ_i = arcsin(sin θ_i)   if cos² θ_i >= 1/2   (θ_i <= π/4)
              arccos(cos θ_i)   otherwise

    Numerical note: ``arccos`` of a cosine near 1 loses everything below ~1e-8 rad in
    float64 (``cos θ = 1 - θ²/2``), so small angles come from the sines, which carry full
    relative accuracy there; large angles come from the cosines for the symmetric reason.
    When the largest angle is below 44.97° (``sin² < 0.499``), every angle takes the
    arcsin branch, so the cosines' k x k SVD is skipped (typical of fine-tunes, whose
    angles are small); the returned angles are the same. Identical inputs
    (``torch.equal(A, B)``) return exact zeros, so an unchanged matrix has angle 0, not
    rounding noise of ~1e-8 degrees. (scipy 1.17's ``subspace_angles``
    applies its arcsin/arccos switch in reversed order when small and large angles mix,
    returning ~1.5e-8 rad for a 1e-9 rad angle there; this function does not.)

    Args:
        A: ``[m, k_A]`` floating tensor with orthonormal columns (not checked: the
            caller passes singular vectors; an unnormalized basis gives wrong angles).
        B: ``[m, k_B]`` floating tensor with orthonormal columns, same ``m`` and device.
            ``k_A != k_B`` is allowed: the ``min(k_A, k_B)`` angles between the two
            subspaces are returned, as in scipy.

    Returns:
        ``[min(k_A, k_B)]`` tensor of angles in radians in ``[0, π/2]``, ascending, in
        the promoted dtype of the inputs (float32 at least; pass float64 bases for the
        SPEC's precision). Empty when either basis has no column.

    Raises:
        TypeError: an input is not a tensor.
        ValueError: an input is not 2-D or not floating point, the row counts or
            devices differ, or a basis has more columns than rows.

    Source: SPEC §1 (principal-angle rotation); Shen et al. 2026 §3.2; Zhu et al. 2025
    §4; Knyazev & Argentati, SIAM J. Sci. Comput. 23(6), 2002.
    """
    _check_bases(A, B)
    dtype = torch.promote_types(torch.promote_types(A.dtype, B.dtype), torch.float32)
    A = A.to(dtype)
    B = B.to(dtype)
    if A.shape[1] < B.shape[1]:
        A, B = B, A  # project the narrower basis (B) out by the wider one (A)
    k = B.shape[1]
    if k == 0:
        return torch.zeros(0, dtype=dtype, device=A.device)
    if torch.equal(A, B):
        return torch.zeros(k, dtype=dtype, device=A.device)

    AtB = A.T @ B  # [k_A, k]
    residual = B - A @ AtB  # [m, k]: the part of span(B) outside span(A)
    sin = torch.linalg.svdvals(residual).flip(0).clamp_(0.0, 1.0)  # ascending -> angles ascending
    if float(sin[-1]) ** 2 <= _ALL_SMALL_SIN2:
        # Every angle is below 45° (by a margin far above rounding), so the rule below
        # takes arcsin everywhere and the cosines are never used: skip their k x k SVD.
        theta = torch.arcsin(sin)
    else:
        cos = torch.linalg.svdvals(AtB)[:k].clamp_(0.0, 1.0)  # descending -> angles ascending
        small = cos.square() >= 0.5
        theta = torch.where(small, torch.arcsin(sin), torch.arccos(cos))
    # Rounding can break monotonicity only at the arcsin/arccos switch (~π/4), by ~eps.
    theta, _ = torch.sort(theta)
    return theta.clamp_(0.0, math.pi / 2)
