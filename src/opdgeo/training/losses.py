"""Per-token losses and THE reduction (SPEC §3).

Pure torch. Every loss returns per-token values ``[N, T]`` (0 outside the mask); the only
place that averages is ``masked_mean``. The training loop passes it the *global* token
count (all micro-batches and all ranks), so summing the micro-batch losses over gradient
accumulation and ranks gives exactly the token-level mean of the full batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["PolicyLoss", "policy_gradient_loss", "sft_loss", "masked_mean", "masked_sum", "linear_logprobs"]


class PolicyLoss(NamedTuple):
    """Output of ``policy_gradient_loss`` (all ``[N, T]``; zero / False outside the mask)."""

    loss: torch.Tensor  # per-token clipped-surrogate loss, differentiable
    ratio: torch.Tensor  # importance ratio exp(logprobs - old_logprobs), detached
    clipped: torch.Tensor  # bool: the clipped branch is active (the token has zero gradient)


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shapes differ: {shapes}")


def policy_gradient_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
) -> PolicyLoss:
    """PPO clipped surrogate per token, with asymmetric ("clip-higher") clipping.

    ::

        ρ_t = exp(log π_θ(a_t|s_t) - log π_old(a_t|s_t))
        ℓ_t = -min(ρ_t·A_t, clip(ρ_t, 1 - ε_low, 1 + ε_high)·A_t)

    The clipped branch is active (zero gradient) when A_t > 0 and ρ_t > 1 + ε_high, or
    A_t < 0 and ρ_t < 1 - ε_low. At ρ = 1, ∇ℓ_t = -A_t·∇log π_θ(a_t|s_t): with A ≡ 1 this
    is exactly the gradient of ``sft_loss``.

    Args:
        logprobs: ``[N, T]`` float, log π_θ of the sampled tokens, with gradient.
        old_logprobs: ``[N, T]`` float, log π_old (the policy that the ratio is taken
            against; no gradient). For off-policy rollouts pass the behaviour log-probs.
        advantages: ``[N, T]`` float, treated as constants (detached).
        mask: ``[N, T]`` bool, the tokens that count.
        eps_low, eps_high: clip range ``[1 - eps_low, 1 + eps_high]``; ``0 <= eps_low <= 1``,
            ``eps_high >= 0``.

    Returns:
        ``PolicyLoss(loss, ratio, clipped)``, all 0 / False outside the mask. Masked
        positions may hold -inf or NaN log-probs without producing a NaN.

    Raises:
        ValueError: shape mismatch or an invalid clip range.

    Source: Schulman et al. 2017 (PPO, Eq. 7); Shao et al. 2024 (GRPO, Eq. 3, without the
    KL term); Yu et al. 2025 (DAPO, §3.1 clip-higher, ε_low = 0.2, ε_high = 0.28, and §3.3
    token-level loss).
    """
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    if not (0.0 <= eps_low <= 1.0) or eps_high < 0.0:
        raise ValueError(f"clip range needs 0 <= eps_low <= 1 and eps_high >= 0; got {eps_low}, {eps_high}")
    mask = mask.bool()
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    log_ratio = torch.where(mask, logprobs - old_logprobs.detach(), zero)  # no inf - inf at padding
    ratio = torch.exp(log_ratio)
    adv = torch.where(mask, advantages.detach().to(logprobs.dtype), zero)
    unclipped = ratio * adv
    clipped_obj = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    loss = torch.where(mask, -torch.minimum(unclipped, clipped_obj), zero)
    r = ratio.detach()
    clipped = mask & (((adv > 0) & (r > 1.0 + eps_high)) | ((adv < 0) & (r < 1.0 - eps_low)))
    return PolicyLoss(loss=loss, ratio=torch.where(mask, r, zero), clipped=clipped)


def sft_loss(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on response (demonstration) tokens: ``ℓ_t = -log π_θ(a_t|s_t)`` on the mask.

    Args:
        logprobs: ``[N, T]`` float, log-probs of the demonstration tokens, with gradient.
        mask: ``[N, T]`` bool (prompt and padding excluded).

    Returns:
        ``[N, T]``, 0 outside the mask (padding holding -inf gives 0, not NaN).

    Raises:
        ValueError: shape mismatch.
    """
    _check_same_shape(logprobs=logprobs, mask=mask)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    return torch.where(mask.bool(), -logprobs, zero)


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``Σ_{n,t} values[n,t]·mask[n,t]`` with masked positions contributing exactly 0 (even if inf/NaN)."""
    _check_same_shape(values=values, mask=mask)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    return torch.where(mask.bool(), values, zero).sum()


def masked_mean(
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    denominator: float | int | torch.Tensor | None = None,
) -> torch.Tensor:
    """THE reduction: token-level mean ``Σ values·mask / D``.

    With ``denominator=None``, ``D = Σ mask`` (the tokens of this tensor). The training loop
    passes ``D`` = the number of counted tokens of the whole global batch (every
    micro-batch on every rank, all-reduced), so that the sum of the micro-batch results over
    gradient accumulation and data-parallel ranks is exactly the token-level mean of the
    full batch (DAPO's token-level loss; the same normalizer whatever the split).

    An empty mask (``D == 0``) gives 0 connected to the graph (its gradient is 0), never NaN.

    Args:
        values: ``[N, T]`` per-token values (e.g. ``PolicyLoss.loss``).
        mask: ``[N, T]`` bool.
        denominator: optional global token count, ``>= 0``.

    Returns:
        0-d tensor in ``values.dtype``.

    Raises:
        ValueError: shape mismatch or a negative denominator.

    Source: Yu et al. 2025 (DAPO, §3.3, token-level policy-gradient loss).
    """
    total = masked_sum(values, mask)
    d = mask.bool().sum() if denominator is None else torch.as_tensor(denominator)
    d = d.to(device=total.device, dtype=total.dtype)
    if (d < 0).item():
        raise ValueError(f"denominator must be >= 0; got {d.item()}")
    if d.item() == 0:
        return total * 0.0
    return total / d


def _chunk_logprobs_lse(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's log-probs of ``targets`` and its log-sum-exp (both ``[r]``), with one fp32
    ``[r, V]`` buffer: the logits are scaled, shifted and exponentiated in place (the
    log-sum-exp as ``m + log Σ exp(z − m)``, m the row maximum, as ``torch.logsumexp``
    computes it, without its temporary)."""
    z = torch.nn.functional.linear(hidden, weight)  # [r, V]: one chunk of logits
    z = z.to(torch.promote_types(z.dtype, torch.float32))  # bf16 -> fp32 (a new buffer); float64 stays
    if temperature != 1.0:
        z.div_(temperature)
    picked = z.gather(1, targets.unsqueeze(1)).squeeze(1)
    top = z.amax(dim=-1, keepdim=True)
    lse = z.sub_(top).exp_().sum(dim=-1).log_().add_(top.squeeze(1))
    return picked - lse, lse


class _ChunkLogprobs(torch.autograd.Function):
    """One chunk of ``linear_logprobs`` with a hand-written backward.

    Forward: ``_chunk_logprobs_lse`` (what the no-gradient path runs, so the same bits),
    keeping only the inputs and the ``[r]`` log-sum-exp. Backward recomputes the chunk's projection once (under the
    forward's autocast state) and turns it into the gradient in place::

        ∂logp_r/∂z_r = (onehot(a_r) − softmax(z_r)) / τ

    so a chunk's backward holds one fp32 ``[r, V]`` buffer (plus the projection's output in
    its compute dtype and the casts of the two products) instead of the logits, their fp32
    copy, the softmax, the gather's scattered gradient and their sum that autograd of the
    formula allocates (about 20 bytes a logit under bf16 autocast there, 8 here).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature):
        device = hidden.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        out, lse = _chunk_logprobs_lse(hidden, weight, targets, temperature)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature = temperature
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, lse = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        tau = ctx.temperature
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            z = torch.nn.functional.linear(hidden, weight)
        p = z.to(torch.promote_types(z.dtype, torch.float32))
        del z
        if tau != 1.0:
            p.div_(tau)
        p.sub_(lse.unsqueeze(1)).exp_()  # softmax(z_r), in place
        g = (grad_out / tau).to(p.dtype).unsqueeze(1)  # [r, 1]
        p.mul_(-g).scatter_add_(1, targets.unsqueeze(1), g)  # g·(onehot − softmax) / τ
        grad_hidden = grad_weight = None
        with torch.autocast(device, dtype=dtype, enabled=enabled):  # the casts autograd of linear makes
            if ctx.needs_input_grad[0]:
                grad_hidden = (p @ weight).to(hidden.dtype)
            if ctx.needs_input_grad[1]:
                grad_weight = (p.mT @ hidden).to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, chunk_rows: int,
                    temperature: float = 1.0) -> torch.Tensor:
    """Log-probs of ``targets`` under ``softmax(hidden @ weightᵀ / τ)``, never holding the
    [R, V] logits for backward.

    ::

        logp_r = z_r[a_r] − logsumexp_v z_r[v],   z_r = h_r Wᵀ / τ   (float32)

    Rows are processed in chunks of ``chunk_rows``; each chunk keeps only ``hidden`` and
    ``weight`` (which the model holds anyway) and its ``[r]`` log-sum-exp for backward, which
    recomputes one chunk of logits at a time and turns it into the gradient in place
    (``_ChunkLogprobs``): saved memory falls from R·V fp32 values to nothing beyond the
    inputs, at the cost of one more projection per chunk. Without gradient it is a plain
    chunked loop. Same values as the unchunked formula up to fp32 rounding (values and
    gradients tested in float64).

    Args:
        hidden: ``[R, h]`` final hidden states (after the final norm).
        weight: ``[V, h]`` output projection (``lm_head.weight``).
        targets: ``[R]`` long token ids.
        chunk_rows: rows per chunk, ``>= 1``.
        temperature: τ > 0.

    Returns:
        ``[R]`` float32 (float64 for float64 inputs).

    Raises:
        ValueError: inconsistent shapes or ``chunk_rows < 1``.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden [R, h], weight [V, h], targets [R] expected; got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1; got {chunk_rows}")
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    parts = []
    for s in range(0, hidden.shape[0], chunk_rows):
        h, t = hidden[s:s + chunk_rows], targets[s:s + chunk_rows]
        parts.append(_ChunkLogprobs.apply(h, weight, t, temperature) if grad
                     else _chunk_logprobs_lse(h, weight, t, temperature)[0])
    if not parts:
        return hidden.new_zeros((0,), dtype=torch.promote_types(hidden.dtype, torch.float32))
    return torch.cat(parts)
