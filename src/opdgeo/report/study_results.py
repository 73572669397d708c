"""The study's results as read from its run folder (documented schemas only), grouped by
seed: a run of the plan and its other seeds (``study.json``'s ``seed_of``).

- ``study.json`` — the plan (written by `opdgeo.study`);
- ``diagnose/compare/<run>/summary.json`` and ``matrices.csv`` — `opdgeo compare`;
- ``diagnose/trajectory/<stage>/trajectory.csv``, ``summary.json``, ``overlap.csv`` —
  `opdgeo trajectory`;
- ``eval/<name>/eval.json`` — the study's eval stages;
- ``.study/stages/*.json`` — stage markers (their ``seconds``).
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

__all__ = ["StudyResults", "load_results", "summary_means", "trajectory_means", "num"]


def _read_json(p: Path):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _read_csv(p: Path) -> list[dict]:
    try:
        with p.open(newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def num(x) -> float | None:
    """A CSV/JSON cell as a float; None for empty/missing/non-numeric."""
    if x is None or x == "":
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


@dataclass
class StudyResults:
    """Everything the report needs, read from the run folder.

    Attributes:
        info: ``study.json``.
        compare: ``{run: summary.json}``.
        matrices: ``{run: rows of matrices.csv}``.
        traj_means: ``{run: [{step, progress, stable_rank, fro_norm, rel_fro_norm,
            hill_alpha, sim_to_final}]}`` — mean over matrices per checkpoint, as
            trajectory's ``summary.json`` gives them (``means``; from ``trajectory.csv``
            only for a summary without them).
        traj_summary: ``{run: its entry of a trajectory summary.json}`` (``locking_step``...).
        overlap: rows of ``overlap.csv``.
        evals: ``{name: eval.json}``.
        markers: ``{stage: marker}``.
        figures: ``{name: path}`` of figure files written by trajectory.
        precision: ``{run: "bf16-autocast" | "fp32"}``, each training run's compute
            precision as its ``config.yaml`` recorded it (``optim.bf16_autocast`` resolved
            at launch), the teacher's SFT as ``teacher``.
    """

    info: dict
    compare: dict = field(default_factory=dict)
    matrices: dict = field(default_factory=dict)
    traj_means: dict = field(default_factory=dict)
    traj_summary: dict = field(default_factory=dict)
    overlap: list = field(default_factory=list)
    evals: dict = field(default_factory=dict)
    markers: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)
    precision: dict = field(default_factory=dict)

    def roles(self) -> dict:
        """Which run plays which part (``study.json``'s ``roles``, `opdgeo.study.roles`; from
        its runs for a ``study.json`` written before it recorded them)."""
        roles = self.info.get("roles")
        if not isinstance(roles, dict):
            from opdgeo.study.roles import study_roles

            roles = study_roles(self.info.get("runs", []))
        return roles

    def role(self, name: str) -> str | None:
        """The run of role ``name`` (``sft``, ``opd``, ``rlvr``, ``sft_matched``), or None."""
        return self.roles().get(name)

    def main_runs(self) -> list[str]:
        """The main comparison's runs (SFT, OPD, RLVR), those the plan has."""
        return list(self.roles().get("main", []))

    def projections(self) -> list[dict]:
        """``[{"projected", "full", "freeze", "start"}]``: every projected run, its full run,
        its freeze-only control and the evaluation of its restart checkpoint."""
        return list(self.roles().get("projection", []))

    def projection_of(self, full: str | None) -> dict | None:
        """The projection entry whose full run is ``full`` (None when there is none)."""
        return next((p for p in self.projections() if full is not None and p["full"] == full), None)

    def runs(self, group: str | None = None) -> list[str]:
        """The plan's runs (seed-0 instances only), optionally of one group."""
        return [r["name"] for r in self.info.get("runs", [])
                if not r.get("seed_of") and (group is None or r.get("group") == group)]

    def all_runs(self) -> list[str]:
        """Every run of the plan, every seed."""
        return [r["name"] for r in self.info.get("runs", [])]

    def by_seed(self, name: str) -> dict[int, str]:
        """``{seed: run}`` of ``name`` and its other seeds."""
        out = {}
        for r in self.info.get("runs", []):
            if r["name"] == name or r.get("seed_of") == name:
                out[int(r.get("seed", 0) or 0)] = r["name"]
        return dict(sorted(out.items())) or {0: name}

    def replicas(self, name: str) -> list[str]:
        """``name`` and its other seeds, by seed."""
        return list(self.by_seed(name).values())

    def values(self, name: str, get: Callable[["StudyResults", str], float | None]) -> list[float]:
        """``get(self, run)`` over the seeds of ``name`` (seeds without a value left out)."""
        vals = [get(self, r) for r in self.replicas(name)]
        return [v for v in vals if v is not None]

    def trajectory(self, run: str) -> tuple[list[float], list[float]]:
        """``(progress in [0, 1], mean stable rank)`` per checkpoint of one run."""
        pts = [m for m in self.traj_means.get(run, []) if m.get("stable_rank") is not None]
        return [(m.get("progress") or 0.0) / 100.0 for m in pts], [m["stable_rank"] for m in pts]

    def run_info(self, name: str) -> dict:
        for r in self.info.get("runs", []):
            if r["name"] == name:
                return r
        return {}

    def setting(self, key: str, default):
        return self.info.get("diagnose", {}).get(key, default)

    def acc(self, name: str) -> float | None:
        e = self.evals.get(name)
        return num(e.get("accuracy")) if e else None

    def acc_n(self, name: str) -> int | None:
        e = self.evals.get(name)
        return int(e["n_samples"]) if e and e.get("n_samples") else None

    def srank_series(self, run: str) -> list[float]:
        return [m["stable_rank"] for m in self.traj_means.get(run, []) if m.get("stable_rank") is not None]

    def band(self, run: str) -> tuple[float, float] | None:
        s = self.srank_series(run)
        return (min(s), max(s)) if s else None


_TRAJ_METRICS = ("stable_rank", "fro_norm", "rel_fro_norm", "hill_alpha", "sim_to_final")


def trajectory_means(rows: list[dict]) -> dict[str, list[dict]]:
    """Mean over matrices of each trajectory metric, per run and checkpoint (progress order).

    NaN/empty cells are left out of the mean (a metric with no finite value is None).
    """
    acc: dict[tuple[str, int], dict] = {}
    for r in rows:
        try:
            key = (r["run"], int(float(r["step"])))
        except (KeyError, TypeError, ValueError):
            continue
        slot = acc.setdefault(key, {"progress": num(r.get("progress")), **{m: [] for m in _TRAJ_METRICS}})
        for m in _TRAJ_METRICS:
            v = num(r.get(m))
            if v is not None:
                slot[m].append(v)
    out: dict[str, list[dict]] = defaultdict(list)
    for (run, step), slot in acc.items():
        rec = {"step": step, "progress": slot["progress"]}
        for m in _TRAJ_METRICS:
            vals = slot[m]
            rec[m] = sum(vals) / len(vals) if vals else None
        out[run].append(rec)
    for run in out:
        out[run].sort(key=lambda r: r["step"])
    return dict(out)


def summary_means(means: list[dict]) -> list[dict]:
    """A run's ``means`` of a trajectory ``summary.json`` as the report's records (NaN → None),
    by step."""
    out = [{"step": int(m["step"]), "progress": num(m.get("progress")), **{k: num(m.get(k)) for k in _TRAJ_METRICS}}
           for m in means if isinstance(m, dict) and num(m.get("step")) is not None]
    return sorted(out, key=lambda r: r["step"])


def load_results(out: Path) -> StudyResults:
    """Read every result file of the study in ``out`` (missing files are simply absent)."""
    out = Path(out)
    res = StudyResults(info=_read_json(out / "study.json") or {})
    cdir = out / "diagnose" / "compare"
    if cdir.is_dir():
        for d in sorted(cdir.iterdir()):
            s = _read_json(d / "summary.json")
            if s is not None:
                res.compare[d.name] = s
                res.matrices[d.name] = _read_csv(d / "matrices.csv")
    # One trajectory folder per stage (``main`` = SFT/OPD/RLVR with the cross-run overlap,
    # then one per other run); a run is taken from the first folder that holds it.
    tdir = out / "diagnose" / "trajectory"
    folders = sorted(tdir.iterdir(), key=lambda d: (d.name != "main", d.name)) if tdir.is_dir() else []
    rows: list[dict] = []
    seen: set[str] = set()
    for d in folders:
        part = _read_csv(d / "trajectory.csv")
        runs_here = {r.get("run") for r in part} - seen
        rows += [r for r in part if r.get("run") in runs_here]
        seen |= runs_here
        summ = _read_json(d / "summary.json") or {}
        node = summ.get("runs", summ) if isinstance(summ, dict) else {}
        if isinstance(node, dict):
            for run, v in node.items():
                if run in runs_here and isinstance(v, dict):
                    res.traj_summary.setdefault(run, v)
        res.overlap += _read_csv(d / "overlap.csv")
        for p in sorted(d.rglob("*.png")):
            res.figures[f"{d.name}/{p.stem}"] = p
    # trajectory's own per-checkpoint means (summary.json ``means``); the CSV's only for a
    # run whose summary has none (a summary written before it had them)
    res.traj_means = {run: m for run, m in trajectory_means(rows).items() if not res.traj_summary.get(run, {}).get("means")}
    for run, v in res.traj_summary.items():
        if v.get("means"):
            res.traj_means[run] = summary_means(v["means"])
    edir = out / "eval"
    if edir.is_dir():
        for d in sorted(edir.iterdir()):
            e = _read_json(d / "eval.json")
            if e is not None:
                res.evals[d.name] = e
    res.precision = _precisions(out)
    mdir = out / ".study" / "stages"
    if mdir.is_dir():
        for p in sorted(mdir.glob("*.json")):
            m = _read_json(p)
            if m is not None:
                res.markers[p.stem] = m
    return res


def _precisions(out: Path) -> dict:
    """``{run: precision}`` from the runs' ``config.yaml`` (a run without one is absent)."""
    import yaml

    from opdgeo.training.precision import precision_name

    folders = sorted((out / "runs").glob("*/config.yaml")) if (out / "runs").is_dir() else []
    named = [(p.parent.name, p) for p in folders]
    teacher = out / "models" / "teacher" / "sft" / "config.yaml"
    if teacher.is_file():
        named.append(("teacher", teacher))
    found = {}
    for name, path in named:
        try:
            value = (yaml.safe_load(path.read_text()) or {}).get("optim", {}).get("bf16_autocast")
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        if isinstance(value, bool):  # "auto" is resolved at launch; an unresolved value says nothing
            found[name] = precision_name(value)
    return found
