"""Entry points of the study: run it, or show its plan."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from opdgeo.errors import ConfigError
from opdgeo.study.pipeline import build_stages, study_info
from opdgeo.study.plan import format_plan
from opdgeo.study.presets import StudyPreset
from opdgeo.study.stages import StageOutcome, read_marker, run_stages, select_stages, stage_keys
from opdgeo.study.workers import default_jobs, preload_stage_modules

__all__ = ["StudyResult", "run_study", "plan_text", "data_plan", "stage_statuses"]


@dataclass(frozen=True)
class StudyResult:
    """What `run_study` returns.

    Attributes:
        out: the run folder.
        outcomes: one `StageOutcome` per stage.
        report: path of ``report.html`` (None when the report stage did not run).
        seconds: wall time of this invocation.
    """

    out: Path
    outcomes: dict[str, StageOutcome]
    report: Path | None
    seconds: float


def stage_statuses(preset: StudyPreset, out: Path) -> dict[str, str]:
    """``{stage: "done" | "started" | ""}`` for an existing run folder."""
    stages = build_stages(preset)
    keys = stage_keys(stages)
    st = {}
    for s in stages:
        m = read_marker(out, s.name)
        if m and m.get("key") == keys[s.name]:
            st[s.name] = "done"
        elif s.path and (out / s.path / ".stage_key").is_file():
            st[s.name] = "started"
        else:
            st[s.name] = ""
    return st


def data_plan(preset: StudyPreset) -> tuple[StudyPreset, str]:
    """``(preset with its steps resolved, the data plan's text)`` for ``--dry-run``.

    Where the data cannot be read here, the preset is returned as given (runs in epochs
    keep their estimated steps) and the text says why. An evaluation task that is training
    data is refused either way it is known.

    Raises:
        ConfigError: an evaluation task whose problems are all training problems.
    """
    from opdgeo.study.data import check_study_eval, group_rows, resolve_steps, study_data_plan
    from opdgeo.tasks.plan import format_data_plan

    try:
        resolved = resolve_steps(preset)
        rows = study_data_plan(resolved)
    except ConfigError as err:
        return preset, f"data plan: not available here ({err}); runs given in epochs show their estimated steps"
    overlaps = check_study_eval(resolved)
    text = "data plan (deduplicated by normalized problem text; epochs = steps x batch / problems drawn):\n"
    text += "\n".join("  " + line for line in format_data_plan(group_rows(rows)).splitlines())
    for o in overlaps:
        text += (f"\n  note: {o.shared} of {o.eval_problems} problems of eval task {o.eval_task} are training problems "
                 f"of {o.train_spec} ({o.train_split})")
    return resolved, text


def plan_text(preset: StudyPreset, out: Path | None = None, *, launcher: str | None = None,
              select: Sequence[str] | None = None) -> str:
    """The ``--dry-run`` text: validated plan, data plan, sizes, memory estimate, expected time."""
    preset, data_text = data_plan(preset)
    stages = select_stages(build_stages(preset, launcher=launcher), select or preset.default_stages)
    statuses = stage_statuses(preset, Path(out)) if out is not None and Path(out).is_dir() else None
    return format_plan(preset, stages, statuses, launcher=launcher, data_plan=data_text, out=out)


def run_study(preset: StudyPreset, out: str | Path, *, fresh: bool = False, select: Sequence[str] | None = None,
              launcher: str | None = None, log: Callable[[str], None] | None = None,
              jobs: int | None = None) -> StudyResult:
    """Run the study (or the selected stages and their dependencies) into ``out``.

    Finished stages are reused (cache keyed by configuration), interrupted training stages
    resume, ``fresh`` redoes the selected stages. Writes ``study.json`` first and
    ``timings.json`` last; the report stage writes ``report.html`` and the rest. ``jobs``
    stages run at once, each in its own process (None: `default_jobs`, the cores divided by
    the preset's ``torch_threads``; 1 under a launcher); results do not depend on it.

    Raises:
        ConfigError: bad ``select`` names, or data that cannot be read, before any work (every
            run's training config was validated when the preset was read).
        LockedError: another study is using ``out`` (``opdgeo.locking``).
    """
    from opdgeo.study.data import check_study_eval, resolve_steps

    out = Path(out)
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    preset = resolve_steps(preset)  # runs given in epochs, from the data's counts
    check_study_eval(preset)  # before any work: no evaluation on training rows
    stages = build_stages(preset, launcher=launcher)
    select = list(select or preset.default_stages)  # none given: the preset's default (all when empty)
    select_stages(stages, select)  # validate names before any work
    from opdgeo.locking import hold_folder

    with hold_folder(out, what="study folder"):  # one study per folder (two would mix their markers)
        return _run_locked(preset, out, stages, select=select, fresh=fresh, log=log, t0=t0,
                           jobs=jobs if jobs is not None else default_jobs(preset.torch_threads, launcher=launcher))


def _warn_disk(preset: StudyPreset, out: Path, stages, select, *, fresh: bool, log) -> None:
    """A warning when the stages still to run may write more than the free disk at ``out``
    (their run folders fill as they train; a full disk fails the stage that hits it)."""
    from opdgeo.study.plan import disk_study_bytes, free_bytes, model_arch

    sa = model_arch(preset.base)
    if sa is None:
        return
    done = {} if fresh else stage_statuses(preset, out)
    todo = [s for s in select_stages(stages, select) if done.get(s.name) != "done"]
    _, peak, _ = disk_study_bytes(preset, todo, sa, model_arch(preset.teacher))
    free = free_bytes(out)
    if peak > free:
        log(f"warning: the {len(todo)} stage(s) to run may write up to ~{peak / 2**30:.1f} GiB; {out} has "
            f"{free / 2**30:.1f} GiB free (opdgeo study --dry-run shows the estimate)")


def _run_locked(preset: StudyPreset, out: Path, stages, *, select, fresh: bool, log, t0: float,
                jobs: int = 1) -> StudyResult:
    (out / "study.json").write_text(json.dumps(study_info(preset), indent=2) + "\n")
    _warn_disk(preset, out, stages, select, fresh=fresh, log=log)
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # the study prints one line per stage
    preload_stage_modules()  # once here rather than in every forked stage
    threads = torch.get_num_threads()
    if preset.torch_threads:
        torch.set_num_threads(preset.torch_threads)
    try:
        outcomes = run_stages(stages, out, select=select, fresh=fresh, log=log, jobs=jobs,
                              threads=torch.get_num_threads(),
                              timings_meta={"preset": preset.name, "torch_threads": torch.get_num_threads(),
                                            "jobs": jobs})
    finally:
        torch.set_num_threads(threads)
    report = out / "report.html"
    ran_report = outcomes.get("report") and outcomes["report"].status in ("ran", "resumed")
    return StudyResult(out=out, outcomes=outcomes, report=report if ran_report else None, seconds=time.perf_counter() - t0)
