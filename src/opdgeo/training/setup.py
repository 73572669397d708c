"""Everything a run needs before its first step: ``setup(config, ctx) -> RunState``.

In order: the resolved config (``auto`` settings made concrete), this rank's micro-batches
and the run folder checks (before any model loads), the task, the student, the teacher and
the behaviour policy, the run's origin W0, a projected restart, the distributed wrapper,
AdamW and its schedule, the resume from the last checkpoint, the projection subspace of a
resumed run, and the files of the run folder. The loop (``loop.py``) only reads the
``RunState``, except when the projection starts (``start_projection``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from opdgeo import distributed
from opdgeo.errors import ConfigError
from opdgeo.files import atomic_write_text
from opdgeo.training import checkpointing as ckpt
from opdgeo.training.batches import (
    generation_units,
    learning_rate,
    micro_batches_per_call,
    mini_batch_share,
    num_mini_batches,
    rank_micro_batches,
)
from opdgeo.training.config import TrainConfig, config_to_dict, resume_differences
from opdgeo.training.monitor import MonitorSettings, restore_monitor, start_monitor
from opdgeo.training.policies import (
    activation_checkpointing_,
    adamw,
    behaviour_policy,
    checkpoint_matrices,
    inference_model,
    load_policy,
    origin_matrices,
    restart_optimizer_state,
    rounded_matrices,
    start_from_checkpoint,
)
from opdgeo.training.precision import resolve_bf16_autocast
from opdgeo.training.projection import SUBSPACE_FILE, freeze_outside, load_subspaces, projection_subspaces, save_subspaces
from opdgeo.training.stages import MicroBatch, demonstration_micro_batch, rollout_micro_batch

__all__ = ["RunState", "setup", "start_projection", "monitor_settings", "needs_behaviour_logprobs"]


@dataclass(frozen=True)
class RunState:
    """A run ready to train: what every stage of the loop reads."""

    config: TrainConfig
    """Resolved: ``optim.bf16_autocast`` and ``distributed.strategy`` as this launch uses them."""
    ctx: distributed.Context
    run_dir: Path
    task: Any
    problems: Sequence[Any]
    student: torch.nn.Module
    """The unwrapped student (fp32 master weights; FSDP2 shards them in place)."""
    tokenizer: Any
    teacher: torch.nn.Module | None
    model: torch.nn.Module
    """What the loss runs through: the student under DDP, FSDP2 or as is."""
    optimizer: torch.optim.Optimizer
    scheduler: Any
    start: int
    """The first step this call runs (after a resume or a restart)."""
    positions: range
    """This rank's micro-batches (indices in the global batch)."""
    sequences: Callable[..., MicroBatch]
    """``sequences(indices, seed=...)``: demonstrations or samples of the behaviour policy."""
    origin: Mapping[str, torch.Tensor] | None
    """W0 of the block matrices (monitor and projection), in the checkpoint dtype."""
    projection: Mapping[str, torch.Tensor] | None
    """V_K per matrix while projecting."""
    monitor: Any
    """The geometry monitor's state (main process, ``run.monitor_every``), else None."""
    resume_from: Path | None


def setup(config: TrainConfig, ctx: distributed.Context, *, resume: bool = False) -> RunState:
    """The ``RunState`` of ``config`` on this process (see the module docstring).

    Raises:
        ConfigError: the run folder already holds a run (without ``resume``), the config
            differs from the run's (with ``resume``), the micro-batches or mini-batches do not
            split over the processes, or a model/task cannot be loaded.
    """
    from opdgeo.training.data import training_problems

    config = _resolved(config, ctx)
    o, device = config.optim, ctx.device
    n_micro = o.batch_size // o.micro_batch_size
    positions = rank_micro_batches(n_micro, ctx.rank, ctx.world)  # ConfigError before any model loads
    mini_batch_share(n_micro, o, ctx.world)
    generation_units(positions, micro_batches_per_call(config.rollout.micro_batch_size, o,
                                                       demonstrations=config.objective.demonstrations), ctx.world)
    run_dir = Path(config.run.out_dir)
    resume_from = _prepare_run_dir(run_dir, config, resume=resume)
    distributed.barrier()
    data = training_problems(config, run_dir, device=device, is_main=ctx.is_main, barrier=distributed.barrier)
    torch.manual_seed(config.run.seed)
    student, tokenizer, teacher = _load_models(config, device)
    behaviour = behaviour_policy(config, student, tokenizer, teacher, device=device)
    needs_origin = bool(config.run.monitor_every) or config.project.start is not None
    origin = origin_matrices(config, student) if needs_origin else None
    start, projection = _restart(config, student, origin, run_dir, resumed=resume_from is not None, device=device)
    model = _wrap(student, config, ctx)
    optimizer = adamw([p for p in student.parameters() if p.requires_grad], o)
    if isinstance(config.project.start, str) and resume_from is None:
        restart_optimizer_state(optimizer, student, config.project.start)
    scheduler = _schedule(optimizer, o, first=start)
    if resume_from is not None:  # DCP, in place, resharded to this launch
        start = ckpt.load_into(resume_from, student, optimizer, scheduler)
    pj = config.project
    if isinstance(pj.start, int) and start >= pj.start:  # resumed after the projection began
        projection = _on_device(load_subspaces(run_dir / SUBSPACE_FILE)[0], device)
        freeze_outside(student, projection)
        model = _wrap(student, config, ctx)
    if ctx.is_main:
        _prepare_files(run_dir, config, start, projection if resume_from is None else None)
    distributed.barrier()
    return RunState(config=config, ctx=ctx, run_dir=run_dir, task=data.task, problems=data.problems, student=student,
                    tokenizer=tokenizer, teacher=teacher, model=model, optimizer=optimizer, scheduler=scheduler,
                    start=start, positions=positions, origin=origin, projection=projection,
                    sequences=_sequence_source(config, behaviour, tokenizer, data, device),
                    monitor=_start_monitor(config, ctx, origin, run_dir, student, start), resume_from=resume_from)


def _resolved(config: TrainConfig, ctx: distributed.Context) -> TrainConfig:
    """``auto`` made concrete for this launch; config.yaml records the result."""
    strategy = distributed.resolve_strategy(config.distributed.strategy, ctx.world)
    return dataclasses.replace(
        config, optim=dataclasses.replace(config.optim, bf16_autocast=resolve_bf16_autocast(config.optim.bf16_autocast,
                                                                                            ctx.device)),
        distributed=dataclasses.replace(config.distributed, strategy=strategy))


def _load_models(config: TrainConfig, device: torch.device):
    """``(student, tokenizer, teacher)``: the student in fp32 (the master weights), the teacher
    (only when a signal or the rollout needs it) as a scoring-only model."""
    from opdgeo.models import check_same_tokenizer

    m = config.model
    student, tokenizer = load_policy(m.student, init_seed=m.init_seed)
    # fp32 master weights; under fsdp they stay on the CPU until fully_shard moves each layer's shard
    on = None if config.distributed.strategy == "fsdp" else device
    student = student.to(device=on, dtype=torch.float32).eval()
    if m.activation_checkpointing:
        activation_checkpointing_(student)
    teacher = None
    if config.objective.weights().get("opd", 0.0) != 0.0 or config.rollout.policy == "teacher":
        teacher, teacher_tok = load_policy(m.teacher, init_seed=m.init_seed)
        check_same_tokenizer(tokenizer, teacher_tok)
        teacher = inference_model(teacher, config, device)
    return student, tokenizer, teacher


def _sequence_source(config: TrainConfig, behaviour, tokenizer, data, device: torch.device) -> Callable[..., MicroBatch]:
    """Where the run's sequences come from: the task's demonstrations, or samples of the
    behaviour policy (scored at generation when the loss needs rollout-time log-probs)."""
    if config.objective.demonstrations:
        return lambda indices, *, seed: demonstration_micro_batch(tokenizer, data.task, data.problems, indices,
                                                                 device=device)
    return functools.partial(rollout_micro_batch, behaviour, tokenizer, data.task, data.problems,
                             rollout=config.rollout, device=device, bf16=config.optim.bf16_autocast,
                             score=needs_behaviour_logprobs(config))


def needs_behaviour_logprobs(config: TrainConfig) -> bool:
    """Whether the rollout must score its samples. Not for on-policy RLVR with one optimizer
    step per batch: its old log-probs are then the loss forward's own, detached
    (``backward_micro_batches``), bit-identical to a separate no-grad forward of the same
    weights and batch, which is saved."""
    return (config.rollout.off_policy or config.optim.ppo_epochs > 1 or num_mini_batches(config.optim) > 1
            or config.objective.weights().get("opd", 0.0) != 0.0)


def _restart(config: TrainConfig, student, origin, run_dir: Path, *, resumed: bool, device: torch.device):
    """``(start, projection)``: a projection from a checkpoint folder starts there, training
    only the block matrices; else step 0 and no projection (yet)."""
    pj = config.project
    if not isinstance(pj.start, str):
        return 0, None
    start = start_from_checkpoint(student, pj.start)
    if start >= config.optim.steps:
        raise ConfigError(f"project.from: {pj.start} is at step {start}, not before optim.steps = {config.optim.steps}")
    bases = (load_subspaces(run_dir / SUBSPACE_FILE)[0] if resumed
             else projection_subspaces(origin, checkpoint_matrices(pj.start, origin, config), rank=pj.rank))
    projection = _on_device(bases, device)
    freeze_outside(student, projection)
    return start, projection


def _schedule(optimizer, o, *, first: int):
    """The learning-rate schedule as a ``LambdaLR``; a run restarted from a checkpoint
    continues its schedule at that step (``first``)."""
    lr_at = functools.partial(learning_rate, lr=o.lr, steps=o.steps, schedule=o.schedule,
                              warmup_steps=o.warmup_steps, min_lr=o.min_lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s + first) / o.lr)


def _wrap(student, config: TrainConfig, ctx: distributed.Context):
    """The student as the loss runs it: DDP, FSDP2 (bf16 compute exactly when autocast is on) or itself."""
    return distributed.wrap_model(student, config.distributed.strategy, ctx,
                                  bf16_compute=bool(config.optim.bf16_autocast),
                                  cpu_offload=config.distributed.cpu_offload)


def start_projection(state: RunState, step: int) -> RunState:
    """``project.from: S`` at step S: V_K of the current ΔW, everything else frozen, the
    student re-wrapped (DDP reduces the trainable set it was built with), V_K saved."""
    config, student = state.config, state.student
    weights = dict(student.named_parameters())
    projection = _on_device(projection_subspaces(state.origin, rounded_matrices(weights, state.origin, config),
                                                 rank=config.project.rank), state.ctx.device)
    freeze_outside(student, projection)
    model = _wrap(student, config, state.ctx)
    if state.ctx.is_main:
        _save_subspaces(state.run_dir, projection, config, step=step)
    return dataclasses.replace(state, projection=projection, model=model)


def _on_device(subspaces: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """V_K as the gradients use it (float32 on the device); this is also what is saved, so a
    resumed run projects with bit-identical bases."""
    return {n: v.to(device=device, dtype=torch.float32) for n, v in subspaces.items()}


def _save_subspaces(run_dir: Path, projection: Mapping[str, torch.Tensor], config: TrainConfig, *, step: int) -> None:
    pj = config.project
    save_subspaces(run_dir / SUBSPACE_FILE, projection,
                   {"from": str(pj.start), "origin": pj.origin or config.model.student, "rank": str(pj.rank),
                    "step": str(step)})


def monitor_settings(config: TrainConfig) -> MonitorSettings:
    """The geometry monitor's settings from ``run.monitor_*`` (weights rounded to the checkpoint dtype)."""
    r = config.run
    return MonitorSettings(matrices=r.monitor_matrices, lock_probes=r.monitor_lock_probes,
                           dtype=config.checkpoint.dtype, per_matrix=r.monitor_per_matrix)


def _start_monitor(config: TrainConfig, ctx: distributed.Context, origin, run_dir: Path, student, start: int):
    """The geometry monitor (main process), continued from ``metrics.jsonl`` on a resume."""
    if not (config.run.monitor_every and ctx.is_main):
        return None
    monitor = start_monitor(origin, monitor_settings(config))
    if start:
        monitor = restore_monitor(monitor, ckpt.read_metrics(run_dir / "metrics.jsonl"), every=config.run.monitor_every,
                                  step=start, weights=dict(student.named_parameters()))
    return monitor


# ------------------------------------------------------------------ run folder


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


def _prepare_files(run_dir: Path, config: TrainConfig, start: int, new_projection) -> None:
    """Main process: drop a partial checkpoint and the metrics after ``start``, write
    ``config.yaml`` and the subspace of a fresh projected restart."""
    import yaml

    ckpt.remove_partial(run_dir)
    ckpt.truncate_metrics(run_dir / "metrics.jsonl", start)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config_to_dict(config), sort_keys=False))
    if new_projection is not None:
        _save_subspaces(run_dir, new_projection, config, step=start)
