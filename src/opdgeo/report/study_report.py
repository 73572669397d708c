"""The study report: tables, claims and figures from the files of a study's run folder.

Loading (`opdgeo.report.study_results`), one function per table
(`opdgeo.report.study_tables`), one function per claim (`opdgeo.report.study_claims`, every
verdict by the symmetric seed rule of `opdgeo.study.statistics`) and rendering (here).

Writes ``tables/<id>.csv`` + ``.json`` for every table, ``claims.json`` (``id, claim, holds,
evidence, statistic, estimate, ci, n, method, comparisons``), ``report.md`` and a
self-contained ``report.html`` (figures as base64 PNG ``data:`` URIs; no external URL).
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from opdgeo.report import plots
from opdgeo.report.study_claims import CLAIM_RULES, CLAIMS, evaluate_claims, seed_value
from opdgeo.report.study_results import StudyResults, load_results, trajectory_means
from opdgeo.report.study_tables import PAPER_TABLE1, acc_se, build_tables, panel_runs
from opdgeo.report.tables import Table, write_table
from opdgeo.study.roles import MAIN_ROLES
from opdgeo.study.statistics import LEVEL, mean_sd

__all__ = ["StudyResults", "load_results", "trajectory_means", "build_tables", "evaluate_claims", "write_report",
           "CLAIM_RULES", "CLAIMS"]


def _locking_progress(res: StudyResults, run: str):
    node = res.traj_summary.get(run)
    return node.get("locking_progress") if isinstance(node, dict) else None


def _band(res: StudyResults, run: str):
    s = res.trajectory(run)[1]
    return (min(s), max(s)) if s else None


# ----------------------------------------------------------------------------- figures


def _series(res: StudyResults, runs: list[str], metric: str) -> dict:
    return {r: [(p["progress"], p[metric]) for p in res.traj_means.get(r, [])] for r in runs if r in res.traj_means}


def build_figures(res: StudyResults) -> list[tuple[str, str, bytes]]:
    """``(id, caption, png bytes)`` of every report figure."""
    figs = []
    # seed means, as Table 1, by role (the paper's SFT / OPD / RLVR columns)
    ours = {m: {role: mean_sd(res.values(res.role(role), seed_value(k)))[0] if res.role(role) else None
                for role in MAIN_ROLES}
            for m, k in (("sparsity", "global_sparsity"), ("update_density", "mean_density"),
                         ("principal_overlap", "mean_principal_overlap"), ("low_magnitude_overlap", "mean_low_magnitude_overlap"))}
    if res.compare:
        figs.append(("table1", "Table 1 metrics: ours (solid, mean over seeds) vs the paper (hatched).", plots.figure_png(plots.table1_bars(ours, PAPER_TABLE1))))
    main = [r for r in res.main_runs() if r in res.traj_means]
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
    opd_band = _band(res, res.role("opd")) if res.role("opd") else None
    for group, title in (("sparsification", "Token sparsification"), ("offpolicy", "Off-policy OPD"), ("mixing", "OPD/RLVR mixing")):
        runs = panel_runs(res, group)
        if not any(r in res.traj_means for r in res.runs(group)):
            continue
        fig = plots.control_panel(_series(res, runs, "stable_rank"), {r: res.acc(r) for r in runs}, title=title, band=opd_band)
        figs.append((f"control_{group}", f"{title}: stable rank vs progress (OPD band shaded) and accuracy.", plots.figure_png(fig)))
    proj = [n for p in sorted(res.projections(), key=lambda p: p["full"] != res.role("sft"))
            for n in (p["full"], p["projected"]) if n in res.evals]
    if proj:
        fig = plots.accuracy_bars({n: res.acc(n) for n in proj}, title="accuracy with and without projection",
                                  errors={n: acc_se(res, n) for n in proj})
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
    return {True: "true", False: "false", None: "inconclusive"}[h]


def _num_text(x) -> str:
    return "—" if x is None else format(x, ".4g")


def _claim_cells(c: dict) -> list[str]:
    """statistic, estimate, CI, n, verdict and evidence of one claim, as shown."""
    ci = "—" if c.get("ci") is None else f"[{_num_text(c['ci'][0])}, {_num_text(c['ci'][1])}]"
    return [c["statistic"], _num_text(c.get("estimate")), ci, str(c.get("n", "")), _holds_text(c["holds"]),
            c.get("method", ""), c["evidence"]]


_CLAIM_HEAD = ["claim", "statistic", "estimate", f"{100 * LEVEL:g} % CI", "n (seeds per side)", "verdict", "method", "evidence"]
_RULE = (f"Verdict rule (every claim): true when the {100 * LEVEL:g} % confidence interval over seeds excludes the null "
         "on the claimed side, false when it excludes it on the other side, inconclusive otherwise (and with fewer "
         "than 2 seeds a side). A claim of several comparisons is true when all are true, false when any is false; its "
         "estimate and interval are those of the deciding comparison (all are in claims.json and the evidence).")


def _matched_sentence(claims: list[dict], matched: str | None) -> str:
    """Whether each ordering survives equal learning rate and origin (the run ``matched``:
    the plan's learning-rate-matched SFT control)."""
    by_id = {c["id"]: c for c in claims}
    parts = []
    for cid, c in by_id.items():
        m = by_id.get(cid + "_matched")
        if m is None:
            continue
        if c["holds"] is True and m["holds"] is True:
            word = "survives"
        elif c["holds"] is True:
            word = "does not survive (" + _holds_text(m["holds"]) + f" with {matched})"
        else:
            word = f"is {_holds_text(c['holds'])} with SFT and {_holds_text(m['holds'])} with {matched}"
        parts.append(f"{cid.removesuffix('_order')} {word}")
    return (f"Orderings at equal learning rate and origin ({matched}: SFT from the anchor at the RL learning rate and "
            "step count): " + "; ".join(parts) + ".") if parts and matched else ""


def precision_sentence(precision: dict) -> str:
    """How the runs computed, and a warning when they did not all compute alike: a claim
    compares runs, and its verdict may change with the precision (the tiny preset's
    verdicts near the null differ between bf16 autocast and fp32: bench/RESULTS.md)."""
    groups: dict[str, list[str]] = {}
    for run, p in sorted(precision.items()):
        groups.setdefault(p, []).append(run)
    if len(groups) == 1:
        (p, runs), = groups.items()
        return (f"Training precision: {p} in all {len(runs)} runs (verdicts close to their null can change with "
                "the precision; compare a study run in another precision before relying on one).")
    return ("WARNING: the runs trained in different precisions (" + "; ".join(
        f"{p}: {', '.join(runs)}" for p, runs in sorted(groups.items()))
        + "); claims comparing them mix precisions (e.g. a study resumed on another CPU).")


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
    parts.append(f"<p>{e(precision_sentence(res.precision))}</p>\n" if res.precision else "")
    names = {"base": "base student", res.role("sft"): "SFT anchor", "teacher": "teacher"}
    models = [(n, res.acc(n)) for n in names if n and res.acc(n) is not None]
    if models:
        parts.append("<p>Held-out accuracy: " + ", ".join(f"{names[n]} {a:.3f}" for n, a in models) + ".</p>\n")
    unavailable = [(n, s) for n, s in (timings or {}).get("stages", {}).items() if s.get("status") in ("unavailable", "skipped", "failed")]
    if unavailable:
        roots = [(n, s) for n, s in unavailable if s["status"] != "skipped"]
        skipped = [n for n, s in unavailable if s["status"] == "skipped"]
        parts.append("<p><b>Not measured in this run:</b></p>\n<ul>\n" + "".join(
            f"<li>{e(n)}: {e(s['status'])} ({e(s.get('reason', ''))})</li>\n" for n, s in roots)
            + (f"<li>{len(skipped)} dependent stages skipped: {e(', '.join(skipped))}</li>\n" if skipped else "")
            + "</ul>\n")
    parts.append("<h2>Claims</h2>\n<table id=\"claims\">\n<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in _CLAIM_HEAD)
                 + "</tr></thead>\n<tbody>\n")
    for c in claims:
        cls = {True: "holds-true", False: "holds-false", None: "holds-null"}[c["holds"]]
        cells = _claim_cells(c)
        parts.append(f"<tr><td>{e(c['claim'])}</td>" + "".join(
            f"<td class=\"{cls}\">{e(x)}</td>" if i == 4 else f"<td>{e(x)}</td>" for i, x in enumerate(cells)) + "</tr>\n")
    parts.append(f"</tbody>\n</table>\n<p class=\"note\">{e(_RULE)}</p>\n")
    parts.append(f"<p>{e(_matched_sentence(claims, res.role('sft_matched')))}</p>\n")
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
        ("Stable-rank band and slope over seeds", ["srank_by_run", "srank_per_seed"], []),
        ("Orderings at equal learning rate and origin", ["orderings_matched"], []),
        ("Accuracy", ["accuracy_seeds", "accuracy"], []),
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
    if res.precision:
        lines += [precision_sentence(res.precision), ""]
    lines += ["## Claims", "", "| " + " | ".join(_CLAIM_HEAD) + " |", "|" + "---|" * len(_CLAIM_HEAD)]
    for c in claims:
        lines.append("| " + " | ".join(x.replace("|", "/") for x in [c["claim"], *_claim_cells(c)]) + " |")
    lines += ["", _RULE, "", _matched_sentence(claims, res.role("sft_matched")), ""]
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
    claims = evaluate_claims(res)
    tables = build_tables(res, claims)
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
