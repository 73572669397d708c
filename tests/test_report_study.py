"""The study report from synthetic result files in the documented schemas.

The inputs are hand-made (compare ``summary.json``/``matrices.csv``, trajectory
``trajectory.csv``/``summary.json``/``overlap.csv``, ``eval.json``), so every claim's
verdict and every table cell is known in advance.
"""

from __future__ import annotations

import base64
import csv
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from opdgeo.report.study_report import CLAIM_RULES, trajectory_means, write_report
from opdgeo.study.pipeline import study_info
from opdgeo.study.presets import get_preset

MATS = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight")


def _write_csv(path: Path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


COMPARE = {  # run: (sparsity, density, principal overlap, low-mag overlap, nss, angle left, angle right)
    "sft": (0.10, 0.90, 0.29, 0.31, 1e-3, 12.0, 10.0),
    "opd": (0.50, 0.50, 0.27, 0.50, 1e-4, 1.5, 1.0),
    "rlvr": (0.80, 0.20, 0.26, 0.70, 1e-5, 0.4, 0.3),
    "sft_matched": (0.30, 0.70, 0.28, 0.40, 5e-4, 3.0, 2.0),
}
SEED_SCALE = {0: 1.0, 1: 1.04, 2: 0.98}  # seed s multiplies every compare value
# run: mean stable rank per checkpoint (matrix q = value - 1, k = value + 1 -> mean = value); seed s adds s
SRANK = {
    "sft": [10, 20, 35, 50, 60],
    "opd": [21, 23, 25, 27, 29],
    "rlvr": [30, 29, 28, 26, 25],
    "opd_topkl50": [20, 22, 25, 28, 30],
    "opd_topkl25": [19, 21, 24, 26, 28],
    "opd_rand50": [22, 23, 24, 25, 26],
    "opd_rand25": [18, 20, 22, 24, 27],
    "opd_offpolicy": [40, 42, 45, 48, 50],
    "mix_0p75": [21, 22, 24, 26, 28],
    "mix_0p5": [20, 21, 22, 23, 24],
    "mix_0p25": [15, 16, 17, 18, 19],
    "mix_0p05": [5, 6, 7, 7, 8],
    "mix_0p01": [3, 3, 4, 4, 4],
}
SIM_FIRST = {"opd": 0.85, "sft": 0.40, "rlvr": 0.70}
ACC = {"base": 0.05, "teacher": 0.95, "sft": 0.60, "sft_proj16": 0.20, "opd": 0.50, "opd_proj16": 0.48, "rlvr": 0.55,
       "opd_proj16_start": 0.05, "sft_proj16_start": 0.05, "opd_freeze16": 0.45, "sft_freeze16": 0.40}


def _instances(info):
    """``(instance, run, seed)`` of every run of the plan."""
    return [(r["name"], r.get("seed_of") or r["name"], r["seed"]) for r in info["runs"]]


def make_fake_study(out: Path, *, drop_trajectory=()) -> Path:
    """A run folder with every result file the report reads, in the documented schemas
    (the tiny preset's plan: every run with seeds 0, 1, 2)."""
    preset = get_preset("tiny")
    out.mkdir(parents=True, exist_ok=True)
    info = study_info(preset)
    (out / "study.json").write_text(json.dumps(info))
    for inst, run, seed in _instances(info):
        if run not in COMPARE:
            continue
        sp, de, po, lo, nss, al, ar = (v * SEED_SCALE[seed] for v in COMPARE[run])
        d = out / "diagnose" / "compare" / inst
        d.mkdir(parents=True)
        summary = {"global_sparsity": sp, "mean_density": de, "mean_principal_overlap": po,
                   "mean_low_magnitude_overlap": lo, "mean_nss": nss, "mean_angle_left_max_deg": al,
                   "mean_angle_right_max_deg": ar, "by_type": {}, "settings": {}}
        (d / "summary.json").write_text(json.dumps(summary))
        header = ["name", "layer", "type", "shape", "numel", "sparsity", "density", "angle_left_max_deg",
                  "angle_left_mean_deg", "angle_right_max_deg", "angle_right_mean_deg", "nss", "principal_overlap",
                  "low_magnitude_overlap"]
        rows = [[MATS[0], 0, "q", "32x32", 1024, sp, de, al - 0.5, al / 2, ar - 0.1, ar / 2, nss, po, lo],
                [MATS[1], 0, "k", "16x32", 512, sp, de, al + 0.5, al / 2, ar + 0.1, ar / 2, nss, po, lo],
                ["model.norm.weight", "", "norm", "32", 32, sp, "", "", "", "", "", "", "", ""]]
        _write_csv(d / "matrices.csv", header, rows)
    header = ["run", "step", "progress", "name", "type", "stable_rank", "fro_norm", "rel_fro_norm", "hill_alpha", "sim_to_final"]

    def traj_rows(inst, run, seed):
        rows = []
        for i, v in enumerate(SRANK[run]):
            step = i + 1
            sim = 1.0 if i == 4 else SIM_FIRST.get(run, 0.9) + 0.03 * i + 0.01 * seed
            for j, name in enumerate(MATS):
                rows.append([inst, step, 100.0 * step / 5, name, "qk"[j], v + seed - 1 + 2 * j, 1e-3 * step, 1e-2 * step,
                             2.0 + 0.1 * i, sim])
        return rows

    main = out / "diagnose" / "trajectory" / "main"
    _write_csv(main / "trajectory.csv", header, [r for run in ("sft", "opd", "rlvr") for r in traj_rows(run, run, 0)])
    (main / "summary.json").write_text(json.dumps({"runs": {"sft": {"locking_step": None}, "opd": {"locking_step": 1},
                                                            "rlvr": {"locking_step": 3}}}))
    _write_csv(main / "overlap.csv", ["run_a", "run_b", "scope", "one_sided", "baseline", "jaccard", "jaccard_baseline"],
               [["opd", "rlvr", "all", 0.61, 0.2, 0.18, 0.166]])
    for inst, run, seed in _instances(info):
        if run not in SRANK or inst in ("sft", "opd", "rlvr") or run in drop_trajectory:
            continue
        d = out / "diagnose" / "trajectory" / inst
        _write_csv(d / "trajectory.csv", header, traj_rows(inst, run, seed))
        (d / "summary.json").write_text(json.dumps({"runs": {inst: {"locking_step": 2}}}))
    evals = [("base", "base", 0), ("teacher", "teacher", 0), ("opd_proj16_start", "opd_proj16_start", 0),
             ("sft_proj16_start", "sft_proj16_start", 0)] + _instances(info)
    for inst, run, seed in evals:
        if run not in ACC:
            continue
        p = ACC[run] + 0.01 * seed
        d = out / "eval" / inst
        d.mkdir(parents=True)
        (d / "eval.json").write_text(json.dumps({"name": inst, "role": "x", "checkpoint": "c", "accuracy": p,
                                                 "n_problems": 100, "k": 1, "temperature": 1.0, "n_samples": 100}))
    m = out / ".study" / "stages"
    m.mkdir(parents=True)
    (m / "sft.json").write_text(json.dumps({"key": "k", "run_id": "r", "seconds": 12.5, "summary": {}}))
    return out


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = make_fake_study(tmp_path_factory.mktemp("study"))
    paths = write_report(out, timings={"total_seconds": 12.5, "stages": {}})
    return out, paths


def test_trajectory_means_against_hand_values():
    rows = [{"run": "a", "step": "2", "progress": "100", "stable_rank": "3", "fro_norm": "1", "rel_fro_norm": "",
             "hill_alpha": "nan", "sim_to_final": "1"},
            {"run": "a", "step": "1", "progress": "50", "stable_rank": "5", "fro_norm": "2", "rel_fro_norm": "0.5",
             "hill_alpha": "2", "sim_to_final": "0.5"},
            {"run": "a", "step": "1", "progress": "50", "stable_rank": "7", "fro_norm": "4", "rel_fro_norm": "",
             "hill_alpha": "4", "sim_to_final": "0.7"}]
    m = trajectory_means(rows)["a"]
    assert [r["step"] for r in m] == [1, 2]
    assert m[0]["stable_rank"] == 6 and m[0]["fro_norm"] == 3 and m[0]["rel_fro_norm"] == 0.5
    # the mean of the parsed strings is one float64 division: exact up to one rounding
    assert m[0]["sim_to_final"] == pytest.approx(0.6, abs=1e-15)
    assert m[1]["hill_alpha"] is None and m[1]["rel_fro_norm"] is None


def test_claims_schema_and_verdicts(report):
    out, _ = report
    claims = json.loads((out / "claims.json").read_text())
    assert [c["id"] for c in claims] == list(CLAIM_RULES)
    for c in claims:
        assert list(c)[:4] == ["id", "claim", "holds", "evidence"]
        assert {"statistic", "estimate", "ci", "n", "method"} <= set(c)
        assert c["holds"] in (True, False, None)
        assert isinstance(c["claim"], str) and isinstance(c["evidence"], str) and c["evidence"]
    holds = {c["id"]: c["holds"] for c in claims}
    orders = ("sparsity_order", "update_density_order", "low_magnitude_overlap_order", "nss_order", "angle_order")
    assert holds == {
        **{o: True for o in orders},  # separated by far more than the 4 % seed scaling
        **{o + "_matched": True for o in orders},  # sft_matched sits between SFT and OPD
        "opd_narrow_band": False,  # RLVR's band 30/25 = 1.2 is narrower than OPD's 29/21 = 1.38 at every seed
        "sft_srank_expands": True,
        "rlvr_srank_contracts": True,
        "opd_sim16_first": True,  # 0.85, 0.86, 0.87: t interval [0.835, 0.885] > 0.8
        "projection_keeps_opd": True,  # f = 0.44 / 0.46 = 0.957, 95 % CI [0.922, 0.991] > 0.5
        "projection_hurts_sft": True,  # f = 0.16 / 0.56 = 0.286, 95 % CI [0.228, 0.344] < 0.5
        "sparsification_keeps_band": True,  # each within ~10 % of OPD, ~30 % from RLVR
        "offpolicy_keeps_band": False,  # [40, 50]: nearer RLVR's [25, 30] than OPD's [21, 29] in ln
        "small_alpha_departs": False,  # [5, 8] and [3, 4] fall below both, nearer OPD's than RLVR's
    }
    c = {c["id"]: c for c in claims}["opd_sim16_first"]
    # mean 0.86, sd 0.01, n 3: half-width t_{0.975,2} 0.01 / sqrt(3) = 4.302653 * 0.005774
    assert c["estimate"] == pytest.approx(0.86) and c["n"] == 3
    assert c["ci"][0] == pytest.approx(0.86 - 4.302653 * 0.01 / math.sqrt(3), abs=1e-6)


def test_missing_inputs_give_null_claims(tmp_path):
    out = make_fake_study(tmp_path / "s", drop_trajectory=("mix_0p05", "opd_offpolicy"))
    for inst in ("opd_proj16", "opd_proj16_seed1", "opd_proj16_seed2"):
        (out / "eval" / inst / "eval.json").unlink()
    write_report(out)
    holds = {c["id"]: c["holds"] for c in json.loads((out / "claims.json").read_text())}
    assert holds["small_alpha_departs"] is None
    assert holds["offpolicy_keeps_band"] is None
    assert holds["projection_keeps_opd"] is None
    assert holds["projection_hurts_sft"] is True
    assert holds["sparsity_order"] is True


class _Checker(HTMLParser):
    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.urls, self.imgs = [], [], [], []
        self.tables: dict[str, list[list[str]]] = {}
        self._table = None
        self._row = None
        self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for k in ("src", "href"):
            if k in a:
                self.urls.append(a[k])
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "table":
            self._table = a.get("id")
            self.tables[self._table] = []
        if tag == "tr":
            self._row = []
        if tag in ("td", "th"):
            self._cell = ""
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unbalanced </{tag}> (open: {self.stack[-3:]})")
            return
        self.stack.pop()
        if tag in ("td", "th"):
            self._row.append(self._cell)
            self._cell = None
        if tag == "tr":
            self.tables[self._table].append(self._row)

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _parse_html(text: str) -> _Checker:
    c = _Checker()
    c.feed(text)
    c.close()
    return c


def test_html_is_valid_and_self_contained(report):
    out, _ = report
    text = (out / "report.html").read_text()
    assert text.startswith("<!DOCTYPE html>")
    c = _parse_html(text)
    assert not c.errors, c.errors
    assert c.stack == [], c.stack
    for u in c.urls:
        assert not re.match(r"^\s*(https?:)?//", u, re.I), u
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "<script" not in text.lower() and "<link" not in text.lower()
    assert len(c.imgs) >= 5
    for src in c.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def _close(shown: str, value: float) -> bool:
    """``shown`` is ``value`` rounded to the digits ``shown`` displays."""
    s = shown.strip().replace("+", "")
    m = re.fullmatch(r"-?\d+(?:\.(\d+))?(?:e([-+]?\d+))?", s.replace("e+", "e"))
    assert m, shown
    decimals = len(m.group(1) or "")
    exp = int(m.group(2) or 0)
    return abs(float(s) - value) <= 0.5 * 10 ** (exp - decimals) * (1 + 1e-9) + 1e-15


def _csv_rows(path: Path) -> list[list[str]]:
    with path.open() as f:
        return list(csv.reader(f))


def _check_table(shown_rows: list[list[str]], csv_rows: list[list[str]], where: str):
    assert shown_rows[0] == csv_rows[0], where
    assert len(shown_rows) == len(csv_rows), where
    for srow, crow in zip(shown_rows[1:], csv_rows[1:]):
        for s, c in zip(srow, crow):
            if c == "":
                assert s.strip() in ("—", ""), (where, s)
                continue
            try:
                v = float(c)
            except ValueError:
                assert s.strip() == {"True": "yes", "False": "no"}.get(c, c), (where, s, c)
                continue
            assert _close(s, v), (where, s, c)


def test_html_and_markdown_numbers_equal_the_csvs(report):
    out, paths = report
    c = _parse_html((out / "report.html").read_text())
    md = (out / "report.md").read_text()
    ids = [Path(p).stem for p in paths["tables"] if p.endswith(".csv")]
    assert {"table1_sparsity", "angles_nss", "localization", "trajectory_summary", "accuracy", "projection",
            "control_sparsification", "control_offpolicy", "control_mixing", "cross_run_overlap"} <= set(ids)
    for tid in ids:
        rows = _csv_rows(out / "tables" / f"{tid}.csv")
        assert tid in c.tables, tid
        _check_table(c.tables[tid], rows, f"html:{tid}")
        js = json.loads((out / "tables" / f"{tid}.json").read_text())
        assert js["columns"] == rows[0] and len(js["rows"]) == len(rows) - 1
        for jr, cr in zip(js["rows"], rows[1:]):
            for col, cell in zip(rows[0], cr):
                if cell == "":
                    assert jr[col] in (None, "")
                elif isinstance(jr[col], float):
                    assert jr[col] == float(cell)
    # markdown: Table 1 parsed from its pipe table
    lines = md.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("| metric | SFT ours")))
    md_rows = [[x.strip() for x in line.strip("|").split("|")] for line in lines[start:start + 6] if not line.startswith("|---")]
    _check_table(md_rows, _csv_rows(out / "tables" / "table1_sparsity.csv"), "md:table1")


def test_table1_values_ours_and_paper(report):
    out, _ = report
    rows = {r[0]: r[1:] for r in _csv_rows(out / "tables" / "table1_sparsity.csv")[1:]}
    paper = {"sparsity (%)": (8.1, 51.6, 77.2), "update density (%)": (92.73, 46.28, 27.76),
             "principal overlap (%)": (29.66, 27.31, 26.65), "low magnitude overlap (%)": (31.88, 53.59, 73.48)}
    for metric, (ps, po, pr) in paper.items():
        r = [float(x) for x in rows[metric][:9]]
        assert (r[1], r[3], r[5]) == (ps, po, pr)
    f = sum(SEED_SCALE.values()) / 3  # ours: the mean over seeds
    sp = [float(x) for x in rows["sparsity (%)"][:9]]
    assert sp[0] == pytest.approx(10.0 * f) and sp[2] == pytest.approx(50.0 * f) and sp[4] == pytest.approx(80.0 * f)
    lo = [float(x) for x in rows["low magnitude overlap (%)"][:9]]
    assert lo[4] == pytest.approx(70.0 * f)


def test_trajectory_and_control_tables(report):
    out, _ = report
    t = {r[0]: r for r in _csv_rows(out / "tables" / "trajectory_summary.csv")[1:]}
    assert float(t["sft"][3]) == 10.0 and float(t["sft"][4]) == 60.0
    assert float(t["opd"][7]) == pytest.approx(29 / 21) and float(t["opd_seed2"][7]) == pytest.approx(31 / 23)
    assert t["opd"][12] == "1" and t["sft"][12] == ""
    b = {r[0]: r for r in _csv_rows(out / "tables" / "srank_by_run.csv")[1:]}
    ratios = [29 / 21, 30 / 22, 31 / 23]
    m = sum(ratios) / 3
    assert float(b["opd"][1]) == pytest.approx(m) and b["opd"][5] == "3"
    assert float(b["opd"][2]) == pytest.approx(math.sqrt(sum((x - m) ** 2 for x in ratios) / 2))
    ps = {(r[0], r[1]): r for r in _csv_rows(out / "tables" / "srank_per_seed.csv")[1:]}
    # opd_offpolicy seed 0 against OPD seed 0: RMS of ln(40/21), ln(42/23), ...
    d = math.sqrt(sum(math.log(a / b) ** 2 for a, b in zip(SRANK["opd_offpolicy"], SRANK["opd"])) / 5)
    assert float(ps[("opd_offpolicy", "0")][7]) == pytest.approx(d)
    ctl = {r[0]: r for r in _csv_rows(out / "tables" / "control_offpolicy.csv")[1:]}
    assert float(ctl["opd_offpolicy"][2]) == pytest.approx(41.0) and ctl["opd_offpolicy"][9] == "3"
    proj = {r[0]: r for r in _csv_rows(out / "tables" / "projection.csv")[1:]}
    assert float(proj["sft"][3]) == pytest.approx(-0.40)
    assert float(proj["sft"][6]) == 0.05 and float(proj["sft"][7]) == pytest.approx(0.41)  # start; freeze mean
    assert float(proj["sft"][8]) == pytest.approx((0.21 - 0.05) / (0.61 - 0.05))
    t1 = {r[0]: r for r in _csv_rows(out / "tables" / "table1_sparsity.csv")[1:]}
    sp = [10 * f for f in SEED_SCALE.values()]
    msp = sum(sp) / 3
    assert float(t1["sparsity (%)"][7]) == pytest.approx(math.sqrt(sum((x - msp) ** 2 for x in sp) / 2))
    assert t1["sparsity (%)"][10] == "3/3/3"
    om = {r[0]: r for r in _csv_rows(out / "tables" / "orderings_matched.csv")[1:]}
    assert om["sparsity_order"][3] == "True"


def test_the_mixing_panel_uses_the_matched_ends(tmp_path):
    """A study whose RLVR run differs from the mixtures (the paper's) plots its own alpha = 0
    end, ``mix_0``, in the mixing panel, not the main RLVR run."""
    import dataclasses

    from opdgeo.study.presets import StudyRun

    out = make_fake_study(tmp_path / "s")
    p = get_preset("quick")
    mix = p.run("mix_0p5")
    runs = tuple(dataclasses.replace(r, steps=10) if r.name == "rlvr" else r for r in p.runs if r.seed_of is None)
    runs += (StudyRun(name="mix_0", objective="rlvr", init="anchor", steps=mix.steps, batch_size=mix.batch_size,
                     samples_per_prompt=mix.samples_per_prompt, optim=mix.optim, group="mixing"),)
    q = dataclasses.replace(p, runs=runs)
    assert dict(q.mixing_panel())[0.0] == "mix_0"
    (out / "study.json").write_text(json.dumps(study_info(q)))
    header = ["run", "step", "progress", "name", "type", "stable_rank", "fro_norm", "rel_fro_norm", "hill_alpha",
              "sim_to_final"]
    _write_csv(out / "diagnose" / "trajectory" / "mix_0" / "trajectory.csv", header,
               [["mix_0", s, 20.0 * s, MATS[0], "q", 40 - s, 1e-3 * s, 1e-2 * s, 2.0, 1.0 if s == 5 else 0.9]
                for s in range(1, 6)])
    write_report(out, timings={"total_seconds": 1.0, "stages": {}})
    rows = _csv_rows(out / "tables" / "control_mixing.csv")[1:]
    assert [r[0] for r in rows] == ["opd", "mix_0p75", "mix_0p5", "mix_0p25", "mix_0p05", "mix_0p01", "mix_0"]
    assert [r[1] for r in rows] == ["alpha=1", "alpha=0.75", "alpha=0.5", "alpha=0.25", "alpha=0.05", "alpha=0.01",
                                    "alpha=0"]
    assert float(rows[-1][2]) == 35.0 and float(rows[-1][3]) == 39.0  # mix_0's band: stable rank 39 .. 35
    small = {c["id"]: c for c in json.loads((out / "claims.json").read_text())}["small_alpha_departs"]
    # the small-alpha claim measures against the sweep's own alpha = 0 end; one seed: inconclusive
    assert "D(mix_0p05, OPD) − D(mix_0p05, mix_0)" in small["evidence"] and small["holds"] is None


def test_trajectory_means_come_from_the_trajectory_summary(tmp_path):
    """The report reads trajectory's own per-checkpoint means (summary.json ``means``, NaN
    written as null) and falls back to averaging trajectory.csv only without them."""
    from opdgeo.report.study_results import load_results

    out = make_fake_study(tmp_path / "s")
    main = out / "diagnose" / "trajectory" / "main"
    summary = json.loads((main / "summary.json").read_text())
    summary["runs"]["opd"]["means"] = [
        {"step": 2, "progress": 100.0, "n_matrices": 2, "stable_rank": 7.5, "fro_norm": 0.5, "rel_fro_norm": None,
         "hill_alpha": 2.0, "sim_to_final": 1.0},
        {"step": 1, "progress": 50.0, "n_matrices": 2, "stable_rank": 9.25, "fro_norm": 0.25, "rel_fro_norm": 0.1,
         "hill_alpha": None, "sim_to_final": 0.5}]
    (main / "summary.json").write_text(json.dumps(summary))
    res = load_results(out)
    assert res.traj_means["opd"] == [
        {"step": 1, "progress": 50.0, "stable_rank": 9.25, "fro_norm": 0.25, "rel_fro_norm": 0.1, "hill_alpha": None,
         "sim_to_final": 0.5},
        {"step": 2, "progress": 100.0, "stable_rank": 7.5, "fro_norm": 0.5, "rel_fro_norm": None, "hill_alpha": 2.0,
         "sim_to_final": 1.0}]
    assert res.trajectory("opd") == ([0.5, 1.0], [9.25, 7.5])
    # sft's summary has no means: the mean over its two matrices in trajectory.csv (SRANK + 0, + 2)
    assert [m["stable_rank"] for m in res.traj_means["sft"]] == [v + 0 - 1 + 1 for v in SRANK["sft"]]


def test_report_states_the_training_precision_and_warns_when_runs_differ(tmp_path):
    from opdgeo.report.study_report import precision_sentence
    from opdgeo.report.study_results import load_results

    out = make_fake_study(tmp_path / "s")
    for run, value in (("sft", True), ("opd", True), ("rlvr", False), ("odd", "auto")):
        d = out / "runs" / run
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.yaml").write_text(f"optim: {{bf16_autocast: {str(value).lower()}}}\n")
    res = load_results(out)
    assert res.precision == {"sft": "bf16-autocast", "opd": "bf16-autocast", "rlvr": "fp32"}  # "auto" says nothing
    text = precision_sentence(res.precision)
    assert text.startswith("WARNING: the runs trained in different precisions (bf16-autocast: opd, sft; fp32: rlvr)")
    write_report(out)
    assert "WARNING: the runs trained in different precisions" in (out / "report.md").read_text()
    assert "WARNING: the runs trained in different precisions" in (out / "report.html").read_text()
    assert precision_sentence({"a": "fp32", "b": "fp32"}).startswith("Training precision: fp32 in all 2 runs")
