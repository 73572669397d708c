"""The study report: tables, claims and figures from the files of a study's run folder.

Reads only files with documented schemas:

- ``study.json`` — the plan (written by `opdgeo.study`): preset, runs with their group,
  objective and control settings, diagnostic settings;
- ``diagnose/compare/<run>/summary.json`` and ``matrices.csv`` — `opdgeo compare`;
- ``diagnose/trajectory/trajectory.csv`` (``run, step, progress, name, type, stable_rank,
  fro_norm, rel_fro_norm, hill_alpha, sim_to_final``), ``summary.json`` and
  ``overlap.csv`` — `opdgeo trajectory`;
- ``eval/<name>/eval.json`` — ``{name, checkpoint, accuracy, n_problems, k, temperature,
  n_samples, stderr}`` written by the study's eval stages;
- ``.study/stages/*.json`` — stage markers (their ``seconds``) for the timing table.

Writes ``tables/<id>.csv`` + ``.json`` for every table, ``claims.json``, ``report.md`` and a
self-contained ``report.html`` (figures as base64 PNG ``data:`` URIs; no external URL).

Claims are decided by fixed, documented rules (below, ``CLAIM_RULES``) from the same
numbers that the tables show; a claim whose inputs are missing has ``holds = null``.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from opdgeo.report import plots
from opdgeo.report.tables import Table, write_table

__all__ = ["StudyResults", "load_results", "build_tables", "evaluate_claims", "write_report", "CLAIM_RULES"]

PAPER_TABLE1 = {
    "sparsity": {"sft": 8.1, "opd": 51.6, "rlvr": 77.2},
    "update_density": {"sft": 92.73, "opd": 46.28, "rlvr": 27.76},
    "principal_overlap": {"sft": 29.66, "opd": 27.31, "rlvr": 26.65},
    "low_magnitude_overlap": {"sft": 31.88, "opd": 53.59, "rlvr": 73.48},
}
"""SPEC §1, Qwen3-8B, percent."""

PAPER_NSS = {"sft": "~1e-3", "opd": "~1e-4", "rlvr": "~1e-5"}
PAPER_MAX_ANGLE = {"sft": ">10°", "opd": "~1°", "rlvr": "<0.5°"}
PAPER_SRANK = {"sft": "~10 → >60 (expands)", "opd": "flat, ~20–30", "rlvr": "~30 → ~15 (contracts)"}

CLAIM_RULES = {
    "sparsity_order": "global bf16 sparsity SFT < OPD < RLVR",
    "update_density_order": "mean update density SFT > OPD > RLVR",
    "low_magnitude_overlap_order": "low-magnitude overlap SFT < OPD < RLVR",
    "nss_order": "mean NSS SFT > OPD > RLVR",
    "angle_order": "mean max principal angle (right) SFT > OPD > RLVR",
    "opd_narrow_band": "max/min of OPD's mean stable rank over its checkpoints <= band_ratio",
    "sft_srank_expands": "SFT's mean stable rank at the last checkpoint >= band_ratio x the first",
    "rlvr_srank_contracts": "RLVR's mean stable rank at the last checkpoint <= the first / band_ratio",
    "opd_sim16_first": "OPD's mean Sim_16 to the final update at the first checkpoint >= lock_threshold",
    "projection_keeps_opd": "acc(rank-16 projected OPD) >= acc(OPD) - 2 SE",
    "projection_hurts_sft": "acc(rank-16 projected SFT) < acc(SFT) - 2 SE",
    "sparsification_keeps_band": "every top-KL/random run's stable-rank range lies within [lo/tol, hi*tol] of OPD's range [lo, hi]",
    "offpolicy_keeps_band": "the off-policy OPD run's stable-rank range lies within [lo/tol, hi*tol] of OPD's",
    "small_alpha_departs": "the alpha = 0.05 and 0.01 mixtures' stable-rank ranges leave [lo/tol, hi*tol] of OPD's",
}
"""How each claim is decided (thresholds from the preset's ``diagnose`` settings)."""

SEED_RULE = ("for the five orderings, when seed repeats exist: null (inconclusive) if |mean OPD - mean RLVR| is "
             "smaller than the largest seed-to-seed spread of that metric")

CLAIM_TEXT = {
    "sparsity_order": "Update sparsity orders SFT < OPD < RLVR.",
    "update_density_order": "Update density orders SFT > OPD > RLVR.",
    "low_magnitude_overlap_order": "Updates concentrate on low-magnitude weights increasingly from SFT to OPD to RLVR.",
    "nss_order": "Spectral drift (NSS) orders SFT > OPD > RLVR.",
    "angle_order": "Principal-subspace rotation orders SFT > OPD > RLVR.",
    "opd_narrow_band": "OPD's stable rank stays in a narrow band.",
    "sft_srank_expands": "SFT's stable rank expands over training.",
    "rlvr_srank_contracts": "RLVR's stable rank contracts over training.",
    "opd_sim16_first": "OPD's Sim_16 is >= 0.8 already at the first checkpoint (early subspace locking).",
    "projection_keeps_opd": "Rank-16 subspace projection keeps OPD's accuracy.",
    "projection_hurts_sft": "Rank-16 subspace projection hurts SFT's accuracy.",
    "sparsification_keeps_band": "Token sparsification (top-KL and random, 50 % and 25 %) keeps OPD's stable-rank band.",
    "offpolicy_keeps_band": "Off-policy OPD (teacher rollouts) keeps OPD's stable-rank band.",
    "small_alpha_departs": "Small OPD weight in the OPD/RLVR mixture (alpha 0.05, 0.01) departs from OPD's band.",
}


# ----------------------------------------------------------------------------- loading


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


def _num(x) -> float | None:
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
            hill_alpha, sim_to_final}]}`` — mean over matrices per checkpoint, from
            ``trajectory.csv``.
        traj_summary: ``{run: its entry of a trajectory summary.json}`` (``locking_step``...).
        overlap: rows of ``overlap.csv``.
        evals: ``{name: eval.json}``.
        markers: ``{stage: marker}``.
        figures: ``{name: path}`` of figure files written by trajectory.
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

    def runs(self, group: str | None = None) -> list[str]:
        return [r["name"] for r in self.info.get("runs", []) if group is None or r.get("group") == group]

    def run_info(self, name: str) -> dict:
        for r in self.info.get("runs", []):
            if r["name"] == name:
                return r
        return {}

    def setting(self, key: str, default):
        return self.info.get("diagnose", {}).get(key, default)

    def acc(self, name: str) -> float | None:
        e = self.evals.get(name)
        return _num(e.get("accuracy")) if e else None

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
        slot = acc.setdefault(key, {"progress": _num(r.get("progress")), **{m: [] for m in _TRAJ_METRICS}})
        for m in _TRAJ_METRICS:
            v = _num(r.get(m))
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
    res.traj_means = trajectory_means(rows)
    edir = out / "eval"
    if edir.is_dir():
        for d in sorted(edir.iterdir()):
            e = _read_json(d / "eval.json")
            if e is not None:
                res.evals[d.name] = e
    mdir = out / ".study" / "stages"
    if mdir.is_dir():
        for p in sorted(mdir.glob("*.json")):
            m = _read_json(p)
            if m is not None:
                res.markers[p.stem] = m
    return res


# ------------------------------------------------------------------------------ tables


def _pct(x) -> float | None:
    v = _num(x)
    return None if v is None else 100.0 * v


def _stderr(p: float | None, n: int | None) -> float | None:
    if p is None or not n:
        return None
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def _locking_progress(res: StudyResults, run: str):
    node = res.traj_summary.get(run)
    return node.get("locking_progress") if isinstance(node, dict) else None


def _locking(res: StudyResults, run: str):
    """Locking step of ``run`` from trajectory summary.json (None if never/absent)."""
    node = res.traj_summary.get(run)
    return node.get("locking_step") if isinstance(node, dict) else None


def build_tables(res: StudyResults) -> list[Table]:
    """Every table of the report, in display order."""
    tables: list[Table] = []
    main = ["sft", "opd", "rlvr"]
    # Table 1 -------------------------------------------------------------------------
    t1_keys = {
        "sparsity": "global_sparsity",
        "update_density": "mean_density",
        "principal_overlap": "mean_principal_overlap",
        "low_magnitude_overlap": "mean_low_magnitude_overlap",
    }
    rows = []
    for metric, key in t1_keys.items():
        row: list = [metric.replace("_", " ") + " (%)"]
        for r in main:
            row += [_pct(res.compare.get(r, {}).get(key)), PAPER_TABLE1[metric][r]]
        rows.append(tuple(row))
    alpha = res.setting("alpha", 0.3)
    tables.append(Table(
        id="table1_sparsity",
        title="Table 1 — update sparsity and localization (ours vs the paper, Qwen3-8B)",
        columns=("metric", "SFT ours", "SFT paper", "OPD ours", "OPD paper", "RLVR ours", "RLVR paper"),
        rows=tuple(rows),
        formats=("", ".2f", ".2f", ".2f", ".2f", ".2f", ".2f"),
        note=("Sparsity: bf16-aware, parameter-weighted over every floating tensor. Density and overlaps: mean over the "
              f"geometry matrices; overlap random baseline = alpha = {100 * alpha:.0f} %. SFT: base -> SFT; OPD/RLVR: anchor -> run."),
    ))
    # Angles and NSS ------------------------------------------------------------------
    compared = [r for r in res.runs() if r in res.compare]
    rows = []
    for r in compared:
        s = res.compare[r]
        mats = res.matrices.get(r, [])
        maxes = [v for m in mats for v in (_num(m.get("angle_left_max_deg")), _num(m.get("angle_right_max_deg"))) if v is not None]
        rows.append((r, _num(s.get("mean_angle_left_max_deg")), _num(s.get("mean_angle_right_max_deg")),
                     max(maxes) if maxes else None, _num(s.get("mean_nss")),
                     PAPER_MAX_ANGLE.get(r, ""), PAPER_NSS.get(r, "")))
    tables.append(Table(
        id="angles_nss",
        title="Principal-angle rotation and normalized spectral shift",
        columns=("run", "mean max angle left (deg)", "mean max angle right (deg)", "largest angle (deg)", "mean NSS",
                 "paper max angle", "paper NSS"),
        rows=tuple(rows),
        formats=("", ".4f", ".4f", ".4f", ".3e", "", ""),
        note="Angles between the top-k singular subspaces of W0 and W+ (k capped at min(m, n)); NSS = ||s+ - s0|| / ||s0||; means over the geometry matrices.",
    ))
    # Localization --------------------------------------------------------------------
    rows = []
    for r in compared:
        s = res.compare[r]
        rows.append((r, _pct(s.get("global_sparsity")), _pct(s.get("mean_density")), _pct(s.get("mean_principal_overlap")),
                     _pct(s.get("mean_low_magnitude_overlap")), 100.0 * alpha))
    tables.append(Table(
        id="localization",
        title="Localization: sparsity, update density, principal and low-magnitude overlap (every compared run)",
        columns=("run", "sparsity (%)", "density (%)", "principal overlap (%)", "low-magnitude overlap (%)", "random baseline (%)"),
        rows=tuple(rows),
        formats=("", ".2f", ".2f", ".2f", ".2f", ".0f"),
    ))
    # Trajectory summary --------------------------------------------------------------
    rows = []
    for r in res.runs():
        pts = res.traj_means.get(r)
        if not pts:
            continue
        sr = [p["stable_rank"] for p in pts if p["stable_rank"] is not None]
        lo, hi = (min(sr), max(sr)) if sr else (None, None)
        rows.append((
            r, res.run_info(r).get("group", ""), len(pts),
            pts[0]["stable_rank"], pts[-1]["stable_rank"], lo, hi,
            (hi / lo) if (lo and hi is not None and lo > 0) else None,
            pts[-1]["fro_norm"], pts[-1]["rel_fro_norm"], pts[-1]["hill_alpha"],
            pts[0]["sim_to_final"], _locking(res, r),
        ))
    tables.append(Table(
        id="trajectory_summary",
        title="Trajectories: stable rank band, update norm, Hill index, Sim_16 and locking step",
        columns=("run", "group", "checkpoints", "srank first", "srank last", "srank min", "srank max", "band ratio",
                 "||dW||_F last", "rel ||dW||_F last", "Hill last", "Sim_16 first", "locking step"),
        rows=tuple(rows),
        formats=("", "", "", ".2f", ".2f", ".2f", ".2f", ".3f", ".4e", ".4e", ".3f", ".3f", ""),
        note=("Means over the trajectory matrix set ({}) per checkpoint; band ratio = max/min of the mean stable rank. "
              "Paper: OPD {}; SFT {}; RLVR {}.").format(res.setting("trajectory_matrices", "attention"),
                                                         PAPER_SRANK["opd"], PAPER_SRANK["sft"], PAPER_SRANK["rlvr"]),
    ))
    rows = []
    for r in res.runs():
        for p in res.traj_means.get(r, []):
            rows.append((r, p["step"], p["progress"], p["stable_rank"], p["fro_norm"], p["rel_fro_norm"], p["hill_alpha"], p["sim_to_final"]))
    tables.append(Table(
        id="trajectory_means",
        title="Trajectory means per checkpoint (the plotted values)",
        columns=("run", "step", "progress (%)", "stable rank", "||dW||_F", "rel ||dW||_F", "Hill alpha", "Sim_16 to final"),
        rows=tuple(rows),
        formats=("", "", ".1f", ".3f", ".4e", ".4e", ".3f", ".4f"),
    ))
    # Accuracy ------------------------------------------------------------------------
    rows = []
    for name, e in res.evals.items():
        p = _num(e.get("accuracy"))
        rows.append((name, e.get("role", ""), p, _acc_se(res, name), e.get("n_problems"), e.get("k")))
    tables.append(Table(
        id="accuracy",
        title="Held-out accuracy (avg@k)",
        columns=("model", "role", "accuracy", "std. error", "problems", "k"),
        rows=tuple(rows),
        formats=("", "", ".4f", ".4f", "", ""),
        note="avg@k = mean 0/1 reward over k samples of each held-out problem; std. error over problems (std of per-problem accuracy / sqrt(problems)).",
    ))
    # Projection ----------------------------------------------------------------------
    rows = []
    for full, proj in (("opd", "opd_proj16"), ("sft", "sft_proj16")):
        if full not in res.evals and proj not in res.evals:
            continue
        a, b = res.acc(full), res.acc(proj)
        se = _diff_se(res, full, proj)
        rows.append((full, a, b, (b - a) if (a is not None and b is not None) else None, se))
    tables.append(Table(
        id="projection",
        title="Functional sufficiency: accuracy with and without rank-16 subspace projection",
        columns=("run", "accuracy (full)", "accuracy (projected, K=16)", "difference", "SE of difference"),
        rows=tuple(rows),
        formats=("", ".4f", ".4f", "+.4f", ".4f"),
        note="Projected runs restart from the run's ~20 % checkpoint and train only inside span(V_16) of that checkpoint's update.",
    ))
    # Control panels ------------------------------------------------------------------
    opd_band = res.band("opd")
    tol = res.setting("band_tolerance", 1.25)
    for group, title in (("sparsification", "Control: token sparsification"), ("offpolicy", "Control: off-policy OPD"),
                         ("mixing", "Control: OPD/RLVR advantage mixing")):
        runs = _panel_runs(res, group)
        alphas = {p["run"]: p["alpha"] for p in res.info.get("mixing_panel", [])} if group == "mixing" else {}
        rows = []
        for r in runs:
            b = res.band(r)
            setting = f"alpha={alphas[r]:g}" if r in alphas else _setting_text(res.run_info(r))
            rows.append((r, setting, b[0] if b else None, b[1] if b else None,
                         _within(b, opd_band, tol) if r != "opd" else None, res.acc(r)))
        tables.append(Table(
            id=f"control_{group}",
            title=title + " — stable-rank band and accuracy",
            columns=("run", "setting", "srank min", "srank max", "within OPD band", "accuracy"),
            rows=tuple(rows),
            formats=("", "", ".2f", ".2f", "", ".4f"),
            note=f"Within OPD band: the run's [min, max] mean stable rank lies inside [lo/{tol}, hi*{tol}] of OPD's [lo, hi].",
        ))
    # Seed spread (noise check) -------------------------------------------------------
    seed_rows = seed_spread(res)
    if seed_rows:
        seeds = sorted({r for g in _seed_pairs(res).values() for r in g})
        tables.append(Table(
            id="seed_spread",
            title="Noise check: OPD-RLVR gap against the spread between seeds",
            columns=("metric", "OPD (seeds)", "RLVR (seeds)", "OPD-RLVR gap", "seed spread", "gap / spread"),
            rows=tuple(seed_rows),
            formats=("", "", "", ".4g", ".4g", ".2f"),
            note=("Runs " + ", ".join(seeds) + ": same configuration, other seeds (prompt order, rollouts). gap = |mean OPD - "
                  "mean RLVR| over seeds; spread = largest |difference| between two seeds of one method. A gap several times "
                  "the spread is not seed noise."),
        ))
    # Cross-run overlap ---------------------------------------------------------------
    if res.overlap:
        cols = tuple(res.overlap[0].keys())
        def cell(c, v):
            x = _num(v)
            if x is None:
                return v
            return int(x) if c == "numel" else x

        pooled = [r for r in res.overlap if r.get("scope") in ("all", "type")]
        rows = tuple(tuple(cell(c, r[c]) for c in cols) for r in pooled)
        tables.append(Table(
            id="cross_run_overlap",
            title="Cross-run overlap of bf16-visible update masks (OPD vs RLVR; each method vs its other seed)",
            columns=cols,
            rows=rows,
            formats=tuple(".4f" if all(isinstance(r[j], float) for r in rows) else "" for j in range(len(cols))),
            note=("From opdgeo trajectory's overlap.csv (pooled over all matrices and per type; per layer and per matrix "
                  "in diagnose/trajectory/*/overlap.csv): one-sided overlap |A∩B|/|A| vs its baseline; Jaccard vs its "
                  "baseline. Seed-vs-seed rows are the overlap two runs of one method reach by chance of data order."),
        ))
    # The plan ------------------------------------------------------------------------
    rows = tuple((r["name"], r.get("group", ""), r.get("objective", ""), r.get("init", ""), r.get("steps"),
                  r.get("batch_size"), r.get("samples_per_prompt"), r.get("lr"), _setting_text(r),
                  "/".join(map(str, r.get("checkpoint_steps", []))))
                 for r in res.info.get("runs", []))
    tables.append(Table(
        id="runs",
        title="Training runs of this study",
        columns=("run", "group", "objective", "init", "steps", "batch", "samples/prompt", "lr", "setting", "checkpoints"),
        rows=rows,
        formats=("", "", "", "", "", "", "", ".1e", "", ""),
        note="Adam(W), weight decay and betas as in the preset; checkpoints stored in " + str(res.info.get("dtype", "bfloat16")) + ".",
    ))
    # Timings -------------------------------------------------------------------------
    rows = tuple((name, m.get("kind", ""), float(m.get("seconds", 0.0)), float(m.get("cpu_seconds", 0.0)))
                 for name, m in res.markers.items())
    tables.append(Table(
        id="stage_times",
        title="Stage times (seconds, as measured when each stage ran)",
        columns=("stage", "kind", "wall seconds", "CPU seconds"),
        rows=rows + (("total", "", sum(r[2] for r in rows), sum(r[3] for r in rows)),),
        formats=("", "", ".1f", ".1f"),
        note="CPU seconds = process time over all threads (independent of other load on a shared machine).",
    ))
    return tables


_SEED_METRICS = (
    ("global sparsity (%)", lambda res, r: _pct(res.compare.get(r, {}).get("global_sparsity"))),
    ("update density (%)", lambda res, r: _pct(res.compare.get(r, {}).get("mean_density"))),
    ("low-magnitude overlap (%)", lambda res, r: _pct(res.compare.get(r, {}).get("mean_low_magnitude_overlap"))),
    ("mean NSS", lambda res, r: _num(res.compare.get(r, {}).get("mean_nss"))),
    ("mean max angle right (deg)", lambda res, r: _num(res.compare.get(r, {}).get("mean_angle_right_max_deg"))),
    ("stable rank, last checkpoint", lambda res, r: (res.srank_series(r) or [None])[-1]),
    ("Sim_16, first checkpoint", lambda res, r: (res.traj_means.get(r) or [{}])[0].get("sim_to_final")),
    ("accuracy", lambda res, r: res.acc(r)),
)


def _seed_pairs(res: StudyResults) -> dict[str, list[str]]:
    """``{"opd": ["opd", "opd_seed1", ...], "rlvr": [...]}`` from the ``seeds`` group."""
    out = {}
    for base in ("opd", "rlvr"):
        runs = [base] + [r for r in res.runs("seeds") if r.startswith(base + "_seed")]
        if len(runs) > 1:
            out[base] = runs
    return out


def seed_spread(res: StudyResults) -> list[tuple]:
    """Rows ``(metric, OPD values, RLVR values, gap, spread, gap/spread)`` of the noise check."""
    pairs = _seed_pairs(res)
    if set(pairs) != {"opd", "rlvr"}:
        return []
    rows = []
    for label, get in _SEED_METRICS:
        vals = {m: [get(res, r) for r in runs] for m, runs in pairs.items()}
        if any(v is None for vs in vals.values() for v in vs):
            rows.append((label, _join(vals["opd"]), _join(vals["rlvr"]), None, None, None))
            continue
        gap = abs(sum(vals["opd"]) / len(vals["opd"]) - sum(vals["rlvr"]) / len(vals["rlvr"]))
        spread = max(max(vs) - min(vs) for vs in vals.values())
        rows.append((label, _join(vals["opd"]), _join(vals["rlvr"]), gap, spread,
                     (gap / spread) if spread > 0 else (math.inf if gap > 0 else None)))
    return rows


def _join(vals) -> str:
    return " / ".join("n/a" if v is None else format(v, ".4g") for v in vals)


def _panel_runs(res: StudyResults, group: str) -> list[str]:
    """The runs of a control panel: OPD and the group's runs; for mixing, the sweep's points
    by descending alpha (``study.json``'s ``mixing_panel``: its ends run at the mixtures'
    steps, batch and group size), else OPD, the mixtures and RLVR."""
    if group == "mixing" and res.info.get("mixing_panel"):
        return [p["run"] for p in res.info["mixing_panel"]]
    return ["opd"] + res.runs(group) + (["rlvr"] if group == "mixing" else [])


def _setting_text(info: dict) -> str:
    if info.get("token_keep"):
        mode, frac = info["token_keep"]
        return f"{mode} rho={frac}"
    if info.get("rollout_policy", "student") != "student":
        return f"rollouts: {info['rollout_policy']}"
    if info.get("mix_alpha") is not None:
        return f"alpha={info['mix_alpha']}"
    return info.get("objective", "")


def _within(band, ref, tol: float):
    if band is None or ref is None:
        return None
    lo, hi = ref
    return bool(band[0] >= lo / tol and band[1] <= hi * tol)


def _acc_se(res: StudyResults, name: str) -> float | None:
    """Standard error of an accuracy: ``eval.json``'s ``stderr`` (over problems) when given,
    else the binomial sqrt(p(1-p)/samples)."""
    e = res.evals.get(name) or {}
    se = _num(e.get("stderr"))
    return se if se is not None else _stderr(res.acc(name), res.acc_n(name))


def _diff_se(res: StudyResults, a: str, b: str) -> float | None:
    sa, sb = _acc_se(res, a), _acc_se(res, b)
    if sa is None or sb is None:
        return None
    return math.sqrt(sa * sa + sb * sb)


# ------------------------------------------------------------------------------ claims


def _order(vals: dict[str, float | None], runs: list[str], increasing: bool):
    xs = [vals.get(r) for r in runs]
    if any(x is None for x in xs):
        return None, xs
    ok = all((a < b) if increasing else (a > b) for a, b in zip(xs, xs[1:]))
    return ok, xs


def _fmt(x, spec=".4g", unit=""):
    return "n/a" if x is None else format(x, spec) + unit


def evaluate_claims(res: StudyResults) -> list[dict]:
    """Decide every claim of ``CLAIM_RULES`` from the study's numbers.

    Returns:
        ``[{id, claim, holds, evidence}]`` (the rule of each id is ``CLAIM_RULES[id]``); ``holds`` is True/False, or None when an
        input is missing (not measured in this run).
    """
    out: list[dict] = []
    main = ["sft", "opd", "rlvr"]
    band_ratio = res.setting("band_ratio", 1.5)
    tol = res.setting("band_tolerance", 1.25)
    lock = res.setting("lock_threshold", 0.8)

    def add(cid, holds, evidence):
        out.append({"id": cid, "claim": CLAIM_TEXT[cid], "holds": holds, "evidence": evidence})

    def cmp_claim(cid, key, increasing, scale=100.0, unit="%"):
        vals = {r: (None if _num(res.compare.get(r, {}).get(key)) is None else scale * _num(res.compare[r][key])) for r in main}
        holds, xs = _order(vals, main, increasing)
        sym = " < " if increasing else " > "
        evidence = f"{key}: " + sym.join(f"{r.upper()} {_fmt(x, unit=unit)}" for r, x in zip(main, xs))
        noise = {row[0]: row for row in seed_spread(res)}
        label = {"global_sparsity": "global sparsity (%)", "mean_density": "update density (%)",
                 "mean_low_magnitude_overlap": "low-magnitude overlap (%)", "mean_nss": "mean NSS",
                 "mean_angle_right_max_deg": "mean max angle right (deg)"}.get(key)
        if label in noise and noise[label][5] is not None:
            ratio = noise[label][5]
            evidence += f" (seed check: OPD-RLVR gap = {ratio:.2f} x the seed spread)"
            if holds is True and ratio < 1.0:  # the OPD/RLVR order is not resolved at this noise level
                holds = None
                evidence = "inconclusive, the OPD-RLVR difference is within seed noise: " + evidence
        frozen = [r.upper() for r in main if _num(res.compare.get(r, {}).get("mean_density")) == 0.0]
        if frozen:  # a run that changed no visible weight makes every ordering trivially true or undefined
            holds, evidence = None, evidence + f" — degenerate: {', '.join(frozen)} made no bf16-visible update"
        add(cid, holds, evidence)

    cmp_claim("sparsity_order", "global_sparsity", True)
    cmp_claim("update_density_order", "mean_density", False)
    cmp_claim("low_magnitude_overlap_order", "mean_low_magnitude_overlap", True)
    cmp_claim("nss_order", "mean_nss", False, scale=1.0, unit="")
    cmp_claim("angle_order", "mean_angle_right_max_deg", False, scale=1.0, unit="°")

    b = res.band("opd")
    if b and b[0] > 0:
        ratio = b[1] / b[0]
        add("opd_narrow_band", ratio <= band_ratio,
            f"OPD mean stable rank in [{b[0]:.3g}, {b[1]:.3g}] over {len(res.srank_series('opd'))} checkpoints: ratio {ratio:.3f} (threshold {band_ratio})")
    else:
        add("opd_narrow_band", None, "no OPD trajectory")
    for cid, run, expand in (("sft_srank_expands", "sft", True), ("rlvr_srank_contracts", "rlvr", False)):
        s = res.srank_series(run)
        if len(s) >= 2 and s[0] > 0:
            r = s[-1] / s[0]
            holds = r >= band_ratio if expand else r <= 1.0 / band_ratio
            add(cid, holds, f"{run.upper()} mean stable rank {s[0]:.3g} -> {s[-1]:.3g} (x{r:.3f}; threshold x{band_ratio if expand else 1 / band_ratio:.3f})")
        else:
            add(cid, None, f"no {run.upper()} trajectory with >= 2 checkpoints")
    pts = res.traj_means.get("opd")
    if pts and pts[0].get("sim_to_final") is not None:
        v = pts[0]["sim_to_final"]
        add("opd_sim16_first", v >= lock, f"OPD Sim_16 at the first checkpoint ({pts[0]['progress']:.0f} %): {v:.4f} (threshold {lock}); locking step {_locking(res, 'opd')}")
    else:
        add("opd_sim16_first", None, "no OPD trajectory")
    for cid, full, proj, keeps in (("projection_keeps_opd", "opd", "opd_proj16", True), ("projection_hurts_sft", "sft", "sft_proj16", False)):
        a, p, se = res.acc(full), res.acc(proj), _diff_se(res, full, proj)
        if a is None or p is None or se is None:
            add(cid, None, f"accuracy of {full} or {proj} not measured")
            continue
        holds = (p >= a - 2 * se) if keeps else (p < a - 2 * se)
        add(cid, holds, f"acc {full} {a:.4f} vs projected {p:.4f} (difference {p - a:+.4f}, 2 SE = {2 * se:.4f})")
    opd_band = res.band("opd")
    for cid, group in (("sparsification_keeps_band", "sparsification"), ("offpolicy_keeps_band", "offpolicy")):
        runs = res.runs(group)
        bands = {r: res.band(r) for r in runs}
        if opd_band is None or not runs or any(v is None for v in bands.values()):
            add(cid, None, f"missing trajectories: {[r for r, v in bands.items() if v is None] or 'opd'}")
            continue
        within = {r: _within(v, opd_band, tol) for r, v in bands.items()}
        add(cid, all(within.values()),
            f"OPD band [{opd_band[0]:.3g}, {opd_band[1]:.3g}] (tol x{tol}); " + "; ".join(
                f"{r} [{v[0]:.3g}, {v[1]:.3g}] {'in' if within[r] else 'out'}" for r, v in bands.items()))
    small = [r["name"] for r in res.info.get("runs", []) if r.get("mix_alpha") is not None and r["mix_alpha"] <= 0.05]
    bands = {r: res.band(r) for r in small}
    if opd_band is None or not small or any(v is None for v in bands.values()):
        add("small_alpha_departs", None, "missing trajectories of the small-alpha mixtures or of OPD")
    else:
        within = {r: _within(v, opd_band, tol) for r, v in bands.items()}
        add("small_alpha_departs", not any(within.values()),
            f"OPD band [{opd_band[0]:.3g}, {opd_band[1]:.3g}] (tol x{tol}); " + "; ".join(
                f"{r} [{v[0]:.3g}, {v[1]:.3g}] {'in' if within[r] else 'out'}" for r, v in bands.items()))
    return out


# ----------------------------------------------------------------------------- figures


def _series(res: StudyResults, runs: list[str], metric: str) -> dict:
    return {r: [(p["progress"], p[metric]) for p in res.traj_means.get(r, [])] for r in runs if r in res.traj_means}


def build_figures(res: StudyResults) -> list[tuple[str, str, bytes]]:
    """``(id, caption, png bytes)`` of every report figure."""
    figs = []
    ours = {m: {r: _pct(res.compare.get(r, {}).get(k)) for r in ("sft", "opd", "rlvr")}
            for m, k in (("sparsity", "global_sparsity"), ("update_density", "mean_density"),
                         ("principal_overlap", "mean_principal_overlap"), ("low_magnitude_overlap", "mean_low_magnitude_overlap"))}
    if res.compare:
        figs.append(("table1", "Table 1 metrics: ours (solid) vs the paper (hatched).", plots.figure_png(plots.table1_bars(ours, PAPER_TABLE1))))
    main = [r for r in ("sft", "opd", "rlvr") if r in res.traj_means]
    if main:
        from opdgeo.report.figures import trajectory_figure

        summary = {"runs": {r: {"means": res.traj_means[r], "locking_progress": _locking_progress(res, r)} for r in main},
                   "settings": {"lock_threshold": res.setting("lock_threshold", 0.8), "sim_k": res.setting("sim_k", 16),
                                "k_hill": res.setting("hill_k", 32)}}
        for metric, label in (("stable_rank", "stable rank of ΔW"), ("fro_norm", "‖ΔW‖_F"),
                              ("hill_alpha", "Hill tail index"), ("sim_to_final", "Sim_K to the final update")):
            fig = trajectory_figure(summary, metric)
            figs.append((f"traj_{metric}", f"{label} against training progress (SFT from base; OPD/RLVR from the anchor).",
                         plots.figure_png(fig)))
    opd_band = res.band("opd")
    for group, title in (("sparsification", "Token sparsification"), ("offpolicy", "Off-policy OPD"), ("mixing", "OPD/RLVR mixing")):
        runs = _panel_runs(res, group)
        if not any(r in res.traj_means for r in res.runs(group)):
            continue
        fig = plots.control_panel(_series(res, runs, "stable_rank"), {r: res.acc(r) for r in runs}, title=title, band=opd_band)
        figs.append((f"control_{group}", f"{title}: stable rank vs progress (OPD band shaded) and accuracy.", plots.figure_png(fig)))
    proj = [n for n in ("sft", "sft_proj16", "opd", "opd_proj16") if n in res.evals]
    if proj:
        fig = plots.accuracy_bars({n: res.acc(n) for n in proj}, title="accuracy with and without projection",
                                  errors={n: _acc_se(res, n) for n in proj})
        figs.append(("projection", "Accuracy with and without rank-16 projection (±1 SE).", plots.figure_png(fig)))
    return figs


# ------------------------------------------------------------------------------ render

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.6em 0;font-size:0.86em}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
.note{font-size:0.82em;color:#555;margin-top:0}
.holds-true{color:#137333;font-weight:bold}.holds-false{color:#b3261e;font-weight:bold}.holds-null{color:#777;font-weight:bold}
figure{display:inline-block;margin:0.5em}figcaption{font-size:0.8em;color:#555;max-width:480px}
code{background:#f3f3f3;padding:0 3px}
"""


def _holds_text(h) -> str:
    return {True: "reproduced", False: "not reproduced", None: "not measured"}[h]


def render_html(res: StudyResults, tables: list[Table], claims: list[dict], figures: list[tuple[str, str, bytes]],
                timings: dict | None) -> str:
    """The self-contained HTML report (inline CSS, figures as base64 PNG data URIs)."""
    e = html.escape
    info = res.info
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
        f"<title>opdgeo study — {e(info.get('preset', ''))}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n",
        f"<h1>opdgeo study: {e(info.get('preset', ''))}</h1>\n",
        f"<p>{e(info.get('description', ''))}. Task: <code>{e(str(info.get('task', '')))}</code>. "
        "Reference: Shen et al., <i>On the Geometry of On-Policy Distillation</i> (arXiv 2606.07082).</p>\n",
    ]
    if timings:
        parts.append(f"<p>Total stage time: {timings.get('total_seconds', 0):.1f} s "
                     f"({timings.get('total_cpu_seconds', 0):.1f} CPU s).</p>\n")
    models = [(n, res.acc(n)) for n in ("base", "sft", "teacher") if res.acc(n) is not None]
    if models:
        names = {"base": "base student", "sft": "SFT anchor", "teacher": "teacher"}
        parts.append("<p>Held-out accuracy: " + ", ".join(f"{names[n]} {a:.3f}" for n, a in models) + ".</p>\n")
    unavailable = [(n, s) for n, s in (timings or {}).get("stages", {}).items() if s.get("status") in ("unavailable", "skipped", "failed")]
    if unavailable:
        roots = [(n, s) for n, s in unavailable if s["status"] != "skipped"]
        skipped = [n for n, s in unavailable if s["status"] == "skipped"]
        parts.append("<p><b>Not measured in this run:</b></p>\n<ul>\n" + "".join(
            f"<li>{e(n)}: {e(s['status'])} ({e(s.get('reason', ''))})</li>\n" for n, s in roots)
            + (f"<li>{len(skipped)} dependent stages skipped: {e(', '.join(skipped))}</li>\n" if skipped else "")
            + "</ul>\n")
    parts.append("<h2>Claims</h2>\n<table id=\"claims\">\n<thead><tr><th>claim</th><th>this run</th><th>evidence</th></tr></thead>\n<tbody>\n")
    for c in claims:
        cls = {True: "holds-true", False: "holds-false", None: "holds-null"}[c["holds"]]
        parts.append(f"<tr><td>{e(c['claim'])}</td><td class=\"{cls}\">{_holds_text(c['holds'])}</td><td>{e(c['evidence'])}</td></tr>\n")
    parts.append("</tbody>\n</table>\n<p class=\"note\">Rules: " + e("; ".join(f"{k}: {v}" for k, v in CLAIM_RULES.items()) + "; " + SEED_RULE) + ".</p>\n")
    by_id = {t.id: t for t in tables}
    figs = {f[0]: f for f in figures}

    def fig_html(fid):
        if fid not in figs:
            return ""
        _, cap, png = figs[fid]
        data = base64.b64encode(png).decode("ascii")
        return f'<figure><img alt="{e(fid)}" src="data:image/png;base64,{data}"><figcaption>{e(cap)}</figcaption></figure>\n'

    sections = [
        ("Table 1: sparsity", ["table1_sparsity"], ["table1"]),
        ("Principal angles and NSS", ["angles_nss"], []),
        ("Localization", ["localization"], []),
        ("Trajectories: stable rank, norm, Hill index, Sim_16", ["trajectory_summary"],
         ["traj_stable_rank", "traj_fro_norm", "traj_hill_alpha", "traj_sim_to_final"]),
        ("Noise check (seeds)", ["seed_spread"], []),
        ("Accuracy", ["accuracy"], []),
        ("Accuracy with and without projection", ["projection"], ["projection"]),
        ("Control: token sparsification", ["control_sparsification"], ["control_sparsification"]),
        ("Control: off-policy OPD", ["control_offpolicy"], ["control_offpolicy"]),
        ("Control: OPD/RLVR mixing", ["control_mixing"], ["control_mixing"]),
        ("Cross-run overlap", ["cross_run_overlap"], []),
        ("Stage times", ["stage_times"], []),
        ("Runs", ["runs"], []),
        ("Trajectory means per checkpoint", ["trajectory_means"], []),
    ]
    for title, tids, fids in sections:
        present = [by_id[t] for t in tids if t in by_id]
        if not present and not any(f in figs for f in fids):
            continue
        parts.append(f"<h2>{e(title)}</h2>\n")
        for t in present:
            parts.append(f"<h3>{e(t.title)}</h3>\n" + t.to_html())
            parts.append(f'<p class="note">Files: <code>tables/{e(t.id)}.csv</code>, <code>tables/{e(t.id)}.json</code></p>\n')
        parts.append("".join(fig_html(f) for f in fids))
    parts.append("</body>\n</html>\n")
    return "".join(parts)


def render_markdown(res: StudyResults, tables: list[Table], claims: list[dict], figures, timings: dict | None) -> str:
    """``report.md``: the same tables and claims (figures as PNG files under ``figures/``)."""
    info = res.info
    lines = [f"# opdgeo study: {info.get('preset', '')}", "", f"{info.get('description', '')}. Task: `{info.get('task', '')}`.", ""]
    if timings:
        lines += [f"Total stage time: {timings.get('total_seconds', 0):.1f} s.", ""]
    lines += ["## Claims", "", "| claim | this run | evidence |", "|---|---|---|"]
    for c in claims:
        lines.append(f"| {c['claim']} | {_holds_text(c['holds'])} | {c['evidence'].replace('|', '/')} |")
    lines.append("")
    for t in tables:
        lines += [f"## {t.title}", "", t.to_markdown()]
    for fid, cap, _ in figures:
        lines += [f"![{cap}](figures/{fid}.png)", ""]
    return "\n".join(lines)


def write_report(out: Path, *, timings: dict | None = None) -> dict:
    """Build every table, claim and figure from the files in ``out`` and write the report.

    Returns:
        ``{"html", "md", "claims", "tables": [paths]}``.
    """
    out = Path(out)
    res = load_results(out)
    tables = build_tables(res)
    claims = evaluate_claims(res)
    figures = build_figures(res)
    tdir = out / "tables"
    paths = []
    for t in tables:
        paths += [str(p) for p in write_table(t, tdir)]
    fdir = out / "figures"
    fdir.mkdir(parents=True, exist_ok=True)
    for fid, _, png in figures:
        (fdir / f"{fid}.png").write_bytes(png)
    (out / "claims.json").write_text(json.dumps(claims, indent=2) + "\n")
    (out / "report.html").write_text(render_html(res, tables, claims, figures, timings))
    (out / "report.md").write_text(render_markdown(res, tables, claims, figures, timings))
    return {"html": str(out / "report.html"), "md": str(out / "report.md"), "claims": str(out / "claims.json"), "tables": paths,
            "n_claims_true": sum(c["holds"] is True for c in claims), "n_claims_false": sum(c["holds"] is False for c in claims),
            "n_claims_null": sum(c["holds"] is None for c in claims)}
