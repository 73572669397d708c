"""Per-token advantages: where SFT, RLVR and OPD differ (SPEC §3).

Pure torch; no I/O, config or distributed calls. Each function returns the per-token
weight that the one policy-gradient core (``losses.policy_gradient_loss``) multiplies
with the importance ratio. Composition of several named signals (the study's objective
mixing) is ``combine_advantages``.

Shapes: ``B`` prompts, ``G`` samples per prompt, ``N = B*G`` sequences, ``T`` response tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch

__all__ = [
    "grpo_advantages",
    "opd_advantages",
    "broadcast_to_tokens",
    "combine_advantages",
]


def grpo_advantages(
    rewards: torch.Tensor,
    group_size: int,
    eps: float = 1e-6,
    *,
    std: Literal["sample", "population"] = "sample",
    filter_zero_variance: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-normalized GRPO advantages with dynamic filtering of zero-variance groups.

    For group ``g`` (the ``G`` consecutive samples of one prompt) with rewards r_1..r_G::

        A_i = (r_i - mean_g(r)) / (std_g(r) + eps)

    ``std="sample"`` uses the unbiased estimator sqrt(Σ(r-mean)² / (G-1)) (as ``torch.std``
    in TRL and verl); ``std="population"`` divides by G. **(our choice, SPEC §3 is silent;
    default ``"sample"``.)** A group whose rewards are all exactly equal carries no signal:
    its advantages are 0 and, with ``filter_zero_variance`` (DAPO's dynamic filtering), its
    ``keep`` entries are False so its tokens also leave the token-mean denominator.

    Args:
        rewards: ``[B*G]`` float, grouped consecutively (``rewards.view(B, G)``); finite.
        group_size: ``G >= 1``.
        eps: added to the std (GRPO's epsilon), ``>= 0``.
        std: ``"sample"`` (ddof = 1) or ``"population"`` (ddof = 0).
        filter_zero_variance: drop zero-variance groups (keep = False).

    Returns:
        ``(advantages [B*G] float32, keep [B*G] bool)``. Computed in float64 internally.

    Raises:
        ValueError: non-1-D rewards, length not a multiple of ``group_size``, ``G < 1``,
        ``eps < 0``, unknown ``std`` or non-finite rewards.

    Source: Shao et al. 2024 (DeepSeekMath, GRPO, §4.1.2 outcome supervision);
    Yu et al. 2025 (DAPO, §3.2 dynamic sampling) for dropping zero-variance groups.
    Note: with G = 1 every group has zero variance, so every sample gets A = 0.
    """
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [B*G]; got shape {tuple(rewards.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1; got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"len(rewards) = {rewards.numel()} is not a multiple of group_size = {group_size}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0; got {eps}")
    if std not in ("sample", "population"):
        raise ValueError(f"std must be 'sample' or 'population'; got {std!r}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards must be finite")
    r = rewards.detach().to(torch.float64).view(-1, group_size)  # [B, G]
    mean = r.mean(dim=1, keepdim=True)
    varying = (r.amax(dim=1) != r.amin(dim=1)).unsqueeze(1)  # [B, 1]; exact, no tolerance
    if group_size > 1:
        sd = r.std(dim=1, keepdim=True, correction=1 if std == "sample" else 0)
    else:
        sd = torch.zeros_like(mean)
    adv = torch.where(varying, (r - mean) / (sd + eps), torch.zeros_like(r))
    keep = varying.expand_as(r) if filter_zero_variance else torch.ones_like(r, dtype=torch.bool)
    return adv.reshape(-1).to(torch.float32), keep.reshape(-1).clone()


def opd_advantages(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """On-policy-distillation advantage: the negative per-token log-ratio, no gradient.

    ::

        r_t = log π_student(a_t | s_t) - log π_teacher(a_t | s_t),     A_t = -r_t

    on the sampled token a_t, with the student log-prob taken at rollout time and the
    teacher scoring at temperature 1. ``A_t`` is a stop-gradient advantage for the
    policy-gradient loss; it is *not* a backpropagated KL estimate (whose gradient is wrong
    for this objective).

    Args:
        student_logprobs: ``[N, T]`` float.
        teacher_logprobs: ``[N, T]`` float, same shape.
        mask: optional ``[N, T]`` bool response mask; positions outside it get 0 (so padding
            that holds ``-inf`` or garbage never leaks a NaN).

    Returns:
        ``[N, T]`` float32, detached. Teacher ≡ student gives exactly 0.

    Raises:
        ValueError: shape mismatch.

    Source: Agarwal et al. 2024 (GKD) and Lu & Thinking Machines 2025 ("On-Policy
    Distillation", per-token reverse-KL reward); Shen et al. 2026 §2 (SPEC §3).
    """
    if student_logprobs.shape != teacher_logprobs.shape:
        raise ValueError(
            f"student_logprobs {tuple(student_logprobs.shape)} and teacher_logprobs "
            f"{tuple(teacher_logprobs.shape)} differ in shape"
        )
    adv = -(student_logprobs.detach().float() - teacher_logprobs.detach().float())
    if mask is not None:
        if mask.shape != adv.shape:
            raise ValueError(f"mask {tuple(mask.shape)} does not match logprobs {tuple(adv.shape)}")
        adv = torch.where(mask.bool(), adv, torch.zeros_like(adv))
    return adv


def broadcast_to_tokens(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Broadcast one value per sequence to its response tokens: ``out[n, t] = values[n]·mask[n, t]``.

    Args:
        values: ``[N]`` float (e.g. GRPO advantages).
        mask: ``[N, T]`` bool response mask.

    Returns:
        ``[N, T]`` float32, 0 outside the mask.

    Raises:
        ValueError: ``values`` not ``[N]`` for ``mask`` of shape ``[N, T]``.
    """
    if mask.ndim != 2 or values.shape != (mask.shape[0],):
        raise ValueError(f"values {tuple(values.shape)} must be [N] for mask {tuple(mask.shape)} [N, T]")
    out = values.detach().float().unsqueeze(1).expand(mask.shape)  # [N, T]
    return torch.where(mask.bool(), out, torch.zeros_like(out))


def combine_advantages(signals: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """Weighted sum of named per-token advantage signals, not re-normalized.

    ::

        A = Σ_k w_k · A_k         (e.g. A = α·A_opd + (1-α)·A_rlvr, SPEC §3 objective mixing)

    Terms with ``w_k == 0`` are skipped entirely and a term with ``w_k == 1`` is taken as
    is, so ``{"opd": 1, "rlvr": 0}`` returns ``signals["opd"]`` bit for bit (the mixing limits
    must equal the pure runs exactly).

    Args:
        signals: name -> ``[N, T]`` float tensor, all the same shape.
        weights: name -> weight; every name with a nonzero weight must be in ``signals``.

    Returns:
        ``[N, T]`` float32.

    Raises:
        ValueError: no nonzero weight, a missing signal, or shapes that differ.
    """
    terms = [(name, float(w)) for name, w in weights.items() if float(w) != 0.0]
    if not terms:
        raise ValueError(f"advantage weights {dict(weights)} are all zero")
    missing = [name for name, _ in terms if name not in signals]
    if missing:
        raise ValueError(f"advantage signals {missing} are weighted but were not computed")
    shape = signals[terms[0][0]].shape
    total = None
    for name, w in terms:
        a = signals[name]
        if a.shape != shape:
            raise ValueError(f"advantage signal {name!r} has shape {tuple(a.shape)}, expected {tuple(shape)}")
        term = a.float() if w == 1.0 else w * a.float()
        total = term if total is None else total + term
    return total
