"""The training recipe: SFT, RLVR and OPD from one policy-gradient loop (SPEC §3).

``train(config)`` is ``setup`` (``setup.py``: models, optimizer, resume, origin, projection,
distributed wrapping) and then, per optimizer step, one named call per stage::

    prompts  = step_prompts(...)                     # seeded, global batch
    for c, mb in this rank's micro-batches, rollout(...):
                                                     # rollout: demonstrations (SFT) or samples of the behaviour
                                                     #   policy, rollout.micro_batch_size prompts per generate call
        mb = score(...)                              # rewards, old and teacher log-probs
        mb = advantages(...)                         # the per-token weight: the ONLY difference
    update = update(...)                             # loss -> step: ppo_epochs × mini-batches, each
                                                     #   backward (Σ per-token / tokens) + clip + AdamW
    values = log(...)                                # metrics.jsonl, progress, trackers
    probe(...); checkpoint(...)                      # geometry monitor, step folder

The three objectives differ only in where the sequences come from and in the per-token
weight: 1 on demonstration tokens (SFT), the group-normalized verifiable reward (RLVR) or
log π_teacher − log π_student on the sampled token (OPD), all in the clipped surrogate
(``stages.py``).

The study's controls (SPEC §3) are parameters of the stages:

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
same step as 1 process, to float tolerance. PPO mini-batches (``optim.ppo_mini_batch_size``)
hold the same share of micro-batches on every rank (``batches.mini_batch_order``).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping
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
from opdgeo.training.batches import (
    demonstration_batch,
    generation_units,
    learning_rate,
    micro_batch_seed,
    micro_batches_per_call,
    mini_batch_order,
    mini_batch_share,
    num_mini_batches,
    rank_micro_batches,
    sparsify_seed,
    step_prompts,
)
from opdgeo.training.config import TrainConfig
from opdgeo.training.monitor import probe as probe_geometry
from opdgeo.training.policies import (
    activation_checkpointing_,
    behaviour_policy,
    inference_model,
    load_policy,
    origin_matrices,
    start_from_checkpoint,
    teacher_dtype,
)
from opdgeo.training.progress import StepProgress
from opdgeo.training.setup import RunState, monitor_settings, setup, start_projection
from opdgeo.training.stages import (
    MicroBatch,
    Update,
    backward_micro_batches,
    clip_range,
    demonstration_micro_batch,
    optimizer_step,
    rollout_micro_batch,
    score_micro_batch,
    split_micro_batches,
    step_metrics,
    token_keep_mask,
    update_policy,
    with_advantages,
)
from opdgeo.training.trackers import Trackers, open_trackers

__all__ = [
    "train",
    "RunResult",
    "StepStats",
    "Hooks",
    "HookContext",
    "RunState",
    "setup",
    # the stages and helpers, re-exported for the loop's users
    "MicroBatch",
    "Update",
    "learning_rate",
    "step_prompts",
    "micro_batch_seed",
    "rank_micro_batches",
    "num_mini_batches",
    "mini_batch_share",
    "mini_batch_order",
    "demonstration_batch",
    "backward_micro_batches",
    "load_policy",
    "inference_model",
    "teacher_dtype",
    "activation_checkpointing_",
    "demonstration_micro_batch",
    "rollout_micro_batch",
    "score_micro_batch",
    "with_advantages",
    "update_policy",
    "optimizer_step",
    "step_metrics",
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

    ``after_backward(ctx)`` runs on every rank after the gradients of a mini-batch are
    summed over ranks (and projected, under ``project``) and before clipping and the
    optimizer step; ``every_n(ctx)`` runs after the step every ``run.monitor_every`` steps,
    after the built-in geometry monitor. Either may return a mapping of extra metrics to log.
    """

    after_backward: Callable[[HookContext], Mapping[str, float] | None] | None = None
    every_n: Callable[[HookContext], Mapping[str, float] | None] | None = None


# ------------------------------------------------------------------------- run


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
    world = distributed.launched_world()
    strategy = distributed.resolve_strategy(config.distributed.strategy, world)
    if world > 1 and strategy == "none":
        raise ConfigError(f"distributed.strategy: 'none' cannot train {world} processes (nothing would sum their "
                          "gradients); use ddp or fsdp")
    ctx = distributed.init(single_process_group=strategy == "fsdp")
    try:
        return run(setup(config, ctx, resume=resume), hooks or Hooks())
    finally:
        distributed.destroy(ctx)


def run(state: RunState, hooks: Hooks) -> RunResult:
    """The steps from ``state.start`` to ``optim.steps``, each one named call per stage."""
    config, is_main = state.config, state.ctx.is_main
    o = config.optim
    trackers = open_trackers(config, state.run_dir) if is_main else Trackers([])  # run.report_to
    history: list[StepStats] = []
    written: list[Path] = []
    monitor, monitor_text = state.monitor, ""
    progress = StepProgress("train", o.steps, start=state.start, enabled=is_main and config.run.progress)
    with progress, closing(trackers):
        for step in range(state.start, o.steps):
            t0 = time.perf_counter()
            prompts = step_prompts(len(state.problems), o.batch_size, step, config.run.seed)
            batches = []
            for c, mb in zip(state.positions, rollout(state, prompts, step), strict=True):
                mb = score(state, mb)
                batches.append(advantages(state, mb, step, c))
            upd = update(state, batches, step, hooks)
            lr = advance_schedule(state)
            values = log_step(state, batches, upd, step, t0, lr=lr)
            monitor, probed, monitor_text = probe(state, monitor, step, hooks, monitor_text)
            values.update(probed)
            stats = StepStats(step=step + 1, values=MappingProxyType(values))
            history.append(stats)
            if is_main:
                ckpt.append_metrics(state.run_dir / "metrics.jsonl", stats.record())
                progress.update(step + 1, values, f"{values['train/tokens_per_s']:.0f} tok/s{monitor_text}")
                trackers.log(stats.record())
            written.extend(checkpoint(state, step))
            if isinstance(config.project.start, int) and step + 1 == config.project.start:
                state = start_projection(state, step + 1)  # from step S: project every later gradient
    return RunResult(out_dir=state.run_dir, final_step=max(state.start, o.steps),
                     checkpoints=tuple(written), history=tuple(history), resumed_from=state.resume_from)


# ------------------------------------------------------------------ the stages


def rollout(state: RunState, prompts, step: int) -> list[MicroBatch]:
    """This rank's micro-batches of step ``step``, in order: their prompts' demonstrations,
    or samples generated ``rollout.micro_batch_size`` prompts per call (seeded by (seed,
    step, the call's first micro-batch)) and cut into micro-batches."""
    config = state.config
    mbs = config.optim.micro_batch_size
    per_call = micro_batches_per_call(config.rollout.micro_batch_size, config.optim,
                                      demonstrations=config.objective.demonstrations)
    out = []
    for unit in generation_units(state.positions, per_call, state.ctx.world):
        mb = state.sequences(prompts[unit.start * mbs:unit.stop * mbs],
                             seed=micro_batch_seed(config.run.seed, step, unit.start))
        out.extend(split_micro_batches(mb, len(unit)))
    return out


def score(state: RunState, mb: MicroBatch) -> MicroBatch:
    """Rewards, old log-probs and teacher log-probs (``stages.score_micro_batch``)."""
    config = state.config
    return score_micro_batch(mb, student=state.student, teacher=state.teacher, task=state.task,
                             problems=state.problems, objective=config.objective,
                             off_policy=config.rollout.off_policy, device=state.ctx.device,
                             bf16=config.optim.bf16_autocast)


def advantages(state: RunState, mb: MicroBatch, step: int, c: int) -> MicroBatch:
    """The per-token weights and the loss mask (``stages.with_advantages``)."""
    config = state.config
    return with_advantages(mb, config.objective, group_size=config.rollout.group_size, token_keep=config.token_keep,
                           keep_seed=sparsify_seed(config.run.seed, step, c))


def update(state: RunState, batches, step: int, hooks: Hooks) -> Update:
    """loss -> step: the optimizer steps on the batch (``stages.update_policy``)."""
    config, ctx = state.config, state.ctx
    after_backward = None
    if hooks.after_backward is not None:
        hook_ctx = HookContext(step + 1, state.student, config, state.run_dir, ctx.rank, ctx.world)
        after_backward = lambda: hooks.after_backward(hook_ctx)  # noqa: E731
    upd = update_policy(state.model, state.optimizer, batches, positions=state.positions, optim=config.optim,
                        seed=config.run.seed, step=step, clip=clip_range(config.objective, config.rollout),
                        device=ctx.device, projection=state.projection, project_mode=config.project.mode,
                        named_params=dict(state.student.named_parameters()), after_backward=after_backward)
    return upd


def advance_schedule(state: RunState) -> float:
    """The learning rate this step used; the schedule advances once per batch, also when
    no optimizer step was taken."""
    lr = state.optimizer.param_groups[0]["lr"]
    with warnings.catch_warnings():  # a skipped update still advances the schedule
        warnings.filterwarnings("ignore", message="Detected call of")
        state.scheduler.step()
    return lr


def log_step(state: RunState, batches, upd: Update, step: int, t0: float, *, lr: float) -> dict[str, float]:
    """The answer log (main process) and the step's metrics, with the update's extras."""
    from opdgeo.training.data import log_answers

    config = state.config
    if state.ctx.is_main:
        log_answers(config, state.run_dir, state.task, state.problems, batches, step=step + 1)
    values = step_metrics(batches, upd.sums, objective=config.objective, token_keep=config.token_keep,
                          off_policy=config.rollout.off_policy, lr=lr, grad_norm=upd.grad_norm,
                          step_time=time.perf_counter() - t0, global_tokens=upd.global_tokens)
    values.update({k: float(v) for k, v in upd.extra.items()})
    return values


def probe(state: RunState, monitor, step: int, hooks: Hooks, text: str):
    """Every ``run.monitor_every`` steps: the geometry monitor (main process) and the
    ``every_n`` hook. Returns ``(monitor, metrics, progress text)``."""
    config = state.config
    every = config.run.monitor_every
    out: dict[str, float] = {}
    if not every or (step + 1) % every:
        return monitor, out, text
    if monitor is not None:
        result, monitor = probe_geometry(monitor, step + 1, dict(state.student.named_parameters()))
        out.update(result.as_metrics())
        text = " | " + result.summary()
    if hooks.every_n is not None:
        ctx = HookContext(step + 1, state.student, config, state.run_dir, state.ctx.rank, state.ctx.world)
        out.update(hooks.every_n(ctx) or {})
    return monitor, {k: float(v) for k, v in out.items()}, text


def checkpoint(state: RunState, step: int) -> list[Path]:
    """The step folder every ``checkpoint.every`` steps and at the last step (every rank
    calls this: FSDP2 shards and DCP writes are collective)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    config, n = state.config, step + 1
    every = config.checkpoint.every
    if not ((every and n % every == 0) or n == config.optim.steps):
        return []
    trainer_state = None
    if config.checkpoint.save_trainer_state:
        master, optim = get_state_dict(state.student, state.optimizer)  # FSDP2: this rank's shards
        trainer_state = ckpt.TrainerState(
            step=n, data_position=n * config.optim.batch_size, master=master, optimizer=optim,
            scheduler=state.scheduler.state_dict(), rng=ckpt.rng_state(),
            extra={"objective": config.objective.name, "world_size": state.ctx.world,
                   "strategy": config.distributed.strategy})
    saved = ckpt.save_checkpoint(state.run_dir, n, state.student, state.tokenizer, dtype=config.checkpoint.dtype,
                                 trainer_state=trainer_state)
    if trainer_state is not None and config.checkpoint.keep_trainer_state == "last":
        if state.ctx.is_main:
            ckpt.prune_trainer_states(state.run_dir, {n, *config.checkpoint.keep_trainer_state_steps})
        distributed.barrier()  # no rank looks at the run folder while it is pruned
    return [saved]
