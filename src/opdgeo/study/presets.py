"""Study presets: what `opdgeo study` trains, evaluates and diagnoses.

A preset is a YAML file (``recipes/study/<name>.yaml``, packaged as
``opdgeo/recipes/study/``; `opdgeo.study.preset_file` reads it). Each of its runs is a
partial training config (the keys of ``opdgeo train``'s YAML config) merged over the
preset's ``defaults`` and validated once, by the training config's own validation. This
module holds what the file turns into:

- `StudyRun`: one run as the study sees it, a view computed from its validated training
  config (steps, batch, learning rate, objective, controls) plus its place in the study
  (``init``, ``group``, checkpoint fraction, seed). It has no validation of its own; its
  fields are what a training stage's cache key hashes, and `opdgeo.study.pipeline`
  writes the run's training config back from it.
- `ModelSpec`, `EvalSpec`, `DiagnoseSpec`: the study-level sections of the file (how the
  base student and the teacher come to exist, the held-out evaluation, the diagnostics).
- `StudyPreset`: the whole study, with the checks that concern the study as a whole
  (run references, seeds, the mixing sweep); `get_preset(name or path)` loads one.

The shipped presets (their learning rates are stated in ``docs/study.md``):

- ``quick``: the CI smoke test of the whole pipeline — a few optimizer steps per run on a
  very small model. Its numbers are meaningless; its artifacts are complete.
- ``tiny`` (default): the study at small scale on a 2-core CPU. bf16 checkpoints, Adam; RL
  (OPD, RLVR and every control) at lr 2e-5, below the median bf16 half-ULP of the tiny block
  weights (~3e-5); SFT at 2e-4, the paper's SFT:RL ratio of 10x (1e-5 : 1e-6).
- ``smollm2``: the real SmolLM2-135M-Instruct as student; the teacher is a copy of it
  SFT-trained to high accuracy on the arithmetic task (same tokenizer).
- ``paper``: Qwen3-8B student, Qwen3-32B teacher, dapo-math-17k deduplicated for RL and
  OPD, OpenR1-Math demonstrations for SFT, the paper's evaluation suite, the paper's
  hyperparameters and checkpoint steps. Shown and validated by ``--dry-run``; runs on GPUs
  with ``--launcher "accelerate launch --num_processes N"``.

Every run of a preset runs once per seed (`opdgeo.study.seeds`: what a seed varies).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from opdgeo.errors import ConfigError

__all__ = [
    "ModelSpec",
    "OptimSpec",
    "StudyRun",
    "EvalSpec",
    "DiagnoseSpec",
    "StudyPreset",
    "PRESETS",
    "ANCHOR_RUN",
    "get_preset",
]

PRESETS = ("quick", "tiny", "smollm2", "paper")
"""The presets shipped in ``recipes/study/`` (``opdgeo/recipes/study/<name>.yaml``)."""

ANCHOR_RUN = "sft"
"""The run whose final checkpoint is the anchor (``study.init: anchor``); every preset has it."""


@dataclass(frozen=True)
class ModelSpec:
    """How one model of the study comes to exist (the file's ``base`` and ``teacher``).

    Attributes:
        name: ``"base"`` or ``"teacher"`` (the stage that builds it; set by the loader).
        source: ``"tiny:<preset>"`` builds `tiny_qwen3_config(<preset>, vocab)` with the
            shared char tokenizer; ``"smollm2"`` exports the packaged SmolLM2 GGUF; any
            other string is a local HF folder or local-cache model id (never downloaded).
        arch: architecture numbers used by ``--dry-run`` to count parameters without
            loading anything (``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
            ``num_key_value_heads``, ``head_dim``, ``intermediate_size``, ``vocab_size``,
            ``tie_word_embeddings``); for ``tiny:`` sources the real config is used when the
            models package is importable.
        pretrain_steps: steps of next-token training on ``arithmetic_pretrain_corpus``
            (0: use the source as is).
        pretrain_lr: learning rate of that pretraining (Adam, constant).
        pretrain_batch: sequences per pretraining step.
        corpus_size: documents in the pretraining corpus.
        sft_steps: steps of SFT on task demonstrations after pretraining (the teacher's
            route to high accuracy; 0 for the base student, which must stay weak).
        sft_lr: learning rate of that SFT.
        sft_batch: prompts per step of that SFT.
        seed: model-init and data seed.
    """

    name: str
    source: str
    arch: dict = field(default_factory=dict)
    pretrain_steps: int = 0
    pretrain_lr: float = 1e-3
    pretrain_batch: int = 32
    corpus_size: int = 2000
    sft_steps: int = 0
    sft_lr: float = 1e-3
    sft_batch: int = 16
    seed: int = 0


@dataclass(frozen=True)
class OptimSpec:
    """The optimizer of one run, as read from its training config's ``optim`` section
    (``warmup_fraction`` comes from the run's ``study`` block: ``optim.warmup_steps`` is
    ``round(warmup_fraction · steps)``, so it follows steps resolved from epochs)."""

    lr: float
    schedule: str = "constant"
    min_lr: float = 0.0
    warmup_fraction: float = 0.0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0


@dataclass(frozen=True)
class StudyRun:
    """One training run of the study: a view of its validated training config.

    Built by `opdgeo.study.preset_file` from the run's merged training config (after the
    training config's validation accepted it) and its ``study`` block; the teacher's own
    SFT is the one run built in code (`opdgeo.study.pipeline.teacher_sft_run`).

    Attributes:
        name: run name (the key under ``runs:``); also the stage name.
        objective: ``objective.name``.
        init: ``study.init``: ``"base"``, ``"anchor"`` (the SFT run's final checkpoint) or
            ``"<run>@<f>"``: the checkpoint of ``<run>`` nearest to fraction ``f`` of its
            steps, from which a projected run restarts.
        steps, batch_size: ``optim.steps``, ``optim.batch_size``.
        optim: the optimizer (`OptimSpec`).
        samples_per_prompt: ``rollout.group_size`` (1 for SFT).
        micro_batch_size: ``optim.micro_batch_size``; None when it is the whole batch.
        checkpoint_every: ``study.checkpoint_every``, the fraction of ``steps`` between
            checkpoints: ``checkpoint.every = max(1, round(checkpoint_every·steps))`` plus
            the final step (1.0: the final step only).
        temperature, max_new_tokens: ``rollout.temperature``, ``rollout.max_new_tokens``.
        token_keep: None, or ``(token_keep.mode, token_keep.fraction)``.
        rollout_policy: ``rollout.policy``.
        mix_alpha: None, or α of ``objective.advantage = {opd: α, rlvr: 1 − α}``.
        project_rank, project_mode: ``project.rank`` and ``project.mode`` of a projected
            run (or its freeze-only control); None without a ``project`` section.
        seed: ``run.seed``, one per seed of the preset (`opdgeo.study.seeds`).
        group: ``study.group``: the report panel (``main``, ``matched``,
            ``sparsification``, ``offpolicy``, ``mixing``, ``projection``).
        epochs: ``study.epochs``: None, or passes over the run's data; the study then sets
            ``steps`` from the data (`opdgeo.study.data.resolve_steps`).
        seed_of: None, or the run this one repeats with another ``seed``.
        extra: every other training-config key the run sets (``("section.key", value)``
            pairs, e.g. ``objective.eps_high``): written to its training config and part of
            its cache key.
    """

    name: str
    objective: str
    init: str
    steps: int
    batch_size: int
    optim: OptimSpec
    samples_per_prompt: int = 1
    micro_batch_size: int | None = None
    checkpoint_every: float = 0.2
    temperature: float = 1.0
    max_new_tokens: int = 64
    token_keep: tuple[str, float] | None = None
    rollout_policy: str = "student"
    mix_alpha: float | None = None
    project_rank: int | None = None
    seed: int = 0
    group: str = "main"
    epochs: float | None = None
    seed_of: str | None = None
    project_mode: str = "project"
    extra: tuple[tuple[str, Any], ...] = ()

    def every(self) -> int:
        """The training core's ``checkpoint.every`` (0 = only the final step)."""
        if self.checkpoint_every >= 1.0:
            return 0
        return max(1, round(self.checkpoint_every * self.steps))

    def checkpoint_steps(self) -> list[int]:
        """Steps at which checkpoints are saved: multiples of `every` and the final step."""
        from opdgeo.training.memory_plan import checkpoint_steps

        return checkpoint_steps(self.steps, self.every())

    def cache_config(self) -> dict:
        """What the run's training stage hashes: every field as JSON data (``extra`` only
        when the run has extra keys, so that a run without them keeps its key)."""
        data = json.loads(json.dumps(dataclasses.asdict(self), default=str))
        if not data["extra"]:
            del data["extra"]
        return data


@dataclass(frozen=True)
class EvalSpec:
    """Held-out evaluation (avg@k), the file's ``eval`` section.

    Attributes:
        split: task split evaluated (``"test"``).
        n_problems: problems evaluated.
        k: samples per problem (avg@k = mean reward over the k·n samples).
        temperature: sampling temperature (0 = greedy, then k is forced to 1).
        max_new_tokens: response length limit.
        suite: ``None``, or the name of an evaluation suite (``opdgeo.tasks.suite.SUITES``,
            e.g. ``"paper"``): every checkpoint is then evaluated on the suite's tasks, each
            with its own k, temperature and token cap (the fields above are unused), and
            ``eval.json``'s ``accuracy`` is the suite's headline.
    """

    split: str = "test"
    n_problems: int = 64
    k: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 64
    suite: str | None = None


@dataclass(frozen=True)
class DiagnoseSpec:
    """Settings passed to `compare` and `trajectory`, the file's ``diagnose`` section
    (SPEC §1/§2 defaults unless noted).

    Attributes:
        k: principal-angle subspace size (capped at min(m, n) by compare).
        rank: rank r of the principal mask.
        alpha: mask fraction α of the principal and low-magnitude masks.
        eta: bf16 relative tolerance.
        trajectory_matrices: ``"attention"`` (paper) or ``"all"``.
        hill_k: Hill estimator k (capped by the matrix size).
        sim_k: K of Sim_K.
        band_ratio, band_tolerance: reference only (the paper's OPD band ~20–30 is a ratio of
            1.5); the band claims compare runs over seeds (docs/study.md, "Claims").
        lock_threshold: Sim_16 of the locking step; the null of the first-checkpoint claim.
    """

    k: int = 512
    rank: int = 64
    alpha: float = 0.3
    eta: float = 1e-3
    trajectory_matrices: str = "attention"
    hill_k: int = 32
    sim_k: int = 16
    band_ratio: float = 1.5
    band_tolerance: float = 1.25
    lock_threshold: float = 0.8


@dataclass(frozen=True)
class StudyPreset:
    """A whole study (one YAML file).

    Attributes:
        name: preset name (the file's ``name``, default its stem).
        description: one line for the plan and the report.
        task: task spec for `opdgeo.tasks.load_task`: the RL and OPD prompts (every run's
            ``task.spec``).
        base: the student's base model.
        teacher: the teacher.
        runs: training runs, in dependency order, every seed included.
        eval: held-out evaluation.
        diagnose: compare/trajectory settings.
        dtype: checkpoint storage dtype (every run's ``checkpoint.dtype``).
        device: ``"cpu"`` or ``"cuda"``.
        expected_minutes: documented wall time, ``{"cpu-2core": m, "1xH100": m, ...}``.
        step_seconds: measured seconds per unit, from which ``--dry-run`` estimates the
            selected stages' time (`opdgeo.study.plan.estimate_seconds`): ``teacher_sft``,
            ``sft``, ``opd``, ``rlvr`` (one optimizer step of that objective at the preset's
            batch), ``eval`` (one evaluation), ``compare`` (one run's compare),
            ``trajectory`` (one run read by a trajectory stage), ``model`` (one model stage
            besides the teacher's SFT). Empty: only ``expected_minutes`` is shown.
        measured_on: where and how ``step_seconds`` were measured (shown with the estimate).
        default_stages: the ``--stages`` selection when none is given (empty: every stage),
            e.g. ``[core]``: the controls then run with ``--stages controls`` or by name.
        torch_threads: intra-op threads for this process (None: torch's default).
        dedup: every run's ``task.dedup``.
        demonstrations: the SFT runs' ``task.demonstrations``.
        seeds: the seeds every run (or every run of ``seeded``) runs with.
        keep_trainer_state: every run's ``checkpoint.keep_trainer_state``. ``"last"`` (our
            choice): a finished run keeps the ``trainer_state/`` of its last checkpoint and
            of the checkpoints a projected run restarts from (``restart_steps``), the HF
            weights of every checkpoint; ``"all"``: every checkpoint's.
        path: the file the preset was read from (``""`` when built in code).
    """

    name: str
    description: str
    task: str
    base: ModelSpec
    teacher: ModelSpec
    runs: tuple[StudyRun, ...]
    eval: EvalSpec = EvalSpec()
    diagnose: DiagnoseSpec = DiagnoseSpec()
    dtype: str = "bfloat16"
    device: str = "cpu"
    expected_minutes: dict = field(default_factory=dict)
    step_seconds: dict = field(default_factory=dict)
    measured_on: str = ""
    default_stages: tuple[str, ...] = ()
    torch_threads: int | None = None
    dedup: bool = True
    demonstrations: str | None = None
    seeds: tuple[int, ...] = (0,)
    keep_trainer_state: str = "last"
    path: str = ""

    def __post_init__(self):
        problems = self.problems()
        if problems:
            where = f"{self.path}: " if self.path else f"preset {self.name!r}: "
            raise ConfigError(where + "; ".join(problems))

    def run(self, name: str) -> StudyRun:
        for r in self.runs:
            if r.name == name:
                return r
        raise ConfigError(f"preset {self.name!r} has no run {name!r}; runs: {', '.join(r.name for r in self.runs)}")

    def has_run(self, name: str) -> bool:
        return any(r.name == name for r in self.runs)

    def restart_steps(self, src: StudyRun) -> tuple[int, ...]:
        """The checkpoint steps of run ``src`` that a projected run restarts from (its
        ``init`` is ``"<src>@<f>"``: the checkpoint nearest to fraction ``f`` of the steps)."""
        out = {nearest_step(src.checkpoint_steps(), float(r.init.partition("@")[2]) * src.steps)
               for r in self.runs if "@" in r.init and r.init.partition("@")[0] == src.name}
        return tuple(sorted(out))

    def mixing_panel(self) -> list[tuple[float, str]]:
        """``(α, run)`` of the mixing sweep, α descending (`opdgeo.study.mixing.mixing_panel`)."""
        from opdgeo.study.mixing import mixing_panel

        return mixing_panel([r for r in self.runs if r.seed_of is None])  # seed-0 instances name the points

    def roles(self) -> dict:
        """Which run plays which part of the study (`opdgeo.study.roles.study_roles`)."""
        from opdgeo.study.roles import study_roles

        return study_roles([dataclasses.asdict(r) for r in self.runs])

    def problems(self) -> list[str]:
        """Every problem of the study as a whole (empty when valid); each run's training
        settings were validated by the training config when the file was read."""
        out: list[str] = []
        names = [r.name for r in self.runs]
        if len(set(names)) != len(names):
            out.append(f"duplicate run names in {names}")
        if ANCHOR_RUN not in names:
            out.append(f"runs must include {ANCHOR_RUN!r} (it produces the anchor)")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            out.append(f"dtype must be bfloat16/float16/float32; got {self.dtype!r}")
        if self.keep_trainer_state not in ("all", "last"):
            out.append(f"keep_trainer_state must be all|last; got {self.keep_trainer_state!r}")
        seen: set[str] = set()
        for r in self.runs:
            out.extend(_run_problems(r, seen))
            seen.add(r.name)
        from opdgeo.study.mixing import mixing_problems

        out.extend(mixing_problems([r for r in self.runs if r.seed_of is None]))
        if self.demonstrations is not None and not self.demonstrations.strip():
            out.append("demonstrations must be None, 'teacher' or a task spec; got ''")
        if self.demonstrations == "teacher" and self.teacher.sft_steps:
            out.append("demonstrations 'teacher' cannot train the teacher's own SFT (teacher.sft_steps > 0)")
        return out + self._eval_problems()

    def _eval_problems(self) -> list[str]:
        out: list[str] = []
        e = self.eval
        if e.suite is not None:
            from opdgeo.tasks.suite import SUITES

            if e.suite not in SUITES:
                out.append(f"eval.suite must be one of {', '.join(SUITES)}; got {e.suite!r}")
        if e.n_problems < 1 or e.k < 1:
            out.append(f"eval.n_problems and eval.k must be >= 1; got {e.n_problems}, {e.k}")
        d = self.diagnose
        if d.trajectory_matrices not in ("attention", "all"):
            out.append(f"diagnose.trajectory_matrices must be attention|all; got {d.trajectory_matrices!r}")
        if not (0 < d.alpha < 1):
            out.append(f"diagnose.alpha must be in (0, 1); got {d.alpha}")
        return out


def _run_problems(r: StudyRun, seen: set[str]) -> list[str]:
    """What is wrong with run ``r``'s place in the study (``seen``: the runs before it)."""
    out: list[str] = []
    key = f"runs.{r.name}"
    if not (0 < r.checkpoint_every <= 1):
        out.append(f"{key}.study.checkpoint_every must be in (0, 1]; got {r.checkpoint_every}")
    if r.project_rank is not None and "@" not in r.init:
        out.append(f"{key}.study.init must be '<run>@<fraction>' for a run with a project section; got {r.init!r}")
    if "@" in r.init and r.project_rank is None:
        out.append(f"{key}.study.init {r.init!r} restarts from a checkpoint, which needs a project section")
    if r.init == "anchor" and r.name == ANCHOR_RUN:
        out.append(f"{key}.study.init cannot be the anchor it produces")
    elif r.init == "anchor" and ANCHOR_RUN not in seen:
        out.append(f"{key} starts from the anchor, so {ANCHOR_RUN!r} must come before it")
    elif "@" in r.init:
        src, _, frac = r.init.partition("@")
        try:
            f = float(frac)
        except ValueError:
            f = -1.0
        if src not in seen:
            out.append(f"{key}.study.init refers to run {src!r}, which must come earlier")
        if not (0 < f <= 1):
            out.append(f"{key}.study.init fraction must be in (0, 1]; got {frac!r}")
    elif r.init not in ("base", "anchor"):
        out.append(f"{key}.study.init must be base|anchor|<run>@<fraction>; got {r.init!r}")
    if r.seed_of is not None and r.seed_of not in seen:
        out.append(f"{key}.seed_of refers to run {r.seed_of!r}, which must come earlier")
    if r.epochs is not None and not r.epochs > 0:
        out.append(f"{key}.study.epochs must be > 0; got {r.epochs}")
    return out


def nearest_step(steps, target: float) -> int:
    """The step of ``steps`` nearest to ``target`` (the earlier one on a tie): the checkpoint
    a projected run restarts from."""
    return min(steps, key=lambda s: (abs(s - target), s))


def get_preset(name: str) -> StudyPreset:
    """The shipped preset called ``name`` (``recipes/study/<name>.yaml``), or the study
    file at path ``name`` (a name ending in ``.yaml``/``.yml`` or holding a ``/``).

    Raises:
        ConfigError: an unknown name (the choices are listed), or a file with a problem
            (one line naming the file and the key).
    """
    from opdgeo.study.preset_file import load_preset, preset_path

    return load_preset(preset_path(name))
