"""The study report's tables, one function each, from `StudyResults`.

Numbers of a run are means over its seeds (the run and its ``<run>_seed<s>`` instances);
beside them ``sd`` is the sample standard deviation over seeds and ``seeds`` the n.
Tables with one row per run instance (``trajectory_summary``, ``srank_per_seed``,
``trajectory_means``, ``accuracy``) show every seed.
"""

from __future__ import annotations

import math

from opdgeo.report.study_claims import seed_value, srank_rows
from opdgeo.report.study_results import StudyResults, num
from opdgeo.report.tables import Table
from opdgeo.study.roles import MAIN_ROLES
from opdgeo.study.statistics import mean_sd

__all__ = ["build_tables", "PAPER_TABLE1", "PAPER_NSS", "PAPER_MAX_ANGLE", "PAPER_SRANK", "acc_se"]

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

_T1_KEYS = {"sparsity": "global_sparsity", "update_density": "mean_density",
            "principal_overlap": "mean_principal_overlap", "low_magnitude_overlap": "mean_low_magnitude_overlap"}
_MAIN = MAIN_ROLES  # the paper's columns: the runs of these roles (StudyResults.role)


def _ms(res: StudyResults, run: str, metric: str):
    """``(mean, sd, n)`` of a metric over the seeds of ``run``."""
    return mean_sd(res.values(run, seed_value(metric)))


def _stderr(p: float | None, n: int | None) -> float | None:
    if p is None or not n:
        return None
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def acc_se(res: StudyResults, name: str) -> float | None:
    """Standard error of one accuracy: ``eval.json``'s ``stderr`` (over problems) when
    given, else the binomial sqrt(p(1-p)/samples)."""
    e = res.evals.get(name) or {}
    se = num(e.get("stderr"))
    return se if se is not None else _stderr(res.acc(name), res.acc_n(name))


def _locking(res: StudyResults, run: str):
    node = res.traj_summary.get(run)
    return node.get("locking_step") if isinstance(node, dict) else None


def setting_text(info: dict) -> str:
    if info.get("token_keep"):
        mode, frac = info["token_keep"]
        return f"{mode} rho={frac}"
    if info.get("rollout_policy", "student") != "student":
        return f"rollouts: {info['rollout_policy']}"
    if info.get("mix_alpha") is not None:
        return f"alpha={info['mix_alpha']}"
    return info.get("objective", "")


def _table1(res: StudyResults) -> Table:
    rows = []
    for metric, key in _T1_KEYS.items():
        stats = [_ms(res, res.role(r), key) if res.role(r) else (None, None, 0) for r in _MAIN]
        row: list = [metric.replace("_", " ") + " (%)"]
        for r, (m, _, _) in zip(_MAIN, stats):
            row += [m, PAPER_TABLE1[metric][r]]
        row += [sd for _, sd, _ in stats] + ["/".join(str(n) for _, _, n in stats)]
        rows.append(tuple(row))
    alpha = res.setting("alpha", 0.3)
    return Table(
        id="table1_sparsity",
        title="Table 1 — update sparsity and localization (ours vs the paper, Qwen3-8B)",
        columns=("metric", "SFT ours", "SFT paper", "OPD ours", "OPD paper", "RLVR ours", "RLVR paper",
                 "SFT sd", "OPD sd", "RLVR sd", "seeds (SFT/OPD/RLVR)"),
        rows=tuple(rows),
        formats=("", ".2f", ".2f", ".2f", ".2f", ".2f", ".2f", ".2f", ".2f", ".2f", ""),
        note=("Ours: mean over seeds (sd: standard deviation over seeds). Sparsity: bf16-aware, parameter-weighted over "
              "every floating tensor. Density and overlaps: mean over the geometry matrices; overlap random baseline = "
              f"alpha = {100 * alpha:.0f} %. SFT: base -> SFT; OPD/RLVR: anchor -> run."),
    )


def _angles_nss(res: StudyResults) -> Table:
    rows = []
    for r in res.runs():
        if r not in res.compare:
            continue
        al, ar, nss = _ms(res, r, "mean_angle_left_max_deg"), _ms(res, r, "mean_angle_right_max_deg"), _ms(res, r, "mean_nss")
        maxes = [v for inst in res.replicas(r) for m in res.matrices.get(inst, [])
                 for v in (num(m.get("angle_left_max_deg")), num(m.get("angle_right_max_deg"))) if v is not None]
        rows.append((r, al[0], ar[0], max(maxes) if maxes else None, nss[0], PAPER_MAX_ANGLE.get(r, ""),
                     PAPER_NSS.get(r, ""), ar[1], nss[1], nss[2]))
    return Table(
        id="angles_nss",
        title="Principal-angle rotation and normalized spectral shift",
        columns=("run", "mean max angle left (deg)", "mean max angle right (deg)", "largest angle (deg)", "mean NSS",
                 "paper max angle", "paper NSS", "sd angle right", "sd NSS", "seeds"),
        rows=tuple(rows),
        formats=("", ".4f", ".4f", ".4f", ".3e", "", "", ".4f", ".3e", ""),
        note=("Angles between the top-k singular subspaces of W0 and W+ (k capped at min(m, n)); NSS = ||s+ - s0|| / ||s0||; "
              "means over the geometry matrices, then over seeds (largest angle: over every seed)."),
    )


def _localization(res: StudyResults) -> Table:
    alpha = res.setting("alpha", 0.3)
    rows = []
    for r in res.runs():
        if r not in res.compare:
            continue
        sp, de = _ms(res, r, "global_sparsity"), _ms(res, r, "mean_density")
        rows.append((r, sp[0], de[0], _ms(res, r, "mean_principal_overlap")[0], _ms(res, r, "mean_low_magnitude_overlap")[0],
                     100.0 * alpha, sp[1], de[1], sp[2]))
    return Table(
        id="localization",
        title="Localization: sparsity, update density, principal and low-magnitude overlap (every compared run)",
        columns=("run", "sparsity (%)", "density (%)", "principal overlap (%)", "low-magnitude overlap (%)",
                 "random baseline (%)", "sd sparsity", "sd density", "seeds"),
        rows=tuple(rows),
        formats=("", ".2f", ".2f", ".2f", ".2f", ".0f", ".2f", ".2f", ""),
        note="Means over seeds; sd = standard deviation over seeds.",
    )


def _trajectory_summary(res: StudyResults) -> Table:
    rows = []
    for r in res.all_runs():
        pts = res.traj_means.get(r)
        if not pts:
            continue
        sr = [p["stable_rank"] for p in pts if p["stable_rank"] is not None]
        lo, hi = (min(sr), max(sr)) if sr else (None, None)
        rows.append((r, res.run_info(r).get("group", ""), len(pts), pts[0]["stable_rank"], pts[-1]["stable_rank"], lo, hi,
                     (hi / lo) if (lo and hi is not None and lo > 0) else None, pts[-1]["fro_norm"], pts[-1]["rel_fro_norm"],
                     pts[-1]["hill_alpha"], pts[0]["sim_to_final"], _locking(res, r)))
    return Table(
        id="trajectory_summary",
        title="Trajectories: stable rank band, update norm, Hill index, Sim_16 and locking step (every seed)",
        columns=("run", "group", "checkpoints", "srank first", "srank last", "srank min", "srank max", "band ratio",
                 "||dW||_F last", "rel ||dW||_F last", "Hill last", "Sim_16 first", "locking step"),
        rows=tuple(rows),
        formats=("", "", "", ".2f", ".2f", ".2f", ".2f", ".3f", ".4e", ".4e", ".3f", ".3f", ""),
        note=("Means over the trajectory matrix set ({}) per checkpoint; band ratio = max/min of the mean stable rank. "
              "Paper: OPD {}; SFT {}; RLVR {}.").format(res.setting("trajectory_matrices", "attention"),
                                                         PAPER_SRANK["opd"], PAPER_SRANK["sft"], PAPER_SRANK["rlvr"]),
    )


def _srank_per_seed(res: StudyResults) -> Table:
    return Table(
        id="srank_per_seed",
        title="Stable-rank trajectory per seed: band, slope and distance to OPD and RLVR",
        columns=("run", "seed", "instance", "checkpoints", "band ratio", "ln band", "slope of ln srank",
                 "D to OPD", "D to RLVR"),
        rows=tuple(srank_rows(res)),
        formats=("", "", "", "", ".3f", ".4f", ".4f", ".4f", ".4f"),
        note=("band ratio = max/min of the mean stable rank over checkpoints; slope = least-squares slope of ln(stable rank) "
              "per unit progress (progress in [0, 1]); D = RMS over this run's checkpoints of ln s - ln s_other, the other "
              "run (same seed) interpolated linearly in progress."),
    )


def _srank_by_run(res: StudyResults) -> Table:
    rows = []
    for r in res.runs():
        b, s = _ms(res, r, "band_ratio"), _ms(res, r, "log_slope")
        if b[2]:
            rows.append((r, b[0], b[1], s[0], s[1], b[2]))
    return Table(
        id="srank_by_run",
        title="Stable-rank band and slope: mean ± sd over seeds",
        columns=("run", "band ratio", "sd band ratio", "slope of ln srank", "sd slope", "seeds"),
        rows=tuple(rows),
        formats=("", ".3f", ".3f", ".4f", ".4f", ""),
    )


def _trajectory_means(res: StudyResults) -> Table:
    rows = [(r, p["step"], p["progress"], p["stable_rank"], p["fro_norm"], p["rel_fro_norm"], p["hill_alpha"], p["sim_to_final"])
            for r in res.all_runs() for p in res.traj_means.get(r, [])]
    return Table(
        id="trajectory_means",
        title="Trajectory means per checkpoint (the plotted values)",
        columns=("run", "step", "progress (%)", "stable rank", "||dW||_F", "rel ||dW||_F", "Hill alpha", "Sim_16 to final"),
        rows=tuple(rows),
        formats=("", "", ".1f", ".3f", ".4e", ".4e", ".3f", ".4f"),
    )


def _accuracy(res: StudyResults) -> Table:
    rows = [(name, e.get("role", ""), num(e.get("accuracy")), acc_se(res, name), e.get("n_problems"), e.get("k"))
            for name, e in res.evals.items()]
    return Table(
        id="accuracy",
        title="Held-out accuracy (avg@k), every model and seed",
        columns=("model", "role", "accuracy", "std. error", "problems", "k"),
        rows=tuple(rows),
        formats=("", "", ".4f", ".4f", "", ""),
        note="avg@k = mean 0/1 reward over k samples of each held-out problem; std. error over problems (std of per-problem accuracy / sqrt(problems)).",
    )


def _accuracy_seeds(res: StudyResults) -> Table:
    rows = []
    for r in res.runs():
        m, sd, n = _ms(res, r, "accuracy")
        if n:
            rows.append((r, m, sd, n))
    return Table(id="accuracy_seeds", title="Held-out accuracy: mean ± sd over seeds",
                 columns=("run", "accuracy", "sd", "seeds"), rows=tuple(rows), formats=("", ".4f", ".4f", ""))


def _projection(res: StudyResults) -> Table:
    from opdgeo.report.study_claims import recovered_fraction

    rows = []
    for p in res.projections():
        full, proj = p["full"], p["projected"]
        a, b = _ms(res, full, "accuracy"), _ms(res, proj, "accuracy")
        if not a[2] and not b[2]:
            continue
        diff = (b[0] - a[0]) if (a[0] is not None and b[0] is not None) else None
        se = None
        if a[1] is not None and b[1] is not None:
            se = math.sqrt(a[1] ** 2 / a[2] + b[1] ** 2 / b[2])
        f = recovered_fraction(res, full, proj)
        rows.append((full, a[0], b[0], diff, se, f"{a[2]}/{b[2]}", res.acc(p["start"]),
                     _ms(res, p["freeze"], "accuracy")[0] if p["freeze"] else None,
                     f.estimate if f else None, f.low if f else None, f.high if f else None))
    return Table(
        id="projection",
        title="Functional sufficiency: accuracy with and without rank-16 subspace projection",
        columns=("run", "accuracy (full)", "accuracy (projected, K=16)", "difference", "SE of difference",
                 "seeds (full/projected)", "accuracy (start checkpoint)", "accuracy (freeze-only, no projection)",
                 "recovered fraction f", "f 95 % CI low", "f 95 % CI high"),
        rows=tuple(rows),
        formats=("", ".4f", ".4f", "+.4f", ".4f", "", ".4f", ".4f", ".3f", ".3f", ".3f"),
        note=("Means over seeds; SE of the difference from the seed standard deviations. Projected runs restart from the "
              "seed-0 run's ~20 % checkpoint (fp32 weights, step and AdamW state) and project every gradient and AdamW "
              "update of the block matrices on span(V_16) of that checkpoint's update, so each block matrix's change "
              "after the restart lies in span(V_16) to float32 rounding (project/out_of_subspace_fraction in the run's "
              "metrics); embeddings, norms and lm_head are frozen. The freeze-only control restarts the same way with "
              "the same frozen parameters and no projection. f = (acc(projected) - acc(start)) / (acc(full) - acc(start)), "
              "interval by the delta method (docs/study.md)."),
    )


def panel_runs(res: StudyResults, group: str) -> list[str]:
    """The runs of a control panel: OPD and the group's runs; for mixing, the sweep's points
    by descending alpha (``study.json``'s ``mixing_panel``: its ends run at the mixtures'
    steps, batch and group size), else OPD, the mixtures and RLVR."""
    if group == "mixing" and res.info.get("mixing_panel"):
        return [p["run"] for p in res.info["mixing_panel"]]
    opd, rlvr = res.role("opd"), res.role("rlvr")
    return [r for r in [opd, *res.runs(group), *([rlvr] if group == "mixing" else [])] if r]


def _control(res: StudyResults, group: str, title: str) -> Table:
    runs = panel_runs(res, group)
    alphas = {p["run"]: p["alpha"] for p in res.info.get("mixing_panel", [])} if group == "mixing" else {}
    per_seed = {(row[0], row[1]): row for row in srank_rows(res)}
    rows = []
    for r in runs:
        seeds = res.by_seed(r)
        lo = [min(res.trajectory(i)[1]) for i in seeds.values() if res.trajectory(i)[1]]
        hi = [max(res.trajectory(i)[1]) for i in seeds.values() if res.trajectory(i)[1]]
        d_o = [per_seed[(r, s)][7] for s in seeds if (r, s) in per_seed and per_seed[(r, s)][7] is not None]
        d_r = [per_seed[(r, s)][8] for s in seeds if (r, s) in per_seed and per_seed[(r, s)][8] is not None]
        setting = f"alpha={alphas[r]:g}" if r in alphas else setting_text(res.run_info(r))
        rows.append((r, setting, mean_sd(lo)[0], mean_sd(hi)[0], mean_sd(res.values(r, seed_value("accuracy")))[0],
                     mean_sd(d_o)[0], mean_sd(d_o)[1], mean_sd(d_r)[0], mean_sd(d_r)[1], len(lo)))
    return Table(
        id=f"control_{group}",
        title=title + " — stable-rank band, distance to OPD and RLVR, accuracy",
        columns=("run", "setting", "srank min", "srank max", "accuracy", "D to OPD", "sd D to OPD", "D to RLVR",
                 "sd D to RLVR", "seeds"),
        rows=tuple(rows),
        formats=("", "", ".2f", ".2f", ".4f", ".4f", ".4f", ".4f", ".4f", ""),
        note=("Means over seeds. D = RMS difference of ln(mean stable rank) over the run's checkpoints against the same "
              "seed's OPD or RLVR run (the claims' trajectory distance)."),
    )


def _cross_run_overlap(res: StudyResults) -> Table | None:
    if not res.overlap:
        return None
    cols = tuple(res.overlap[0].keys())

    def cell(c, v):
        x = num(v)
        if x is None:
            return v
        return int(x) if c == "numel" else x

    pooled = [r for r in res.overlap if r.get("scope") in ("all", "type")]
    rows = tuple(tuple(cell(c, r[c]) for c in cols) for r in pooled)
    return Table(
        id="cross_run_overlap",
        title="Cross-run overlap of bf16-visible update masks (OPD vs RLVR; each method vs its other seeds)",
        columns=cols,
        rows=rows,
        formats=tuple(".4f" if all(isinstance(r[j], float) for r in rows) else "" for j in range(len(cols))),
        note=("From opdgeo trajectory's overlap.csv (pooled over all matrices and per type; per layer and per matrix "
              "in diagnose/trajectory/*/overlap.csv): one-sided overlap |A∩B|/|A| vs its baseline; Jaccard vs its "
              "baseline. Seed-vs-seed rows are the overlap two runs of one method reach by chance of data order."),
    )


def _orderings_matched(res: StudyResults, claims: list[dict]) -> Table:
    by_id = {c["id"]: c for c in claims}
    rows = []
    for cid in ("sparsity_order", "update_density_order", "low_magnitude_overlap_order", "nss_order", "angle_order"):
        a, b = by_id.get(cid), by_id.get(cid + "_matched")
        if a is None or b is None:
            continue
        survives = None if a["holds"] is None or b["holds"] is None else (a["holds"] is True and b["holds"] is True)
        if a["holds"] is True and b["holds"] is not True:
            survives = False
        rows.append((cid, _verdict(a["holds"]), _verdict(b["holds"]), survives))
    return Table(
        id="orderings_matched",
        title="Do the SFT/OPD/RLVR orderings survive equal learning rate and origin (sft_matched)?",
        columns=("ordering", "with SFT (base origin, SFT lr)", "with sft_matched (anchor origin, RL lr and steps)", "survives"),
        rows=tuple(rows),
        formats=("", "", "", ""),
        note=("survives: yes when the ordering holds with both; no when it holds with SFT but not with sft_matched (or fails "
              "with both); empty when either is inconclusive."),
    )


def _verdict(h) -> str:
    return {True: "true", False: "false", None: "inconclusive"}[h]


def _runs(res: StudyResults) -> Table:
    rows = tuple((r["name"], r.get("group", ""), r.get("objective", ""), r.get("init", ""), r.get("steps"),
                  r.get("batch_size"), r.get("samples_per_prompt"), r.get("lr"), setting_text(r),
                  "/".join(map(str, r.get("checkpoint_steps", []))), r.get("seed"))
                 for r in res.info.get("runs", []))
    return Table(
        id="runs",
        title="Training runs of this study",
        columns=("run", "group", "objective", "init", "steps", "batch", "samples/prompt", "lr", "setting", "checkpoints", "seed"),
        rows=rows,
        formats=("", "", "", "", "", "", "", ".1e", "", "", ""),
        note=("Adam(W), weight decay and betas as in the preset; checkpoints stored in " + str(res.info.get("dtype", "bfloat16"))
              + ". A seed varies the prompt order, the rollout samples and the random token-keep draw; every seed starts "
                "from the same checkpoint."),
    )


def _stage_times(res: StudyResults) -> Table:
    rows = tuple((name, m.get("kind", ""), float(m.get("seconds", 0.0)), float(m.get("cpu_seconds", 0.0)))
                 for name, m in res.markers.items())
    return Table(
        id="stage_times",
        title="Stage times (seconds, as measured when each stage ran)",
        columns=("stage", "kind", "wall seconds", "CPU seconds"),
        rows=rows + (("total", "", sum(r[2] for r in rows), sum(r[3] for r in rows)),),
        formats=("", "", ".1f", ".1f"),
        note="CPU seconds = process time over all threads (independent of other load on a shared machine).",
    )


def build_tables(res: StudyResults, claims: list[dict] | None = None) -> list[Table]:
    """Every table of the report, in display order."""
    tables = [_table1(res), _angles_nss(res), _localization(res), _trajectory_summary(res), _srank_by_run(res),
              _srank_per_seed(res), _trajectory_means(res), _accuracy(res), _accuracy_seeds(res), _projection(res)]
    for group, title in (("sparsification", "Control: token sparsification"), ("offpolicy", "Control: off-policy OPD"),
                         ("mixing", "Control: OPD/RLVR advantage mixing")):
        tables.append(_control(res, group, title))
    if claims is not None:
        tables.append(_orderings_matched(res, claims))
    overlap = _cross_run_overlap(res)
    if overlap is not None:
        tables.append(overlap)
    return tables + [_runs(res), _stage_times(res)]
