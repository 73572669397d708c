"""The training recipe: SFT, RLVR (GRPO) and OPD from one policy-gradient loop (SPEC §3).

``train(config)`` reads top to bottom. Per optimizer step::

    prompts    = step_prompts(...)                      # seeded, global batch
    batches    = [sample_micro_batch(...) ...]          # rollouts (RL) or demonstrations (SFT)
    batches    = [score_micro_batch(...) ...]           # rewards, old and teacher log-probs
    batches    = [with_advantages(...) ...]             # per-token weights: the ONLY difference
    n_tokens   = all_reduce_sum(counted tokens)         # global token count
    for epoch in ppo_epochs:
        backward_micro_batches(...)                     # loss = Σ per-token / n_tokens
        all_reduce_gradients(...); hooks.after_backward # gradient hook point
        optimizer_step(...)                             # clip + AdamW
    log; checkpoint; hooks.every_n

The three objectives differ only in the per-token weight: 1 on demonstration tokens
(SFT, ``sft_loss``), the group-normalized verifiable reward (RLVR) or
log π_teacher - log π_student on the sampled token (OPD), both in the clipped surrogate.

Data parallelism (``accelerate launch --num_processes W``): the global batch of
``batch_size`` prompts is cut into micro-batches of ``micro_batch_size`` prompts; micro-
batch ``c`` of step ``s`` is generated with its own seed derived from (run seed, s, c), and
rank ``r`` takes micro-batches ``r·k .. r·k+k-1``. So the union over ranks is exactly the
single-process batch, the token count is all-reduced before the loss, and the gradients
are summed over ranks: 2 ranks take the same step as 1 process, to float tolerance.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from opdgeo.errors import ConfigError
from opdgeo.training import checkpointing as ckpt
from opdgeo.training.advantages import broadcast_to_tokens, combine_advantages, grpo_advantages, opd_advantages
from opdgeo.training.config import TrainConfig, config_to_dict
from opdgeo.training.losses import masked_mean, masked_sum, policy_gradient_loss, sft_loss

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
    "sample_micro_batch",
    "score_micro_batch",
    "with_advantages",
    "optimizer_step",
    "step_metrics",
    "all_reduce_sum",
    "all_reduce_gradients",
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
    summed over ranks and before clipping and the optimizer step (e.g. subspace
    projection); ``every_n(ctx)`` runs after the step every ``run.monitor_every`` steps (e.g.
    the geometry monitor). Either may return a mapping of extra metrics to log.
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
    teacher_logprobs: torch.Tensor | None = None  # [n, T]
    advantages: torch.Tensor | None = None  # [n, T]
    loss_mask: torch.Tensor | None = None  # [n, T] bool: tokens that count in the loss


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


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a float64 tensor over ranks (identity in one process)."""
    dist = _dist()
    if dist is not None and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum the gradients over ranks, in one flat buffer (a missing gradient counts as 0)."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def _barrier() -> None:
    dist = _dist()
    if dist is not None and dist.get_world_size() > 1:
        dist.barrier()


# ---------------------------------------------------------------------- models


def load_policy(source: str, *, init_seed: int = 0):
    """``(model, tokenizer)`` for a model source: ``tiny:PRESET`` builds a fresh model with the
    character tokenizer; anything else goes through ``opdgeo.models.load_model``."""
    from opdgeo.models import build_model, char_tokenizer, load_model, load_tokenizer, tiny_qwen3_config

    if source.startswith("tiny:"):
        tok = char_tokenizer()
        cfg = tiny_qwen3_config(source[5:], len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        return build_model(cfg, seed=init_seed), tok
    return load_model(source), load_tokenizer(source)


def _autocast(enabled: bool, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


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
                      max_new_tokens=r.max_new_tokens, seed=seed, batch_size=len(prompts) * r.group_size)
    idx = torch.tensor(list(indices), dtype=torch.long)[ro.prompt_index.cpu().long()]  # [n]
    return MicroBatch(input_ids=ro.input_ids.to(device), attention_mask=ro.attention_mask.to(device),
                      response_mask=ro.response_mask.to(device).bool(), problem_index=idx, texts=tuple(ro.texts),
                      behaviour_logprobs=ro.behaviour_logprobs.to(device))


def _logprobs(model, mb: MicroBatch) -> torch.Tensor:
    from opdgeo.training.rollout import sequence_logprobs

    return sequence_logprobs(model, mb.input_ids, mb.attention_mask, mb.response_mask)


def score_micro_batch(mb: MicroBatch, *, student, teacher, task, problems, config: TrainConfig,
                      device: torch.device) -> MicroBatch:
    """Rewards (every rollout), the old log-probs of the current student (no gradient, the
    ratio's reference: exactly 1 at the first inner step; also the OPD student log-probs
    "at rollout time") and the teacher's log-probs at temperature 1 (OPD)."""
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
    teacher_lp = None
    with torch.no_grad(), _autocast(config.optim.bf16_autocast, device):
        if weights.get("opd", 0.0) != 0.0:
            teacher_lp = _logprobs(teacher, mb).float()
    return dataclasses.replace(mb, rewards=rewards, old_logprobs=old, teacher_logprobs=teacher_lp)


def with_advantages(mb: MicroBatch, config: TrainConfig) -> MicroBatch:
    """Per-token weights and the loss mask: 1 (SFT), GRPO (RLVR), −(s − t) (OPD), or a mix."""
    obj = config.objective
    if obj.name == "sft":
        return dataclasses.replace(mb, advantages=mb.response_mask.float(), loss_mask=mb.response_mask)
    weights = obj.weights()
    signals: dict[str, torch.Tensor] = {}
    loss_mask = mb.response_mask
    if weights.get("rlvr", 0.0) != 0.0:
        adv, keep = grpo_advantages(mb.rewards, config.rollout.group_size, obj.grpo_eps, std=obj.grpo_std,
                                    filter_zero_variance=obj.filter_zero_variance)
        signals["rlvr"] = broadcast_to_tokens(adv.to(mb.response_mask.device), mb.response_mask)
        loss_mask = loss_mask & keep.to(loss_mask.device).unsqueeze(1)
    if weights.get("opd", 0.0) != 0.0:
        signals["opd"] = opd_advantages(mb.old_logprobs, mb.teacher_logprobs, mb.response_mask)
    return dataclasses.replace(mb, advantages=combine_advantages(signals, weights), loss_mask=loss_mask)


def backward_micro_batches(model, batches: Sequence[MicroBatch], *, config: TrainConfig, global_tokens: float,
                           device: torch.device) -> dict[str, float]:
    """Forward + backward of every micro-batch; gradients accumulate in ``.grad``.

    Each micro-batch's loss is ``masked_mean(per_token, loss_mask, denominator=global_tokens)``,
    so the accumulated gradient (summed over micro-batches, then over ranks) is exactly the
    gradient of the token-level mean over the global batch. Returns this rank's sums
    (``loss``, ``clipped``, ``ratio``) for logging.
    """
    obj = config.objective
    sums = {"loss": 0.0, "clipped": 0.0, "ratio": 0.0}
    for mb in batches:
        with _autocast(config.optim.bf16_autocast, device):
            lp = _logprobs(model, mb).float()  # [n, T]
        if obj.name == "sft":
            per_token = sft_loss(lp, mb.loss_mask)
        else:
            old = mb.old_logprobs  # the student before this step's updates, no gradient
            out = policy_gradient_loss(lp, old, mb.advantages, mb.loss_mask, eps_low=obj.eps_low, eps_high=obj.eps_high)
            per_token = out.loss
            sums["clipped"] += float(out.clipped.sum())
            sums["ratio"] += float(masked_sum(out.ratio, mb.loss_mask))
        loss = masked_mean(per_token, mb.loss_mask, denominator=global_tokens)
        loss.backward()
        sums["loss"] += float(loss.detach())
    return sums


def optimizer_step(model, optimizer, *, grad_clip: float | None) -> float:
    """Clip the global gradient norm (if set), AdamW step, zero the gradients; returns the
    pre-clip gradient 2-norm."""
    params = [p for p in model.parameters() if p.requires_grad]
    if grad_clip is not None:
        norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    else:
        norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
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
        "gap": sum(float(masked_sum(mb.old_logprobs - mb.teacher_logprobs, mb.response_mask))
                   for mb in batches if mb.teacher_logprobs is not None),
    }
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
    return out


# ------------------------------------------------------------------------- run


def _prepare_run_dir(run_dir: Path, config: TrainConfig, *, resume: bool) -> Path | None:
    """Create the run folder / find the checkpoint to resume from (checks before models load)."""
    import yaml

    resolved = config_to_dict(config)
    existing = run_dir / "config.yaml"
    if resume:
        if existing.is_file():
            saved = yaml.safe_load(existing.read_text()) or {}
            free = {("optim", "steps"), ("checkpoint", "every"), ("run", "progress"), ("run", "out_dir")}
            diffs = [f"{s}.{k}" for s, sec in resolved.items() for k, v in sec.items()
                     if (s, k) not in free and saved.get(s, {}).get(k) != v]
            if diffs:
                raise ConfigError(f"{existing}: --resume with a different config ({', '.join(diffs)})")
        return ckpt.latest_resumable(run_dir)
    if (run_dir / "metrics.jsonl").exists() or ckpt.list_checkpoints(run_dir):
        raise ConfigError(f"{run_dir}: already holds a run; pass --resume to continue it or choose another --out")
    return None


def _write_config(run_dir: Path, config: TrainConfig) -> None:
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    tmp.replace(run_dir / "config.yaml")


def _progress(enabled: bool, total: int, start: int):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not enabled:
        return None
    prog = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.description}"), console=Console(stderr=True), transient=False)
    task_id = prog.add_task("", total=total, completed=start)
    return prog, task_id


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
    from accelerate import Accelerator

    from opdgeo.models import check_same_tokenizer
    from opdgeo.tasks import load_task

    transformers.utils.logging.disable_progress_bar()
    hooks = hooks or Hooks()
    # cpu=True on CPU-only hosts: accelerate then sets up MULTI_CPU (gloo) under a launcher
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    is_main = accelerator.is_main_process
    o, obj = config.optim, config.objective
    n_micro = o.batch_size // o.micro_batch_size
    my_micro = rank_micro_batches(n_micro, rank, world)  # ConfigError before any model loads
    run_dir = Path(config.run.out_dir)
    resume_from = _prepare_run_dir(run_dir, config, resume=resume)
    _barrier()

    # ---- task, student, teacher
    task = load_task(config.task.spec)
    problems = task.problems(config.task.split, config.task.num_problems)
    if not problems:
        raise ConfigError(f"task.spec: {config.task.spec!r} has no {config.task.split!r} problems")
    torch.manual_seed(config.run.seed)
    student, tokenizer = load_policy(config.model.student, init_seed=config.model.init_seed)
    student = student.to(device=device, dtype=torch.float32).eval()  # fp32 master weights
    teacher = None
    if obj.name != "sft" and obj.weights().get("opd", 0.0) != 0.0:
        teacher, teacher_tok = load_policy(config.model.teacher, init_seed=config.model.init_seed)
        check_same_tokenizer(tokenizer, teacher_tok)
        teacher = teacher.to(device).eval().requires_grad_(False)

    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.adam_eps, weight_decay=o.weight_decay)
    lr_at = functools.partial(learning_rate, lr=o.lr, steps=o.steps, schedule=o.schedule,
                              warmup_steps=o.warmup_steps, min_lr=o.min_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s) / o.lr)

    # ---- resume
    start = 0
    if resume_from is not None:
        state = ckpt.load_trainer_state(resume_from)
        student.load_state_dict({k: v.to(device) for k, v in state.master.items()})
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        ckpt.set_rng_state(state.rng)
        start = state.step
    if is_main:
        ckpt.remove_partial(run_dir)
        ckpt.truncate_metrics(run_dir / "metrics.jsonl", start)
        _write_config(run_dir, config)
    _barrier()

    history: list[StepStats] = []
    written: list[Path] = []
    bar = _progress(is_main and config.run.progress, o.steps, start)
    ctx_bar = bar[0] if bar else nullcontext()
    with ctx_bar:
        for step in range(start, o.steps):
            t0 = time.perf_counter()
            # rollout -> score -> advantages
            prompts = step_prompts(len(problems), o.batch_size, step, config.run.seed)
            batches = []
            for c in my_micro:
                idx = prompts[c * o.micro_batch_size:(c + 1) * o.micro_batch_size]
                mb = sample_micro_batch(student, tokenizer, task, problems, idx, config=config,
                                        seed=micro_batch_seed(config.run.seed, step, c), device=device)
                mb = score_micro_batch(mb, student=student, teacher=teacher, task=task, problems=problems,
                                       config=config, device=device)
                batches.append(with_advantages(mb, config))
            global_tokens = float(all_reduce_sum(torch.tensor([sum(float(mb.loss_mask.sum()) for mb in batches)],
                                                              dtype=torch.float64))[0])
            # loss -> step (ppo_epochs inner passes over the same rollouts)
            extra: dict[str, float] = {}
            grad_norm = 0.0
            for epoch in range(o.ppo_epochs):
                sums = backward_micro_batches(student, batches, config=config, global_tokens=global_tokens,
                                              device=device)
                if epoch == 0:
                    first_sums = sums
                all_reduce_gradients(params)
                if hooks.after_backward is not None:
                    extra.update(hooks.after_backward(HookContext(step + 1, student, config, run_dir, rank, world)) or {})
                if global_tokens > 0:
                    norm = optimizer_step(student, optimizer, grad_clip=o.grad_clip)
                    grad_norm = norm if epoch == 0 else grad_norm
                else:  # nothing to learn from (e.g. every group filtered): no update
                    optimizer.zero_grad(set_to_none=True)
            lr = optimizer.param_groups[0]["lr"]
            with warnings.catch_warnings():  # a skipped update still advances the schedule
                warnings.filterwarnings("ignore", message="Detected call of")
                scheduler.step()
            # log
            values = step_metrics(batches, first_sums, config=config, lr=lr, grad_norm=grad_norm,
                                  step_time=time.perf_counter() - t0, global_tokens=global_tokens)
            if config.run.monitor_every and hooks.every_n is not None and (step + 1) % config.run.monitor_every == 0:
                extra.update(hooks.every_n(HookContext(step + 1, student, config, run_dir, rank, world)) or {})
            values.update({k: float(v) for k, v in extra.items()})
            stats = StepStats(step=step + 1, values=MappingProxyType(values))
            history.append(stats)
            if is_main:
                ckpt.append_metrics(run_dir / "metrics.jsonl", stats.record())
                if bar:
                    desc = f"loss {values['train/loss']:.4f}"
                    if "rlvr/reward" in values:
                        desc += f" reward {values['rlvr/reward']:.3f} acc {values['rlvr/accuracy']:.3f}"
                    desc += f" {values['train/tokens_per_s']:.0f} tok/s"
                    bar[0].update(bar[1], completed=step + 1, description=desc)
            # checkpoint
            every = config.checkpoint.every
            if (every and (step + 1) % every == 0) or step + 1 == o.steps:
                if is_main:
                    written.append(_save(run_dir, step + 1, student, tokenizer, optimizer, scheduler, config, world))
                _barrier()
    return RunResult(out_dir=run_dir, final_step=max(start, o.steps),
                     checkpoints=tuple(written), history=tuple(history), resumed_from=resume_from)


def _save(run_dir: Path, step: int, model, tokenizer, optimizer, scheduler, config: TrainConfig, world: int) -> Path:
    state = None
    if config.checkpoint.save_trainer_state:
        state = ckpt.TrainerState(step=step, data_position=step * config.optim.batch_size, master=model.state_dict(),
                                  optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                                  rng=ckpt.rng_state(), extra={"objective": config.objective.name, "world_size": world})
    return ckpt.save_checkpoint(run_dir, step, model, tokenizer, dtype=config.checkpoint.dtype, trainer_state=state)
