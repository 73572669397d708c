"""Cross-run overlap of two update masks, with random baselines (SPEC §2, cross-run overlap).

Two fine-tunes from the same origin (OPD vs RLVR, two seeds) are compared on their
bf16-visible update masks A and B (``geometry.sparsity.bf16_visible_mask``). If B's
entries were placed independently of A at random, |A∩B|/|A| would equal B's density q
and the Jaccard index would equal pq/(p+q−pq), p = density of A.
"""

from __future__ import annotations

import math

import torch

__all__ = ["one_sided_overlap", "jaccard", "jaccard_baseline"]


def _check_masks(a: torch.Tensor, b: torch.Tensor) -> None:
    for label, m in (("a", a), ("b", b)):
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"mask {label} must be a torch.Tensor; got {type(m).__name__}")
        if m.dtype != torch.bool:
            raise TypeError(f"mask {label} must be a bool tensor; got {m.dtype}")
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")


def one_sided_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of A's entries that are also in B.

    Formula::

        overlap(A → B) = |A ∩ B| / |A|;   random baseline = |B| / N (the density of B)

    Args:
        a: bool mask (any shape).
        b: bool mask, same shape.

    Returns:
        The overlap; NaN when A is empty.

    Raises:
        TypeError: a non-bool or non-tensor mask.
        ValueError: shapes differ.
    """
    _check_masks(a, b)
    n_a = int(torch.count_nonzero(a))
    if n_a == 0:
        return float("nan")
    return int(torch.count_nonzero(a & b)) / n_a


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """Jaccard index of two masks.

    Formula (Jaccard 1901)::

        J(A, B) = |A ∩ B| / |A ∪ B|;   random baseline = jaccard_baseline(|A|/N, |B|/N)

    Args:
        a: bool mask (any shape).
        b: bool mask, same shape.

    Returns:
        The index; NaN when both masks are empty.

    Raises:
        TypeError: a non-bool or non-tensor mask.
        ValueError: shapes differ.
    """
    _check_masks(a, b)
    union = int(torch.count_nonzero(a | b))
    if union == 0:
        return float("nan")
    return int(torch.count_nonzero(a & b)) / union


def jaccard_baseline(p: float, q: float) -> float:
    """Expected Jaccard index of two independent random masks of densities p and q.

    Formula: entry-wise independence gives P(in A∩B) = pq and P(in A∪B) = p + q − pq, so
    (to leading order in the number of entries N)::

        J₀(p, q) = pq / (p + q − pq)

    Args:
        p: density of A, in [0, 1].
        q: density of B, in [0, 1].

    Returns:
        The baseline; NaN when ``p == q == 0``.

    Raises:
        ValueError: a density outside [0, 1] or non-finite.
    """
    p, q = float(p), float(q)
    for label, v in (("p", p), ("q", q)):
        if not (math.isfinite(v) and 0.0 <= v <= 1.0):
            raise ValueError(f"density {label} must be in [0, 1]; got {v}")
    denom = p + q - p * q
    if denom == 0.0:
        return float("nan")
    return p * q / denom
