"""The study's per-token controls (SPEC §3 "Controls"): token sparsification and the
sample filter of OPD/RLVR mixing.

The mixed advantage itself is ``advantages.combine_advantages`` (one implementation; it
skips zero-weight terms so the mixing limits are the pure runs bit for bit); the
off-policy importance ratio and its clipping are ``losses.policy_gradient_loss`` with the
behaviour log-probs as the reference (the loop's ``clip_range`` picks ε).

Pure torch functions: no I/O, no config, no distributed calls. The training loop
composes them with ``opdgeo.training.advantages`` and ``opdgeo.training.losses``; the
subspace projection lives in ``projection.py`` and the geometry monitor in ``monitor.py``.

Notation (STYLE.md): N sequences (B prompts × G samples), T response positions
(padded), ``response_mask`` [N, T] bool marks the real response tokens of each row, and
``gaps`` r_t = log π_student(a_t|s_t) − log π_teacher(a_t|s_t) [N, T].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "keep_counts",
    "topkl_keep_mask",
    "random_keep_mask",
    "rescale_kept",
    "SparsifyStats",
    "SPARSIFY_SUMS",
    "sparsify_sums",
    "sparsify_stats",
    "mixed_keep_mask",
]

# ρ·T is rounded to this many decimals before the ceiling, so that e.g. 0.7·10 (which is
# 7.000000000000001 in binary floating point) keeps 7 tokens, not 8.
_CEIL_DECIMALS = 9


def _check_response_mask(response_mask: torch.Tensor) -> None:
    if response_mask.dtype != torch.bool or response_mask.dim() != 2:
        raise ValueError(
            f"response_mask must be a 2-D bool tensor [N, T]; got {response_mask.dtype} of shape {tuple(response_mask.shape)}"
        )


def _check_fraction(fraction: float) -> None:
    if not (0.0 < float(fraction) <= 1.0):
        raise ValueError(f"fraction must be in (0, 1]; got {fraction}")


def keep_counts(response_mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """Number of response tokens each sample keeps: k_i = ceil(ρ · T_i).

    Args:
        response_mask: [N, T] bool, True on the response tokens of each row.
        fraction: ρ ∈ (0, 1].

    Returns:
        [N] int64, with T_i = response_mask[i].sum(); k_i = 0 iff T_i = 0, and
        1 ≤ k_i ≤ T_i otherwise.

    Raises:
        ValueError: a non-bool or non-2-D mask, ρ outside (0, 1].

    Note:
        ρ·T_i is computed in float64 and rounded to 9 decimals before the ceiling, so
        binary rounding (0.7 · 10 = 7.000000000000001) cannot add a token.
    """
    _check_response_mask(response_mask)
    _check_fraction(fraction)
    lengths = response_mask.sum(dim=1).to(torch.float64)  # [N]
    return torch.ceil(torch.round(lengths * float(fraction), decimals=_CEIL_DECIMALS)).to(torch.int64)


def _keep_top(scores: torch.Tensor, response_mask: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Keep, per row, the ``counts[i]`` response positions with the largest score.

    Ties are broken by position (the earlier token wins): a stable descending sort.
    """
    keyed = scores.masked_fill(~response_mask, float("-inf"))  # [N, T], padding sorts last
    order = torch.sort(keyed, dim=1, descending=True, stable=True).indices  # [N, T]
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return (ranks < counts.to(ranks.device)[:, None]) & response_mask


def topkl_keep_mask(gaps: torch.Tensor, response_mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """The "top-KL" token-sparsification mask: per sample, the ceil(ρ·T) largest signed gaps.

    m_t = 1 iff r_t is among the k = ceil(ρ·T) largest values of
    {r_t : t a response token of the sample}, r_t = log π_s(a_t|s_t) − log π_t(a_t|s_t)
    (signed, not |r_t|: the tokens the student over-weights most relative to the teacher).

    Args:
        gaps: [N, T] float, r_t; values at padding positions are ignored (may be anything,
            including non-finite).
        response_mask: [N, T] bool.
        fraction: ρ ∈ (0, 1].

    Returns:
        [N, T] bool keep mask m, a subset of ``response_mask`` with exactly
        ``keep_counts(response_mask, ρ)[i]`` True entries in row i.

    Raises:
        ValueError: shape mismatch, a non-finite gap on a response token, ρ outside (0, 1].

    Ties: equal gaps are ranked by position, the earlier token first (stable sort), so
    the mask is a deterministic function of its inputs.

    Source: SPEC §3 "Token sparsification" (Shen et al. 2026, RQ3 top-KL condition).
    """
    _check_response_mask(response_mask)
    if gaps.shape != response_mask.shape:
        raise ValueError(f"gaps {tuple(gaps.shape)} and response_mask {tuple(response_mask.shape)} differ in shape")
    if not torch.isfinite(gaps[response_mask]).all():
        raise ValueError("gaps has a non-finite value on a response token")
    counts = keep_counts(response_mask, fraction)
    return _keep_top(gaps.to(torch.float64), response_mask, counts)


def random_keep_mask(response_mask: torch.Tensor, fraction: float, *, generator: torch.Generator) -> torch.Tensor:
    """The "random" token-sparsification mask: per sample, a uniform draw of ceil(ρ·T) tokens.

    Each row keeps a uniformly random k-subset (k = ceil(ρ·T)) of its response tokens:
    the k response positions with the largest i.i.d. U(0, 1) keys (a random permutation
    restricted to the response).

    Args:
        response_mask: [N, T] bool.
        fraction: ρ ∈ (0, 1].
        generator: a seeded CPU ``torch.Generator``; the draw consumes exactly N·T float64
            uniforms from it and nothing from the global RNG, so rollout sampling is
            unaffected by the choice of mode.

    Returns:
        [N, T] bool keep mask, a subset of ``response_mask`` with ``keep_counts`` entries per row.

    Raises:
        ValueError: a non-bool or non-2-D mask, ρ outside (0, 1].

    Source: SPEC §3 "Token sparsification" (random control).
    """
    counts = keep_counts(response_mask, fraction)
    keys = torch.rand(response_mask.shape, generator=generator, dtype=torch.float64)  # [N, T], CPU
    return _keep_top(keys.to(response_mask.device), response_mask, counts)


def rescale_kept(gaps: torch.Tensor, keep_mask: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """The kept, rescaled per-token signal r̃_t = (T / Σ_t m_t) · m_t · r_t.

    Rescaling keeps the per-sample scale of the signal: with ρ = 1 it is the identity,
    and Σ_t r̃_t = T · mean_{kept} r_t.

    Args:
        gaps: [N, T] float r_t.
        keep_mask: [N, T] bool m (a subset of ``response_mask``).
        response_mask: [N, T] bool; T = the row's number of response tokens.

    Returns:
        [N, T] tensor of ``gaps.dtype``; zero off the kept tokens and on rows with no kept
        token (T = 0). Non-finite gaps on dropped or padding positions do not propagate.

    Raises:
        ValueError: shape mismatch, a keep mask that is not a subset of the response.

    Source: SPEC §3 "Token sparsification".
    """
    _check_response_mask(response_mask)
    if gaps.shape != response_mask.shape or keep_mask.shape != response_mask.shape:
        raise ValueError(
            f"gaps {tuple(gaps.shape)}, keep_mask {tuple(keep_mask.shape)} and response_mask "
            f"{tuple(response_mask.shape)} must have the same shape"
        )
    if (keep_mask & ~response_mask).any():
        raise ValueError("keep_mask keeps a token outside response_mask")
    lengths = response_mask.sum(dim=1, keepdim=True).to(torch.float64)  # [N, 1]
    kept = keep_mask.sum(dim=1, keepdim=True).to(torch.float64)  # [N, 1]
    scale = torch.where(kept > 0, lengths / kept.clamp(min=1.0), torch.zeros_like(kept))  # [N, 1]
    out = torch.where(keep_mask, gaps * scale.to(gaps.dtype), torch.zeros((), dtype=gaps.dtype, device=gaps.device))
    return out


@dataclass(frozen=True)
class SparsifyStats:
    """What a sparsified batch kept (pooled over the batch's response tokens).

    Attributes:
        kept_fraction: Σ m / Σ response tokens (≥ ρ because of the ceiling); NaN on an
            empty batch.
        kept_abs_share: Σ_kept |r_t| / Σ_response |r_t|, the share of the gap mass the
            mask keeps (1 = everything; ≈ ρ for a random mask, more for top-KL when the
            large gaps are positive); NaN when Σ|r_t| = 0.
    """

    kept_fraction: float
    kept_abs_share: float

    def as_metrics(self) -> dict[str, float]:
        return {"sparsify/kept_fraction": self.kept_fraction, "sparsify/kept_abs_share": self.kept_abs_share}


SPARSIFY_SUMS = ("kept_tokens", "response_tokens", "kept_abs", "total_abs")
"""Keys of ``sparsify_sums``: additive over micro-batches and ranks."""


def sparsify_sums(gaps: torch.Tensor, keep_mask: torch.Tensor, response_mask: torch.Tensor) -> dict[str, float]:
    """Additive pieces of ``SparsifyStats`` for one micro-batch (float64).

    Returns:
        ``{"kept_tokens": Σ m, "response_tokens": Σ response, "kept_abs": Σ_kept |r_t|,
        "total_abs": Σ_response |r_t|}``; sum them over micro-batches and ranks, then call
        ``sparsify_stats``. Non-finite gaps off the response are ignored.
    """
    _check_response_mask(response_mask)
    kept = keep_mask & response_mask
    absg = gaps.detach().to(torch.float64).abs()
    zero = torch.zeros((), dtype=torch.float64, device=absg.device)
    return {
        "kept_tokens": float(kept.sum()),
        "response_tokens": float(response_mask.sum()),
        "kept_abs": float(torch.where(kept, absg, zero).sum()),
        "total_abs": float(torch.where(response_mask, absg, zero).sum()),
    }


def sparsify_stats(sums: dict[str, float]) -> SparsifyStats:
    """Kept fraction and kept share of Σ|r_t| from (summed) ``sparsify_sums``."""
    n, total = sums["response_tokens"], sums["total_abs"]
    return SparsifyStats(
        kept_fraction=sums["kept_tokens"] / n if n else float("nan"),
        kept_abs_share=sums["kept_abs"] / total if total > 0 else float("nan"),
    )


def mixed_keep_mask(grpo_keep: torch.Tensor, opd_weight: float) -> torch.Tensor:
    """Which samples a mixed objective trains on: GRPO's dynamic filter applies only without OPD.

    GRPO drops the groups whose rewards are all equal (their A_GRPO is 0). Under mixing
    A = α·A_OPD + (1 − α)·A_GRPO a sample is dropped iff *every* term with a non-zero weight
    drops it. OPD never drops a sample, so with α ≠ 0 every sample is kept (a zero-variance
    group still carries its α·A_OPD signal, and its GRPO term is exactly 0), and with
    α = 0 the GRPO filter is used unchanged. So α = 1 is the pure OPD run and α = 0 the
    pure RLVR run, including the token count that normalizes the token-level mean, and a
    mostly-OPD mix (α = 0.99) does not lose the OPD signal of every all-correct or
    all-wrong group. **(our choice)**

    Args:
        grpo_keep: [N] bool, GRPO's keep mask (from ``grpo_advantages``).
        opd_weight: α, the weight of the OPD signal (any real; only α = 0 matters).

    Returns:
        [N] bool: ``grpo_keep`` itself when α = 0, all True otherwise.
    """
    if float(opd_weight) == 0.0:
        return grpo_keep
    return torch.ones_like(grpo_keep, dtype=torch.bool)
