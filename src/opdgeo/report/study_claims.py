"""The study's claims: one small function per claim, each a comparison over seeds decided
by the one symmetric rule of `opdgeo.study.statistics` (95 % t intervals; true when the
interval excludes the null on the claimed side, false on the other side, null otherwise).

A claim made of several comparisons (an ordering SFT < OPD < RLVR is OPD − SFT > 0 and
RLVR − OPD > 0) is true when every comparison is true, false when any is false, null
otherwise; its ``estimate``/``ci``/``n`` are those of the deciding comparison (the first
false one, else the first inconclusive one, else the one whose interval lies nearest the
null), and ``comparisons`` lists them all.

Trajectory distance (our choice, `opdgeo.study.statistics.trajectory_distance`): the RMS
over a run's checkpoints of the difference of ln(mean stable rank), the other run linearly
interpolated in progress. A control "keeps OPD's band" when, seed by seed (seed s of the
control against seed s of OPD and of RLVR), D(control, RLVR) − D(control, OPD) > 0 beyond
seed noise; "small α departs" when D(mix, OPD) − D(mix, RLVR) > 0 likewise.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Callable

from opdgeo.report.study_results import StudyResults, num
from opdgeo.study.statistics import (
    Interval,
    combine,
    log_band,
    log_slope,
    mean_sd,
    t_interval,
    trajectory_distance,
    verdict,
    welch_interval,
)

__all__ = ["Claim", "CLAIMS", "CLAIM_RULES", "RECOVERY_THRESHOLD", "evaluate_claims", "recovered_fraction",
           "srank_rows", "seed_value", "start_of"]


@dataclass(frozen=True)
class Claim:
    """One claim: ``id``, the sentence ``text``, the ``statistic`` compared (in words) and
    ``decide(results) -> claims.json entry`` (without ``id``/``claim``)."""

    id: str
    text: str
    statistic: str
    decide: Callable[[StudyResults], dict]


@dataclass(frozen=True)
class Comparison:
    label: str
    interval: Interval
    null: float = 0.0
    direction: int = 1

    @property
    def holds(self) -> bool | None:
        return verdict(self.interval, self.null, self.direction)

    def as_dict(self) -> dict:
        iv = self.interval
        return {"comparison": self.label, "estimate": iv.estimate, "ci": iv.ci, "n": iv.n, "null": self.null,
                "direction": ">" if self.direction > 0 else "<", "holds": self.holds, "method": iv.method}

    def text(self) -> str:
        iv = self.interval
        side = ">" if self.direction > 0 else "<"
        ci = "no interval" if iv.ci is None else f"95 % CI [{iv.low:.4g}, {iv.high:.4g}]"
        est = "n/a" if iv.estimate is None else f"{iv.estimate:.4g}"
        return f"{self.label} = {est} ({ci}, n = {iv.n}; claimed {side} {self.null:g}: {_word(self.holds)})"


def _word(h) -> str:
    return {True: "true", False: "false", None: "inconclusive"}[h]


def _deciding(cs: list[Comparison]) -> Comparison:
    for c in cs:
        if c.holds is False:
            return c
    for c in cs:
        if c.holds is None:
            return c

    def margin(c):
        iv = c.interval
        return (iv.low - c.null) if c.direction > 0 else (c.null - iv.high)

    return min(cs, key=margin)


def _entry(cs: list[Comparison], evidence: str = "", *, force_null: str | None = None) -> dict:
    """The claims.json fields of a claim decided by comparisons ``cs``."""
    if not cs:
        return {"holds": None, "evidence": evidence or "not measured", "estimate": None, "ci": None, "n": 0,
                "method": "no comparison: inputs missing", "comparisons": []}
    d = _deciding(cs)
    holds = combine([c.holds for c in cs])
    text = "; ".join(c.text() for c in cs)
    if force_null:
        holds, text = None, f"{force_null}; {text}"
    return {"holds": holds, "evidence": (evidence + "; " if evidence else "") + text, "estimate": d.interval.estimate,
            "ci": d.interval.ci, "n": d.interval.n, "method": d.interval.method,
            "comparisons": [c.as_dict() for c in cs]}


def _spread(vals: list[float], fmt: str = ".4g") -> str:
    m, sd, n = mean_sd(vals)
    if m is None:
        return "n/a"
    return f"{m:{fmt}}" + (f" ± {sd:{fmt}}" if sd is not None else "") + f" (n={n})"


# ----------------------------------------------------------------------- per-seed values


def seed_value(metric: str) -> Callable[[StudyResults, str], float | None]:
    """The per-run value of a metric: a compare key (``global_sparsity``... in percent for
    fractions), ``log_band``, ``log_slope``, ``sim_first``, ``band_ratio`` or ``accuracy``."""
    pct = {"global_sparsity", "mean_density", "mean_low_magnitude_overlap", "mean_principal_overlap"}

    def get(res: StudyResults, run: str):
        if metric == "log_band":
            return log_band(res.trajectory(run)[1])
        if metric == "band_ratio":
            s = res.trajectory(run)[1]
            return max(s) / min(s) if s and min(s) > 0 else None
        if metric == "log_slope":
            return log_slope(*res.trajectory(run))
        if metric == "sim_first":
            pts = res.traj_means.get(run) or [{}]
            return pts[0].get("sim_to_final")
        if metric == "accuracy":
            return res.acc(run)
        v = num(res.compare.get(run, {}).get(metric))
        return None if v is None else (100.0 * v if metric in pct else v)

    return get


def _distance(res: StudyResults, a: str, b: str) -> float | None:
    pa, sa = res.trajectory(a)
    pb, sb = res.trajectory(b)
    return trajectory_distance(pa, sa, pb, sb)


def _paired(res: StudyResults, run: str, f: Callable[[str, str, str], float | None], rlvr: str | None = None) -> list[float]:
    """``f(run seed s, OPD seed s, RLVR seed s)`` for every seed s that all three have
    (``rlvr``: the RLVR-side reference run; default the main RLVR run)."""
    opd, rlvr = res.by_seed(res.role("opd")), res.by_seed(rlvr or res.role("rlvr"))
    out = []
    for s, r in res.by_seed(run).items():
        if s in opd and s in rlvr:
            v = f(r, opd[s], rlvr[s])
            if v is not None:
                out.append(v)
    return out


def srank_rows(res: StudyResults) -> list[tuple]:
    """Per run and seed: ``(run, seed, instance, checkpoints, band ratio, ln band, slope of ln
    stable rank per unit progress, D to OPD, D to RLVR)`` (D from the same seed's runs)."""
    opd, rlvr = res.by_seed(res.role("opd")), res.by_seed(res.role("rlvr"))
    rows = []
    for run in res.runs():
        for s, inst in res.by_seed(run).items():
            p, sr = res.trajectory(inst)
            if not sr:
                continue
            d_opd = _distance(res, inst, opd[s]) if s in opd and opd[s] != inst else None
            d_rlvr = _distance(res, inst, rlvr[s]) if s in rlvr and rlvr[s] != inst else None
            rows.append((run, s, inst, len(sr), seed_value("band_ratio")(res, inst), log_band(sr), log_slope(p, sr),
                         d_opd, d_rlvr))
    return rows


# ----------------------------------------------------------------------------- claims

_ORDER_METRICS = {  # claim id: (compare key, label, increasing from SFT to RLVR)
    "sparsity_order": ("global_sparsity", "global bf16 sparsity (%)", True),
    "update_density_order": ("mean_density", "mean update density (%)", False),
    "low_magnitude_overlap_order": ("mean_low_magnitude_overlap", "low-magnitude overlap (%)", True),
    "nss_order": ("mean_nss", "mean NSS", False),
    "angle_order": ("mean_angle_right_max_deg", "mean max principal angle, right (deg)", False),
}
_ORDER_TEXT = {
    "sparsity_order": "Update sparsity orders SFT < OPD < RLVR.",
    "update_density_order": "Update density orders SFT > OPD > RLVR.",
    "low_magnitude_overlap_order": "Updates concentrate on low-magnitude weights increasingly from SFT to OPD to RLVR.",
    "nss_order": "Spectral drift (NSS) orders SFT > OPD > RLVR.",
    "angle_order": "Principal-subspace rotation orders SFT > OPD > RLVR.",
}


def _roles_of(res: StudyResults, *roles: str) -> list[str] | None:
    """The runs of ``roles`` in the plan, or None when one is missing."""
    runs = [res.role(r) for r in roles]
    return None if None in runs else runs


def _ordering(cid: str, sft_role: str) -> Claim:
    """An ordering SFT < OPD < RLVR (or >), with the run of ``sft_role`` as SFT: the anchor's
    run (``sft``) or the learning-rate-matched control (``sft_matched``)."""
    key, label, inc = _ORDER_METRICS[cid]
    d = 1 if inc else -1
    matched = sft_role != "sft"
    name = "matched SFT" if matched else "SFT"
    text = _ORDER_TEXT[cid]
    if matched:
        text = text[:-1] + ", with the learning-rate-matched SFT control (SFT from the anchor at the RL learning rate " \
                           "and step count) as SFT."

    def decide(res: StudyResults) -> dict:
        runs = _roles_of(res, sft_role, "opd", "rlvr")
        if runs is None:
            return _entry([], f"the plan has no {name}, OPD or RLVR run")
        sft, opd, rlvr = runs
        get = seed_value(key)
        v = {r: res.values(r, get) for r in runs}
        cs = [Comparison(f"OPD − {name}", welch_interval(v[opd], v[sft]), 0.0, d),
              Comparison("RLVR − OPD", welch_interval(v[rlvr], v[opd]), 0.0, d)]
        ev = f"{label}: " + ", ".join(f"{r} {_spread(x)}" for r, x in v.items())
        frozen = [r for r in runs if res.values(r, seed_value("mean_density")) and
                  max(res.values(r, seed_value("mean_density"))) == 0.0]
        if any(not x for x in v.values()):
            return _entry([], ev + " — a run is not measured")
        return _entry(cs, ev, force_null=f"degenerate: {', '.join(frozen)} made no bf16-visible update" if frozen else None)

    side = ">" if inc else "<"
    return Claim(f"{cid}_matched" if matched else cid, text,
                 f"{label}: difference of seed means, OPD − {name} and RLVR − OPD, each claimed {side} 0", decide)


def _narrow_band(res: StudyResults) -> dict:
    runs = _roles_of(res, "sft", "opd", "rlvr")
    if runs is None:
        return _entry([], "the plan has no SFT, OPD or RLVR run")
    sft, opd, rlvr = runs
    get = seed_value("log_band")
    v = {r: res.values(r, get) for r in runs}
    if any(not x for x in v.values()):
        return _entry([], "missing trajectories")
    ratio = {r: res.values(r, seed_value("band_ratio")) for r in v}
    cs = [Comparison("ln band SFT − ln band OPD", welch_interval(v[sft], v[opd])),
          Comparison("ln band RLVR − ln band OPD", welch_interval(v[rlvr], v[opd]))]
    return _entry(cs, "max/min of the mean stable rank: " + ", ".join(f"{r} {_spread(x)}" for r, x in ratio.items()))


def _srank_trend(role: str, direction: int) -> Callable[[StudyResults], dict]:
    def decide(res: StudyResults) -> dict:
        run = res.role(role)
        if run is None:
            return _entry([], f"the plan has no {role} run")
        v = res.values(run, seed_value("log_slope"))
        if not v:
            return _entry([], f"no {run} trajectory with >= 2 checkpoints")
        return _entry([Comparison(f"slope of ln stable rank ({run})", t_interval(v), 0.0, direction)])

    return decide


def _sim_first(res: StudyResults) -> dict:
    lock = res.setting("lock_threshold", 0.8)
    opd = res.role("opd")
    v = res.values(opd, seed_value("sim_first")) if opd else []
    if not v:
        return _entry([], "no OPD trajectory")
    return _entry([Comparison("OPD Sim_16 at the first checkpoint", t_interval(v), lock, 1)])


def _keeps_band(group: str) -> Callable[[StudyResults], dict]:
    def decide(res: StudyResults) -> dict:
        runs = res.runs(group)
        cs = []
        for r in runs:
            v = _paired(res, r, lambda c, o, rl: _diff(_distance(res, c, rl), _distance(res, c, o)))
            if v:
                cs.append(Comparison(f"D({r}, RLVR) − D({r}, OPD)", t_interval(v)))
        if not runs or len(cs) < len(runs):
            return _entry([], f"missing trajectories of {group} runs, OPD or RLVR")
        return _entry(cs)

    return decide


def _diff(a, b):
    return None if a is None or b is None else a - b


def _small_alpha(res: StudyResults) -> dict:
    small = [r["name"] for r in res.info.get("runs", []) if not r.get("seed_of") and r.get("mix_alpha") is not None
             and r["mix_alpha"] <= 0.05]
    # the alpha = 0 end of the sweep (mix_0 where the main RLVR run differs from the mixtures)
    end = {p["alpha"]: p["run"] for p in res.info.get("mixing_panel", [])}.get(0.0, res.role("rlvr"))
    cs = []
    for r in small:
        v = _paired(res, r, lambda c, o, rl: _diff(_distance(res, c, o), _distance(res, c, rl)), rlvr=end)
        if v:
            cs.append(Comparison(f"D({r}, OPD) − D({r}, {end})", t_interval(v)))
    if not small or len(cs) < len(small):
        return _entry([], "missing trajectories of the small-alpha mixtures, OPD or RLVR")
    return _entry(cs)


RECOVERY_THRESHOLD = 0.5
"""f above which a projected run counts as recovering "most" of the full run's gain (our choice)."""


def recovered_fraction(res: StudyResults, full: str, proj: str) -> Interval | None:
    """The fraction of the full run's gain from the restart checkpoint that the projected run keeps.

    f = (P̄ − s) / (Ō − s): P̄, Ō the mean accuracies over seeds of ``proj`` and ``full``, s the
    accuracy of the checkpoint every seed of ``proj`` restarts from (its ``start`` evaluation,
    `StudyResults.projections`). 95 %
    normal interval by the delta method, Var f ≈ (se_P² + f²·se_O² + (1 − f)²·se_s²)/(Ō − s)²,
    se_P and se_O the standard errors of the seed means, se_s the start's evaluation standard
    error over its samples. None when an accuracy is missing; an interval-less Interval when a
    side has fewer than 2 seeds or the gain Ō − s is within 2 SE of zero (f undefined).
    """
    start = start_of(res, proj)
    s, ns = res.acc(start), res.acc_n(start)
    o = mean_sd([res.acc(r) for r in res.by_seed(full).values()])
    p = mean_sd([res.acc(r) for r in res.by_seed(proj).values()])
    if s is None or o[0] is None or p[0] is None:
        return None
    method = "delta method on the seed means and the start checkpoint's evaluation SE (normal 95 %)"
    n = min(o[2], p[2])
    if n < 2 or not ns:
        return Interval(None, None, None, n, method + "; fewer than 2 seeds on a side or no sample count: no interval")
    se_o, se_p = o[1] / math.sqrt(o[2]), p[1] / math.sqrt(p[2])
    se_s = math.sqrt(s * (1 - s) / ns)
    gain = o[0] - s
    if abs(gain) <= 2 * math.hypot(se_o, se_s):
        return Interval(None, None, None, n, method + f"; gain {gain:+.4f} within 2 SE of 0: f undefined")
    f = (p[0] - s) / gain
    se_f = math.sqrt(se_p**2 + f**2 * se_o**2 + (1 - f) ** 2 * se_s**2) / abs(gain)
    return Interval(f, f - 1.96 * se_f, f + 1.96 * se_f, n, method)


def start_of(res: StudyResults, proj: str) -> str:
    """The evaluation name of the checkpoint projected run ``proj`` restarts from."""
    entry = next((p for p in res.projections() if p["projected"] == proj), None)
    return entry["start"] if entry else f"{proj}_start"


def _projection_claim(full_role: str, direction: int) -> Callable[[StudyResults], dict]:
    """f of the projected run whose full run is the run of ``full_role``, claimed above or
    below `RECOVERY_THRESHOLD` (``direction``)."""
    def decide(res: StudyResults) -> dict:
        p = res.projection_of(res.role(full_role))
        if p is None:
            return _entry([], f"the plan has no projected run of {full_role}")
        full, proj, start = p["full"], p["projected"], p["start"]
        iv = recovered_fraction(res, full, proj)
        if iv is None:
            return _entry([], f"accuracy of {full}, {proj} or {start} not measured")
        ev = f"start {res.acc(start):.4f}; {full} {_spread(_accs(res, full))}; {proj} {_spread(_accs(res, proj))}"
        return _entry([Comparison(f"f({proj})", iv, RECOVERY_THRESHOLD, direction)], ev)

    return decide


def _accs(res: StudyResults, name: str) -> list[float]:
    return [a for a in (res.acc(r) for r in res.by_seed(name).values()) if a is not None]


CLAIMS: tuple[Claim, ...] = (
    *(_ordering(cid, "sft") for cid in _ORDER_METRICS),
    Claim("opd_narrow_band", "OPD's stable rank stays in a narrower band than SFT's and RLVR's.",
          "ln(max/min mean stable rank) per seed: SFT − OPD and RLVR − OPD, each claimed > 0", _narrow_band),
    Claim("sft_srank_expands", "SFT's stable rank expands over training.",
          "least-squares slope of ln(mean stable rank) over progress, per seed, claimed > 0", _srank_trend("sft", 1)),
    Claim("rlvr_srank_contracts", "RLVR's stable rank contracts over training.",
          "least-squares slope of ln(mean stable rank) over progress, per seed, claimed < 0", _srank_trend("rlvr", -1)),
    Claim("opd_sim16_first", "OPD's Sim_16 is >= 0.8 already at the first checkpoint (early subspace locking).",
          "OPD's mean Sim_16 to the final update at the first checkpoint, per seed, claimed > lock_threshold", _sim_first),
    Claim("projection_keeps_opd",
          "The rank-16 projected OPD run recovers most (f > 0.5) of OPD's gain from the checkpoint it restarts from.",
          "recovered fraction f = (acc(projected OPD) − acc(start)) / (acc(OPD) − acc(start)), seed means, claimed > 0.5",
          _projection_claim("opd", 1)),
    Claim("projection_hurts_sft",
          "The rank-16 projected SFT run recovers less than half (f < 0.5) of SFT's gain from the checkpoint it restarts from.",
          "recovered fraction f = (acc(projected SFT) − acc(start)) / (acc(SFT) − acc(start)), seed means, claimed < 0.5",
          _projection_claim("sft", -1)),
    Claim("sparsification_keeps_band", "Token sparsification (top-KL and random, 50 % and 25 %) keeps OPD's stable-rank band.",
          "per seed s: D(run_s, RLVR_s) − D(run_s, OPD_s), every sparsified run claimed > 0", _keeps_band("sparsification")),
    Claim("offpolicy_keeps_band", "Off-policy OPD (teacher rollouts) keeps OPD's stable-rank band.",
          "per seed s: D(off-policy OPD_s, RLVR_s) − D(off-policy OPD_s, OPD_s), claimed > 0", _keeps_band("offpolicy")),
    Claim("small_alpha_departs", "Small OPD weight in the OPD/RLVR mixture (alpha 0.05, 0.01) departs from OPD's band.",
          "per seed s: D(mix_s, OPD_s) − D(mix_s, RLVR_s), every alpha <= 0.05 claimed > 0", _small_alpha),
    *(_ordering(cid, "sft_matched") for cid in _ORDER_METRICS),
)

CLAIM_RULES = {c.id: c.statistic for c in CLAIMS}
"""What each claim compares (its ``statistic``); the verdict rule is the same for all."""


def evaluate_claims(res: StudyResults) -> list[dict]:
    """Every claim of `CLAIMS`: ``[{id, claim, holds, evidence, statistic, estimate, ci, n,
    method, comparisons}]``; ``holds`` True/False/None by the symmetric rule."""
    out = []
    for c in CLAIMS:
        e = c.decide(res)
        out.append({"id": c.id, "claim": c.text, "holds": e["holds"], "evidence": e["evidence"], "statistic": c.statistic,
                    "estimate": e["estimate"], "ci": e["ci"], "n": e["n"], "method": e["method"],
                    "comparisons": e["comparisons"]})
    return out
