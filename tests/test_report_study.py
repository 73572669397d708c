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

from opdgeo.report.study_report import CLAIM_RULES, load_results, trajectory_means, write_report
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
    "opd_seed1": (0.54, 0.46, 0.27, 0.52, 1.2e-4, 1.4, 0.9),
    "rlvr_seed1": (0.78, 0.22, 0.26, 0.69, 2e-5, 0.5, 0.35),
}
# run: mean stable rank per checkpoint (matrix q = value - 1, k = value + 1 -> mean = value)
SRANK = {
    "sft": [10, 20, 35, 50, 60],
    "opd": [21, 23, 25, 27, 29],
    "rlvr": [30, 29, 28, 26, 25],
    "opd_seed1": [20, 22, 24, 26, 27],
    "rlvr_seed1": [31, 30, 28, 27, 26],
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
ACC = {"base": (0.05, 100), "teacher": (0.95, 100), "sft": (0.60, 100), "sft_proj16": (0.30, 100),
       "opd": (0.50, 100), "opd_proj16": (0.48, 100), "rlvr": (0.55, 100), "opd_seed1": (0.52, 100),
       "rlvr_seed1": (0.57, 100)}


def make_fake_study(out: Path, *, drop_trajectory=()) -> Path:
    """A run folder with every result file the report reads, in the documented schemas."""
    preset = get_preset("quick")
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(study_info(preset)))
    for run, (sp, de, po, lo, nss, al, ar) in COMPARE.items():
        d = out / "diagnose" / "compare" / run
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

    def traj_rows(run):
        rows = []
        for i, v in enumerate(SRANK[run]):
            step = i + 1
            sim = 1.0 if i == 4 else SIM_FIRST.get(run, 0.9) + 0.03 * i
            for j, name in enumerate(MATS):
                rows.append([run, step, 100.0 * step / 5, name, "qk"[j], v - 1 + 2 * j, 1e-3 * step, 1e-2 * step, 2.0 + 0.1 * i, sim])
        return rows

    main = out / "diagnose" / "trajectory" / "main"
    _write_csv(main / "trajectory.csv", header, [r for run in ("sft", "opd", "rlvr") for r in traj_rows(run)])
    (main / "summary.json").write_text(json.dumps({"runs": {"sft": {"locking_step": None}, "opd": {"locking_step": 1},
                                                            "rlvr": {"locking_step": 3}}}))
    _write_csv(main / "overlap.csv", ["run_a", "run_b", "scope", "one_sided", "baseline", "jaccard", "jaccard_baseline"],
               [["opd", "rlvr", "all", 0.61, 0.2, 0.18, 0.166]])
    for run in SRANK:
        if run in ("sft", "opd", "rlvr") or run in drop_trajectory:
            continue
        d = out / "diagnose" / "trajectory" / run
        _write_csv(d / "trajectory.csv", header, traj_rows(run))
        (d / "summary.json").write_text(json.dumps({"runs": {run: {"locking_step": 2}}}))
    for name, (p, n) in ACC.items():
        d = out / "eval" / name
        d.mkdir(parents=True)
        (d / "eval.json").write_text(json.dumps({"name": name, "role": "x", "checkpoint": "c", "accuracy": p,
                                                 "n_problems": n, "k": 1, "temperature": 1.0, "n_samples": n}))
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
        assert set(c) == {"id", "claim", "holds", "evidence"}
        assert c["holds"] in (True, False, None)
        assert isinstance(c["claim"], str) and isinstance(c["evidence"], str) and c["evidence"]
    holds = {c["id"]: c["holds"] for c in claims}
    assert holds == {
        "sparsity_order": True,
        "update_density_order": True,
        "low_magnitude_overlap_order": True,
        "nss_order": True,
        "angle_order": True,
        "opd_narrow_band": True,  # 29 / 21 = 1.381 <= 1.5
        "sft_srank_expands": True,  # 60 / 10 = 6
        "rlvr_srank_contracts": False,  # 25 / 30 = 0.833 > 1 / 1.5
        "opd_sim16_first": True,  # 0.85 >= 0.8
        "projection_keeps_opd": True,  # 0.48 >= 0.50 - 2 * 0.0707
        "projection_hurts_sft": True,  # 0.30 < 0.60 - 2 * 0.0678
        "sparsification_keeps_band": True,  # all within [16.8, 36.25]
        "offpolicy_keeps_band": False,  # [40, 50] leaves it
        "small_alpha_departs": True,  # [5, 8] and [3, 4] leave it
    }
    ev = {c["id"]: c["evidence"] for c in claims}
    assert "1.381" in ev["opd_narrow_band"]
    assert "0.8500" in ev["opd_sim16_first"]


def test_missing_inputs_give_null_claims(tmp_path):
    out = make_fake_study(tmp_path / "s", drop_trajectory=("mix_0p05", "opd_offpolicy"))
    (out / "eval" / "opd_proj16" / "eval.json").unlink()
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
        r = [float(x) for x in rows[metric]]
        assert (r[1], r[3], r[5]) == (ps, po, pr)
    sp = [float(x) for x in rows["sparsity (%)"]]
    assert sp[0] == pytest.approx(10.0) and sp[2] == pytest.approx(50.0) and sp[4] == pytest.approx(80.0)
    lo = [float(x) for x in rows["low magnitude overlap (%)"]]
    assert lo[4] == pytest.approx(70.0)


def test_trajectory_and_control_tables(report):
    out, _ = report
    res = load_results(out)
    assert res.band("opd") == (21.0, 29.0)
    t = {r[0]: r for r in _csv_rows(out / "tables" / "trajectory_summary.csv")[1:]}
    assert float(t["sft"][3]) == 10.0 and float(t["sft"][4]) == 60.0
    assert float(t["opd"][7]) == pytest.approx(29 / 21)
    assert t["opd"][12] == "1" and t["sft"][12] == ""
    ctl = {r[0]: r for r in _csv_rows(out / "tables" / "control_offpolicy.csv")[1:]}
    assert ctl["opd_offpolicy"][4] == "False" and float(ctl["opd_offpolicy"][2]) == 40.0
    proj = {r[0]: r for r in _csv_rows(out / "tables" / "projection.csv")[1:]}
    assert float(proj["sft"][3]) == pytest.approx(-0.30)
    assert float(proj["opd"][4]) == pytest.approx(math.sqrt(0.25 / 100 + 0.48 * 0.52 / 100))


def test_seed_spread_table_by_hand(report):
    out, _ = report
    rows = {r[0]: r for r in _csv_rows(out / "tables" / "seed_spread.csv")[1:]}
    sp = rows["global sparsity (%)"]
    assert sp[1] == "50 / 54" and sp[2] == "80 / 78"
    # gap = |52 - 79| = 27; spread = max(4, 2) = 4
    assert float(sp[3]) == pytest.approx(27.0) and float(sp[4]) == pytest.approx(4.0)
    assert float(sp[5]) == pytest.approx(6.75)
    last = rows["stable rank, last checkpoint"]  # opd 29 / 27, rlvr 25 / 26: gap 2.5, spread 2
    assert float(last[5]) == pytest.approx(1.25)
    claims = {c["id"]: c["evidence"] for c in json.loads((out / "claims.json").read_text())}
    assert "gap = 6.75 x the seed spread" in claims["sparsity_order"]


def test_ordering_within_seed_noise_is_inconclusive(tmp_path):
    out = make_fake_study(tmp_path / "s")
    # rlvr_seed1's angle far from rlvr's: spread 5 > OPD-RLVR gap, so the angle order is not resolved
    p = out / "diagnose" / "compare" / "rlvr_seed1" / "summary.json"
    s = json.loads(p.read_text())
    s["mean_angle_right_max_deg"] = 5.3
    p.write_text(json.dumps(s))
    write_report(out)
    c = {c["id"]: c for c in json.loads((out / "claims.json").read_text())}
    assert c["angle_order"]["holds"] is None and c["angle_order"]["evidence"].startswith("inconclusive")
    assert c["sparsity_order"]["holds"] is True


def test_the_mixing_panel_uses_the_matched_ends(tmp_path):
    """A study whose RLVR run differs from the mixtures (the paper's) plots its own alpha = 0
    end, ``mix_0``, in the mixing panel, not the main RLVR run."""
    import dataclasses

    from opdgeo.study.presets import RunSpec

    out = make_fake_study(tmp_path / "s")
    p = get_preset("quick")
    mix = p.run("mix_0p5")
    runs = tuple(dataclasses.replace(r, steps=10) if r.name == "rlvr" else r for r in p.runs if r.group != "seeds")
    runs += (RunSpec(name="mix_0", objective="rlvr", init="anchor", steps=mix.steps, batch_size=mix.batch_size,
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
