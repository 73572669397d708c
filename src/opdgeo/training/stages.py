"""The named stages of one training step, each a function of the config sections it needs.

    sequences   demonstration_micro_batch | rollout_micro_batch   where the sequences come from
    score       score_micro_batch          rewards, old and teacher log-probs
    advantages  with_advantages            the per-token weight: the ONLY difference of the objectives
    loss, step  update_policy              ppo_epochs × mini-batches of backward_micro_batches + optimizer_step
    log         step_metrics               global sums over ranks

SFT, RLVR and OPD share every stage. They differ in where the sequences come from
(demonstrations or samples of the behaviour policy) and in the per-token weight: 1 on
demonstration tokens (``sft``), the group-normalized verifiable reward (``rlvr``),
log π_teacher − log π_student (``opd``), or a mix. All go through the same clipped
surrogate (``policy_gradient_loss``): demonstrations have no recorded log-probs, so their
ratio is taken against the loss forward itself (exactly 1) and the gradient is exactly
that of the cross-entropy (``losses.policy_gradient_loss``, tested bit for bit).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import torch

from opdgeo import distributed
from opdgeo.training.advantages import broadcast_to_tokens, combine_advantages, grpo_advantages, opd_advantages
from opdgeo.training.batches import demonstration_batch, mini_batch_order, num_mini_batches
from opdgeo.training.config import ObjectiveConfig, OptimConfig, RolloutConfig, TokenKeepConfig
from opdgeo.training.controls import (
    SPARSIFY_SUMS,
    mixed_keep_mask,
    random_keep_mask,
    rescale_kept,
    sparsify_stats,
    sparsify_sums,
    topkl_keep_mask,
)
from opdgeo.training.losses import masked_mean, masked_sum, policy_gradient_loss, sft_loss
from opdgeo.training.precision import autocast_context, resolve_bf16_autocast
from opdgeo.training.projection import project_gradients_, project_updates_, weights_before_step

__all__ = [
    "MicroBatch",
    "Update",
    "demonstration_micro_batch",
    "rollout_micro_batch",
    "score_micro_batch",
    "token_keep_mask",
    "with_advantages",
    "backward_micro_batches",
    "clip_range",
    "optimizer_step",
    "split_micro_batches",
    "update_policy",
    "step_metrics",
]


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of sequences ``[n, P+T]`` (prompt left-padded, response right-padded).

    Fields are filled by the named stages: the sequence source (ids, masks, texts),
    ``score_micro_batch`` (rewards, old/teacher log-probs), ``with_advantages``
    (advantages, loss_mask). ``behaviour_logprobs`` (from generation) are kept separate
    from ``old_logprobs`` (the ratio's reference) for the off-policy control.
    """

    input_ids: torch.Tensor  # [n, P+T] long
    attention_mask: torch.Tensor  # [n, P+T] long
    response_mask: torch.Tensor  # [n, T] bool
    problem_index: torch.Tensor  # [n] long, index into the task's problem list
    texts: tuple[str, ...] = ()
    behaviour_logprobs: torch.Tensor | None = None  # [n, T]
    rewards: torch.Tensor | None = None  # [n]
    old_logprobs: torch.Tensor | None = None  # [n, T]
    student_logprobs: torch.Tensor | None = None  # [n, T] the student at rollout time (OPD's r_t)
    teacher_logprobs: torch.Tensor | None = None  # [n, T]
    advantages: torch.Tensor | None = None  # [n, T]
    loss_mask: torch.Tensor | None = None  # [n, T] bool: tokens that count in the loss
    keep_mask: torch.Tensor | None = None  # [n, T] bool: tokens kept by token sparsification


def _autocast(setting: bool | str, device: torch.device, *, cache: bool = True):
    """bf16 autocast per ``optim.bf16_autocast`` (``train`` resolves ``"auto"`` once; a stage
    called on its own resolves it here); ``cache``: autocast's cache of bf16 weight casts."""
    return autocast_context(resolve_bf16_autocast(setting, device), device, cache=cache)


def _logprobs(model, mb: MicroBatch) -> torch.Tensor:
    from opdgeo.training.rollout import sequence_logprobs

    return sequence_logprobs(model, mb.input_ids, mb.attention_mask, mb.response_mask)


# ------------------------------------------------------------------ sequences


def demonstration_micro_batch(tokenizer, task, problems, indices: Sequence[int], *, device: torch.device) -> MicroBatch:
    """SFT's sequences: the task's demonstration of each problem after its prompt (no texts,
    no log-probs: nothing generated them)."""
    chosen = [problems[i] for i in indices]
    prompts = [task.format_prompt(p, tokenizer) for p in chosen]
    ids, att, resp = demonstration_batch(tokenizer, prompts, [task.demonstration(p) for p in chosen])
    return MicroBatch(input_ids=ids.to(device), attention_mask=att.to(device), response_mask=resp.to(device),
                      problem_index=torch.tensor(list(indices), dtype=torch.long))


def rollout_micro_batch(model, tokenizer, task, problems, indices: Sequence[int], *, rollout: RolloutConfig,
                        seed: int, device: torch.device, bf16: bool | str = "auto", score: bool = True) -> MicroBatch:
    """RL's sequences: ``rollout.group_size`` samples per prompt from ``model`` (the
    behaviour policy), with their log-probs at temperature 1 when ``score``."""
    from opdgeo.training.rollout import generate

    prompts = [task.format_prompt(problems[i], tokenizer) for i in indices]
    with torch.no_grad(), _autocast(bf16, device):
        ro = generate(model, tokenizer, prompts, num_samples=rollout.group_size, temperature=rollout.temperature,
                      max_new_tokens=rollout.max_new_tokens, seed=seed, batch_size=len(prompts) * rollout.group_size,
                      score=score)
    idx = torch.tensor(list(indices), dtype=torch.long)[ro.prompt_index.cpu().long()]  # [n]
    return MicroBatch(input_ids=ro.input_ids.to(device), attention_mask=ro.attention_mask.to(device),
                      response_mask=ro.response_mask.to(device).bool(), problem_index=idx, texts=tuple(ro.texts),
                      behaviour_logprobs=None if ro.behaviour_logprobs is None else ro.behaviour_logprobs.to(device))


def split_micro_batches(mb: MicroBatch, parts: int) -> list[MicroBatch]:
    """The rows of one generate call (prompt-major) cut into ``parts`` micro-batches of equal
    row counts, each trimmed to its own padding: leading prompt columns that are padding in
    every row and response columns after its longest response are dropped, so each part is
    laid out as if it had been sampled alone (its tokens, masks and log-probs unchanged)."""
    if parts == 1:
        return [mb]
    n = mb.input_ids.shape[0]
    if n % parts:
        raise ValueError(f"{n} rows do not split into {parts} micro-batches")
    rows, T = n // parts, mb.response_mask.shape[1]
    P = mb.input_ids.shape[1] - T
    out = []
    for i in range(parts):
        sl = slice(i * rows, (i + 1) * rows)
        att = mb.attention_mask[sl]
        lead = int((att[:, :P] != 0).int().argmax(dim=1).min()) if P else 0  # all-padding prompt columns
        t = max(int(mb.response_mask[sl].sum(dim=1).max()), 1)
        cols = slice(lead, P + t)
        out.append(dataclasses.replace(
            mb, input_ids=mb.input_ids[sl, cols], attention_mask=att[:, cols], response_mask=mb.response_mask[sl, :t],
            problem_index=mb.problem_index[sl], texts=tuple(mb.texts[sl]),
            behaviour_logprobs=None if mb.behaviour_logprobs is None else mb.behaviour_logprobs[sl, :t]))
    return out


# ---------------------------------------------------------------------- score


def score_micro_batch(mb: MicroBatch, *, student, teacher, task, problems, objective: ObjectiveConfig,
                      off_policy: bool, device: torch.device, bf16: bool | str = "auto") -> MicroBatch:
    """Rewards (every sampled response), the old log-probs (the ratio's reference), the
    student log-probs "at rollout time" (OPD's r_t) and the teacher's at temperature 1 (OPD).

    On-policy the old log-probs are the student's own behaviour log-probs (ratio exactly 1
    at the first inner step) and serve as the OPD student log-probs too. Off-policy
    (``rollout.policy`` not the student) the old log-probs are the behaviour policy's,
    recorded at generation, so the surrogate's ratio is exp(log π_θ − log π_behaviour), and
    the OPD gap needs one extra no-grad student forward. Demonstrations have no recorded
    log-probs: their ratio is taken against the loss forward itself."""
    rewards = None
    if mb.texts:
        rewards = torch.tensor([task.reward(t, problems[int(i)]) for t, i in zip(mb.texts, mb.problem_index)],
                               dtype=torch.float32)
    # On-policy, the behaviour log-probs ARE the old log-probs: ``generate`` scores its
    # samples with ``sequence_logprobs`` at temperature 1, in this micro-batch's shape and
    # autocast context, i.e. the very forward the loss recomputes (bit-identical on CPU),
    # so no extra forward is needed and the ratio is exactly 1 at the first inner step.
    old = mb.behaviour_logprobs.float() if mb.behaviour_logprobs is not None else None
    student_lp = old
    teacher_lp = None
    with torch.no_grad(), _autocast(bf16, device):
        if objective.weights().get("opd", 0.0) != 0.0:
            teacher_lp = _logprobs(teacher, mb).float()
            if off_policy:
                student_lp = _logprobs(student, mb).float()
    return dataclasses.replace(mb, rewards=rewards, old_logprobs=old, student_logprobs=student_lp,
                               teacher_logprobs=teacher_lp)


# ----------------------------------------------------------------- advantages


def _student_logprobs(mb: MicroBatch) -> torch.Tensor:
    """OPD's student log-probs at rollout time (on-policy: the old log-probs themselves)."""
    return mb.student_logprobs if mb.student_logprobs is not None else mb.old_logprobs


def token_keep_mask(gaps: torch.Tensor, response_mask: torch.Tensor, token_keep: TokenKeepConfig, *,
                    seed: int) -> torch.Tensor | None:
    """The token-sparsification mask of ``token_keep`` (None for mode ``none``)."""
    if token_keep.mode == "topkl":
        return topkl_keep_mask(gaps, response_mask, token_keep.fraction)
    if token_keep.mode == "random":
        gen = torch.Generator().manual_seed(seed)
        return random_keep_mask(response_mask, token_keep.fraction, generator=gen)
    return None


def with_advantages(mb: MicroBatch, objective: ObjectiveConfig, *, group_size: int,
                    token_keep: TokenKeepConfig = TokenKeepConfig(), keep_seed: int = 0) -> MicroBatch:
    """Per-token weights and the loss mask: A = Σ_k w_k A_k over the objective's signals.

    ``sft``: 1 on every response (demonstration) token. ``rlvr``: GRPO's group-normalized
    reward over groups of ``group_size``, broadcast to the tokens. ``opd``: −(s − t).
    Token sparsification (``token_keep``) keeps, per sample, ceil(ρ·T) tokens of the OPD
    signal and rescales them by T/Σm (``controls.rescale_kept``); dropped tokens keep a
    zero advantage and stay in the token-mean denominator, which the rescaling accounts for.
    Objective mixing: zero-weight terms are skipped (``combine_advantages``); GRPO's
    zero-variance filter drops a sample only when OPD has weight 0
    (``controls.mixed_keep_mask``), so both limits are the pure runs bit for bit.
    """
    weights = objective.weights()
    signals: dict[str, torch.Tensor] = {}
    loss_mask = mb.response_mask
    keep_tokens = None
    if weights.get("sft", 0.0) != 0.0:
        signals["sft"] = mb.response_mask.float()
    if weights.get("rlvr", 0.0) != 0.0:
        adv, keep = grpo_advantages(mb.rewards, group_size, objective.grpo_eps, std=objective.grpo_std,
                                    filter_zero_variance=objective.filter_zero_variance)
        signals["rlvr"] = broadcast_to_tokens(adv.to(mb.response_mask.device), mb.response_mask)
        keep = mixed_keep_mask(keep, weights.get("opd", 0.0))
        loss_mask = loss_mask & keep.to(loss_mask.device).unsqueeze(1)
    if weights.get("opd", 0.0) != 0.0:
        student_lp = _student_logprobs(mb)
        opd = opd_advantages(student_lp, mb.teacher_logprobs, mb.response_mask)  # [n, T] = -r_t
        gaps = student_lp - mb.teacher_logprobs  # [n, T] r_t (signed)
        keep_tokens = token_keep_mask(gaps, mb.response_mask, token_keep, seed=keep_seed)
        if keep_tokens is not None:
            opd = rescale_kept(opd, keep_tokens, mb.response_mask)
        signals["opd"] = opd
    return dataclasses.replace(mb, advantages=combine_advantages(signals, weights), loss_mask=loss_mask,
                               keep_mask=keep_tokens)


# ------------------------------------------------------------------ loss, step


def clip_range(objective: ObjectiveConfig, rollout: RolloutConfig) -> tuple[float, float]:
    """``(eps_low, eps_high)`` of the surrogate: the objective's on-policy, the symmetric
    ``rollout.offpolicy_eps`` when another policy generated the responses."""
    if rollout.off_policy:
        eps = rollout.offpolicy_eps
        return min(eps, 1.0), eps
    return objective.eps_low, objective.eps_high


def backward_micro_batches(model, batches: Sequence[MicroBatch], *, clip: tuple[float, float], global_tokens: float,
                           device: torch.device, bf16: bool | str = "auto") -> dict[str, float]:
    """Forward + backward of every micro-batch; gradients accumulate in ``.grad``.

    Each micro-batch's loss is ``masked_mean(per_token, loss_mask, denominator=global_tokens)``,
    so the accumulated gradient (summed over micro-batches, then over ranks) is exactly the
    gradient of the token-level mean over the global batch. Returns this rank's sums for
    logging: ``loss`` (the surrogate), ``nll`` (−log π of the counted tokens, the same
    normalization), ``clipped``, ``ratio``, ``ratio_max``.
    """
    sums = {"loss": 0.0, "nll": 0.0, "clipped": 0.0, "ratio": 0.0, "ratio_max": 0.0}
    alone = not distributed.is_distributed()
    for i, mb in enumerate(batches):
        if alone and not mb.loss_mask.any():
            # no token counts (e.g. every group filtered): its loss and gradient are exactly 0, so
            # no forward. Only in one process: under DDP/FSDP every rank's forward and backward
            # take part in collectives, so every rank runs every micro-batch.
            continue
        # gradients are reduced over ranks once, in the last micro-batch's backward
        with distributed.no_sync(model, sync=i == len(batches) - 1):
            loss = _micro_batch_loss(model, mb, clip=clip, global_tokens=global_tokens, device=device, bf16=bf16,
                                     sums=sums)
            loss.backward()
        sums["loss"] += float(loss.detach())
    if alone:  # a step whose micro-batches were all skipped: zero gradients, so AdamW steps as it would with them
        for p in model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
    return sums


def _micro_batch_loss(model, mb: MicroBatch, *, clip: tuple[float, float], global_tokens: float,
                      device: torch.device, bf16: bool | str, sums: dict[str, float]) -> torch.Tensor:
    """Σ per-token loss / global_tokens of one micro-batch (adds its counts to ``sums``)."""
    # No cast cache in the differentiable forward: each weight is cast once per forward either
    # way, and with activation checkpointing the cache would hold a bf16 copy of every weight
    # until the forward ends (2 bytes a parameter; measured +258 MiB of forward peak on SmolLM2-135M).
    # Casts are deterministic, so the log-probs are the same bits as rollout's (cached) forward.
    with _autocast(bf16, device, cache=False):
        lp = _logprobs(model, mb).float()  # [n, T]
    # the ratio's reference: recorded at rollout time; else (demonstrations, on-policy RLVR with
    # one inner pass) this very forward, detached: the ratio is exactly 1
    old = mb.old_logprobs if mb.old_logprobs is not None else lp.detach()
    out = policy_gradient_loss(lp, old, mb.advantages, mb.loss_mask, eps_low=clip[0], eps_high=clip[1])
    sums["nll"] += float(masked_mean(sft_loss(lp.detach(), mb.loss_mask), mb.loss_mask, denominator=global_tokens))
    sums["clipped"] += float(out.clipped.sum())
    sums["ratio"] += float(masked_sum(out.ratio, mb.loss_mask))
    if mb.loss_mask.any():
        sums["ratio_max"] = max(sums["ratio_max"], float(out.ratio[mb.loss_mask].max()))
    return masked_mean(out.loss, mb.loss_mask, denominator=global_tokens)


def optimizer_step(model, optimizer, *, grad_clip: float | None) -> float:
    """Clip the global gradient norm (if set), AdamW step, zero the gradients; returns the
    pre-clip gradient 2-norm."""
    params = [p for p in model.parameters() if p.requires_grad]
    if grad_clip is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        norms = [p.grad.norm() for p in params if p.grad is not None]  # none when no micro-batch counted a token
        norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor over ranks
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


@dataclass(frozen=True)
class Update:
    """What the optimizer steps on one rollout batch report (``update_policy``)."""

    sums: Mapping[str, float]
    """This rank's sums of the first pass (``backward_micro_batches``; the means ``loss`` and
    ``nll`` weighted by each mini-batch's share of the batch's tokens)."""
    grad_norm: float
    """Pre-clip gradient norm of the first optimizer step (0 when none was taken)."""
    extra: Mapping[str, float]
    """Projection metrics (gradient: the first step's; update: the worst over the steps) and the hook's."""
    global_tokens: float
    """Counted tokens of the whole batch, all ranks."""


def update_policy(model, optimizer, batches: Sequence[MicroBatch], *, positions: range, optim: OptimConfig,
                  seed: int, step: int, clip: tuple[float, float], device: torch.device,
                  projection: Mapping[str, torch.Tensor] | None = None, project_mode: str = "project",
                  named_params: Mapping[str, torch.Tensor] | None = None,
                  after_backward: Callable[[], Mapping[str, float] | None] | None = None) -> Update:
    """The optimizer steps on one rollout batch: ``optim.ppo_epochs`` passes, each over
    ``num_mini_batches(optim)`` mini-batches (``mini_batch_order``), one step per mini-batch.

    Each step's loss is the token-level mean over its mini-batch's counted tokens on all
    ranks (``backward_micro_batches`` with that count); the old log-probs are those recorded
    at rollout time. With a subspace ``projection`` the summed gradient is projected
    (``project_mode == "project"``) before ``after_backward`` and the step, and AdamW's update
    after it. A mini-batch without counted tokens takes no step.

    Args:
        batches: this rank's micro-batches, at global positions ``positions``.
        named_params: the student's parameters by name (with ``projection``).
    """
    n_micro = optim.batch_size // optim.micro_batch_size
    local = torch.zeros(n_micro, dtype=torch.float64)
    for pos, mb in zip(positions, batches):
        local[pos] = float(mb.loss_mask.sum())
    tokens = distributed.all_reduce_sum(local)  # [n_micro] counted tokens of every micro-batch, all ranks
    global_tokens = float(tokens.sum())
    first: dict[str, float] = {}
    extra: dict[str, float] = {}
    grad_norm, steps, projected = 0.0, 0, False
    projecting = projection is not None and project_mode == "project"
    for epoch in range(optim.ppo_epochs):
        for mini in mini_batch_order(n_micro, num_mini_batches(optim), seed=seed, step=step, epoch=epoch):
            n_tokens = float(tokens[list(mini)].sum())
            mine = [batches[p - positions.start] for p in mini if p in positions]
            sums = backward_micro_batches(model, mine, clip=clip, global_tokens=n_tokens, device=device,
                                          bf16=optim.bf16_autocast)
            if epoch == 0:
                _add_sums(first, sums, share=n_tokens / global_tokens if global_tokens else 1.0)
            if projecting:  # after the reduction over ranks, before clipping and the step
                kept = project_gradients_(named_params, projection)
                if not projected:  # the first step's gradient
                    extra.update(kept.as_metrics())
                    projected = True
            if after_backward is not None:
                extra.update(after_backward() or {})
            if n_tokens > 0:
                before = weights_before_step(named_params, projection) if projection is not None else None
                norm = optimizer_step(model, optimizer, grad_clip=optim.grad_clip)
                grad_norm = norm if steps == 0 and epoch == 0 else grad_norm
                steps += 1
                if before is not None:  # AdamW's whole update D -> D V_K V_Kᵀ (freeze: measured only)
                    _worst_of(extra, project_updates_(named_params, projection, before,
                                                      project=projecting).as_metrics())
            else:  # nothing to learn from (e.g. every group filtered): no update
                optimizer.zero_grad(set_to_none=True)
    return Update(sums=MappingProxyType(first), grad_norm=grad_norm, extra=MappingProxyType(extra),
                  global_tokens=global_tokens)


def _add_sums(total: dict[str, float], sums: Mapping[str, float], *, share: float) -> None:
    """Accumulate one mini-batch's sums: the means (``loss``, ``nll``, normalized by the
    mini-batch's tokens) weighted by its share of the batch's tokens, counts added, maxima kept."""
    for k, v in sums.items():
        if k == "ratio_max":
            total[k] = max(total.get(k, v), v)
        elif k in ("loss", "nll"):
            total[k] = total.get(k, 0.0) + v * share
        else:
            total[k] = total.get(k, 0.0) + v


def _worst_of(extra: dict[str, float], values: Mapping[str, float]) -> None:
    """Keep, per key, the largest value over the optimizer steps (NaN counts as nothing)."""
    for k, v in values.items():
        if k not in extra or math.isnan(extra[k]) or v > extra[k]:
            extra[k] = v


# ------------------------------------------------------------------------ log


def _local_sums(batches: Sequence[MicroBatch], sums: Mapping[str, float]) -> dict[str, float]:
    """This rank's sums that the step's metrics are ratios of."""
    local = {
        "loss": sums["loss"], "nll": sums["nll"], "clipped": sums["clipped"], "ratio": sums["ratio"],
        "responses": sum(float(mb.response_mask.shape[0]) for mb in batches),
        "response_tokens": sum(float(mb.response_mask.sum()) for mb in batches),
        "reward": sum(float(mb.rewards.sum()) for mb in batches if mb.rewards is not None),
        "correct": sum(float((mb.rewards == 1.0).sum()) for mb in batches if mb.rewards is not None),
        "kept_sequences": sum(float(mb.loss_mask.any(dim=1).sum()) for mb in batches),
        "gap": sum(float(masked_sum(_student_logprobs(mb) - mb.teacher_logprobs, mb.response_mask))
                   for mb in batches if mb.teacher_logprobs is not None),
    }
    sparse = [sparsify_sums(_student_logprobs(mb) - mb.teacher_logprobs, mb.keep_mask, mb.response_mask)
              for mb in batches if mb.keep_mask is not None]
    local.update({f"sparsify_{k}": sum(d[k] for d in sparse) for k in SPARSIFY_SUMS})
    return local


def step_metrics(batches: Sequence[MicroBatch], sums: Mapping[str, float], *, objective: ObjectiveConfig,
                 token_keep: TokenKeepConfig, off_policy: bool, lr: float, grad_norm: float, step_time: float,
                 global_tokens: float) -> dict[str, float]:
    """The step's metrics (global: all sums are all-reduced over ranks).

    Demonstrations (no sampled texts) report their cross-entropy as ``train/loss`` and
    ``sft/nll``; sampled responses the surrogate, its ratio and clipping, the rewards and
    the metrics of the signals and controls in use."""
    local = _local_sums(batches, sums)
    keys = list(local)
    g = dict(zip(keys, distributed.all_reduce_sum(torch.tensor([local[k] for k in keys], dtype=torch.float64)).tolist()))
    sampled = any(mb.texts for mb in batches)
    out = {
        "train/loss": g["loss"] if sampled else g["nll"],
        "train/lr": lr,
        "train/grad_norm": grad_norm,
        "train/tokens": global_tokens,
        "train/step_time": step_time,
        "train/tokens_per_s": g["response_tokens"] / step_time if step_time > 0 else float("nan"),
        "train/skipped": float(global_tokens == 0),
        "rollout/response_len": g["response_tokens"] / max(g["responses"], 1.0),
    }
    if not sampled:
        out["sft/nll"] = g["nll"]
        return out
    weights = objective.weights()
    out["train/clip_frac"] = g["clipped"] / global_tokens if global_tokens else 0.0
    out["train/ratio_mean"] = g["ratio"] / global_tokens if global_tokens else 1.0
    out["rlvr/reward"] = g["reward"] / max(g["responses"], 1.0)
    out["rlvr/accuracy"] = g["correct"] / max(g["responses"], 1.0)
    if "rlvr" in weights:
        out["rlvr/kept_fraction"] = g["kept_sequences"] / max(g["responses"], 1.0)
    if "opd" in weights:
        out["opd/teacher_gap"] = g["gap"] / max(g["response_tokens"], 1.0)
    if token_keep.mode != "none":
        out.update(sparsify_stats({k: g[f"sparsify_{k}"] for k in SPARSIFY_SUMS}).as_metrics())
    if off_policy:  # NaN when no token counted (every group filtered)
        ratio_max = distributed.all_reduce_max(sums["ratio_max"])
        out["offpolicy/ratio_mean"] = out["train/ratio_mean"] if global_tokens else float("nan")
        out["offpolicy/ratio_max"] = ratio_max if global_tokens else float("nan")
        out["offpolicy/clip_fraction"] = out["train/clip_frac"] if global_tokens else float("nan")
    return out
