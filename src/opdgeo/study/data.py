"""The study's data: what each stage reads, how many steps an epoch is, and the checks.

A preset names its data in four fields: ``task`` (the RL and OPD prompts, every run's
``task.spec``), ``dedup`` (``task.dedup``), ``demonstrations`` (the SFT runs'
``task.demonstrations``) and ``eval`` (one held-out split of the task, or a named
evaluation suite). This module turns them into:

- ``task_section(preset, run)``: the ``task`` section of a run's training config;
- ``resolve_steps(preset)``: the preset with every run given in ``epochs`` set to
  ``steps_for_epochs(n, B, E) = ceil(E·n/B)`` steps, n the distinct problems it draws
  (for SFT, those with a demonstration);
- ``eval_suite(preset)``: the evaluation as an ``EvalSuite`` (a preset without a suite
  evaluates its task's ``eval.split``, the first ``eval.n_problems`` rows);
- ``training_sets(preset)`` and ``check_study_eval(preset)``: the training ``(spec,
  split)`` pairs, and the refusal of an evaluation task whose problems are all training
  problems (``opdgeo.tasks.suite.check_eval_not_train``);
- ``study_data_plan(preset)``: one ``opdgeo.tasks.plan.DataPlanRow`` per training stage
  and evaluation task, for ``--dry-run``.

Everything reads the data (files, the local Hugging Face caches; nothing is downloaded)
and no model.
"""

from __future__ import annotations

from dataclasses import replace

from opdgeo.errors import ConfigError
from opdgeo.study.presets import StudyPreset, StudyRun

__all__ = ["task_section", "task_fields", "resolve_steps", "eval_suite", "training_sets", "check_study_eval", "study_data_plan",
           "group_rows", "TEACHER_SFT"]

TEACHER_SFT = "teacher_sft"
"""Name of the teacher's own SFT run (models stage), trained on the task's solutions."""


def task_section(preset: StudyPreset, run: StudyRun) -> dict:
    """The ``task`` section of ``run``'s training config (``opdgeo.training.config.TaskConfig``)."""
    return task_fields(preset.task, preset.dedup, preset.demonstrations,
                       demonstrations_apply=run.objective == "sft" and run.name != TEACHER_SFT)


def task_fields(task: str, dedup: bool, demonstrations: str | None, *, demonstrations_apply: bool) -> dict:
    """The ``task`` section from a preset's ``task``, ``dedup`` and ``demonstrations`` (these
    for an SFT run of the study, ``demonstrations_apply``; the teacher's SFT uses the task's
    own solutions)."""
    out = {"spec": task, "split": "train", "num_problems": None, "dedup": dedup}
    if demonstrations_apply and demonstrations is not None:
        out["demonstrations"] = demonstrations
    return out


def _task_config(preset: StudyPreset, run: StudyRun):
    from opdgeo.training.config import TaskConfig

    return TaskConfig(**task_section(preset, run))


def _run_row(preset: StudyPreset, run: StudyRun):
    """The data plan row of one training run (its steps not yet set)."""
    from opdgeo.tasks.plan import data_plan_row, demonstrations_plan_row

    if run.objective == "sft":
        return demonstrations_plan_row(_task_config(preset, run), stage=run.name, batch_size=run.batch_size)
    return data_plan_row(preset.task, stage=run.name, role="train", split="train", dedup=preset.dedup,
                         batch_size=run.batch_size)


def resolve_steps(preset: StudyPreset) -> StudyPreset:
    """``preset`` with ``steps = ceil(epochs·n / batch_size)`` for every run given in epochs.

    Raises:
        ConfigError: the data cannot be read, or a run in epochs trains on teacher
            demonstrations (their count is known only after generation).
    """
    from opdgeo.tasks.plan import steps_for_epochs

    if all(r.epochs is None for r in preset.runs):
        return preset
    runs = []
    for r in preset.runs:
        if r.epochs is not None:
            if r.objective == "sft" and preset.demonstrations == "teacher":
                raise ConfigError(f"runs.{r.name}.epochs: teacher demonstrations are counted only after they are "
                                  "generated; give the run in steps")
            row = _run_row(preset, r)
            if not row.drawn:
                raise ConfigError(f"runs.{r.name}: its data ({row.spec}) has no problems to draw")
            r = replace(r, steps=steps_for_epochs(row.drawn, r.batch_size, r.epochs))
        runs.append(r)
    return replace(preset, runs=tuple(runs))


def eval_suite(preset: StudyPreset):
    """The study's evaluation as an ``opdgeo.tasks.suite.EvalSuite``."""
    from opdgeo.tasks.suite import SUITES, EvalSuite, EvalTask

    e = preset.eval
    if e.suite is not None:
        return SUITES[e.suite]
    task = EvalTask(name="held-out", spec=preset.task, k=e.k, split=e.split, n=e.n_problems)
    return EvalSuite(tasks=(task,), temperature=e.temperature, max_new_tokens=e.max_new_tokens, dedup=False)


def training_sets(preset: StudyPreset) -> list[tuple[str, str]]:
    """``(spec, split)`` of every set the study trains on: the task, and a demonstration dataset."""
    out = [(preset.task, "train")]
    if preset.demonstrations not in (None, "teacher"):
        out.append((preset.demonstrations, "train"))
    return out


def check_study_eval(preset: StudyPreset) -> list:
    """Refuse evaluation tasks that are training data; the partial overlaps (``Overlap``).

    Raises:
        ConfigError: an evaluation task all of whose problems are training problems.
    """
    from opdgeo.tasks.suite import check_eval_not_train

    return check_eval_not_train(training_sets(preset), eval_suite(preset))


def study_data_plan(preset: StudyPreset) -> list:
    """One ``DataPlanRow`` per training stage (the teacher's SFT included) and evaluation
    task, with the steps and epochs of each training stage.

    Raises:
        ConfigError: a dataset that cannot be read.
    """
    from opdgeo.tasks.plan import data_plan_row, drawing_solutions
    from opdgeo.tasks.suite import suite_plan_rows

    rows = []
    t = preset.teacher
    if t.sft_steps:
        row = data_plan_row(preset.task, stage="teacher", role="demonstrations", split="train", dedup=preset.dedup,
                            batch_size=t.sft_batch, note="the teacher's SFT on the task's own solutions")
        rows.append(drawing_solutions(row).with_steps(t.sft_steps))
    for r in preset.runs:
        rows.append(_run_row(preset, r).with_steps(r.steps))
    if preset.eval.suite is None:
        e = preset.eval
        rows.append(data_plan_row(preset.task, stage="eval", role="eval", split=e.split, dedup=False,
                                  num_problems=e.n_problems, k=1 if e.temperature == 0 else e.k,
                                  note=f"T={e.temperature:g}, up to {e.max_new_tokens} new tokens"))
    else:
        rows.extend(suite_plan_rows(eval_suite(preset)))
    return rows


def group_rows(rows: list) -> list:
    """Rows that differ only in their stage as one row, ``"opd (+13)"``, whose note lists
    the stages (the controls share the main runs' data, batch and steps)."""
    from dataclasses import asdict

    groups: dict = {}
    for r in rows:
        key = tuple(sorted((k, str(v)) for k, v in asdict(r).items() if k != "stage"))
        groups.setdefault(key, []).append(r)
    out = []
    for same in groups.values():
        first = same[0]
        if len(same) == 1:
            out.append(first)
            continue
        names = ", ".join(r.stage for r in same)
        note = f"stages {names}" + (f"; {first.note}" if first.note else "")
        out.append(replace(first, stage=f"{first.stage} (+{len(same) - 1})", note=note))
    return out
