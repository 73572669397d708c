"""The training recipe: SFT, RLVR (GRPO) and OPD from one policy-gradient loop (SPEC §3).

``train(config)`` reads top to bottom. Per optimizer step::

    prompts    = step_prompts(...)                      # seeded, global batch
    batches    = [sample_micro_batch(...) ...]          # rollouts (RL; by the behaviour policy) or demonstrations (SFT)
    batches    = [score_micro_batch(...) ...]           # rewards, old and teacher log-probs
    batches    = [with_advantages(...) ...]             # per-token weights: the ONLY difference
    n_tokens   = all_reduce_sum(counted tokens)         # global token count
    for epoch in ppo_epochs:
        backward_micro_batches(...)                     # loss = Σ per-token / n_tokens; DDP/FSDP2 sum over ranks
        project_gradients_(...)                         # subspace projection (when on)
        hooks.after_backward                            # gradient hook point
        optimizer_step(...)                             # clip + AdamW
    log; probe (geometry monitor); checkpoint; hooks.every_n

The three objectives differ only in the per-token weight: 1 on demonstration tokens
(SFT, ``sft_loss``), the group-normalized verifiable reward (RLVR) or
log π_teacher - log π_student on the sampled token (OPD), both in the clipped surrogate.

The study's controls (SPEC §3) are parameters of this loop:

- ``token_keep``: per sample, keep ceil(ρ·T) tokens of the OPD signal (top signed gap or a
  seeded random draw) and rescale by T/Σm (``with_advantages``; ``controls.py``);
- ``rollout.policy``: the teacher or another model generates; the ratio is taken against
  its log-probs recorded at generation, clipped with ``rollout.offpolicy_eps``
  (``behaviour_policy``, ``score_micro_batch``, ``clip_range``);
- ``objective.advantage``: A = Σ_k w_k A_k; GRPO's filter only without OPD
  (``controls.mixed_keep_mask``), so the limits are the pure runs bit for bit;
- ``project``: from a checkpoint or a step, every block matrix's gradient g → g V_K V_Kᵀ
  after the all-reduce and before clipping; everything else frozen (``projection.py``);
- ``run.monitor_every``: geometry of the update since the origin, every N steps, with the
  trajectory's functions (``monitor.py``), to ``metrics.jsonl`` and the progress bar.

Data parallelism (``torchrun`` or ``accelerate launch``; ``distributed.strategy``): the
global batch of ``batch_size`` prompts is cut into micro-batches of ``micro_batch_size``
prompts; micro-batch ``c`` of step ``s`` is generated with its own seed derived from (run
seed, s, c), and rank ``r`` takes micro-batches ``r·k .. r·k+k-1``. So the union over
ranks is exactly the single-process batch, the token count is all-reduced before the
loss, and PyTorch's DDP or FSDP2 (``opdgeo.distributed.wrap_model``) SUMS the gradients
over ranks in the last micro-batch's backward (``no_sync`` before it): 2 ranks take the
same step as 1 process, to float tolerance.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from opdgeo import distributed
from opdgeo.errors import ConfigError
from opdgeo.locking import holds_run_folder
from opdgeo.training import checkpointing as ckpt
from opdgeo.training.advantages import broadcast_to_tokens, combine_advantages, grpo_advantages, opd_advantages
from opdgeo.training.config import TrainConfig, config_to_dict, resume_differences
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
from opdgeo.training.precision import autocast_context, native_bf16, resolve_bf16_autocast
from opdgeo.training.progress import StepProgress
from opdgeo.training.trackers import Trackers, open_trackers
from opdgeo.training.monitor import MonitorSettings, probe, restore_monitor, start_monitor
from opdgeo.files import atomic_write_text
from opdgeo.training.projection import (
    SUBSPACE_FILE,
    carry_optimizer_state,
    freeze_outside,
    load_subspaces,
    project_gradients_,
    project_updates_,
    projection_subspaces,
    save_subspaces,
    weights_before_step,
)

__all__ = [
    "train",
    "RunResult",
    "StepStats",
    "Hooks",
    "HookContext",
    "MicroBatch",
    "learning_rate",
    "step_prompts",
    "micro_batch_seed",
    "rank_micro_batches",
    "demonstration_batch",
    "backward_micro_batches",
    "load_policy",
    "inference_model",
    "teacher_dtype",
    "activation_checkpointing_",
    "sample_micro_batch",
    "score_micro_batch",
    "with_advantages",
    "optimizer_step",
    "step_metrics",
    "all_reduce_sum",
    "all_reduce_max",
    "behaviour_policy",
    "clip_range",
    "origin_matrices",
    "start_from_checkpoint",
    "monitor_settings",
    "sparsify_seed",
    "token_keep_mask",
]


# ------------------------------------------------------------------------ records


@dataclass(frozen=True)
class StepStats:
    """Immutable record of one optimizer step: ``values`` maps stable namespaced names
    (``train/loss``, ``train/lr``, ``rlvr/reward``, ``opd/teacher_gap``, ...) to floats."""

    step: int
    values: Mapping[str, float]

    def record(self) -> dict[str, Any]:
        """The ``metrics.jsonl`` line: ``{"step": step, **values}``."""
        return {"step": self.step, **self.values}


@dataclass(frozen=True)
class RunResult:
    """What ``train`` returns."""

    out_dir: Path
    """The run folder."""
    final_step: int
    """Optimizer steps done (including those of a resumed run)."""
    checkpoints: tuple[Path, ...]
    """Step folders written by this call."""
    history: tuple[StepStats, ...]
    """Stats of the steps run by this call."""
    resumed_from: Path | None
    """The checkpoint a ``resume`` continued from."""


@dataclass(frozen=True)
class HookContext:
    """Passed to the hooks: the (unwrapped) student, where the step stands, the run."""

    step: int
    model: torch.nn.Module
    config: TrainConfig
    run_dir: Path
    rank: int
    world: int


@dataclass(frozen=True)
class Hooks:
    """Extension points of the loop (the study's controls plug in here).

    ``after_backward(ctx)`` runs on every rank after the gradients of all micro-batches are
    summed over ranks (and projected, under ``project``) and before clipping and the
    optimizer step; ``every_n(ctx)`` runs after the step every ``run.monitor_every`` steps,
    after the built-in geometry monitor. Either may return a mapping of extra metrics to log.
    """

    after_backward: Callable[[HookContext], Mapping[str, float] | None] | None = None
    every_n: Callable[[HookContext], Mapping[str, float] | None] | None = None


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of sequences ``[n, P+T]`` (prompt left-padded, response right-padded).

    Fields are filled by the named stages: ``sample_micro_batch`` (ids, masks, texts),
    ``score_micro_batch`` (rewards, old/teacher log-probs), ``with_advantages``
    (advantages, loss_mask). ``behaviour_logprobs`` (from generation) are kept separate
    from ``old_logprobs`` (the current policy, recomputed without gradient) for the
    off-policy control.
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


# ---------------------------------------------------------------- pure helpers


def _derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (sha256; stable across processes and runs)."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


def learning_rate(step: int, *, lr: float, steps: int, schedule: str, warmup_steps: int, min_lr: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Warmup: ``lr·(step+1)/warmup_steps`` for ``step < warmup_steps``. Then ``constant``:
    ``lr``; ``cosine``: ``min_lr + (lr-min_lr)·(1+cos(π·p))/2`` with
    ``p = (step-warmup_steps)/(steps-warmup_steps-1)`` (so the last step uses ``min_lr``).
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    span = steps - warmup_steps - 1
    p = 1.0 if span <= 0 else min(1.0, (step - warmup_steps) / span)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))


def step_prompts(num_problems: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Problem indices of step ``step`` (0-based): epochs of seeded permutations, concatenated.

    Position ``step·batch_size + i`` of the stream is element ``(pos mod n)`` of the
    permutation of epoch ``pos // n`` (seeded by (seed, epoch)). A pure function of its
    arguments, so a resumed run sees the same data as an uninterrupted one.
    """
    out = []
    cache: dict[int, list[int]] = {}
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, num_problems)
        if epoch not in cache:
            g = torch.Generator().manual_seed(_derive_seed("epoch", seed, epoch))
            cache[epoch] = torch.randperm(num_problems, generator=g).tolist()
        out.append(cache[epoch][i])
    return out


def micro_batch_seed(seed: int, step: int, index: int) -> int:
    """Generation seed of micro-batch ``index`` of step ``step`` (independent of the rank)."""
    return _derive_seed("rollout", seed, step, index) % (2**31 - 1)


def rank_micro_batches(num_micro_batches: int, rank: int, world: int) -> range:
    """The micro-batches (indices in the global batch) that rank ``rank`` of ``world`` takes."""
    if num_micro_batches % world:
        raise ConfigError(
            f"optim.batch_size / optim.micro_batch_size = {num_micro_batches} micro-batches cannot be split "
            f"evenly over {world} processes"
        )
    k = num_micro_batches // world
    return range(rank * k, (rank + 1) * k)


def demonstration_batch(tokenizer, prompts: Sequence[str], responses: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokenize SFT pairs into the rollout layout: ``(input_ids, attention_mask, response_mask)``.

    Prompts are left-padded to the longest prompt ``P``, responses (with ``eos_token``
    appended) right-padded to the longest response ``T``: ``input_ids [n, P+T]``,
    ``response_mask [n, T]`` True on response tokens (EOS included).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token or ""
    p_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    r_ids = [tokenizer(r + eos, add_special_tokens=False)["input_ids"] for r in responses]
    P, T = max(map(len, p_ids)), max(map(len, r_ids))
    n = len(p_ids)
    input_ids = torch.full((n, P + T), pad, dtype=torch.long)
    attention = torch.zeros((n, P + T), dtype=torch.long)
    response_mask = torch.zeros((n, T), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(p_ids, r_ids)):
        input_ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        input_ids[i, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
        attention[i, P - len(p):P + len(r)] = 1
        response_mask[i, :len(r)] = True
    return input_ids, attention, response_mask


# ------------------------------------------------------------------ distributed


# The collectives live in ``opdgeo.distributed`` (re-exported here for the loop's users).
all_reduce_sum = distributed.all_reduce_sum
all_reduce_max = distributed.all_reduce_max
_barrier = distributed.barrier


# ---------------------------------------------------------------------- models


def load_policy(source: str, *, init_seed: int = 0):
    """``(model, tokenizer)`` for a model source (``opdgeo.models.model_and_tokenizer``)."""
    from opdgeo.models import model_and_tokenizer

    return model_and_tokenizer(source, seed=init_seed)


def behaviour_policy(config: TrainConfig, student, tokenizer, teacher, *, device: torch.device):
    """The model that generates the rollouts (``rollout.policy``): the student (on-policy),
    the teacher, or another model sharing the student's tokenizer (no gradient)."""
    from opdgeo.models import check_same_tokenizer

    policy = config.rollout.policy
    if policy == "student":
        return student
    if policy == "teacher":
        return teacher
    model, tok = load_policy(policy, init_seed=config.model.init_seed)
    check_same_tokenizer(tokenizer, tok, names=("student", "rollout.policy"))
    return inference_model(model, config, device)


def teacher_dtype(setting: str, device: torch.device) -> torch.dtype:
    """``model.teacher_dtype``: ``auto`` is bf16 where ``device`` computes bf16 natively, else fp32."""
    if setting == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return ckpt.DTYPES[setting]


def inference_model(model, config: TrainConfig, device: torch.device):
    """A scoring-only model: on ``device`` in ``model.teacher_dtype``, eval mode, no gradients
    (its log-probs enter the loss as constants, under ``torch.no_grad``). Under ``fsdp`` it
    is sharded like the student (``distributed.shard_for_inference``: 1/world per rank)."""
    dtype = teacher_dtype(config.model.teacher_dtype, device)
    if config.distributed.strategy == "fsdp":  # cast on the CPU; fully_shard moves each layer's shard to the device
        return distributed.shard_for_inference(model.to(dtype=dtype).eval().requires_grad_(False))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def activation_checkpointing_(model: torch.nn.Module) -> None:
    """Recompute every decoder layer's activations in backward (``torch.utils.checkpoint``,
    non-reentrant) instead of saving them: a layer keeps only its input for backward.
    In place; forwards without gradient (generation, scoring) run the layer as is. The
    recomputation is the same computation, so gradients are unchanged (tested)."""
    from torch.utils.checkpoint import checkpoint

    for layer in distributed.decoder_layers(model):
        inner = layer.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = forward


def _checkpoint_dtype(config: TrainConfig) -> torch.dtype:
    return ckpt.DTYPES[config.checkpoint.dtype]


def _rounded(weights: Mapping[str, torch.Tensor], names, config: TrainConfig) -> dict[str, torch.Tensor]:
    """The named matrices as the checkpoints hold them: CPU, rounded to the checkpoint dtype."""
    dtype = _checkpoint_dtype(config)
    # copy=True: a float32 run's origin must not alias the live parameters it is compared with
    return {n: weights[n].detach().to(device="cpu", dtype=dtype, copy=True) for n in names}


def _rounded_checkpoint(source: str, names, config: TrainConfig) -> dict[str, torch.Tensor]:
    """The named matrices of a checkpoint folder, rounded to the checkpoint dtype."""
    from opdgeo.checkpoints import open_checkpoint
    from opdgeo.errors import CheckpointError

    ck = open_checkpoint(source)
    missing = [n for n in names if n not in ck]
    if missing:
        raise CheckpointError(f"{source}: no tensor {missing[0]!r} (the student has it)")
    dtype = _checkpoint_dtype(config)
    return {n: ck.load(n).to(dtype) for n in names}


def origin_matrices(config: TrainConfig, student) -> dict[str, torch.Tensor]:
    """W0 of every 2-D block weight, in the checkpoint dtype: the geometry monitor's and the
    projection's origin. ``project.origin`` when set, else the student as loaded (before any
    resume or restart), i.e. ``model.student`` (SPEC §2: the run's origin)."""
    from opdgeo.checkpoints import is_geometry_matrix

    params = dict(student.named_parameters())
    names = [n for n, p in params.items() if is_geometry_matrix(n, tuple(p.shape))]
    source = config.project.origin
    if source is None or source == config.model.student:
        return _rounded(params, names, config)
    if Path(source).expanduser().is_dir():
        return _rounded_checkpoint(source, names, config)
    model, _ = load_policy(source, init_seed=config.model.init_seed)
    return _rounded(dict(model.named_parameters()), names, config)


def start_from_checkpoint(student, source: str) -> int:
    """Load a step folder into the student (the fp32 master weights of its ``trainer_state/``
    when present, else its weights) and return its step (from ``trainer_state`` or the folder name).

    Raises:
        CheckpointError: unreadable weights, or tensors that do not fit the student.
    """
    from opdgeo.checkpoints import open_checkpoint

    folder = Path(source)
    if (folder / "trainer_state" / "state.json").is_file():
        state = ckpt.load_trainer_state(folder)
        weights, step = dict(state.master), state.step
    else:
        ck = open_checkpoint(folder)
        weights = {n: ck.load(n) for n in ck.names()}
        m = ckpt.STEP_RE.match(folder.name)
        step = int(m.group(1)) if m else 0
    own = student.state_dict()
    tied = {"lm_head.weight"} if getattr(student.config, "tie_word_embeddings", False) else set()
    problems = sorted(set(own) - set(weights) - tied)[:3] + sorted(set(weights) - set(own))[:3]
    problems += [n for n in weights if n in own and tuple(weights[n].shape) != tuple(own[n].shape)][:3]
    if problems:
        raise CheckpointError(f"{folder}: weights do not fit the student (e.g. {', '.join(problems)})")
    with torch.no_grad():
        for n, w in weights.items():
            own[n].copy_(w.to(own[n].dtype))
    return step


def adamw(params, o) -> torch.optim.AdamW:
    """AdamW of ``optim`` over ``params``, fused (one kernel per parameter) on CPU and CUDA:
    the multi-tensor (foreach) update of a 135M-parameter model took 5-8x longer on CPU."""
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                for p in params)
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.adam_eps, weight_decay=o.weight_decay,
                             fused=fused or None)


def _restart_optimizer_state(optimizer, student, folder: str) -> None:
    """A projected restart continues with the AdamW state its checkpoint saved for the
    matrices it trains (``projection.carry_optimizer_state``); fresh without ``trainer_state/``."""
    if not (Path(folder) / "trainer_state" / "state.json").is_file():
        return
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    carry_optimizer_state(optimizer, ckpt.load_trainer_state(folder).optimizer,
                          [n for n, _ in student.named_parameters()], names)


def _worst_of(extra: dict[str, float], values: Mapping[str, float]) -> None:
    """Keep, per key, the largest value over the inner epochs (NaN counts as nothing)."""
    for k, v in values.items():
        if k not in extra or math.isnan(extra[k]) or v > extra[k]:
            extra[k] = v


def _save_subspaces(run_dir: Path, projection: Mapping[str, torch.Tensor], config: TrainConfig, *, step: int) -> None:
    pj = config.project
    save_subspaces(run_dir / SUBSPACE_FILE, projection,
                   {"from": str(pj.start), "origin": pj.origin or config.model.student, "rank": str(pj.rank),
                    "step": str(step)})


def _on_device(subspaces: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """V_K as the gradients use it (float32 on the device); this is also what is saved, so a
    resumed run projects with bit-identical bases."""
    return {n: v.to(device=device, dtype=torch.float32) for n, v in subspaces.items()}


def monitor_settings(config: TrainConfig) -> MonitorSettings:
    """The geometry monitor's settings from ``run.monitor_*`` (weights rounded to the checkpoint dtype)."""
    r = config.run
    return MonitorSettings(matrices=r.monitor_matrices, lock_probes=r.monitor_lock_probes,
                           dtype=config.checkpoint.dtype, per_matrix=r.monitor_per_matrix)


def _autocast(setting: bool | str, device: torch.device):
    """bf16 autocast per ``optim.bf16_autocast`` (``train`` resolves ``"auto"`` once; a stage
    called on its own resolves it here)."""
    return autocast_context(resolve_bf16_autocast(setting, device), device)


# ------------------------------------------------------------------- the stages


def sample_micro_batch(model, tokenizer, task, problems, indices: Sequence[int], *, config: TrainConfig,
                       seed: int, device: torch.device) -> MicroBatch:
    """Rollout (RL objectives: ``G`` samples per prompt) or demonstrations (SFT)."""
    chosen = [problems[i] for i in indices]
    prompts = [task.format_prompt(p, tokenizer) for p in chosen]
    if config.objective.name == "sft":
        ids, att, resp = demonstration_batch(tokenizer, prompts, [task.demonstration(p) for p in chosen])
        return MicroBatch(input_ids=ids.to(device), attention_mask=att.to(device), response_mask=resp.to(device),
                          problem_index=torch.tensor(list(indices), dtype=torch.long))
    from opdgeo.training.rollout import generate

    r = config.rollout
    with torch.no_grad(), _autocast(config.optim.bf16_autocast, device):
        ro = generate(model, tokenizer, prompts, num_samples=r.group_size, temperature=r.temperature,
                      max_new_tokens=r.max_new_tokens, seed=seed, batch_size=len(prompts) * r.group_size,
                      score=_needs_behaviour_logprobs(config))
    idx = torch.tensor(list(indices), dtype=torch.long)[ro.prompt_index.cpu().long()]  # [n]
    return MicroBatch(input_ids=ro.input_ids.to(device), attention_mask=ro.attention_mask.to(device),
                      response_mask=ro.response_mask.to(device).bool(), problem_index=idx, texts=tuple(ro.texts),
                      behaviour_logprobs=None if ro.behaviour_logprobs is None else ro.behaviour_logprobs.to(device))


def _needs_behaviour_logprobs(config: TrainConfig) -> bool:
    """Whether the rollout must score its samples. Not for on-policy RLVR with one inner
    pass: its old log-probs are then the loss forward's own, detached (``backward_micro_batches``),
    bit-identical to a separate no-grad forward of the same weights and batch, which is saved."""
    return (config.rollout.off_policy or config.optim.ppo_epochs > 1
            or config.objective.weights().get("opd", 0.0) != 0.0)


def _logprobs(model, mb: MicroBatch) -> torch.Tensor:
    from opdgeo.training.rollout import sequence_logprobs

    return sequence_logprobs(model, mb.input_ids, mb.attention_mask, mb.response_mask)


def score_micro_batch(mb: MicroBatch, *, student, teacher, task, problems, config: TrainConfig,
                      device: torch.device) -> MicroBatch:
    """Rewards (every rollout), the old log-probs (no gradient, the ratio's reference), the
    student log-probs "at rollout time" (OPD's r_t) and the teacher's at temperature 1 (OPD).

    On-policy the old log-probs are the student's own behaviour log-probs (ratio exactly 1
    at the first inner step) and serve as the OPD student log-probs too. Off-policy
    (``rollout.policy`` not the student) the old log-probs are the behaviour policy's,
    recorded at generation, so the surrogate's ratio is exp(log π_θ − log π_behaviour), and
    the OPD gap needs one extra no-grad student forward."""
    weights = config.objective.weights() if config.objective.name != "sft" else {}
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
    with torch.no_grad(), _autocast(config.optim.bf16_autocast, device):
        if weights.get("opd", 0.0) != 0.0:
            teacher_lp = _logprobs(teacher, mb).float()
            if config.rollout.off_policy:
                student_lp = _logprobs(student, mb).float()
    return dataclasses.replace(mb, rewards=rewards, old_logprobs=old, student_logprobs=student_lp,
                               teacher_logprobs=teacher_lp)


def _student_logprobs(mb: MicroBatch) -> torch.Tensor:
    """OPD's student log-probs at rollout time (on-policy: the old log-probs themselves)."""
    return mb.student_logprobs if mb.student_logprobs is not None else mb.old_logprobs


def sparsify_seed(seed: int, step: int, index: int) -> int:
    """Seed of the random token mask of micro-batch ``index`` of step ``step`` (rank-independent)."""
    return _derive_seed("token_keep", seed, step, index)


def token_keep_mask(gaps: torch.Tensor, response_mask: torch.Tensor, config: TrainConfig, *,
                    seed: int) -> torch.Tensor | None:
    """The token-sparsification mask of ``config.token_keep`` (None for mode ``none``)."""
    tk = config.token_keep
    if tk.mode == "topkl":
        return topkl_keep_mask(gaps, response_mask, tk.fraction)
    if tk.mode == "random":
        gen = torch.Generator().manual_seed(seed)
        return random_keep_mask(response_mask, tk.fraction, generator=gen)
    return None


def with_advantages(mb: MicroBatch, config: TrainConfig, *, keep_seed: int = 0) -> MicroBatch:
    """Per-token weights and the loss mask: 1 (SFT), GRPO (RLVR), −(s − t) (OPD), or a mix.

    Token sparsification (``token_keep``) keeps, per sample, ceil(ρ·T) tokens of the OPD
    signal and rescales them by T/Σm (``controls.rescale_kept``); dropped tokens keep a
    zero advantage and stay in the token-mean denominator, which the rescaling accounts for.
    Objective mixing: A = Σ_k w_k A_k (``combine_advantages``, zero-weight terms skipped);
    GRPO's zero-variance filter drops a sample only when OPD has weight 0
    (``controls.mixed_keep_mask``), so both limits are the pure runs bit for bit.
    """
    obj = config.objective
    if obj.name == "sft":
        return dataclasses.replace(mb, advantages=mb.response_mask.float(), loss_mask=mb.response_mask)
    weights = obj.weights()
    signals: dict[str, torch.Tensor] = {}
    loss_mask = mb.response_mask
    keep_tokens = None
    if weights.get("rlvr", 0.0) != 0.0:
        adv, keep = grpo_advantages(mb.rewards, config.rollout.group_size, obj.grpo_eps, std=obj.grpo_std,
                                    filter_zero_variance=obj.filter_zero_variance)
        signals["rlvr"] = broadcast_to_tokens(adv.to(mb.response_mask.device), mb.response_mask)
        keep = mixed_keep_mask(keep, weights.get("opd", 0.0))
        loss_mask = loss_mask & keep.to(loss_mask.device).unsqueeze(1)
    if weights.get("opd", 0.0) != 0.0:
        student_lp = _student_logprobs(mb)
        opd = opd_advantages(student_lp, mb.teacher_logprobs, mb.response_mask)  # [n, T] = -r_t
        gaps = student_lp - mb.teacher_logprobs  # [n, T] r_t (signed)
        keep_tokens = token_keep_mask(gaps, mb.response_mask, config, seed=keep_seed)
        if keep_tokens is not None:
            opd = rescale_kept(opd, keep_tokens, mb.response_mask)
        signals["opd"] = opd
    return dataclasses.replace(mb, advantages=combine_advantages(signals, weights), loss_mask=loss_mask,
                               keep_mask=keep_tokens)


def backward_micro_batches(model, batches: Sequence[MicroBatch], *, config: TrainConfig, global_tokens: float,
                           device: torch.device) -> dict[str, float]:
    """Forward + backward of every micro-batch; gradients accumulate in ``.grad``.

    Each micro-batch's loss is ``masked_mean(per_token, loss_mask, denominator=global_tokens)``,
    so the accumulated gradient (summed over micro-batches, then over ranks) is exactly the
    gradient of the token-level mean over the global batch. Returns this rank's sums
    (``loss``, ``clipped``, ``ratio``) for logging.
    """
    eps_low, eps_high = clip_range(config)
    sums = {"loss": 0.0, "clipped": 0.0, "ratio": 0.0, "ratio_max": 0.0}
    alone = not distributed.is_distributed()
    for i, mb in enumerate(batches):
        if alone and not mb.loss_mask.any():
            # no token counts (e.g. every group filtered): its loss and gradient are exactly 0, so
            # no forward. Only in one process: under DDP/FSDP every rank's forward and backward
            # take part in collectives, so every rank runs every micro-batch.
            continue
        # gradients are reduced over ranks once, in the last micro-batch's backward
        with distributed.no_sync(model, sync=i == len(batches) - 1):
            loss = _micro_batch_loss(model, mb, config, eps=(eps_low, eps_high), global_tokens=global_tokens,
                                     device=device, sums=sums)
            loss.backward()
        sums["loss"] += float(loss.detach())
    if alone:  # a step whose micro-batches were all skipped: zero gradients, so AdamW steps as it would with them
        for p in model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
    return sums


def _micro_batch_loss(model, mb: MicroBatch, config: TrainConfig, *, eps: tuple[float, float], global_tokens: float,
                      device: torch.device, sums: dict[str, float]) -> torch.Tensor:
    """Σ per-token loss / global_tokens of one micro-batch (adds its clip/ratio counts to ``sums``)."""
    with _autocast(config.optim.bf16_autocast, device):
        lp = _logprobs(model, mb).float()  # [n, T]
    if config.objective.name == "sft":
        per_token = sft_loss(lp, mb.loss_mask)
    else:
        # the student before this step's updates, no gradient (on-policy RLVR with one inner pass:
        # this very forward, detached; the ratio is exactly 1, as with a separate forward)
        old = mb.old_logprobs if mb.old_logprobs is not None else lp.detach()
        out = policy_gradient_loss(lp, old, mb.advantages, mb.loss_mask, eps_low=eps[0], eps_high=eps[1])
        per_token = out.loss
        sums["clipped"] += float(out.clipped.sum())
        sums["ratio"] += float(masked_sum(out.ratio, mb.loss_mask))
        if mb.loss_mask.any():
            sums["ratio_max"] = max(sums["ratio_max"], float(out.ratio[mb.loss_mask].max()))
    return masked_mean(per_token, mb.loss_mask, denominator=global_tokens)


def clip_range(config: TrainConfig) -> tuple[float, float]:
    """``(eps_low, eps_high)`` of the surrogate: the objective's on-policy, the symmetric
    ``rollout.offpolicy_eps`` when another policy generated the responses."""
    if config.rollout.off_policy:
        eps = config.rollout.offpolicy_eps
        return min(eps, 1.0), eps
    return config.objective.eps_low, config.objective.eps_high


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


def step_metrics(batches: Sequence[MicroBatch], sums: Mapping[str, float], *, config: TrainConfig, lr: float,
                 grad_norm: float, step_time: float, global_tokens: float) -> dict[str, float]:
    """The step's metrics (global: all sums are all-reduced over ranks)."""
    name = config.objective.name
    local = {
        "loss": sums["loss"], "clipped": sums["clipped"], "ratio": sums["ratio"],
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
    keys = list(local)
    g = dict(zip(keys, all_reduce_sum(torch.tensor([local[k] for k in keys], dtype=torch.float64)).tolist()))
    out = {
        "train/loss": g["loss"],
        "train/lr": lr,
        "train/grad_norm": grad_norm,
        "train/tokens": global_tokens,
        "train/step_time": step_time,
        "train/tokens_per_s": g["response_tokens"] / step_time if step_time > 0 else float("nan"),
        "train/skipped": float(global_tokens == 0),
        "rollout/response_len": g["response_tokens"] / max(g["responses"], 1.0),
    }
    if name == "sft":
        out["sft/nll"] = g["loss"]
    else:
        out["train/clip_frac"] = g["clipped"] / global_tokens if global_tokens else 0.0
        out["train/ratio_mean"] = g["ratio"] / global_tokens if global_tokens else 1.0
        out["rlvr/reward"] = g["reward"] / max(g["responses"], 1.0)
        out["rlvr/accuracy"] = g["correct"] / max(g["responses"], 1.0)
        if "rlvr" in config.objective.weights():
            out["rlvr/kept_fraction"] = g["kept_sequences"] / max(g["responses"], 1.0)
        if "opd" in config.objective.weights():
            out["opd/teacher_gap"] = g["gap"] / max(g["response_tokens"], 1.0)
        if config.token_keep.mode != "none":
            out.update(sparsify_stats({k: g[f"sparsify_{k}"] for k in SPARSIFY_SUMS}).as_metrics())
        if config.rollout.off_policy:  # NaN when no token counted (every group filtered)
            ratio_max = all_reduce_max(sums["ratio_max"])
            out["offpolicy/ratio_mean"] = out["train/ratio_mean"] if global_tokens else float("nan")
            out["offpolicy/ratio_max"] = ratio_max if global_tokens else float("nan")
            out["offpolicy/clip_fraction"] = out["train/clip_frac"] if global_tokens else float("nan")
    return out


# ------------------------------------------------------------------------- run


def _prepare_run_dir(run_dir: Path, config: TrainConfig, *, resume: bool) -> Path | None:
    """Create the run folder / find the checkpoint to resume from (checks before models load)."""
    import yaml

    existing = run_dir / "config.yaml"
    if resume:
        if existing.is_file():
            diffs = resume_differences(yaml.safe_load(existing.read_text()) or {}, config)
            if diffs:
                raise ConfigError(f"{existing}: --resume with a different config ({', '.join(diffs)})")
        return ckpt.latest_resumable(run_dir)
    if (run_dir / "metrics.jsonl").exists() or ckpt.list_checkpoints(run_dir):
        raise ConfigError(f"{run_dir}: already holds a run; pass --resume to continue it or choose another --out")
    return None


def _write_config(run_dir: Path, config: TrainConfig) -> None:
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config_to_dict(config), sort_keys=False))


@holds_run_folder  # one writer per run folder (opdgeo.locking)
def train(config: TrainConfig, *, resume: bool = False, hooks: Hooks | None = None) -> RunResult:
    """Run SFT, RLVR or OPD as configured; write the run folder; return a ``RunResult``.

    Args:
        config: a validated ``TrainConfig`` (``load_config``).
        resume: continue from the last complete checkpoint of ``config.run.out_dir`` with
            its optimizer, scheduler and RNG state (fresh start if there is none).
        hooks: optional extension points (``Hooks``).

    Raises:
        ConfigError: the run folder already holds a run (without ``resume``), the config
            differs from the run's (with ``resume``), the micro-batches do not split over the
            processes, or a model/task cannot be loaded.
    """
    import transformers

    transformers.utils.logging.disable_progress_bar()
    hooks = hooks or Hooks()
    world = distributed.launched_world()
    strategy = distributed.resolve_strategy(config.distributed.strategy, world)
    if world > 1 and strategy == "none":
        raise ConfigError(f"distributed.strategy: 'none' cannot train {world} processes (nothing would sum their "
                          "gradients); use ddp or fsdp")
    ctx = distributed.init(single_process_group=strategy == "fsdp")
    try:
        return _train(config, strategy, ctx, resume=resume, hooks=hooks)
    finally:
        distributed.destroy(ctx)


def _train(config: TrainConfig, strategy: str, ctx: distributed.Context, *, resume: bool, hooks: Hooks) -> RunResult:
    from opdgeo.models import check_same_tokenizer
    from opdgeo.training.data import log_answers, training_problems

    rank, world, device, is_main = ctx.rank, ctx.world, ctx.device, ctx.is_main
    # "auto" becomes what this device computes natively / this launch uses; config.yaml records the result
    config = dataclasses.replace(
        config, optim=dataclasses.replace(config.optim, bf16_autocast=resolve_bf16_autocast(config.optim.bf16_autocast, device)),
        distributed=dataclasses.replace(config.distributed, strategy=strategy))
    o, obj = config.optim, config.objective
    n_micro = o.batch_size // o.micro_batch_size
    my_micro = rank_micro_batches(n_micro, rank, world)  # ConfigError before any model loads
    run_dir = Path(config.run.out_dir)
    resume_from = _prepare_run_dir(run_dir, config, resume=resume)
    _barrier()

    # ---- task, student, teacher
    data = training_problems(config, run_dir, device=device, is_main=is_main, barrier=_barrier)
    task, problems = data.task, data.problems
    torch.manual_seed(config.run.seed)
    student, tokenizer = load_policy(config.model.student, init_seed=config.model.init_seed)
    # fp32 master weights; under fsdp they stay on the CPU until fully_shard moves each layer's shard
    student = student.to(device=None if strategy == "fsdp" else device, dtype=torch.float32).eval()
    if config.model.activation_checkpointing:
        activation_checkpointing_(student)
    teacher = None
    if obj.name != "sft" and (obj.weights().get("opd", 0.0) != 0.0 or config.rollout.policy == "teacher"):
        teacher, teacher_tok = load_policy(config.model.teacher, init_seed=config.model.init_seed)
        check_same_tokenizer(tokenizer, teacher_tok)
        teacher = inference_model(teacher, config, device)
    behaviour = behaviour_policy(config, student, tokenizer, teacher, device=device)
    # the run's origin W0 (the monitor's and the projection's ΔW = W − W0), in the checkpoint dtype
    needs_origin = bool(config.run.monitor_every) or config.project.start is not None
    origin = origin_matrices(config, student) if needs_origin else None

    # ---- subspace projection from a checkpoint: start there, train only the block matrices
    start = 0
    projection = None  # name -> V_K while projecting
    pj = config.project
    if isinstance(pj.start, str):
        start = start_from_checkpoint(student, pj.start)
        if start >= o.steps:
            raise ConfigError(f"project.from: {pj.start} is at step {start}, not before optim.steps = {o.steps}")
        projection = _on_device(load_subspaces(run_dir / SUBSPACE_FILE)[0] if resume_from is not None
                                else projection_subspaces(origin, _rounded_checkpoint(pj.start, origin, config),
                                                          rank=pj.rank), device)
        freeze_outside(student, projection)

    model = _wrap(student, strategy, ctx, config)  # what the loss runs through
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = adamw(params, o)
    if isinstance(pj.start, str) and resume_from is None:
        _restart_optimizer_state(optimizer, student, pj.start)
    lr_at = functools.partial(learning_rate, lr=o.lr, steps=o.steps, schedule=o.schedule,
                              warmup_steps=o.warmup_steps, min_lr=o.min_lr)
    first = start  # a run restarted from a checkpoint continues its schedule at that step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s + first) / o.lr)

    # ---- resume
    if resume_from is not None:  # DCP, in place, resharded to this launch
        start = ckpt.load_into(resume_from, student, optimizer, scheduler)
    if isinstance(pj.start, int) and start >= pj.start:  # resumed after projection began
        projection = _on_device(load_subspaces(run_dir / SUBSPACE_FILE)[0], device)
        freeze_outside(student, projection)
        model = _wrap(student, strategy, ctx, config)
    if is_main:
        ckpt.remove_partial(run_dir)
        ckpt.truncate_metrics(run_dir / "metrics.jsonl", start)
        _write_config(run_dir, config)
        if projection is not None and resume_from is None:
            _save_subspaces(run_dir, projection, config, step=start)
    _barrier()
    trackers = open_trackers(config, run_dir) if is_main else Trackers([])  # run.report_to
    monitor = None
    if config.run.monitor_every and is_main:
        monitor = start_monitor(origin, monitor_settings(config))
        if start:
            monitor = restore_monitor(monitor, ckpt.read_metrics(run_dir / "metrics.jsonl"), every=config.run.monitor_every,
                                      step=start, weights=dict(student.named_parameters()))
    monitor_text = ""

    named_params = dict(student.named_parameters())
    history: list[StepStats] = []
    written: list[Path] = []
    progress = StepProgress("train", o.steps, start=start, enabled=is_main and config.run.progress)
    with progress, closing(trackers):
        for step in range(start, o.steps):
            t0 = time.perf_counter()
            # rollout -> score -> advantages
            prompts = step_prompts(len(problems), o.batch_size, step, config.run.seed)
            batches = []
            for c in my_micro:
                idx = prompts[c * o.micro_batch_size:(c + 1) * o.micro_batch_size]
                mb = sample_micro_batch(behaviour, tokenizer, task, problems, idx, config=config,
                                        seed=micro_batch_seed(config.run.seed, step, c), device=device)
                mb = score_micro_batch(mb, student=student, teacher=teacher, task=task, problems=problems,
                                       config=config, device=device)
                batches.append(with_advantages(mb, config, keep_seed=sparsify_seed(config.run.seed, step, c)))
            global_tokens = float(all_reduce_sum(torch.tensor([sum(float(mb.loss_mask.sum()) for mb in batches)],
                                                              dtype=torch.float64))[0])
            # loss -> step (ppo_epochs inner passes over the same rollouts)
            extra: dict[str, float] = {}
            grad_norm = 0.0
            params = [p for p in student.parameters() if p.requires_grad]
            for epoch in range(o.ppo_epochs):
                sums = backward_micro_batches(model, batches, config=config, global_tokens=global_tokens,
                                              device=device)
                if epoch == 0:
                    first_sums = sums
                projecting = projection is not None and pj.mode == "project"
                if projecting:  # after the reduction over ranks, before clipping and the step
                    kept = project_gradients_(named_params, projection)
                    if epoch == 0:
                        extra.update(kept.as_metrics())
                if hooks.after_backward is not None:
                    extra.update(hooks.after_backward(HookContext(step + 1, student, config, run_dir, rank, world)) or {})
                if global_tokens > 0:
                    before = weights_before_step(named_params, projection) if projection is not None else None
                    norm = optimizer_step(model, optimizer, grad_clip=o.grad_clip)
                    grad_norm = norm if epoch == 0 else grad_norm
                    if before is not None:  # AdamW's whole update D -> D V_K V_Kᵀ (freeze: measured only)
                        _worst_of(extra, project_updates_(named_params, projection, before,
                                                          project=projecting).as_metrics())
                else:  # nothing to learn from (e.g. every group filtered): no update
                    optimizer.zero_grad(set_to_none=True)
            lr = optimizer.param_groups[0]["lr"]
            with warnings.catch_warnings():  # a skipped update still advances the schedule
                warnings.filterwarnings("ignore", message="Detected call of")
                scheduler.step()
            # log
            if is_main:
                log_answers(config, run_dir, task, problems, batches, step=step + 1)
            values = step_metrics(batches, first_sums, config=config, lr=lr, grad_norm=grad_norm,
                                  step_time=time.perf_counter() - t0, global_tokens=global_tokens)
            if monitor is not None and (step + 1) % config.run.monitor_every == 0:
                result, monitor = probe(monitor, step + 1, named_params)
                extra.update(result.as_metrics())
                monitor_text = " | " + result.summary()
            if config.run.monitor_every and hooks.every_n is not None and (step + 1) % config.run.monitor_every == 0:
                extra.update(hooks.every_n(HookContext(step + 1, student, config, run_dir, rank, world)) or {})
            values.update({k: float(v) for k, v in extra.items()})
            stats = StepStats(step=step + 1, values=MappingProxyType(values))
            history.append(stats)
            if is_main:
                ckpt.append_metrics(run_dir / "metrics.jsonl", stats.record())
                progress.update(step + 1, values, f"{values['train/tokens_per_s']:.0f} tok/s{monitor_text}")
                trackers.log(stats.record())
            # checkpoint
            every = config.checkpoint.every
            if (every and (step + 1) % every == 0) or step + 1 == o.steps:
                written.append(_save(run_dir, step + 1, student, tokenizer, optimizer, scheduler, config, world))
            # projection from step S: take V_K of ΔW_S now, project every later gradient
            if isinstance(pj.start, int) and step + 1 == pj.start:
                projection = _on_device(projection_subspaces(origin, _rounded(named_params, origin, config),
                                                             rank=pj.rank), device)
                freeze_outside(student, projection)
                model = _wrap(student, strategy, ctx, config)  # DDP reduces the trainable set it was built with
                if is_main:
                    _save_subspaces(run_dir, projection, config, step=step + 1)
    return RunResult(out_dir=run_dir, final_step=max(start, o.steps),
                     checkpoints=tuple(written), history=tuple(history), resumed_from=resume_from)


def _wrap(student, strategy: str, ctx: distributed.Context, config: TrainConfig):
    """The student as the loss runs it: DDP, FSDP2 (bf16 compute exactly when autocast is on) or itself."""
    return distributed.wrap_model(student, strategy, ctx, bf16_compute=bool(config.optim.bf16_autocast),
                                  cpu_offload=config.distributed.cpu_offload)


def _save(run_dir: Path, step: int, student, tokenizer, optimizer, scheduler, config: TrainConfig, world: int) -> Path:
    """The step folder (every rank calls this: FSDP2 shards and DCP writes are collective)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    state = None
    if config.checkpoint.save_trainer_state:
        master, optim = get_state_dict(student, optimizer)  # FSDP2: this rank's shards
        state = ckpt.TrainerState(step=step, data_position=step * config.optim.batch_size, master=master,
                                  optimizer=optim, scheduler=scheduler.state_dict(), rng=ckpt.rng_state(),
                                  extra={"objective": config.objective.name, "world_size": world,
                                         "strategy": config.distributed.strategy})
    return ckpt.save_checkpoint(run_dir, step, student, tokenizer, dtype=config.checkpoint.dtype, trainer_state=state)
