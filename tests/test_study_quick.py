"""`opdgeo study --preset quick` end to end on the real components (the CI smoke test).

One module-scoped flow keeps the cost at about one quick study:

1. the study is run with a crash injected into the OPD run's training after its 3rd
   checkpoint (as if the process had been killed) — it stops there;
2. the same command is run again: finished stages come from the cache, the OPD training
   stage resumes with the trainer's resume (no step is trained twice), the rest runs;
3. a third run reuses every stage (only the report is re-rendered).

Then every artifact is checked: report.html/.md, claims.json, timings.json, the tables.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from opdgeo.cli.main import main
from opdgeo.study.pipeline import build_stages
from opdgeo.study.presets import get_preset


class Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    import opdgeo.training.checkpointing as ckpt

    out = tmp_path_factory.mktemp("study") / "quick"
    argv = ["study", "--preset", "quick", "--out", str(out)]
    real_save = ckpt.save_checkpoint
    saved = []

    def crashing_save(run_dir, step, *args, **kwargs):
        path = real_save(run_dir, step, *args, **kwargs)
        if Path(run_dir).name == "opd":
            saved.append(step)
            if len(saved) == 3:
                raise Crash("simulated kill after the 3rd OPD checkpoint")
        return path

    mp = pytest.MonkeyPatch()
    mp.setattr(ckpt, "save_checkpoint", crashing_save)
    with pytest.raises(Crash):
        main(argv + ["--jobs", "1"])  # one process: the patched save runs here and counts here
    mp.undo()
    first = json.loads((out / "timings.json").read_text())
    main(argv + ["--jobs", "2"])  # stages side by side, each in its own process
    second = json.loads((out / "timings.json").read_text())
    main(argv)
    third = json.loads((out / "timings.json").read_text())
    return out, first, second, third, saved


def test_crash_then_resume_runs_only_missing_stages(quick_study):
    out, first, second, _, saved = quick_study
    assert saved == [1, 2, 3]
    st1 = {k: v["status"] for k, v in first["stages"].items()}
    assert st1["base"] == st1["teacher"] == st1["sft"] == "ran"
    assert st1["opd"] == "failed" and st1["rlvr"] == "pending"
    st2 = {k: v["status"] for k, v in second["stages"].items()}
    for name in ("base", "teacher", "eval_base", "eval_teacher", "sft", "eval_sft", "compare_sft"):
        assert st2[name] == "cached", name
    assert st2["opd"] == "resumed"
    assert st2["rlvr"] == "ran" and st2["report"] == "ran"
    # the trainer resumed at step 3: every step logged exactly once
    steps = [json.loads(line)["step"] for line in (out / "runs" / "opd" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, get_preset("quick").run("opd").steps + 1))


def test_third_run_reuses_everything(quick_study):
    _, _, second, third, _ = quick_study
    assert set(third["stages"]) == set(second["stages"])
    for name, v in third["stages"].items():
        assert v["status"] == ("ran" if name == "report" else "cached"), (name, v)


def test_every_stage_ran(quick_study):
    out, _, second, _, _ = quick_study
    stages = build_stages(get_preset("quick"))
    assert set(second["stages"]) == {s.name for s in stages}
    for name, v in second["stages"].items():
        assert v["status"] in ("ran", "resumed", "cached"), (name, v)
        assert v["seconds"] >= 0
    assert second["preset"] == "quick" and second["total_seconds"] > 0


def test_artifacts_exist_and_are_well_formed(quick_study):
    out, *_ = quick_study
    for f in ("report.html", "report.md", "claims.json", "timings.json", "study.json"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    claims = json.loads((out / "claims.json").read_text())
    assert isinstance(claims, list) and len(claims) >= 10
    ids = set()
    for c in claims:
        assert list(c)[:4] == ["id", "claim", "holds", "evidence"]
        assert {"statistic", "estimate", "ci", "n", "method"} <= set(c)
        assert c["holds"] in (True, False, None) and c["evidence"]
        assert c["n"] == 2 or c["ci"] is None  # quick: 2 seeds a run
        ids.add(c["id"])
    assert {"sparsity_order", "opd_narrow_band", "opd_sim16_first", "projection_keeps_opd", "projection_hurts_sft",
            "sparsification_keeps_band", "offpolicy_keeps_band", "small_alpha_departs"} <= ids
    tables = sorted((out / "tables").glob("*.csv"))
    assert {"table1_sparsity", "angles_nss", "localization", "trajectory_summary", "accuracy"} <= {p.stem for p in tables}
    for p in tables:
        rows = list(csv.reader(p.open()))
        js = json.loads(p.with_suffix(".json").read_text())
        assert js["columns"] == rows[0] and len(js["rows"]) == len(rows) - 1
    for run in ("sft", "opd", "rlvr"):
        s = json.loads((out / "diagnose" / "compare" / run / "summary.json").read_text())
        assert 0.0 <= s["global_sparsity"] <= 1.0
        e = json.loads((out / "eval" / run / "eval.json").read_text())
        assert 0.0 <= e["accuracy"] <= 1.0 and e["n_problems"] == get_preset("quick").eval.n_problems
    t1 = {r[0]: r for r in csv.reader((out / "tables" / "table1_sparsity.csv").open())}
    sft_sparsity = [json.loads((out / "diagnose" / "compare" / r / "summary.json").read_text())["global_sparsity"]
                    for r in ("sft", "sft_seed1")]
    # the CSV keeps the full float64 mean over the seeds of 100 x each value
    assert float(t1["sparsity (%)"][1]) == pytest.approx(sum(100 * x for x in sft_sparsity) / 2, rel=1e-12)
    assert t1["sparsity (%)"][10] == "2/2/2"
    traj = list(csv.DictReader((out / "diagnose" / "trajectory" / "main" / "trajectory.csv").open()))
    assert {r["run"] for r in traj} == {"sft", "opd", "rlvr"}
    html = (out / "report.html").read_text()
    assert "Training precision: " in html and "WARNING: the runs trained in different precisions" not in html
    assert 'src="http' not in html and 'href="http' not in html and 'src="//' not in html


def test_cli_dry_run_shows_cached_state(quick_study, capsys):
    out, *_ = quick_study
    main(["study", "--preset", "quick", "--out", str(out), "--dry-run"])
    text = capsys.readouterr().out
    assert "  sft " in text and "[done]" in text


def test_real_report_html_is_valid_self_contained_and_matches_the_csvs(quick_study):
    import re

    from test_report_study import _check_table, _csv_rows, _parse_html

    out, *_ = quick_study
    c = _parse_html((out / "report.html").read_text())
    assert not c.errors and c.stack == []
    for u in c.urls:
        assert not re.match(r"^\s*(https?:)?//", u, re.I), u
    assert c.imgs and all(src.startswith("data:image/png;base64,") for src in c.imgs)
    for p in sorted((out / "tables").glob("*.csv")):
        assert p.stem in c.tables, p.stem
        _check_table(c.tables[p.stem], _csv_rows(p), f"html:{p.stem}")


def test_runs_keep_only_the_trainer_states_the_study_needs(quick_study):
    from opdgeo.training.checkpointing import list_checkpoints

    out, *_ = quick_study
    p = get_preset("quick")
    sources = 0
    for run in p.runs:
        cks = list_checkpoints(out / "runs" / run.name)
        if not cks:
            continue  # a control the core does not offer
        with_state = [s for s, path in cks if (path / "trainer_state").exists()]
        assert with_state == sorted({cks[-1][0], *p.restart_steps(run)}), run.name
        assert all((path / "model.safetensors").is_file() for _, path in cks), run.name
        sources += bool(p.restart_steps(run))
    assert sources == 2  # sft and opd: the projected runs restart from their early checkpoint
