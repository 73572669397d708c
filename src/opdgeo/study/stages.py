"""Cached, resumable stages: the study's execution engine.

A `Stage` is a named step with a JSON-able configuration, the stages it reads from
(``deps``) and a function that writes its outputs into its own folder. Execution rules:

- **Cache key.** ``key = sha256(json({name, config, deps' keys, STAGE_FORMAT}))``. A stage
  is *done* when its marker ``<out>/.study/stages/<name>.json`` holds this key and the
  ``run_id`` of every dependency it consumed is still the current one (so redoing a
  dependency invalidates everything downstream, even with an unchanged config).
- **Atomic completion.** The marker is written (temporary file + ``os.replace``) only after
  the stage function returned, i.e. after its outputs are complete. A crash leaves no
  marker, so the next run redoes the stage.
- **Resume.** A stage folder holding ``.stage_key`` equal to the current key was started
  with this very configuration; a resumable stage (training) is called with
  ``ctx.resume = True`` and continues from its last checkpoint (the trainer's resume);
  a non-resumable one is wiped and redone.
- **Fresh.** ``fresh=True`` wipes and redoes every selected stage.
- **Validated reuse.** The marker records every output file's size and SHA-256
  (``output_manifest``; large weights: size, and a valid safetensors header). A cached
  stage whose outputs no longer match (``output_damage``: a file cut short, edited or
  removed) is not reused: it is logged with the damaged file, wiped and redone (and the
  stages after it, whose inputs changed), so a report never shows a damaged table as blank.
- **Unavailable.** A stage function may raise `StageUnavailable` (a component it needs is
  missing, e.g. a training control not implemented); it is reported, not cached, and the
  stages depending on it are skipped. The report marks what could not be measured.

Timings (seconds per stage, whether it ran, resumed or came from the cache) are written to
``<out>/timings.json`` at the end of every invocation.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from opdgeo.errors import ConfigError

__all__ = [
    "Stage",
    "StageContext",
    "StageUnavailable",
    "StageOutcome",
    "stage_keys",
    "select_stages",
    "run_stages",
    "read_marker",
    "STAGE_FORMAT",
    "MARKER_DIR",
]

STAGE_FORMAT = 1
"""Bumped when a stage's outputs change meaning, so old caches are not reused."""

MARKER_DIR = Path(".study") / "stages"


class StageUnavailable(Exception):
    """Raised by a stage function when a component it needs is not available."""


@dataclass
class StageContext:
    """What a stage function receives.

    Attributes:
        out: the study's run folder.
        dir: this stage's own output folder (created, empty unless resuming).
        resume: True when continuing an interrupted run of the same configuration.
        deps: summaries returned by the dependencies' functions, by stage name.
        log: print one progress line.
    """

    out: Path
    dir: Path
    resume: bool
    deps: dict
    log: Callable[[str], None]


@dataclass(frozen=True)
class Stage:
    """One step of the study.

    Attributes:
        name: unique name (also its marker file name).
        kind: ``model``, ``train``, ``eval``, ``compare``, ``trajectory``, ``report``.
        path: output folder relative to the run folder (``""`` = the run folder itself,
            which is never wiped).
        config: JSON-able settings that determine the outputs (the cache key).
        deps: names of the stages whose outputs this one reads.
        fn: ``fn(ctx) -> dict`` writes the outputs, returns a small JSON-able summary.
        resumable: the function can continue an interrupted run (``ctx.resume``).
        always: rerun on every invocation (cheap stages whose output embeds timings). Such a
            stage reads the whole run folder (the report), so with ``jobs > 1`` it starts
            only after every stage listed before it has finished, as in a serial run.
        soft: an exception inside the stage does not stop the study: the stage is marked
            ``failed`` (traceback in ``<dir>/error.txt``), the stages depending on it are
            skipped, and the report lists it as not measured (used for the controls, so
            that one broken control does not cost the whole study).
        tags: selection names besides the stage's name and kind (``core``; ``controls``
            and the control's panel, e.g. ``mixing``): ``--stages controls`` selects every
            stage tagged ``controls``. Not part of the cache key.
    """

    name: str
    kind: str
    path: str
    config: dict
    fn: Callable[[StageContext], dict]
    deps: tuple[str, ...] = ()
    resumable: bool = False
    always: bool = False
    soft: bool = False
    tags: tuple[str, ...] = ()


@dataclass
class StageOutcome:
    """How one stage went in this invocation."""

    name: str
    kind: str
    status: str  # ran | resumed | cached | unavailable | skipped | failed | pending
    seconds: float = 0.0
    reason: str = ""
    cpu_seconds: float = 0.0
    summary: dict = field(default_factory=dict)


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def stage_keys(stages: Sequence[Stage]) -> dict[str, str]:
    """Cache key of every stage: sha256 of its name, config, format and its deps' keys.

    Raises:
        ConfigError: duplicate names, or a dependency that is unknown or comes later.
    """
    keys: dict[str, str] = {}
    for s in stages:
        if s.name in keys:
            raise ConfigError(f"duplicate stage name {s.name!r}")
        for d in s.deps:
            if d not in keys:
                raise ConfigError(f"stage {s.name!r} depends on {d!r}, which is unknown or comes later")
        blob = _canonical({"name": s.name, "config": s.config, "deps": {d: keys[d] for d in s.deps}, "format": STAGE_FORMAT})
        keys[s.name] = hashlib.sha256(blob.encode()).hexdigest()[:32]
    return keys


def select_stages(stages: Sequence[Stage], wanted: Sequence[str] | None) -> list[Stage]:
    """The stages to run for ``wanted`` (names, kinds or tags), with all their dependencies.

    ``None`` or empty selects everything, and so does ``all``. A name may be a stage name
    (``opd``, ``compare_opd``), a kind (``train``, ``eval``, ``compare``, ``trajectory``,
    ``report``) or a tag (``core``, ``controls``, a control panel such as ``mixing``).

    Raises:
        ConfigError: a name that is none of these (the choices are listed).
    """
    if not wanted or "all" in wanted:
        return list(stages)
    by_name = {s.name: s for s in stages}
    kinds = {s.kind for s in stages}
    tags = {t for s in stages for t in s.tags}
    chosen: set[str] = set()
    bad = []
    for w in wanted:
        if w in by_name:
            chosen.add(w)
        elif w in kinds or w in tags:
            chosen.update(s.name for s in stages if s.kind == w or w in s.tags)
        else:
            bad.append(w)
    if bad:
        raise ConfigError(
            f"--stages: unknown {', '.join(map(repr, bad))}; choose 'all', kinds {sorted(kinds)}, tags {sorted(tags)} "
            f"or stages {list(by_name)}"
        )
    stack = list(chosen)
    while stack:
        for d in by_name[stack.pop()].deps:
            if d not in chosen:
                chosen.add(d)
                stack.append(d)
    return [s for s in stages if s.name in chosen]


def _marker_path(out: Path, name: str) -> Path:
    return out / MARKER_DIR / f"{name}.json"


def read_marker(out: Path, name: str) -> dict | None:
    """The completion marker of stage ``name`` in run folder ``out`` (None if absent/corrupt)."""
    p = _marker_path(out, name)
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _write_json_atomic(path: Path, obj) -> None:
    from opdgeo.files import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _is_done(out: Path, stage: Stage, key: str, markers: dict[str, dict | None]) -> bool:
    m = markers.get(stage.name)
    if not m or m.get("key") != key:
        return False
    for d in stage.deps:
        dm = markers.get(d)
        if not dm or m.get("inputs", {}).get(d) != dm.get("run_id"):
            return False
    return True


HASH_LIMIT = 64 << 20
"""Stage output files up to this size get a SHA-256 in the marker; larger ones (model
weights of the bigger presets) are checked by size and, for safetensors, by their header
(truncation, corrupt offsets), so reusing a cached stage never reads gigabytes."""
_NOT_OUTPUTS = {".stage_key", "error.txt", ".lock"}


def _output_files(sdir: Path) -> list[Path]:
    from opdgeo.files import is_temporary

    out = []
    for p in sorted(sdir.rglob("*")):
        rel = p.relative_to(sdir)
        if p.is_file() and rel.name not in _NOT_OUTPUTS and not any(is_temporary(part) for part in rel.parts):
            out.append(p)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def output_manifest(sdir: Path) -> dict[str, dict]:
    """``{relative path: {"size", "sha256"}}`` of a finished stage's outputs (no hash above
    ``HASH_LIMIT``); recorded in the stage's marker when it completes."""
    files = {}
    for p in _output_files(sdir):
        size = p.stat().st_size
        files[p.relative_to(sdir).as_posix()] = {"size": size, "sha256": _sha256(p) if size <= HASH_LIMIT else None}
    return files


def output_damage(sdir: Path, manifest: dict | None) -> str | None:
    """What is wrong with a cached stage's outputs, or None when they are as completed.

    With a manifest: every file present with its size and content hash, a large
    safetensors file with a valid header. Without one (a marker from before manifests):
    every ``*.json`` output must parse. The answer names the file.
    """
    if manifest is None:
        for p in _output_files(sdir) if sdir.is_dir() else []:
            if p.suffix == ".json":
                try:
                    json.loads(p.read_text())
                except (OSError, ValueError):
                    return f"{p}: not valid JSON"
        return None
    for rel, rec in manifest.items():
        p = sdir / rel
        try:
            size = p.stat().st_size
        except OSError:
            return f"{p}: missing"
        if size != rec.get("size"):
            return f"{p}: {size} bytes, {rec.get('size')} when the stage finished"
        if rec.get("sha256") is not None and _sha256(p) != rec["sha256"]:
            return f"{p}: content differs from when the stage finished"
        if rec.get("sha256") is None and p.suffix == ".safetensors":
            from opdgeo.checkpoints.safetensors_file import read_header
            from opdgeo.errors import CheckpointError

            try:
                read_header(p)
            except CheckpointError as err:
                return str(err)
    return None


def _wipe(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def run_stages(
    stages: Sequence[Stage],
    out: Path,
    *,
    select: Sequence[str] | None = None,
    fresh: bool = False,
    log: Callable[[str], None] | None = None,
    timings_meta: dict | None = None,
    jobs: int = 1,
    threads: int | None = None,
) -> dict[str, StageOutcome]:
    """Run (or reuse) the selected stages in order; write ``timings.json``.

    Args:
        stages: every stage of the study, dependencies first.
        out: the run folder.
        select: stage names or kinds to run (with their dependencies); None = all.
        fresh: redo the selected stages even when cached.
        log: progress printer (default: stderr).
        timings_meta: extra keys for ``timings.json`` (preset, ...).
        jobs: how many stages may run at once, each in a forked process
            (`opdgeo.study.workers`); 1 runs every stage in this process, in order.
        threads: intra-op threads each stage process sets (None: inherited).

    Returns:
        One `StageOutcome` per stage of ``stages`` (unselected ones ``pending`` or
        ``cached`` according to their marker).

    Raises:
        Whatever a stage raises, after writing ``timings.json`` with that stage ``failed``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runner = _Runner(stages, out, chosen={s.name for s in select_stages(stages, select)}, fresh=fresh,
                     log=log or (lambda msg: print(msg, file=sys.stderr, flush=True)), meta=timings_meta or {})
    try:
        if jobs > 1:
            runner.run_parallel(jobs, threads)
        else:
            for s in stages:
                runner.step(s)
    finally:
        runner.write_timings()
    return runner.outcomes


_BLOCKING = ("unavailable", "skipped", "pending", "failed")


class _Runner:
    """The state of one `run_stages` call: keys, markers, outcomes and summaries so far."""

    def __init__(self, stages: Sequence[Stage], out: Path, *, chosen: set[str], fresh: bool, log, meta: dict):
        self.stages, self.out, self.chosen, self.fresh, self.log, self.meta = stages, out, chosen, fresh, log, meta
        self.keys = stage_keys(stages)
        self.markers = {s.name: read_marker(out, s.name) for s in stages}
        self.outcomes: dict[str, StageOutcome] = {}
        self.summaries: dict[str, dict] = {}
        self.t_start = time.perf_counter()
        self.n, self.i = len(chosen), 0

    def write_timings(self) -> None:
        write_timings(self.out, self.stages, self.outcomes, time.perf_counter() - self.t_start, self.meta)

    def step(self, s: Stage) -> None:
        """Reuse, skip or run stage ``s`` (in this process)."""
        todo = self.decide(s)
        if todo is not None:
            self._run(s, *todo)

    def decide(self, s: Stage) -> tuple[str, str, str | None] | None:
        """Reuse or skip stage ``s``; or return ``(key, prefix, damage)`` when it must run."""
        key = self.keys[s.name]
        done = _is_done(self.out, s, key, self.markers)
        damage = output_damage(self.out / s.path, self.markers[s.name].get("outputs")) if done and s.path else None
        if damage:
            self.log(f"stage {s.name}: its cached output is damaged ({damage}); "
                     + ("redoing it" if s.name in self.chosen else f"not used (rerun with --stages {s.name})"))
            done, self.markers[s.name] = False, None
        if s.name not in self.chosen:
            self._unselected(s, done)
            return None
        self.i += 1
        prefix = f"[{self.i}/{self.n}] {s.kind:<10} {s.name}"
        blocked = [d for d in s.deps if self.outcomes.get(d) and self.outcomes[d].status in _BLOCKING]
        if blocked:
            self.outcomes[s.name] = StageOutcome(s.name, s.kind, "skipped", reason=f"needs {', '.join(blocked)}")
            self.log(f"{prefix}: skipped (needs {', '.join(blocked)})")
            return None
        if done and not self.fresh and not s.always:
            m = self.markers[s.name]
            self.outcomes[s.name] = StageOutcome(s.name, s.kind, "cached", float(m.get("seconds", 0.0)),
                                                 summary=m.get("summary", {}), cpu_seconds=float(m.get("cpu_seconds", 0.0)))
            self.summaries[s.name] = m.get("summary", {})
            self.log(f"{prefix}: cached ({m.get('seconds', 0.0):.1f} s when it ran)")
            return None
        return key, prefix, damage

    def _unselected(self, s: Stage, done: bool) -> None:
        m = self.markers.get(s.name) or {}
        self.outcomes[s.name] = StageOutcome(s.name, s.kind, "cached" if done else "pending",
                                             float(m.get("seconds", 0.0)) if done else 0.0,
                                             summary=m.get("summary", {}) if done else {})
        if done:
            self.summaries[s.name] = m.get("summary", {})

    def _prepare(self, s: Stage, key: str, damage) -> tuple[Path, bool]:
        """The stage's folder, wiped unless it resumes an interrupted run of this key."""
        sdir = self.out / s.path if s.path else self.out
        key_file = sdir / ".stage_key"
        resume = False
        if s.path:
            started_same = key_file.is_file() and key_file.read_text().strip() == key
            if started_same and s.resumable and not self.fresh and not damage:
                resume = True
            else:
                _wipe(sdir)
        # A marker from an older run of this stage is invalid from here on.
        _wipe(_marker_path(self.out, s.name))
        self.markers[s.name] = None
        sdir.mkdir(parents=True, exist_ok=True)
        if s.path:
            key_file.write_text(key + "\n")
        return sdir, resume

    def _begin(self, s: Stage, key: str, prefix: str, damage) -> tuple[Path, bool, StageContext]:
        sdir, resume = self._prepare(s, key, damage)
        self.log(f"{prefix}: {'resuming' if resume else 'running'} ...")
        ctx = StageContext(out=self.out, dir=sdir, resume=resume, deps={d: self.summaries.get(d, {}) for d in s.deps},
                           log=self.log)
        return sdir, resume, ctx

    def _unavailable(self, s: Stage, sdir: Path, prefix: str, reason: str, seconds: float) -> None:
        if s.path:
            _wipe(sdir)  # nothing to resume from: the next attempt starts clean
        self.outcomes[s.name] = StageOutcome(s.name, s.kind, "unavailable", seconds, reason=reason)
        self.log(f"{prefix}: unavailable ({reason})")

    def _failed(self, s: Stage, sdir: Path, prefix: str, reason: str, seconds: float, trace: str) -> None:
        self.outcomes[s.name] = StageOutcome(s.name, s.kind, "failed", seconds, reason=reason.replace("\n", " ")[:500])
        if s.soft:
            (sdir / "error.txt").write_text(trace)
            self.log(f"{prefix}: FAILED ({self.outcomes[s.name].reason[:300]}); traceback in {sdir / 'error.txt'}")

    def _done(self, s: Stage, key: str, sdir: Path, prefix: str, summary: dict, *, seconds: float, cpu: float,
              resume: bool, damage) -> None:
        self._finish(s, key, sdir, summary, seconds=seconds, cpu=cpu, resume=resume, damage=damage)
        self.log(f"{prefix}: done in {self.outcomes[s.name].seconds:.1f} s")
        self.write_timings()

    def _run(self, s: Stage, key: str, prefix: str, damage) -> None:
        sdir, resume, ctx = self._begin(s, key, prefix, damage)
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            summary = s.fn(ctx) or {}
        except StageUnavailable as err:
            self._unavailable(s, sdir, prefix, str(err), time.perf_counter() - t0)
            return
        except Exception as err:
            import traceback

            self._failed(s, sdir, prefix, f"{type(err).__name__}: {err}", time.perf_counter() - t0, traceback.format_exc())
            if not s.soft:
                raise
            return
        except BaseException:
            self.outcomes[s.name] = StageOutcome(s.name, s.kind, "failed", time.perf_counter() - t0)
            raise
        self._done(s, key, sdir, prefix, summary, seconds=time.perf_counter() - t0, cpu=time.process_time() - c0,
                   resume=resume, damage=damage)

    def run_parallel(self, jobs: int, threads: int | None) -> None:
        """Every stage, up to ``jobs`` at once in forked processes, each once its dependencies are done."""
        from multiprocessing.connection import wait

        from opdgeo.study.workers import StageProcess

        order = [s.name for s in self.stages]
        after = {s.name: set(order[:order.index(s.name)]) if s.always else set(s.deps) for s in self.stages}
        pending, running = list(self.stages), {}
        try:
            while pending or running:
                waiting = {q.name for q in pending} | set(running)  # a stage never depends on itself
                for s in list(pending):
                    if len(running) >= jobs:
                        break
                    if waiting.intersection(after[s.name]):
                        continue
                    pending.remove(s)
                    todo = self.decide(s)
                    if todo is None:  # reused or skipped: its dependents may go on in this pass
                        waiting.discard(s.name)
                        continue
                    key, prefix, damage = todo
                    sdir, resume, ctx = self._begin(s, key, prefix, damage)
                    proc = StageProcess(s.name, lambda s=s, ctx=ctx: s.fn(ctx), threads=threads,
                                        unavailable=StageUnavailable)
                    running[s.name] = (proc, s, key, prefix, damage, sdir, resume)
                if not running:
                    continue
                ready = wait([r[0].recv for r in running.values()])
                for name in [n for n, r in running.items() if r[0].recv in ready]:
                    self._collect(*running.pop(name))
        except BaseException:
            for proc, *_ in running.values():
                proc.kill()
            raise

    def _collect(self, proc, s: Stage, key: str, prefix: str, damage, sdir: Path, resume: bool) -> None:
        """Record what a stage's process reported; a hard failure stops the study."""
        res = proc.result()
        if res.status == "ok":
            self._done(s, key, sdir, prefix, res.summary or {}, seconds=res.seconds, cpu=res.cpu_seconds,
                       resume=resume, damage=damage)
        elif res.status == "unavailable":
            self._unavailable(s, sdir, prefix, res.message, res.seconds)
        else:
            self._failed(s, sdir, prefix, f"{res.error_type}: {res.message}", res.seconds, res.traceback)
            if not s.soft:
                if res.traceback and sdir.is_dir():
                    (sdir / "error.txt").write_text(res.traceback)
                if res.exception is not None:  # the stage's own error, as a serial run raises it
                    raise res.exception
                if res.error_type == "ConfigError":
                    raise ConfigError(res.message)
                raise RuntimeError(f"stage {s.name} failed: {res.error_type}: {res.message}"
                                   + (f" (traceback in {sdir / 'error.txt'})" if res.traceback else ""))

    def _finish(self, s: Stage, key: str, sdir: Path, summary: dict, *, seconds: float, cpu: float, resume: bool,
                damage) -> None:
        """Write the stage's completion marker (atomically, after its outputs are complete)."""
        marker = {
            "key": key,
            "kind": s.kind,
            "run_id": uuid.uuid4().hex,
            "inputs": {d: (self.markers.get(d) or {}).get("run_id") for d in s.deps},
            "seconds": seconds,
            "cpu_seconds": cpu,
            "resumed": resume,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "summary": summary,
            "outputs": output_manifest(sdir) if s.path else None,
        }
        _write_json_atomic(_marker_path(self.out, s.name), marker)
        self.markers[s.name] = marker
        self.summaries[s.name] = summary
        self.outcomes[s.name] = StageOutcome(s.name, s.kind, "resumed" if resume else "ran", seconds, summary=summary,
                                             cpu_seconds=cpu,
                                             reason=f"redone: cached output damaged ({damage})" if damage else "")


def write_timings(out: Path, stages: Sequence[Stage], outcomes: dict[str, StageOutcome], wall: float, meta: dict) -> dict:
    """Write ``timings.json``: seconds per stage (as measured when it ran) and totals.

    Schema: ``{"stages": {name: {"kind", "status", "seconds", "cpu_seconds"[, "reason"]}},
    "total_seconds"`` (sum of the stage wall times as measured when each ran, i.e. the cost
    of the whole study from scratch), ``"total_cpu_seconds"`` (process CPU time, all
    threads: a load-independent measure on a shared machine), ``"wall_seconds"`` (this
    invocation), plus ``meta``.
    """
    rows = {}
    for s in stages:
        o = outcomes.get(s.name) or StageOutcome(s.name, s.kind, "pending")
        rows[s.name] = {"kind": s.kind, "status": o.status, "seconds": round(o.seconds, 3),
                        "cpu_seconds": round(o.cpu_seconds, 3)}
        if o.reason:
            rows[s.name]["reason"] = o.reason
    data = {
        **meta,
        "stages": rows,
        "total_seconds": round(sum(r["seconds"] for r in rows.values()), 3),
        "total_cpu_seconds": round(sum(r["cpu_seconds"] for r in rows.values()), 3),
        "wall_seconds": round(wall, 3),
    }
    _write_json_atomic(Path(out) / "timings.json", data)
    return data
