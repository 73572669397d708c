"""Validation of an assembled ``TrainConfig``: one function per section, every problem
reported at once, each prefixed with its key (``"optim.lr: must be > 0; got -1"``).

``validate`` runs them in the order of the sections; ``config_from_dict`` joins the result
into one ``ConfigError``. Nothing here loads a model or a task's rows: model sources are
checked by their headers, task specs by ``load_task`` (which reads rows lazily).
"""

from __future__ import annotations

from pathlib import Path

from opdgeo.errors import ConfigError
from opdgeo.training.config import (
    KEEP_TRAINER_STATE,
    MONITOR_MATRICES,
    OBJECTIVES,
    PROJECT_MODES,
    SAVE_DTYPES,
    SCHEDULES,
    SIGNALS,
    STRATEGIES,
    TEACHER_DTYPES,
    TOKEN_KEEP_MODES,
    CheckpointConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    RolloutConfig,
    RunConfig,
    TaskConfig,
    TrainConfig,
)

__all__ = ["validate"]


def validate(config: TrainConfig, *, check_paths: bool = True) -> list[str]:
    """All problems of an assembled config, one string each, prefixed with its key."""
    weights = _signal_weights(config.objective)
    return [
        *_model_problems(config.model, check_paths),
        *_task_problems(config.task, config.objective, config.model, check_paths),
        *_objective_problems(config.objective),
        *_signal_problems(weights, config.model, config.rollout),
        *_rollout_problems(config.rollout, config.objective, config.model, check_paths),
        *_token_keep_problems(config, weights),
        *_project_problems(config, check_paths),
        *_optim_problems(config.optim),
        *_generation_batch_problems(config.rollout, config.optim),
        *_checkpoint_problems(config.checkpoint),
        *_run_problems(config.run),
        *_engine_problems(config),
    ]


def _model_source_problem(source: str, key: str, check_paths: bool) -> str | None:
    from opdgeo.errors import CheckpointError
    from opdgeo.sources import ModelSource

    try:
        parsed = ModelSource.parse(source)
        problem = parsed.problem(check_paths=check_paths)
        if not problem and check_paths and parsed.kind in ("folder", "file"):
            from opdgeo.checkpoints import open_checkpoint

            open_checkpoint(parsed.path)  # headers only: a truncated file is named with its tensor
    except CheckpointError as err:  # SourceError included
        problem = str(err)
    return f"{key}: {problem}" if problem else None


def _task_problem(spec: str) -> str | None:
    """What is wrong with a task spec (unknown option, missing file or dataset), or None;
    tasks read their rows lazily, so this costs no data loading."""
    from opdgeo.tasks import load_task

    try:
        load_task(spec)
    except ConfigError as err:
        return str(err)
    return None


def _model_problems(m: ModelConfig, check_paths: bool) -> list[str]:
    e: list[str] = []
    if not m.student:
        e.append("model.student: required (a folder, a local-cache id, 'smollm2' or 'tiny:PRESET')")
    elif (p := _model_source_problem(m.student, "model.student", check_paths)):
        e.append(p)
    if m.teacher is not None and (p := _model_source_problem(m.teacher, "model.teacher", check_paths)):
        e.append(p)
    return e


def _task_problems(t: TaskConfig, obj: ObjectiveConfig, m: ModelConfig, check_paths: bool) -> list[str]:
    e: list[str] = []
    if not t.spec:
        e.append("task.spec: required")
    elif check_paths and (p := _task_problem(t.spec)):
        e.append(f"task.spec: {p}")
    if t.num_problems is not None and t.num_problems < 1:
        e.append(f"task.num_problems: must be >= 1; got {t.num_problems}")
    if t.demonstrations is not None:
        if not obj.demonstrations:
            e.append(f"task.demonstrations: SFT demonstrations apply to objective sft; got {obj.name!r}")
        if t.demonstrations == "teacher" and m.teacher is None:
            e.append("task.demonstrations: 'teacher' needs model.teacher (the model that generates them)")
        elif not t.demonstrations.strip():
            e.append("task.demonstrations: must be 'teacher' or a task spec; got ''")
        elif (check_paths and Path(t.demonstrations.split(":")[0]).suffix in (".jsonl", ".json", ".parquet")
              and not Path(t.demonstrations.split(":")[0]).expanduser().exists()):
            e.append(f"task.demonstrations: no such file {t.demonstrations!r}")
    if t.demonstration_samples < 1:
        e.append(f"task.demonstration_samples: must be >= 1; got {t.demonstration_samples}")
    if not t.demonstration_temperature > 0:
        e.append(f"task.demonstration_temperature: must be > 0; got {t.demonstration_temperature}")
    return e


def _signal_weights(obj: ObjectiveConfig) -> dict[str, float]:
    """The weights of the sampled signals (``rlvr``, ``opd``) in effect; {} for demonstrations."""
    if obj.advantage is not None:
        return dict(obj.advantage)
    return {obj.name: 1.0} if obj.name in SIGNALS else {}


def _objective_problems(obj: ObjectiveConfig) -> list[str]:
    e: list[str] = []
    if obj.name not in OBJECTIVES:
        e.append(f"objective.name: must be one of {', '.join(OBJECTIVES)}; got {obj.name!r}")
    if not (0.0 <= obj.eps_low < 1.0):
        e.append(f"objective.eps_low: must be in [0, 1); got {obj.eps_low}")
    if obj.eps_high < 0:
        e.append(f"objective.eps_high: must be >= 0; got {obj.eps_high}")
    if obj.grpo_eps < 0:
        e.append(f"objective.grpo_eps: must be >= 0; got {obj.grpo_eps}")
    if obj.grpo_std not in ("sample", "population"):
        e.append(f"objective.grpo_std: must be 'sample' or 'population'; got {obj.grpo_std!r}")
    if obj.advantage is not None:
        if obj.demonstrations:
            e.append("objective.advantage: mixing applies to rlvr/opd, not to sft")
        bad = [k for k in obj.advantage if k not in SIGNALS]
        if bad:
            e.append(f"objective.advantage: unknown signal(s) {bad}; known: {', '.join(SIGNALS)}")
        elif all(w == 0 for w in obj.advantage.values()):
            e.append("objective.advantage: at least one weight must be nonzero")
    return e


def _signal_problems(weights: dict[str, float], m: ModelConfig, r: RolloutConfig) -> list[str]:
    e: list[str] = []
    if weights.get("opd", 0.0) != 0.0 and m.teacher is None:
        e.append("model.teacher: required for OPD (objective opd or an advantage weight on opd)")
    if weights.get("rlvr", 0.0) != 0.0 and r.group_size < 2:
        e.append(f"rollout.group_size: RLVR needs >= 2 samples per prompt; got {r.group_size}")
    return e


def _rollout_problems(r: RolloutConfig, obj: ObjectiveConfig, m: ModelConfig, check_paths: bool) -> list[str]:
    e: list[str] = []
    if r.group_size < 1:
        e.append(f"rollout.group_size: must be >= 1; got {r.group_size}")
    if not r.temperature > 0:
        e.append(f"rollout.temperature: must be > 0; got {r.temperature}")
    elif r.temperature != 1.0 and not obj.demonstrations:
        e.append(f"rollout.temperature: must be 1 for {obj.name} (the importance ratio, the behaviour log-probs "
                 f"and the OPD gap are the temperature-1 policy; a tempered sampler would be off-policy); "
                 f"got {r.temperature}")
    if r.max_new_tokens < 1:
        e.append(f"rollout.max_new_tokens: must be >= 1; got {r.max_new_tokens}")
    if r.policy == "teacher":
        if m.teacher is None:
            e.append("rollout.policy: 'teacher' needs model.teacher")
    elif r.policy != "student":
        if not r.policy:
            e.append("rollout.policy: must be 'student', 'teacher' or a model source; got ''")
        elif (p := _model_source_problem(r.policy, "rollout.policy", check_paths)):
            e.append(p)
    if r.policy != "student" and obj.demonstrations:
        e.append("rollout.policy: off-policy rollouts apply to rlvr/opd, not to sft")
    if not 0.0 <= r.offpolicy_eps <= 1.0:
        e.append(f"rollout.offpolicy_eps: must be in [0, 1] (clip range [1 - eps, 1 + eps]); got {r.offpolicy_eps}")
    return e


def _token_keep_problems(config: TrainConfig, weights: dict[str, float]) -> list[str]:
    e: list[str] = []
    tk = config.token_keep
    if tk.mode not in TOKEN_KEEP_MODES:
        e.append(f"token_keep.mode: must be one of {', '.join(TOKEN_KEEP_MODES)}; got {tk.mode!r}")
    elif tk.mode != "none" and weights.get("opd", 0.0) == 0.0:
        e.append(f"token_keep.mode: {tk.mode!r} sparsifies the OPD signal; it needs objective opd or an advantage weight on opd")
    if not 0.0 < tk.fraction <= 1.0:
        e.append(f"token_keep.fraction: must be in (0, 1]; got {tk.fraction}")
    return e


def _project_problems(config: TrainConfig, check_paths: bool) -> list[str]:
    e: list[str] = []
    pj, steps = config.project, config.optim.steps
    if pj.start is not None:
        if isinstance(pj.start, int):
            if not 1 <= pj.start < steps:
                e.append(f"project.from: a step must be in [1, optim.steps = {steps}); got {pj.start}")
        elif check_paths and not Path(pj.start).expanduser().is_dir():
            e.append(f"project.from: checkpoint folder {pj.start!r} not found")
        if pj.origin is not None and (p := _model_source_problem(pj.origin, "project.origin", check_paths)):
            e.append(p)
    if pj.rank < 1:
        e.append(f"project.rank: must be >= 1; got {pj.rank}")
    if pj.mode not in PROJECT_MODES:
        e.append(f"project.mode: must be one of {', '.join(PROJECT_MODES)}; got {pj.mode!r}")
    return e


def _generation_batch_problems(r: RolloutConfig, o: OptimConfig) -> list[str]:
    n = r.micro_batch_size
    if n is None or o.micro_batch_size < 1:
        return []
    if n < 1 or n % o.micro_batch_size or o.batch_size % n:
        return [f"rollout.micro_batch_size: must be a multiple of optim.micro_batch_size = {o.micro_batch_size} "
                f"that divides optim.batch_size = {o.batch_size}; got {n}"]
    return []


def _optim_problems(o: OptimConfig) -> list[str]:
    e = _batch_problems(o)
    if not o.lr > 0:
        e.append(f"optim.lr: must be > 0; got {o.lr}")
    if o.schedule not in SCHEDULES:
        e.append(f"optim.schedule: must be one of {', '.join(SCHEDULES)}; got {o.schedule!r}")
    if o.warmup_steps < 0 or (o.steps >= 1 and o.warmup_steps >= o.steps and o.warmup_steps > 0):
        e.append(f"optim.warmup_steps: must be in [0, optim.steps = {o.steps}); got {o.warmup_steps}")
    if o.min_lr < 0 or (o.lr > 0 and o.min_lr > o.lr):
        e.append(f"optim.min_lr: must be in [0, optim.lr = {o.lr}]; got {o.min_lr}")
    if not all(0.0 <= b < 1.0 for b in o.betas):
        e.append(f"optim.betas: each must be in [0, 1); got {list(o.betas)}")
    if o.weight_decay < 0:
        e.append(f"optim.weight_decay: must be >= 0; got {o.weight_decay}")
    if not o.adam_eps > 0:
        e.append(f"optim.adam_eps: must be > 0; got {o.adam_eps}")
    if isinstance(o.bf16_autocast, str) and o.bf16_autocast != "auto":
        e.append(f"optim.bf16_autocast: must be true, false or 'auto'; got {o.bf16_autocast!r}")
    if o.grad_clip is not None and not o.grad_clip > 0:
        e.append(f"optim.grad_clip: must be > 0 or null; got {o.grad_clip}")
    return e


def _batch_problems(o: OptimConfig) -> list[str]:
    """Steps, batch, micro-batch and PPO mini-batch sizes (their divisibility)."""
    e: list[str] = []
    if o.steps < 1:
        e.append(f"optim.steps: must be >= 1; got {o.steps}")
    if o.batch_size < 1:
        e.append(f"optim.batch_size: must be >= 1; got {o.batch_size}")
    if o.micro_batch_size < 1:
        e.append(f"optim.micro_batch_size: must be >= 1; got {o.micro_batch_size}")
    elif o.batch_size >= 1 and o.batch_size % o.micro_batch_size:
        e.append(f"optim.micro_batch_size: must divide optim.batch_size = {o.batch_size}; got {o.micro_batch_size}")
    if o.ppo_epochs < 1:
        e.append(f"optim.ppo_epochs: must be >= 1; got {o.ppo_epochs}")
    mini = o.ppo_mini_batch_size
    if mini is not None and (mini < 1 or o.batch_size % mini or mini % max(o.micro_batch_size, 1)):
        e.append(f"optim.ppo_mini_batch_size: must divide optim.batch_size = {o.batch_size} and be a multiple of "
                 f"optim.micro_batch_size = {o.micro_batch_size}; got {mini}")
    return e


def _checkpoint_problems(c: CheckpointConfig) -> list[str]:
    e: list[str] = []
    if c.every < 0:
        e.append(f"checkpoint.every: must be >= 0; got {c.every}")
    if c.dtype not in SAVE_DTYPES:
        e.append(f"checkpoint.dtype: must be one of {', '.join(SAVE_DTYPES)}; got {c.dtype!r}")
    if c.keep_trainer_state not in KEEP_TRAINER_STATE:
        e.append(f"checkpoint.keep_trainer_state: must be one of {', '.join(KEEP_TRAINER_STATE)}; "
                 f"got {c.keep_trainer_state!r}")
    bad = [s for s in c.keep_trainer_state_steps if s < 1]
    if bad:
        e.append(f"checkpoint.keep_trainer_state_steps: steps must be >= 1; got {bad[0]}")
    return e


def _run_problems(run: RunConfig) -> list[str]:
    from opdgeo.training.trackers import REPORT_TO, missing_trackers

    e: list[str] = []
    if not run.out_dir:
        e.append("run.out_dir: required")
    if run.monitor_every < 0:
        e.append(f"run.monitor_every: must be >= 0; got {run.monitor_every}")
    if run.monitor_matrices not in MONITOR_MATRICES:
        e.append(f"run.monitor_matrices: must be one of {', '.join(MONITOR_MATRICES)}; got {run.monitor_matrices!r}")
    if run.monitor_lock_probes < 1:
        e.append(f"run.monitor_lock_probes: must be >= 1; got {run.monitor_lock_probes}")
    if run.answer_log_every < 0:
        e.append(f"run.answer_log_every: must be >= 0; got {run.answer_log_every}")
    if run.answer_log_samples < 1:
        e.append(f"run.answer_log_samples: must be >= 1; got {run.answer_log_samples}")
    unknown = [t for t in run.report_to if t not in REPORT_TO]
    if unknown:
        e.append(f"run.report_to: unknown tracker(s) {', '.join(map(repr, unknown))}; choose from {', '.join(REPORT_TO)}")
    elif missing_trackers(run.report_to):
        missing = missing_trackers(run.report_to)
        e.append(f"run.report_to: {', '.join(missing)} not installed (pip install {' '.join(missing)})")
    if len(set(run.report_to)) != len(run.report_to):
        e.append(f"run.report_to: a tracker is listed twice; got {list(run.report_to)}")
    return e


def _engine_problems(config: TrainConfig) -> list[str]:
    """Problems of the precision and distributed settings."""
    e: list[str] = []
    if config.model.teacher_dtype not in TEACHER_DTYPES:
        e.append(f"model.teacher_dtype: must be one of {', '.join(TEACHER_DTYPES)}; got {config.model.teacher_dtype!r}")
    d = config.distributed
    if d.strategy not in STRATEGIES:
        e.append(f"distributed.strategy: must be one of {', '.join(STRATEGIES)}; got {d.strategy!r}")
    if d.cpu_offload and d.strategy != "fsdp":
        e.append(f"distributed.cpu_offload: applies to strategy fsdp; got strategy {d.strategy!r}")
    if d.strategy == "fsdp":
        if config.project.start is not None:
            e.append("project.from: the subspace projection needs whole gradients; use strategy ddp or none, not fsdp")
        if config.run.monitor_every:
            e.append("run.monitor_every: the geometry monitor reads whole weights; use strategy ddp or none, not fsdp")
    return e
