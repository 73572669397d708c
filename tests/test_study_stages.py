"""The study's stage engine: caching by configuration, resume after a crash, --fresh,
dependency invalidation, unavailable stages, timings.json — with tiny fake stages."""

from __future__ import annotations

import json

import pytest

from opdgeo.errors import ConfigError
from opdgeo.study.stages import Stage, StageUnavailable, read_marker, run_stages, select_stages, stage_keys


class Recorder:
    def __init__(self):
        self.calls: list[tuple[str, bool]] = []
        self.crash: set[str] = set()
        self.unavailable: set[str] = set()

    def fn(self, name):
        def f(ctx):
            self.calls.append((name, ctx.resume))
            if name in self.unavailable:
                raise StageUnavailable(f"{name} needs a missing component")
            # a resumable stage leaves partial output, then may crash
            (ctx.dir / "partial.txt").write_text("started")
            if name in self.crash:
                raise RuntimeError(f"simulated crash in {name}")
            inputs = {d: ctx.deps[d]["value"] for d in ctx.deps}
            (ctx.dir / "out.json").write_text(json.dumps(inputs))
            return {"value": f"{name}({','.join(sorted(inputs.values()))})"}

        return f


def make_stages(rec: Recorder, cfg: int = 0):
    return [
        Stage("a", "model", "s/a", {"x": cfg}, rec.fn("a")),
        Stage("b", "train", "s/b", {"y": 1}, rec.fn("b"), deps=("a",), resumable=True),
        Stage("c", "eval", "s/c", {}, rec.fn("c"), deps=("b",)),
        Stage("d", "compare", "s/d", {}, rec.fn("d"), deps=("a",)),
        Stage("r", "report", "", {}, rec.fn("r"), always=True),
    ]


def test_keys_depend_on_config_and_dependencies():
    rec = Recorder()
    k0, k1 = stage_keys(make_stages(rec, 0)), stage_keys(make_stages(rec, 1))
    assert k0["a"] != k1["a"] and k0["b"] != k1["b"] and k0["c"] != k1["c"]
    assert k0["r"] == k1["r"]
    assert stage_keys(make_stages(rec, 0)) == k0  # deterministic
    with pytest.raises(ConfigError, match="depends on 'zz'"):
        stage_keys([Stage("a", "model", "a", {}, rec.fn("a"), deps=("zz",))])


def test_second_run_reuses_everything(tmp_path):
    rec = Recorder()
    outcomes = run_stages(make_stages(rec), tmp_path, log=lambda m: None)
    assert [o.status for o in outcomes.values()] == ["ran"] * 5
    assert outcomes["c"].summary == {"value": "c(b(a()))"}
    rec.calls.clear()
    outcomes = run_stages(make_stages(rec), tmp_path, log=lambda m: None)
    assert {n: o.status for n, o in outcomes.items()} == {"a": "cached", "b": "cached", "c": "cached", "d": "cached", "r": "ran"}
    assert rec.calls == [("r", False)]  # only the always-run report
    # a config change redoes the stage and everything downstream of it
    rec.calls.clear()
    outcomes = run_stages(make_stages(rec, cfg=7), tmp_path, log=lambda m: None)
    assert [c[0] for c in rec.calls] == ["a", "b", "c", "d", "r"]
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert set(timings["stages"]) == {"a", "b", "c", "d", "r"}
    assert all(set(v) >= {"kind", "status", "seconds"} for v in timings["stages"].values())
    assert timings["total_seconds"] == pytest.approx(sum(v["seconds"] for v in timings["stages"].values()), abs=1e-2)
    assert timings["wall_seconds"] >= 0


def test_resume_after_crash_runs_only_missing_stages(tmp_path):
    rec = Recorder()
    rec.crash = {"b"}
    with pytest.raises(RuntimeError, match="simulated crash in b"):
        run_stages(make_stages(rec), tmp_path, log=lambda m: None)
    assert read_marker(tmp_path, "a") is not None
    assert read_marker(tmp_path, "b") is None and read_marker(tmp_path, "c") is None
    assert (tmp_path / "s" / "b" / "partial.txt").is_file()
    t = json.loads((tmp_path / "timings.json").read_text())
    assert t["stages"]["a"]["status"] == "ran" and t["stages"]["b"]["status"] == "failed"
    rec.crash.clear()
    rec.calls.clear()
    outcomes = run_stages(make_stages(rec), tmp_path, log=lambda m: None)
    # a is reused; b resumes its partial output (same key); c, d, r run
    assert rec.calls == [("b", True), ("c", False), ("d", False), ("r", False)]
    assert outcomes["a"].status == "cached" and outcomes["b"].status == "resumed"
    assert json.loads((tmp_path / "s" / "c" / "out.json").read_text()) == {"b": "b(a())"}


def test_non_resumable_stage_is_wiped_after_crash(tmp_path):
    rec = Recorder()
    rec.crash = {"c"}
    with pytest.raises(RuntimeError):
        run_stages(make_stages(rec), tmp_path, log=lambda m: None)
    (tmp_path / "s" / "c" / "stale.txt").write_text("x")
    rec.crash.clear()
    rec.calls.clear()
    run_stages(make_stages(rec), tmp_path, log=lambda m: None)
    assert ("c", False) in rec.calls
    assert not (tmp_path / "s" / "c" / "stale.txt").exists()


def test_fresh_redoes_selected_and_invalidates_downstream(tmp_path):
    rec = Recorder()
    run_stages(make_stages(rec), tmp_path, log=lambda m: None)
    rec.calls.clear()
    outcomes = run_stages(make_stages(rec), tmp_path, select=["a"], fresh=True, log=lambda m: None)
    assert rec.calls == [("a", False)]
    assert outcomes["b"].status == "pending"  # its input was redone
    rec.calls.clear()
    run_stages(make_stages(rec), tmp_path, log=lambda m: None)
    assert [c[0] for c in rec.calls] == ["b", "c", "d", "r"]


def test_select_by_name_and_kind_with_dependencies():
    rec = Recorder()
    st = make_stages(rec)
    assert [s.name for s in select_stages(st, ["c"])] == ["a", "b", "c"]
    assert [s.name for s in select_stages(st, ["compare"])] == ["a", "d"]
    assert [s.name for s in select_stages(st, None)] == ["a", "b", "c", "d", "r"]
    with pytest.raises(ConfigError, match="unknown 'nope'"):
        select_stages(st, ["nope"])


def test_select_by_tag_and_all_and_tags_are_not_in_the_key():
    import dataclasses

    rec = Recorder()
    st = make_stages(rec)
    tagged = [dataclasses.replace(s, tags=("controls", "mixing") if s.name in ("c", "d") else ("core",)) for s in st]
    assert [s.name for s in select_stages(tagged, ["core"])] == ["a", "b", "r"]
    assert [s.name for s in select_stages(tagged, ["mixing"])] == ["a", "b", "c", "d"]  # with their dependencies
    assert [s.name for s in select_stages(tagged, ["controls", "r"])] == ["a", "b", "c", "d", "r"]
    assert [s.name for s in select_stages(tagged, ["all"])] == ["a", "b", "c", "d", "r"]
    assert stage_keys(tagged) == stage_keys(st)  # how a stage is selected does not change what it computes
    with pytest.raises(ConfigError, match="tags \\['controls', 'core', 'mixing'\\]"):
        select_stages(tagged, ["nope"])


def test_unavailable_stage_is_reported_skipped_downstream_and_retried(tmp_path):
    rec = Recorder()
    rec.unavailable = {"b"}
    outcomes = run_stages(make_stages(rec), tmp_path, log=lambda m: None)
    assert outcomes["b"].status == "unavailable" and "missing component" in outcomes["b"].reason
    assert outcomes["c"].status == "skipped" and outcomes["d"].status == "ran" and outcomes["r"].status == "ran"
    assert read_marker(tmp_path, "b") is None
    t = json.loads((tmp_path / "timings.json").read_text())
    assert t["stages"]["b"]["status"] == "unavailable" and "missing component" in t["stages"]["b"]["reason"]
    rec.unavailable.clear()
    rec.calls.clear()
    run_stages(make_stages(rec), tmp_path, log=lambda m: None)
    assert rec.calls[:3] == [("b", False), ("c", False), ("r", False)]  # a fresh start, not a resume


def test_soft_stage_failure_does_not_stop_the_study(tmp_path):
    rec = Recorder()
    rec.crash = {"b"}
    stages = make_stages(rec)
    stages[1] = Stage("b", "train", "s/b", {"y": 1}, rec.fn("b"), deps=("a",), resumable=True, soft=True)
    outcomes = run_stages(stages, tmp_path, log=lambda m: None)
    assert outcomes["b"].status == "failed" and "simulated crash in b" in outcomes["b"].reason
    assert "RuntimeError" in (tmp_path / "s" / "b" / "error.txt").read_text()
    assert outcomes["c"].status == "skipped" and outcomes["d"].status == "ran" and outcomes["r"].status == "ran"
    assert read_marker(tmp_path, "b") is None
