"""Stages side by side in forked processes: same outcomes, markers and outputs as one at a time,
dependencies respected, failures handled as in the serial runner."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from opdgeo.errors import ConfigError
from opdgeo.study.stages import Stage, StageUnavailable, read_marker, run_stages
from opdgeo.study.workers import _Prefixed, default_jobs


def _writer(value: int):
    """A stage that checks its dependencies' outputs are complete, then writes its own."""

    def fn(ctx):
        total = value
        for dep, summary in ctx.deps.items():
            path = Path(summary["file"])
            data = json.loads(path.read_text())  # complete: written before the dep's marker
            assert data["done"] is True
            total += data["total"]
        out = ctx.dir / "out.json"
        out.write_text(json.dumps({"total": total, "pid": os.getpid(), "done": True}))
        return {"file": str(out), "total": total}

    return fn


def _diamond() -> list[Stage]:
    # a -> (b, c, d) -> e ; f independent
    return [
        Stage("a", "model", "a", {"v": 1}, _writer(1)),
        Stage("b", "train", "b", {"v": 2}, _writer(2), deps=("a",)),
        Stage("c", "train", "c", {"v": 3}, _writer(3), deps=("a",)),
        Stage("d", "train", "d", {"v": 4}, _writer(4), deps=("a",)),
        Stage("f", "eval", "f", {"v": 6}, _writer(6)),
        Stage("e", "report", "e", {"v": 5}, _writer(5), deps=("b", "c", "d")),
    ]


def test_parallel_equals_serial(tmp_path):
    serial = run_stages(_diamond(), tmp_path / "serial", log=lambda m: None)
    parallel = run_stages(_diamond(), tmp_path / "parallel", log=lambda m: None, jobs=3, threads=1)
    for name in "abcdef":
        assert serial[name].status == parallel[name].status == "ran"
        assert serial[name].summary["total"] == parallel[name].summary["total"]
        m = read_marker(tmp_path / "parallel", name)
        assert m["key"] == read_marker(tmp_path / "serial", name)["key"]
        assert m["summary"]["total"] == serial[name].summary["total"]
    # hand-computed: e = 5 + b + c + d = 5 + (2+1) + (3+1) + (4+1)
    assert parallel["e"].summary["total"] == 17
    pids = {json.loads((tmp_path / "parallel" / n / "out.json").read_text())["pid"] for n in "bcd"}
    assert os.getpid() not in pids and len(pids) == 3  # each stage in its own process
    again = run_stages(_diamond(), tmp_path / "parallel", log=lambda m: None, jobs=3)
    assert {o.status for o in again.values()} == {"cached"}


def test_always_stage_waits_for_every_stage_before_it(tmp_path):
    # the report has no declared dependencies: it reads the whole run folder, so under jobs > 1
    # it must still start after every stage listed before it (as it does in a serial run)
    def report(ctx):
        seen = sorted(p.parent.name for p in ctx.out.glob("*/out.json"))
        return {"seen": seen}

    stages = _diamond() + [Stage("report", "report", "", {}, report, always=True)]
    out = run_stages(stages, tmp_path, log=lambda m: None, jobs=3, threads=1)
    assert out["report"].status == "ran"
    assert out["report"].summary["seen"] == list("abcdef")


def test_soft_failure_and_unavailable_in_a_child(tmp_path):
    def boom(ctx):
        raise ValueError("bad control")

    def missing(ctx):
        raise StageUnavailable("no such control")

    stages = [
        Stage("a", "model", "a", {}, _writer(1)),
        Stage("soft", "train", "soft", {}, boom, deps=("a",), soft=True),
        Stage("gone", "train", "gone", {}, missing, deps=("a",)),
        Stage("after_soft", "eval", "after_soft", {}, _writer(2), deps=("soft",)),
        Stage("after_gone", "eval", "after_gone", {}, _writer(2), deps=("gone",)),
        Stage("fine", "eval", "fine", {}, _writer(3), deps=("a",)),
    ]
    out = run_stages(stages, tmp_path, log=lambda m: None, jobs=2)
    assert out["soft"].status == "failed" and "ValueError: bad control" in out["soft"].reason
    assert "ValueError" in (tmp_path / "soft" / "error.txt").read_text()
    assert out["gone"].status == "unavailable" and out["gone"].reason == "no such control"
    assert out["after_soft"].status == out["after_gone"].status == "skipped"
    assert out["fine"].status == "ran" and out["fine"].summary["total"] == 4
    assert read_marker(tmp_path, "soft") is None and read_marker(tmp_path, "gone") is None


def test_hard_failure_stops_the_study(tmp_path):
    def user_mistake(ctx):
        raise ConfigError("data.yaml: field 'x' must be positive")

    def crash(ctx):
        raise RuntimeError("kaboom")

    base = [Stage("a", "model", "a", {}, _writer(1))]
    with pytest.raises(ConfigError, match=r"^data.yaml: field 'x' must be positive$"):
        run_stages(base + [Stage("b", "train", "b", {}, user_mistake, deps=("a",))], tmp_path / "1", log=lambda m: None,
                   jobs=2)
    with pytest.raises(RuntimeError, match="^kaboom$"):  # the stage's own error, as in a serial run
        run_stages(base + [Stage("b", "train", "b", {}, crash, deps=("a",))], tmp_path / "2", log=lambda m: None, jobs=2)
    assert read_marker(tmp_path / "2", "a") is not None and read_marker(tmp_path / "2", "b") is None
    timings = json.loads((tmp_path / "2" / "timings.json").read_text())
    assert timings["stages"]["b"]["status"] == "failed"


def test_unpicklable_error_is_named(tmp_path):
    class LocalError(Exception):  # a local class does not pickle
        pass

    def crash(ctx):
        raise LocalError("odd")

    stages = [Stage("a", "model", "a", {}, _writer(1)), Stage("b", "train", "b", {}, crash, deps=("a",))]
    with pytest.raises(RuntimeError, match=r"stage b failed: LocalError: odd \(traceback in .*error.txt\)"):
        run_stages(stages, tmp_path, log=lambda m: None, jobs=2)
    assert "LocalError" in (tmp_path / "b" / "error.txt").read_text()


def test_crash_kills_siblings_and_they_resume(tmp_path):
    def slow(ctx):
        if ctx.resume:
            return {"resumed": True}
        (ctx.dir / "started").write_text("1")
        while True:  # killed by the parent when the other stage crashes
            time.sleep(0.01)

    def crash(ctx):
        while not (tmp_path / "slow" / "started").is_file():
            time.sleep(0.01)
        raise RuntimeError("kaboom")

    stages = lambda fail: [Stage("slow", "train", "slow", {}, slow, resumable=True),  # noqa: E731
                           Stage("b", "train", "b", {}, crash if fail else _writer(1))]
    with pytest.raises(RuntimeError, match="kaboom"):
        run_stages(stages(True), tmp_path, log=lambda m: None, jobs=2)
    assert read_marker(tmp_path, "slow") is None
    out = run_stages(stages(False), tmp_path, log=lambda m: None, jobs=2)
    assert out["slow"].status == "resumed" and out["slow"].summary == {"resumed": True}
    assert out["b"].status == "ran"


def test_child_dies_without_result(tmp_path):
    def die(ctx):
        os._exit(3)

    stages = [Stage("a", "model", "a", {}, _writer(1)), Stage("b", "train", "b", {}, die, deps=("a",), soft=True)]
    out = run_stages(stages, tmp_path, log=lambda m: None, jobs=2)
    assert out["b"].status == "failed" and "exit code 3" in out["b"].reason


def test_prefixed_stream_lines(tmp_path):
    class Sink:
        def __init__(self):
            self.text = ""

        def write(self, t):
            self.text += t

        def flush(self):
            pass

    sink = Sink()
    s = _Prefixed(sink, "  opd | ")
    s.write("step 1\nstep")
    s.write(" 2\rstep 3\n")
    s.write("tail")
    s.flush()
    assert sink.text == "  opd | step 1\n  opd | step 2\n  opd | step 3\n  opd | tail\n"
    assert s.isatty() is False


def test_default_jobs():
    cores = len(os.sched_getaffinity(0))
    assert default_jobs(1) == cores
    assert default_jobs(None) == 1
    assert default_jobs(1, launcher="torchrun --nproc-per-node 8") == 1
    assert default_jobs(cores * 4) == 1


def test_preload_imports_the_stage_modules_and_skips_missing_ones(monkeypatch):
    import sys

    from opdgeo.study import workers

    monkeypatch.setattr(workers, "PRELOADED", ("opdgeo.no_such_module", "opdgeo.training.evaluate"))
    monkeypatch.delitem(sys.modules, "opdgeo.training.evaluate", raising=False)
    workers.preload_stage_modules()
    assert "opdgeo.training.evaluate" in sys.modules and "opdgeo.no_such_module" not in sys.modules
