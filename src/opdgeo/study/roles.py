"""Which run plays which part of the study: the names the report and the stages use.

The roles follow from each run's ``objective``, ``group``, ``init`` and projection (the
seed-0 instance of each run; the other seeds are found by ``seed_of``):

- ``sft``: the anchor, the SFT run of group ``main`` (the anchor's run is named ``sft``:
  ``init: anchor`` refers to it);
- ``opd``, ``rlvr``: the OPD and RLVR runs of group ``main``;
- ``sft_matched``: the SFT run of group ``matched`` (SFT from the anchor at the RL
  learning rate and step count), or None;
- ``main``: those of ``sft``, ``opd``, ``rlvr`` that exist (the main trajectory);
- ``projection``: one entry per projected run, ``{"projected", "full", "freeze",
  "start"}``: the run restarted with ``project.mode: project`` from a checkpoint of run
  ``full``, its freeze-only control (same ``init``, ``project.mode: freeze``; None when
  absent) and the evaluation name of the checkpoint it restarts from.

``study.json`` records them (``roles``); `study_roles` also reads a ``study.json`` written
before it did (a run without ``project_mode`` counts as projected unless it is the
second run from the same checkpoint).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["study_roles", "MAIN_ROLES"]

MAIN_ROLES = ("sft", "opd", "rlvr")
"""The roles of the main comparison, in the report's order."""


def _first(runs, objective: str, group: str) -> str | None:
    return next((r["name"] for r in runs if r.get("objective") == objective and r.get("group", "main") == group), None)


def study_roles(runs: Sequence[Mapping]) -> dict:
    """The roles of a study's runs (``study.json``'s run entries or `StudyRun` fields as dicts)."""
    plan = [r for r in runs if not r.get("seed_of")]
    roles: dict = {role: _first(plan, role, "main") for role in MAIN_ROLES}
    roles["sft_matched"] = _first(plan, "sft", "matched")
    roles["main"] = [roles[r] for r in MAIN_ROLES if roles[r]]
    by_init: dict[str, list[Mapping]] = {}
    for r in plan:
        if r.get("project_rank") is not None and "@" in str(r.get("init", "")):
            by_init.setdefault(r["init"], []).append(r)
    projection = []
    for init, group in by_init.items():
        modes = [r.get("project_mode") for r in group]
        if None in modes:  # an older study.json: the first run from a checkpoint is the projected one
            modes = ["project"] + ["freeze"] * (len(group) - 1)
        projected = [r["name"] for r, m in zip(group, modes) if m == "project"]
        frozen = [r["name"] for r, m in zip(group, modes) if m == "freeze"]
        for name in projected:
            projection.append({"projected": name, "full": init.partition("@")[0], "freeze": frozen[0] if frozen else None,
                               "start": f"{name}_start"})
    roles["projection"] = projection
    return roles
