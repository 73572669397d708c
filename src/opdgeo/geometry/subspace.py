"""Subspace similarity to the final update and the locking step (SPEC §2).

Sim_K compares the top-K right singular subspaces of two updates (the input-side
directions a fine-tune writes into); the locking step is the first checkpoint from
which the update's subspace stays close to its final one (our addition to the paper).
"""

from __future__ import annotations

import math

import torch

__all__ = ["subspace_similarity", "locking_step"]

# Orthonormality tolerance of the inputs of ``subspace_similarity``: float32 singular
# vectors are orthonormal to ~1e-6; a non-orthonormal input (e.g. rows of Vᵀ passed as
# columns, or unnormalized vectors) is off by O(1).
_ORTHO_TOL = 1e-4


def _check_basis(label: str, v: torch.Tensor, K: int) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{label} must be a torch.Tensor; got {type(v).__name__}")
    if v.dim() != 2:
        raise ValueError(f"{label} must be 2-D [n, >=K]; got shape {tuple(v.shape)}")
    if v.shape[1] < K:
        raise ValueError(f"{label} has {v.shape[1]} columns; K = {K} needed")
    vk = v[:, :K].to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(vk).all()):
        raise ValueError(f"{label} has non-finite entries")
    gram_err = float((vk.T @ vk - torch.eye(K, dtype=torch.float64)).abs().max())
    if gram_err > _ORTHO_TOL:
        raise ValueError(f"{label}[:, :{K}] columns are not orthonormal (max |VᵀV − I| = {gram_err:.2g})")
    return vk


def subspace_similarity(V_a: torch.Tensor, V_b: torch.Tensor, K: int = 16) -> float:
    """Similarity of two K-dimensional subspaces: mean squared cosine of their principal angles.

    Formula (SPEC §2; Shen et al. 2026 §4, after Zhu et al. 2025)::

        Sim_K = ‖V_a[:, :K]ᵀ V_b[:, :K]‖_F² / K = (1/K) Σ_i cos² θ_i ∈ [0, 1]

    1 for the same subspace, K'/K when a K'-dimensional subspace is shared and the rest
    is orthogonal, and K/n in expectation for two independent uniformly random
    subspaces of R^n. Computed in float64.

    Args:
        V_a: ``[n, >=K]`` orthonormal columns (e.g. top right singular vectors, in
            descending order of singular value); only the first K columns are used.
        V_b: ``[n, >=K]`` likewise, same ``n``.
        K: subspace dimension, ``>= 1`` (K = 16 in the paper).

    Returns:
        Sim_K as a float.

    Raises:
        ValueError: ``K < 1``, shapes that are not ``[n, >=K]`` with a common ``n``,
            non-finite entries, or columns that are not orthonormal (to 1e-4).
        TypeError: a non-tensor input.
    """
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"K must be an integer >= 1; got {K!r}")
    a = _check_basis("V_a", V_a, K)
    b = _check_basis("V_b", V_b, K)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"V_a and V_b have different row counts: {a.shape[0]} vs {b.shape[0]}")
    return float((a.T @ b).pow(2).sum()) / K  # [K, K] cosines


def locking_step(steps, sims, *, threshold: float = 0.8) -> int | None:
    """First step from which the similarity stays at or above ``threshold`` to the end.

    Formula (SPEC §2, our addition)::

        t* = min { s_j : Sim(s_i) >= threshold for every i >= j }

    NaN similarities count as below the threshold (an undefined subspace is not
    locked). The trajectory passes the checkpoints before the final one: the final
    checkpoint is the reference of Sim_K (Sim = 1 by construction), so a run whose only
    checkpoint above the threshold is the final one does not lock (our convention).

    Args:
        steps: training steps, strictly increasing integers.
        sims: the similarity at each step, same length.
        threshold: the locking level (0.8 in SPEC §2).

    Returns:
        The locking step, or ``None`` when the last similarity is below the threshold
        (or NaN) or there are no steps.

    Raises:
        ValueError: different lengths, non-increasing or non-integer steps, a
            non-finite threshold.
    """
    steps = list(steps)
    sims = [float(s) for s in sims]
    if len(steps) != len(sims):
        raise ValueError(f"steps and sims differ in length: {len(steps)} vs {len(sims)}")
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
        raise ValueError(f"threshold must be a finite number; got {threshold!r}")
    for s in steps:
        if isinstance(s, bool) or not isinstance(s, int):
            raise ValueError(f"steps must be integers; got {s!r}")
    for prev, cur in zip(steps, steps[1:]):
        if cur <= prev:
            raise ValueError(f"steps must be strictly increasing; got {prev} then {cur}")
    locked = None
    for step, sim in zip(reversed(steps), reversed(sims)):
        if not sim >= threshold:  # NaN is not locked
            break
        locked = step
    return locked
