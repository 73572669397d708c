"""Trajectory diagnostics over a run's checkpoints and cross-run overlap (SPEC §2).

For every run (a folder of ``step-*`` checkpoints, or an ordered list of checkpoint
folders) and every selected matrix, with ΔW_t = W_t − W0 (W0 from the run's origin), the
per-matrix metrics of ``opdgeo.analysis.update.update_metrics`` (the one implementation,
shared with the training monitor):

- ``stable_rank`` = ‖ΔW_t‖_F² / σ1(ΔW_t)²;
- ``fro_norm`` = ‖ΔW_t‖_F and ``rel_fro_norm`` = ‖ΔW_t‖_F / ‖W0‖_F;
- ``hill_alpha``: Hill tail index of the top ``k_hill`` singular values of ΔW_t;
- ``sim_to_final`` = Sim_K(t) = ‖V_K(t)ᵀ V_K(T)‖_F² / K on the top-K right singular
  vectors, T the run's last checkpoint;

then the mean over matrices per checkpoint (overall and per type), and the run's locking
step: the first checkpoint from which the mean Sim_K stays ≥ ``lock_threshold``.

Cross-run overlap: for two runs with the same origin, the bf16-visible update masks of
their final checkpoints (``geometry.sparsity.bf16_visible_mask``) are compared per
matrix, type, layer and overall: one-sided overlap |A∩B|/|A| against its random baseline
and Jaccard against pq/(p+q−pq).

Streaming: the work is split by (origin, matrix). A work item loads W0 once, then for
each run the final checkpoint first (its V_K is the reference of Sim_K; its update mask
feeds the overlap), then the other checkpoints one by one, so memory is bounded by W0,
one W_t, one ΔW_t and the kept top-K vectors and masks; every matrix of every checkpoint
is read exactly once. The items go through ``opdgeo.analysis.driver.execute`` (threads,
torchrun ranks, results gathered on every rank). A mixture-of-experts checkpoint's expert
matrices are ordinary matrices here (``--matrices all``), with their ``expert`` column.

Conventions (our choices, documented in docs/trajectory.md):

- progress = 100 · step / last step (steps from ``step-N`` folder names; for a list of
  folders whose names carry no step, the position 1..T);
- a metric that is undefined is NaN in the table and left out of the means
  (``update.py`` lists when);
- the locking step ignores the final checkpoint (Sim = 1 there by construction): a run
  whose only checkpoint above the threshold is the final one never locks (null).
"""

from __future__ import annotations

import math
import os
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from opdgeo.analysis.driver import SELECTIONS, Progress, execute, plan_matrices, resolve_options
from opdgeo.analysis.runs import RunSpec, check_architectures, overlap_pairs, resolve_run, resolve_runs
from opdgeo.analysis.update import RANK_RTOL, UpdateMetrics, sim, update_metrics
from opdgeo.checkpoints import TYPES
from opdgeo.errors import CheckpointError, FieldError
from opdgeo.geometry.overlap import jaccard, jaccard_baseline, one_sided_overlap
from opdgeo.geometry.sparsity import bf16_visible_mask
from opdgeo.geometry.subspace import locking_step

__all__ = [
    "COLUMNS",
    "METRICS",
    "OVERLAP_COLUMNS",
    "RANK_RTOL",
    "TrajectoryOptions",
    "TrajectoryResult",
    "RunSpec",
    "resolve_run",
    "trajectory",
]

# trajectory.csv schema (docs/trajectory.md): these columns, in this order; additions at the end.
COLUMNS = ("run", "step", "progress", "name", "type", "stable_rank", "fro_norm", "rel_fro_norm", "hill_alpha",
           "sim_to_final", "expert")
METRICS = ("stable_rank", "fro_norm", "rel_fro_norm", "hill_alpha", "sim_to_final")
OVERLAP_COLUMNS = ("run_a", "run_b", "scope", "key", "numel", "density_a", "density_b", "overlap_a_in_b",
                   "baseline_a_in_b", "overlap_b_in_a", "baseline_b_in_a", "jaccard", "jaccard_baseline")


@dataclass(frozen=True)
class TrajectoryOptions:
    """Settings of a trajectory analysis (SPEC §2): the one place of their defaults (the
    CLI, the study and the training monitor read them here). ``validate()`` lists every
    problem at once, naming fields.

    Attributes:
        matrices: ``"attention"`` (q, k, v, o of every block: the paper's set),
            ``"all"`` (the whole geometry set q..down, experts included) or a regular
            expression matched (``re.search``) against names of 2-D floating tensors.
        k_hill: number of top singular values in the Hill index (our choice: 32).
        sim_k: K of Sim_K (16 in the paper).
        lock_threshold: the locking level of Sim_K (our addition: 0.8).
        eta: relative tolerance of the bf16 visible-update rule (SPEC §1).
        oversample, n_iter, tol, seed: settings of ``geometry.randomized_top_svd``, the route
            of ``geometry.top_svd`` for matrices with min(m, n) > 192 (narrower ones take the
            exact SVD).
        exact_svd: use full float64 SVDs for every matrix (reference; slow on large ones).
        workers: matrices processed at once (threads).
        keep_spectra: keep each ΔW_t's top singular values in ``TrajectoryResult.spectra``.
        allow_pickle: allow ``pytorch_model*.bin`` (loaded with ``weights_only=True``).
        progress: a progress bar on stderr (rank 0 only).
    """

    matrices: str = "attention"
    k_hill: int = 32
    sim_k: int = 16
    lock_threshold: float = 0.8
    eta: float = 1e-3
    oversample: int = 64
    n_iter: int = 40
    tol: float = 1e-4
    seed: int = 0
    exact_svd: bool = False
    workers: int = 1
    keep_spectra: bool = False
    allow_pickle: bool = False
    progress: bool = False

    #: fields that change how the work runs or what is kept, not the numbers
    RUN_FIELDS = ("workers", "keep_spectra", "allow_pickle", "progress")

    def validate(self) -> None:
        """Raise ``FieldError`` listing every invalid field."""
        problems = []

        def integer(name, low):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                problems.append((name, f"must be an integer >= {low}; got {value!r}"))

        def number(name, ok, text):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
                problems.append((name, f"{text}; got {value!r}"))

        if not isinstance(self.matrices, str) or not self.matrices:
            problems.append(("matrices", f"must be attention, all or a regular expression; got {self.matrices!r}"))
        elif self.matrices not in SELECTIONS:
            try:
                re.compile(self.matrices)
            except re.error as err:
                problems.append(("matrices", f"{self.matrices!r} is not a valid regular expression ({err})"))
        for name, low in (("k_hill", 2), ("sim_k", 1), ("oversample", 0), ("n_iter", 0), ("workers", 1)):
            integer(name, low)
        number("lock_threshold", lambda x: 0.0 <= x <= 1.0, "must be in [0, 1]")
        number("eta", lambda x: x >= 0, "must be finite and >= 0")
        number("tol", lambda x: x > 0, "must be finite and > 0")
        if problems:
            raise FieldError(problems)

    def settings(self) -> dict[str, Any]:
        """The fields that change the numbers (``summary.json`` ``settings``), with the
        numerical-rank tolerance."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.RUN_FIELDS}
        out["rank_rtol"] = RANK_RTOL
        return out


@dataclass
class TrajectoryResult:
    """Tables of a trajectory analysis (row dicts; schema in docs/trajectory.md).

    Attributes:
        rows: one dict per run, checkpoint and matrix, keys ``COLUMNS``.
        summary: ``{"runs": {run: {...locking_step, means, by_type...}}, "settings": {...}}``.
        overlap: rows of the cross-run overlap, keys ``OVERLAP_COLUMNS``.
        spectra: ``{(run, step, name): top singular values}`` when ``keep_spectra``.
        stats: timing and counts.
    """

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    overlap: list[dict[str, Any]] = field(default_factory=list)
    spectra: dict[tuple[str, int, str], torch.Tensor] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    def to_csv(self) -> str:
        from opdgeo.report.trajectory_files import csv_text

        return csv_text(self.rows, COLUMNS)

    def overlap_csv(self) -> str:
        from opdgeo.report.trajectory_files import csv_text

        return csv_text(self.overlap, OVERLAP_COLUMNS)

    def write(self, out_dir: str | os.PathLike, *, figures: bool = True) -> list[Path]:
        """Write ``trajectory.csv``, ``summary.json``, ``overlap.csv`` and the figures
        (``opdgeo.report.trajectory_files.write_trajectory``).

        Raises:
            OutputError: ``out_dir`` cannot be created or written.
        """
        from opdgeo.report.trajectory_files import write_trajectory

        return write_trajectory(self, out_dir, figures=figures)


def trajectory(runs, origins, options: TrajectoryOptions | None = None, *, overlap=None, **fields_) -> TrajectoryResult:
    """Trajectory diagnostics of one or more runs (SPEC §2), with cross-run overlap.

    Args:
        runs: ``{name: run folder | [checkpoint, ...]}``; a bare folder or list is one
            run named after the folder.
        origins: ``{name: origin checkpoint}`` (one per run) or one origin for all runs.
        options: ``TrajectoryOptions``; keyword arguments named after its fields override
            them (``trajectory(runs, origin, k_hill=8)``).
        overlap: ``None``/``True``: every pair of runs with the same origin; a list of
            ``(run_a, run_b)`` pairs; ``False`` or ``[]``: none.

    Returns:
        ``TrajectoryResult`` (the same on every rank of a distributed run).

    Raises:
        FieldError: invalid options, origins or overlap pairs, or a matrix selection that
            matches nothing, before any weight is read.
        CheckpointError: unreadable checkpoints; a run folder without checkpoints;
            steps that cannot be ordered; checkpoints of different architectures in one
            run; an origin whose tensors do not match the run's.
        TypeError: a keyword that is not a field of ``TrajectoryOptions``.
    """
    from opdgeo.checkpoints import open_checkpoint
    from opdgeo.checkpoints.adapters import is_adapter

    opts = resolve_options(TrajectoryOptions, options, fields_, "trajectory")
    t0 = time.perf_counter()
    run_specs = resolve_runs(runs, origins)
    pairs = overlap_pairs(run_specs, overlap)
    opened: dict[Path, Any] = {}

    adapter_base = {Path(os.path.abspath(p)): s.origin for s in run_specs for p in s.paths}

    def ckpt(path: Path):
        key = Path(os.path.abspath(path))
        if key not in opened:
            # a run's LoRA adapter checkpoint is the merged model over the run's origin
            base = ckpt(adapter_base[key]) if key in adapter_base and is_adapter(key) else None
            opened[key] = open_checkpoint(path, allow_pickle=opts.allow_pickle, base=base)
        return opened[key]

    check_architectures(run_specs, ckpt)  # headers only, before any weight is read
    items = _plan(run_specs, pairs, opts, ckpt)
    done = execute(items, _Worker(opts, ckpt), cost=lambda it: it.cost, workers=opts.workers,
                   progress=Progress("trajectory") if opts.progress else None)
    results = done.results
    rows = _order_rows([row for r in results for row in r.rows], run_specs, items)
    overlap_rows = _overlap_table([c for r in results for c in r.counts], pairs)
    spectra = {key: s for r in results for key, s in r.spectra.items()} if opts.keep_spectra else {}
    summary = _summarize(rows, run_specs, opts, pairs)
    stats = {"elapsed_s": time.perf_counter() - t0, "world": done.world, "n_items": len(items),
             "n_checkpoints": sum(len(s.paths) for s in run_specs)}
    return TrajectoryResult(rows=rows, summary=summary, overlap=overlap_rows, spectra=spectra, stats=stats)


# ------------------------------------------------------------------------------ planning


@dataclass(frozen=True)
class _Item:
    """One work item: a matrix of one origin, followed through every run from that origin."""

    origin: str  # absolute path of the origin
    name: str
    type: str
    expert: int | str | None
    shape: tuple[int, int]
    runs: tuple[RunSpec, ...]
    pairs: tuple[tuple[str, str], ...]  # overlap pairs among these runs
    cost: float


def _plan(specs: list[RunSpec], pairs, opts: TrajectoryOptions, ckpt) -> list[_Item]:
    groups: dict[str, list[RunSpec]] = {}
    for s in specs:
        groups.setdefault(os.path.abspath(s.origin), []).append(s)
    items = []
    for origin, group in groups.items():
        matrices = plan_matrices(ckpt(Path(origin)), select=opts.matrices)
        if not matrices:
            raise FieldError([("matrices", f"{opts.matrices}: no matrix of {origin} matches")])
        in_group = {s.name for s in group}
        group_pairs = tuple(p for p in pairs if p[0] in in_group)
        n_ckpts = sum(len(s.paths) for s in group)
        for mat in matrices:
            m, n = mat.shape
            # cost ~ (checkpoints) x (m n l) randomized SVD work + I/O
            items.append(_Item(origin, mat.name, mat.type, mat.expert, mat.shape, tuple(group), group_pairs,
                               float(n_ckpts * m * n)))
    return items


# ------------------------------------------------------------------------------- worker


@dataclass
class _ItemResult:
    origin: str
    name: str
    rows: list[dict[str, Any]]
    counts: list[dict[str, Any]]
    spectra: dict


class _Worker:
    """Computes one item; called from the driver's threads (holds no mutable state)."""

    def __init__(self, opts: TrajectoryOptions, ckpt):
        self.opts = opts
        self.ckpt = ckpt

    def _load(self, path: Path, item: _Item) -> torch.Tensor:
        w = self.ckpt(path).load(item.name)
        if not w.is_floating_point():
            raise CheckpointError(f"{path}: tensor {item.name} is not floating-point ({w.dtype})")
        if tuple(w.shape) != item.shape:
            raise CheckpointError(f"{path}: tensor {item.name} has shape {list(w.shape)}; origin has {list(item.shape)}")
        return w

    def __call__(self, item: _Item) -> _ItemResult:
        o = self.opts
        origin = Path(item.origin)
        w0 = self._load(origin, item)
        if not bool(torch.isfinite(w0).all()):
            raise CheckpointError(f"{origin}: tensor {item.name} has non-finite values")
        w0_norm = float(torch.linalg.matrix_norm(w0.to(torch.float64)))
        rows, spectra, masks = [], {}, {}
        want_mask = {r for p in item.pairs for r in p}
        for spec in item.runs:
            last = len(spec.paths) - 1
            final: UpdateMetrics | None = None
            run_rows = {}
            for idx in [last] + list(range(last)):  # final first: the reference of Sim_K
                path = spec.paths[idx]
                w = self._load(path, item)
                if idx == last and spec.name in want_mask:
                    masks[spec.name] = bf16_visible_mask(w0, w, eta=o.eta)
                um = update_metrics(w0, w, o, w0_norm=w0_norm)
                del w
                if not math.isfinite(um.fro_norm):  # W0 is finite (checked), so W_t is not
                    raise CheckpointError(f"{path}: tensor {item.name} has non-finite values")
                if final is None:
                    final = um
                run_rows[idx] = self._row(spec, idx, item, um, final)
                if o.keep_spectra and um.S is not None:
                    spectra[(spec.name, spec.steps[idx], item.name)] = um.S.clone()
            rows += [run_rows[i] for i in range(len(spec.paths))]
        counts = [_mask_counts(a, b, masks[a], masks[b], item) for a, b in item.pairs]
        return _ItemResult(item.origin, item.name, rows, counts, spectra)

    def _row(self, spec: RunSpec, idx: int, item: _Item, um: UpdateMetrics, final: UpdateMetrics):
        return {
            "run": spec.name,
            "step": spec.steps[idx],
            "progress": spec.progress[idx],
            "name": item.name,
            "type": item.type,
            "stable_rank": um.stable_rank,
            "fro_norm": um.fro_norm,
            "rel_fro_norm": um.rel_fro_norm,
            "hill_alpha": um.hill_alpha,
            "sim_to_final": sim(um, final, self.opts.sim_k),
            "expert": item.expert,
        }


def _mask_counts(a: str, b: str, ma: torch.Tensor, mb: torch.Tensor, item: _Item) -> dict[str, Any]:
    return {"run_a": a, "run_b": b, "name": item.name, "type": item.type, "numel": ma.numel(),
            "n_a": int(torch.count_nonzero(ma)), "n_b": int(torch.count_nonzero(mb)),
            "n_ab": int(torch.count_nonzero(ma & mb)),
            "overlap_a_in_b": one_sided_overlap(ma, mb), "overlap_b_in_a": one_sided_overlap(mb, ma),
            "jaccard": jaccard(ma, mb)}


def _order_rows(rows, specs: list[RunSpec], items: list[_Item]) -> list[dict[str, Any]]:
    """Rows ordered by run (given order), step, then matrix (checkpoint order)."""
    run_pos = {s.name: i for i, s in enumerate(specs)}
    name_pos = {}
    for it in items:
        name_pos.setdefault(it.name, len(name_pos))
    return sorted(rows, key=lambda r: (run_pos[r["run"]], r["step"], name_pos[r["name"]]))


# ------------------------------------------------------------------------------ summary


def _nanmean(values) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def _means(rows, spec: RunSpec) -> list[dict[str, Any]]:
    by_step = defaultdict(list)
    for r in rows:
        by_step[r["step"]].append(r)
    out = []
    for step, prog in zip(spec.steps, spec.progress):
        rec = {"step": step, "progress": prog, "n_matrices": len(by_step[step])}
        for m in METRICS:
            rec[m] = _nanmean(r[m] for r in by_step[step])
        out.append(rec)
    return out


def _lock(means: list[dict[str, Any]], threshold: float) -> int | None:
    # the final checkpoint is Sim's reference (Sim = 1): excluded (module docstring)
    body = means[:-1]
    return locking_step([m["step"] for m in body], [m["sim_to_final"] for m in body], threshold=threshold)


def _summarize(rows, specs: list[RunSpec], opts: TrajectoryOptions, pairs) -> dict[str, Any]:
    runs = {}
    for spec in specs:
        mine = [r for r in rows if r["run"] == spec.name]
        means = _means(mine, spec)
        lock = _lock(means, opts.lock_threshold)
        by_type = {}
        for t in sorted({r["type"] for r in mine}, key=TYPES.index):
            tm = _means([r for r in mine if r["type"] == t], spec)
            by_type[t] = {"locking_step": _lock(tm, opts.lock_threshold), "means": tm}
        runs[spec.name] = {
            "origin": str(spec.origin),
            "checkpoints": [str(p) for p in spec.paths],
            "steps": list(spec.steps),
            "progress": list(spec.progress),
            "n_matrices": len({r["name"] for r in mine}),
            "locking_step": lock,
            "locking_progress": None if lock is None else spec.progress[spec.steps.index(lock)],
            "means": means,
            "by_type": by_type,
        }
    settings = opts.settings()
    settings["rank_rtol"] = RANK_RTOL
    settings["overlap_pairs"] = [list(p) for p in pairs]
    return {"runs": runs, "settings": settings}


def _overlap_table(counts: list[dict[str, Any]], pairs) -> list[dict[str, Any]]:
    """Per pair: pooled over all matrices, per type, per layer, then per matrix.

    Pooled baselines are expectations under random placement *within each matrix* at
    its own densities: E|A∩B| = Σ_i |A_i||B_i| / N_i; one-sided baseline E|A∩B| / |A|,
    Jaccard baseline E|A∩B| / (|A| + |B| − E|A∩B|). For one matrix these are density(B)
    and ``jaccard_baseline(p, q)``.
    """
    from opdgeo.checkpoints import parse_tensor_name

    out = []
    for a, b in pairs:
        mine = [c for c in counts if c["run_a"] == a and c["run_b"] == b]
        groups: dict[tuple[str, str], list] = {("all", "all"): mine}
        for c in mine:
            groups.setdefault(("type", c["type"]), []).append(c)
        for c in mine:
            layer = parse_tensor_name(c["name"]).layer
            groups.setdefault(("layer", "-" if layer is None else str(layer)), []).append(c)
        for (scope, key), cs in groups.items():
            out.append(_pooled_row(a, b, scope, key, cs))
        for c in mine:
            p, q = c["n_a"] / c["numel"], c["n_b"] / c["numel"]
            out.append({"run_a": a, "run_b": b, "scope": "matrix", "key": c["name"], "numel": c["numel"],
                        "density_a": p, "density_b": q,
                        "overlap_a_in_b": c["overlap_a_in_b"], "baseline_a_in_b": q,
                        "overlap_b_in_a": c["overlap_b_in_a"], "baseline_b_in_a": p,
                        "jaccard": c["jaccard"], "jaccard_baseline": jaccard_baseline(p, q)})
    return out


def _pooled_row(a, b, scope, key, cs) -> dict[str, Any]:
    nan = float("nan")
    numel = sum(c["numel"] for c in cs)
    n_a = sum(c["n_a"] for c in cs)
    n_b = sum(c["n_b"] for c in cs)
    n_ab = sum(c["n_ab"] for c in cs)
    e_ab = sum(c["n_a"] * c["n_b"] / c["numel"] for c in cs)
    union, e_union = n_a + n_b - n_ab, n_a + n_b - e_ab
    return {"run_a": a, "run_b": b, "scope": scope, "key": key, "numel": numel,
            "density_a": n_a / numel, "density_b": n_b / numel,
            "overlap_a_in_b": n_ab / n_a if n_a else nan, "baseline_a_in_b": e_ab / n_a if n_a else nan,
            "overlap_b_in_a": n_ab / n_b if n_b else nan, "baseline_b_in_a": e_ab / n_b if n_b else nan,
            "jaccard": n_ab / union if union else nan, "jaccard_baseline": e_ab / e_union if e_union > 0 else nan}
