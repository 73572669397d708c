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


# The narrowest vocabulary tile: below it the [rows, h] x [h, tile] products run at a
# fraction of GEMM speed, so rows are split instead (a 2-D tiling).
_MIN_VOCAB_TILE = 256


def _logprob_tiles(rows: int, vocab: int, chunk_elements: int) -> tuple[int, int]:
    """``(row block, vocabulary tile)`` of ``linear_logprobs``: at most ``chunk_elements``
    logits a tile (or one row of ``_MIN_VOCAB_TILE``), every row in one block where the
    tile can stay ``_MIN_VOCAB_TILE`` wide (then each tile of the weight gradient is one
    product, written once)."""
    if rows * vocab <= chunk_elements:
        return max(rows, 1), vocab
    tile = min(vocab, max(chunk_elements // max(rows, 1), _MIN_VOCAB_TILE))
    return max(1, min(rows, chunk_elements // tile)), tile


def _logprobs_lse(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                  chunk_elements: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of ``targets`` and the log-sum-exp of every row (both ``[R]``), one tile of
    logits at a time. The log-sum-exp runs online over the vocabulary tiles,
    ``m + log Σ exp(z − m)`` with the running maximum m rescaling the running sum (one tile:
    exactly ``torch.logsumexp``'s formula), each tile scaled, shifted and exponentiated in
    place in one fp32 buffer. What the gradient path runs too, so both read the same bits."""
    R, V = hidden.shape[0], weight.shape[0]
    rb, vc = _logprob_tiles(R, V, chunk_elements)
    dtype = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
    picked = torch.empty(R, dtype=dtype, device=hidden.device)
    lse = torch.empty(R, dtype=dtype, device=hidden.device)
    for r0 in range(0, R, rb):
        h, t = hidden[r0:r0 + rb], targets[r0:r0 + rb]
        top = total = None
        for v0 in range(0, V, vc):
            z = torch.nn.functional.linear(h, weight[v0:v0 + vc])  # [rb, vc]: one tile of logits
            z = z.to(dtype)  # bf16 -> fp32 (a new buffer); float32 and float64 stay
            if temperature != 1.0:
                z.div_(temperature)
            local = t - v0
            inside = (local >= 0) & (local < z.shape[1])
            hit = z.gather(1, local.clamp(0, z.shape[1] - 1).unsqueeze(1)).squeeze(1)
            picked[r0:r0 + rb] = hit if v0 == 0 else torch.where(inside, hit, picked[r0:r0 + rb])
            tile_top = z.amax(dim=-1)
            if top is None:
                top = tile_top
                total = z.sub_(top.unsqueeze(1)).exp_().sum(dim=-1)
            else:
                new_top = torch.maximum(top, tile_top)
                total.mul_((top - new_top).exp_()).add_(z.sub_(new_top.unsqueeze(1)).exp_().sum(dim=-1))
                top = new_top
        lse[r0:r0 + rb] = total.log_().add_(top)
    return picked - lse, lse


class _LinearLogprobs(torch.autograd.Function):
    """``linear_logprobs`` with a hand-written backward.

    Forward: ``_logprobs_lse`` (what the no-gradient path runs, so the same bits), keeping
    only the inputs and the ``[R]`` log-sum-exp. Backward recomputes each tile of logits
    once (same tiles, under the forward's autocast state) and turns it into the gradient
    in place::

        ∂logp_r/∂z_r = (onehot(a_r) − softmax(z_r)) / τ

    A tile ``[rb, vc]`` becomes g·(onehot − softmax)/τ in one fp32 buffer; its two products
    go straight into the gradients: the hidden states' ``[R, h]`` (summed over the tiles in
    fp32) and the weight's ``[V, h]``, whose tile is written once, in the weight's dtype,
    when every row is in one block. So backward holds the weight gradient it returns plus
    one tile and its products, not a full ``[V, h]`` product per row chunk, its fp32 copy
    and autograd's running sum of them.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_elements):
        device = hidden.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        out, lse = _logprobs_lse(hidden, weight, targets, temperature, chunk_elements)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.chunk_elements = temperature, chunk_elements
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, lse = ctx.saved_tensors
        device, enabled, cdtype = ctx.autocast
        tau = ctx.temperature
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        R, V = hidden.shape[0], weight.shape[0]
        rb, vc = _logprob_tiles(R, V, ctx.chunk_elements)
        g = (grad_out / tau).to(lse.dtype)  # [R]
        grad_h = torch.zeros(hidden.shape, dtype=torch.promote_types(hidden.dtype, lse.dtype), device=hidden.device) \
            if need_h else None
        # one row block: each tile of the weight gradient is one product, written once in the
        # weight's dtype (bf16 under FSDP2's mixed precision); several: summed in fp32
        grad_w = None if not need_w else torch.empty(
            weight.shape, dtype=weight.dtype if rb >= R else torch.promote_types(weight.dtype, lse.dtype),
            device=weight.device)
        for r0 in range(0, R, rb):
            h, gr, t = hidden[r0:r0 + rb], g[r0:r0 + rb], targets[r0:r0 + rb]
            for v0 in range(0, V, vc):
                w = weight[v0:v0 + vc]
                with torch.autocast(device, dtype=cdtype, enabled=enabled):
                    z = torch.nn.functional.linear(h, w)
                p = z.to(lse.dtype)
                del z
                if tau != 1.0:
                    p.div_(tau)
                p.sub_(lse[r0:r0 + rb].unsqueeze(1)).exp_().mul_(-gr.unsqueeze(1))  # −g·softmax(z)/τ, in place
                local = t - v0
                inside = (local >= 0) & (local < p.shape[1])
                p.scatter_add_(1, local.clamp(0, p.shape[1] - 1).unsqueeze(1),
                               torch.where(inside, gr, 0.0).unsqueeze(1))  # + g·onehot(a_r)/τ
                if enabled and p.dtype == torch.float32:  # the cast autocast makes, once for both products
                    p = p.to(cdtype)
                if p.dtype == h.dtype == w.dtype == lse.dtype:  # no cast: products straight into the gradients
                    if need_h:
                        grad_h[r0:r0 + rb].addmm_(p, w)
                    if need_w and r0 == 0:
                        torch.mm(p.mT, h, out=grad_w[v0:v0 + vc])
                    elif need_w:
                        grad_w[v0:v0 + vc].addmm_(p.mT, h)
                else:
                    with torch.autocast(device, dtype=cdtype, enabled=enabled):
                        if need_h:
                            grad_h[r0:r0 + rb] += p @ w
                        if need_w:
                            part = p.mT @ h
                            if r0 == 0:
                                grad_w[v0:v0 + vc].copy_(part)
                            else:
                                grad_w[v0:v0 + vc] += part
                del p
        return (grad_h.to(hidden.dtype) if need_h else None, grad_w.to(weight.dtype) if need_w else None,
                None, None, None)


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, chunk_elements: int,
                    temperature: float = 1.0) -> torch.Tensor:
    """Log-probs of ``targets`` under ``softmax(hidden @ weightᵀ / τ)``, never holding the
    [R, V] logits, in forward or for backward.

    ::

        logp_r = z_r[a_r] − logsumexp_v z_r[v],   z_r = h_r Wᵀ / τ   (float32)

    The logits are computed in tiles of at most ``chunk_elements`` (every row and a slice
    of the vocabulary; rows split too when the slice would fall below 256 columns), the
    log-sum-exp online over the slices. For backward only ``hidden``, ``weight`` (which the
    model holds anyway) and the ``[R]`` log-sum-exp are kept; backward recomputes one tile
    at a time and turns it into the gradient in place (``_LinearLogprobs``), at the cost of
    one more projection. Without gradient it is the same tiled loop. Same values as the
    untiled formula up to fp32 rounding (values and gradients tested in float64).

    Args:
        hidden: ``[R, h]`` final hidden states (after the final norm).
        weight: ``[V, h]`` output projection (``lm_head.weight``).
        targets: ``[R]`` long token ids.
        chunk_elements: logits per tile, ``>= 1``.
        temperature: τ > 0.

    Returns:
        ``[R]`` float32 (float64 for float64 inputs).

    Raises:
        ValueError: inconsistent shapes, ``chunk_elements < 1`` or a target outside the vocabulary.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden [R, h], weight [V, h], targets [R] expected; got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)}")
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be >= 1; got {chunk_elements}")
    if targets.numel():
        low, high = (int(x) for x in torch.aminmax(targets))
        if low < 0 or high >= weight.shape[0]:
            raise ValueError(f"targets must be token ids in [0, {weight.shape[0]}); got {low} .. {high}")
    if hidden.shape[0] == 0:
        return hidden.new_zeros((0,), dtype=torch.promote_types(hidden.dtype, torch.float32))
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearLogprobs.apply(hidden, weight, targets, temperature, chunk_elements)
    return _logprobs_lse(hidden, weight, targets, temperature, chunk_elements)[0]
