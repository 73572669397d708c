"""Trajectory diagnostics over a run's checkpoints and cross-run overlap (SPEC §2, issue 4).

For every run (a folder of ``step-*`` checkpoints, or an ordered list of checkpoint
folders) and every selected matrix, with ΔW_t = W_t − W0 (W0 from the run's origin):

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
is read exactly once. Items run on ``workers`` threads (``analysis.parallel.map_ordered``)
and, under torchrun, are shared among ranks (``shard_for_rank``; results gathered to
every rank).

Conventions (our choices, documented in docs/trajectory.md):

- progress = 100 · step / last step (steps from ``step-N`` folder names; for a list of
  folders whose names carry no step, the position 1..T);
- a metric that is undefined is NaN in the table and left out of the means: stable rank
  of a zero update; Hill index when min(m, n) < k_hill or σ_{k_hill} ≤ 1e-6 σ1
  (numerical rank < k_hill); Sim_K when min(m, n) < K or σ_K ≤ 1e-6 σ1 at t or T;
- the locking step ignores the final checkpoint (Sim = 1 there by construction): a run
  whose only checkpoint above the threshold is the final one never locks (null).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from opdgeo.analysis.files import atomic_write_text, json_safe
from opdgeo.analysis.parallel import all_gather, map_ordered, shard_for_rank
from opdgeo.analysis.progress import progress_bar
from opdgeo.errors import CheckpointError, ConfigError, OpdgeoError
from opdgeo.geometry.lowrank import exact_svd, hill_alpha, randomized_top_svd, stable_rank
from opdgeo.geometry.overlap import jaccard, jaccard_baseline, one_sided_overlap
from opdgeo.geometry.sparsity import bf16_visible_mask
from opdgeo.geometry.subspace import locking_step, subspace_similarity

__all__ = [
    "COLUMNS",
    "METRICS",
    "OVERLAP_COLUMNS",
    "TrajectoryOptions",
    "TrajectoryResult",
    "RunSpec",
    "resolve_run",
    "trajectory",
]

# trajectory.csv schema (docs/trajectory.md): these columns, in this order.
COLUMNS = ("run", "step", "progress", "name", "type", "stable_rank", "fro_norm", "rel_fro_norm", "hill_alpha",
           "sim_to_final")
METRICS = ("stable_rank", "fro_norm", "rel_fro_norm", "hill_alpha", "sim_to_final")
OVERLAP_COLUMNS = ("run_a", "run_b", "scope", "key", "numel", "density_a", "density_b", "overlap_a_in_b",
                   "baseline_a_in_b", "overlap_b_in_a", "baseline_b_in_a", "jaccard", "jaccard_baseline")

# A singular value at or below RANK_RTOL · σ1 counts as zero (numerical rank): the
# float32 iteration of ``randomized_top_svd`` leaves ~1e-7 σ1 on zero singular values.
RANK_RTOL = 1e-6
_STEP_RE = re.compile(r"^step[-_]?(\d+)$")


@dataclass(frozen=True)
class TrajectoryOptions:
    """Settings of a trajectory analysis (SPEC §2); ``validate()`` lists every problem at once.

    Attributes:
        matrices: ``"attention"`` (q, k, v, o of every block: the paper's set),
            ``"all"`` (the whole geometry set q..down) or a regular expression matched
            (``re.search``) against tensor names of 2-D floating-point tensors.
        k_hill: number of top singular values in the Hill index (our choice: 32).
        sim_k: K of Sim_K (16 in the paper).
        lock_threshold: the locking level of Sim_K (our addition: 0.8).
        eta: relative tolerance of the bf16 visible-update rule (SPEC §1).
        oversample, n_iter, tol, seed: settings of ``geometry.randomized_top_svd``.
        exact_svd: use full float64 SVDs instead (reference; slow).
        workers: matrices processed at once (threads).
        keep_spectra: keep each ΔW_t's top singular values in ``TrajectoryResult.spectra``.
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

    def validate(self) -> None:
        problems = []

        def positive_int(label, value, low):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                problems.append(f"{label} must be an integer >= {low}; got {value!r}")

        if not isinstance(self.matrices, str) or not self.matrices:
            problems.append(f"--matrices must be attention, all or a regular expression; got {self.matrices!r}")
        elif self.matrices not in ("attention", "all"):
            try:
                re.compile(self.matrices)
            except re.error as err:
                problems.append(f"--matrices {self.matrices!r} is not a valid regular expression ({err})")
        positive_int("--k-hill", self.k_hill, 2)
        positive_int("--sim-k", self.sim_k, 1)
        positive_int("oversample", self.oversample, 0)
        positive_int("n_iter", self.n_iter, 0)
        positive_int("--workers", self.workers, 1)
        if not (isinstance(self.lock_threshold, (int, float)) and 0.0 <= self.lock_threshold <= 1.0):
            problems.append(f"--threshold must be in [0, 1]; got {self.lock_threshold!r}")
        if not (isinstance(self.eta, (int, float)) and math.isfinite(self.eta) and self.eta >= 0):
            problems.append(f"eta must be finite and >= 0; got {self.eta!r}")
        if not (isinstance(self.tol, (int, float)) and math.isfinite(self.tol) and self.tol > 0):
            problems.append(f"tol must be finite and > 0; got {self.tol!r}")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class RunSpec:
    """One run: its ordered checkpoints and their steps.

    Attributes:
        name: run name (CSV ``run`` column, legend label).
        steps: training steps, strictly increasing.
        paths: checkpoint folders (or files), same order.
        origin: the checkpoint W0 the updates are measured from.
    """

    name: str
    steps: tuple[int, ...]
    paths: tuple[Path, ...]
    origin: Path

    @property
    def progress(self) -> tuple[float, ...]:
        last = self.steps[-1]
        return tuple(100.0 * s / last if last > 0 else 100.0 for s in self.steps)


def _step_of(path: Path) -> int | None:
    m = _STEP_RE.match(path.name)
    return int(m.group(1)) if m else None


def resolve_run(name: str, spec, origin) -> RunSpec:
    """A run's checkpoints and steps from a run folder or an explicit list of checkpoints.

    A folder: its ``step-*`` subfolders, step from the name (``step-000063`` → 63),
    ordered by step. A list: the checkpoints in the order given; steps from the names
    when every name is ``step-N`` (then they must increase), else 1..T.

    Raises:
        CheckpointError: a missing path, a run folder with no ``step-*`` checkpoints, a
            ``step-*`` name without a number, duplicate or decreasing steps.
    """
    origin = Path(origin)
    if isinstance(spec, (str, os.PathLike)):
        folder = Path(spec)
        if not folder.is_dir():
            raise CheckpointError(f"run '{name}': {folder} is not a folder")
        children = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step"))
        if not children:
            raise CheckpointError(f"run '{name}': {folder} has no step-* checkpoints")
        steps = []
        for p in children:
            step = _step_of(p)
            if step is None:
                raise CheckpointError(f"run '{name}': cannot order {p}: the folder name has no step number (step-N)")
            steps.append(step)
        by_step: dict[int, Path] = {}
        for step, p in zip(steps, children):
            if step in by_step:
                raise CheckpointError(f"run '{name}': steps cannot be ordered: {by_step[step].name} and {p.name} "
                                      f"are both step {step}")
            by_step[step] = p
        order = sorted(by_step)
        return RunSpec(name, tuple(order), tuple(by_step[s] for s in order), origin)
    paths = [Path(p) for p in spec]
    if not paths:
        raise CheckpointError(f"run '{name}': no checkpoints given")
    for p in paths:
        if not p.exists():
            raise CheckpointError(f"run '{name}': checkpoint {p} does not exist")
    steps = [_step_of(p) for p in paths]
    if all(s is not None for s in steps):
        for a, b, pa, pb in zip(steps, steps[1:], paths, paths[1:]):
            if b <= a:
                raise CheckpointError(f"run '{name}': steps cannot be ordered: {pb.name} (step {b}) is listed after "
                                      f"{pa.name} (step {a})")
    else:
        steps = list(range(1, len(paths) + 1))
    return RunSpec(name, tuple(steps), tuple(paths), origin)


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
        return _csv(self.rows, COLUMNS)

    def overlap_csv(self) -> str:
        return _csv(self.overlap, OVERLAP_COLUMNS)

    def write(self, out_dir: str | os.PathLike, *, figures: bool = True) -> list[Path]:
        """Write ``trajectory.csv``, ``summary.json``, ``overlap.csv`` and the figures.

        Returns:
            The paths written.

        Raises:
            ConfigError: ``out_dir`` cannot be created or written.
        """
        out = Path(out_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
            paths = [out / "trajectory.csv", out / "summary.json", out / "overlap.csv"]
            atomic_write_text(paths[0], self.to_csv())
            atomic_write_text(paths[1], json.dumps(json_safe(self.summary), indent=2) + "\n")
            atomic_write_text(paths[2], self.overlap_csv())
            if figures:
                from opdgeo.report.figures import write_trajectory_figures

                paths += write_trajectory_figures(self.summary, out)
        except OSError as err:
            raise ConfigError(f"--out {out}: cannot write ({err.strerror or err})") from None
        return paths


def trajectory(
    runs,
    origins,
    *,
    matrices: str = "attention",
    k_hill: int = 32,
    sim_k: int = 16,
    lock_threshold: float = 0.8,
    overlap: bool | Sequence[tuple[str, str]] | None = None,
    eta: float = 1e-3,
    oversample: int = 64,
    n_iter: int = 40,
    tol: float = 1e-4,
    seed: int = 0,
    exact_svd: bool = False,
    workers: int = 1,
    progress: bool = False,
    allow_pickle: bool = False,
    keep_spectra: bool = False,
) -> TrajectoryResult:
    """Trajectory diagnostics of one or more runs (SPEC §2), with cross-run overlap.

    Args:
        runs: ``{name: run folder | [checkpoint, ...]}``; a bare folder or list is one
            run named after the folder.
        origins: ``{name: origin checkpoint}`` (one per run) or one origin for all runs.
        matrices, k_hill, sim_k, lock_threshold, eta, oversample, n_iter, tol, seed,
            exact_svd, workers, keep_spectra: see ``TrajectoryOptions``.
        overlap: ``None``/``True``: every pair of runs with the same origin; a list of
            ``(run_a, run_b)`` pairs; ``False`` or ``[]``: none.
        progress: a rich progress bar on stderr (rank 0 only).
        allow_pickle: allow ``pytorch_model*.bin`` (``weights_only=True``).

    Returns:
        ``TrajectoryResult`` (the same on every rank of a distributed run).

    Raises:
        ConfigError: invalid options or overlap pairs, or a matrix selection that
            matches nothing, before any weight is read.
        CheckpointError: unreadable checkpoints; a run folder without checkpoints;
            steps that cannot be ordered; checkpoints of different architectures in one
            run; an origin whose tensors do not match the run's.
    """
    from opdgeo.checkpoints import open_checkpoint

    opts = TrajectoryOptions(matrices=matrices, k_hill=k_hill, sim_k=sim_k, lock_threshold=lock_threshold, eta=eta,
                             oversample=oversample, n_iter=n_iter, tol=tol, seed=seed, exact_svd=exact_svd,
                             workers=workers, keep_spectra=keep_spectra)
    opts.validate()
    t0 = time.perf_counter()

    run_specs = _resolve_runs(runs, origins)
    pairs = _overlap_pairs(run_specs, overlap)

    # Open every checkpoint (headers only) and check architectures before reading weights.
    opened: dict[Path, Any] = {}

    def ckpt(path: Path):
        key = Path(os.path.abspath(path))
        if key not in opened:
            opened[key] = open_checkpoint(path, allow_pickle=allow_pickle)
        return opened[key]

    for spec in run_specs:
        ckpts = [ckpt(p) for p in spec.paths]
        ref = _signature(ckpts[0])
        for p, c in zip(spec.paths[1:], ckpts[1:]):
            diff = _first_difference(ref, _signature(c), spec.paths[0].name, p.name)
            if diff:
                raise CheckpointError(f"run '{spec.name}': checkpoints of different architectures in "
                                      f"{spec.paths[0].parent}: {diff}")
        diff = _first_difference(_signature(ckpt(spec.origin)), ref, "the origin", str(spec.paths[0]))
        if diff:
            raise CheckpointError(f"origin {spec.origin} does not match run {spec.name}: {diff}")

    items = _plan(run_specs, pairs, opts, ckpt)

    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank_id, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    mine = shard_for_rank(items, rank_id, world, cost=lambda it: it.cost)

    results: list[_ItemResult] = []
    error = None
    worker = _Worker(opts, ckpt)
    try:
        with progress_bar("trajectory", progress and rank_id == 0, sum(it.cost for it in mine)) as advance:
            for item, res in zip(mine, map_ordered(worker, mine, opts.workers)):
                results.append(res)
                advance(item.cost)
    except OpdgeoError as err:
        if not distributed:
            raise
        error = f"{type(err).__name__}\t{err}"
    if distributed:
        gathered = all_gather((error, results))
        errors = [e for e, _ in gathered if e is not None]
        if errors:
            kind, message = errors[0].split("\t", 1)
            from opdgeo import errors as err_mod

            raise getattr(err_mod, kind, OpdgeoError)(message)
        by_key = {(r.origin, r.name): r for _, part in gathered for r in part}
        results = [by_key[(it.origin, it.name)] for it in items]

    rows = _order_rows([row for r in results for row in r.rows], run_specs, items)
    overlap_rows = _overlap_table([c for r in results for c in r.counts], pairs)
    spectra = {key: s for r in results for key, s in r.spectra.items()} if keep_spectra else {}
    summary = _summarize(rows, run_specs, opts, pairs)
    stats = {"elapsed_s": time.perf_counter() - t0, "world": world, "n_items": len(items),
             "n_checkpoints": sum(len(s.paths) for s in run_specs)}
    return TrajectoryResult(rows=rows, summary=summary, overlap=overlap_rows, spectra=spectra, stats=stats)


# ------------------------------------------------------------------------------ planning


def _resolve_runs(runs, origins) -> list[RunSpec]:
    if isinstance(runs, (str, os.PathLike)):
        runs = {Path(runs).name: runs}
    elif not isinstance(runs, Mapping):
        runs = list(runs)
        if not runs:
            raise ConfigError("no runs given")
        runs = {Path(runs[0]).parent.name or "run": runs}
    if not runs:
        raise ConfigError("no runs given")
    if isinstance(origins, (str, os.PathLike)):
        origins = {name: origins for name in runs}
    elif not isinstance(origins, Mapping):
        raise ConfigError(f"origins must be a path or a mapping run -> path; got {type(origins).__name__}")
    missing = [name for name in runs if name not in origins]
    extra = [name for name in origins if name not in runs]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no --origin for run(s) {', '.join(missing)}")
        if extra:
            parts.append(f"--origin for unknown run(s) {', '.join(extra)}")
        raise ConfigError("; ".join(parts))
    return [resolve_run(str(name), spec, origins[name]) for name, spec in runs.items()]


def _overlap_pairs(specs: list[RunSpec], overlap) -> list[tuple[str, str]]:
    same = {}
    for s in specs:
        same.setdefault(os.path.abspath(s.origin), []).append(s.name)
    if overlap is False or (overlap is not None and overlap is not True and len(overlap) == 0):
        return []
    if overlap is None or overlap is True:
        return [(a, b) for names in same.values() for i, a in enumerate(names) for b in names[i + 1:]]
    origin_of = {s.name: os.path.abspath(s.origin) for s in specs}
    pairs, problems = [], []
    for pair in overlap:
        try:
            a, b = pair
        except (TypeError, ValueError):
            problems.append(f"overlap pair {pair!r} is not (run_a, run_b)")
            continue
        unknown = [r for r in (a, b) if r not in origin_of]
        if unknown:
            problems.append(f"overlap pair ({a}, {b}): unknown run {', '.join(unknown)}")
        elif a == b:
            problems.append(f"overlap pair ({a}, {b}): a run with itself")
        elif origin_of[a] != origin_of[b]:
            problems.append(f"overlap pair ({a}, {b}): the runs have different origins")
        else:
            pairs.append((a, b))
    if problems:
        raise ConfigError("; ".join(problems))
    return pairs


def _signature(c) -> dict[str, tuple]:
    return {name: tuple(c.info(name).shape) for name in c.names()}


def _first_difference(a: dict[str, tuple], b: dict[str, tuple], label_a: str, label_b: str) -> str | None:
    """The first tensor that tells two checkpoints' architectures apart, in words."""
    only_a = [n for n in a if n not in b]
    only_b = [n for n in b if n not in a]
    if only_a:
        return f"tensor {only_a[0]} is in {label_a} but not in {label_b} ({len(only_a)} such tensors)"
    if only_b:
        return f"tensor {only_b[0]} is in {label_b} but not in {label_a} ({len(only_b)} such tensors)"
    for n, shape in a.items():
        if b[n] != shape:
            return f"tensor {n} has shape {list(shape)} in {label_a} but {list(b[n])} in {label_b}"
    return None


@dataclass(frozen=True)
class _Item:
    """One work item: a matrix of one origin, followed through every run from that origin."""

    origin: str  # absolute path of the origin
    name: str
    type: str
    shape: tuple[int, int]
    runs: tuple[RunSpec, ...]
    pairs: tuple[tuple[str, str], ...]  # overlap pairs among these runs
    cost: float


def _selected(c, opts: TrajectoryOptions) -> list[str]:
    from opdgeo.checkpoints import ATTENTION_TYPES, is_geometry_matrix, parse_tensor_name

    out = []
    pattern = None if opts.matrices in ("attention", "all") else re.compile(opts.matrices)
    for name in c.names():
        info = c.info(name)
        if pattern is None:
            if not is_geometry_matrix(name, info.shape):
                continue
            if opts.matrices == "attention" and parse_tensor_name(name).type not in ATTENTION_TYPES:
                continue
        elif not (pattern.search(name) and len(info.shape) == 2 and info.dtype.is_floating_point):
            continue
        out.append(name)
    return out


def _plan(specs: list[RunSpec], pairs, opts: TrajectoryOptions, ckpt) -> list[_Item]:
    from opdgeo.checkpoints import parse_tensor_name

    groups: dict[str, list[RunSpec]] = {}
    for s in specs:
        groups.setdefault(os.path.abspath(s.origin), []).append(s)
    items = []
    for origin, group in groups.items():
        c = ckpt(Path(origin))
        names = _selected(c, opts)
        if not names:
            raise ConfigError(f"--matrices {opts.matrices}: no matrix of {origin} matches")
        in_group = {s.name for s in group}
        group_pairs = tuple(p for p in pairs if p[0] in in_group)
        n_ckpts = sum(len(s.paths) for s in group)
        for name in names:
            shape = tuple(c.info(name).shape)
            m, n = shape
            # cost ~ (checkpoints) x (m n l) randomized SVD work + I/O
            items.append(_Item(origin, name, parse_tensor_name(name).type, shape, tuple(group), group_pairs,
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


@dataclass(frozen=True)
class _Spectrum:
    S: torch.Tensor | None  # top singular values (None for a zero update)
    V: torch.Tensor | None  # top right singular vectors [n, kk]
    fro: float


class _Worker:
    """Computes one item; called from ``map_ordered`` threads (holds no mutable state)."""

    def __init__(self, opts: TrajectoryOptions, ckpt):
        self.opts = opts
        self.ckpt = ckpt

    def _load(self, path: Path, name: str, *, check_finite: bool) -> torch.Tensor:
        w = self.ckpt(path).load(name)
        if not w.is_floating_point():
            raise CheckpointError(f"{path}: tensor {name} is not floating-point ({w.dtype})")
        if check_finite and not bool(torch.isfinite(w).all()):
            raise CheckpointError(f"{path}: tensor {name} has non-finite values")
        return w

    def _spectrum(self, d: torch.Tensor, path: Path, name: str) -> _Spectrum:
        o = self.opts
        fro = float(torch.linalg.matrix_norm(d))
        if not math.isfinite(fro):  # W0 is finite (checked), so W_t is not: one pass instead of two
            raise CheckpointError(f"{path}: tensor {name} has non-finite values")
        if fro == 0.0:
            return _Spectrum(None, None, 0.0)
        kk = min(max(o.k_hill, o.sim_k), min(d.shape))
        if o.exact_svd:
            _, s, v = exact_svd(d)
            return _Spectrum(s[:kk], v[:, :kk], fro)
        _, s, v = randomized_top_svd(d, kk, oversample=o.oversample, n_iter=o.n_iter, tol=o.tol, seed=o.seed)
        return _Spectrum(s, v, fro)

    def _defined(self, sp: _Spectrum, k: int) -> bool:
        return sp.S is not None and sp.S.numel() >= k and float(sp.S[k - 1]) > RANK_RTOL * float(sp.S[0])

    def __call__(self, item: _Item) -> _ItemResult:
        o = self.opts
        origin = Path(item.origin)
        w0 = self._load(origin, item.name, check_finite=True)
        w0_64 = w0.to(torch.float64)
        w0_norm = float(torch.linalg.matrix_norm(w0_64))
        rows, spectra, masks = [], {}, {}
        want_mask = {r for p in item.pairs for r in p}
        for spec in item.runs:
            order = [len(spec.paths) - 1] + list(range(len(spec.paths) - 1))  # final first
            final: _Spectrum | None = None
            run_rows = {}
            for idx in order:
                path = spec.paths[idx]
                w = self._load(path, item.name, check_finite=False)
                if tuple(w.shape) != item.shape:
                    raise CheckpointError(f"{path}: tensor {item.name} has shape {list(w.shape)}; "
                                          f"origin has {list(item.shape)}")
                if idx == len(spec.paths) - 1 and spec.name in want_mask:
                    masks[spec.name] = bf16_visible_mask(w0, w, eta=o.eta)
                d = w.to(torch.float64).sub_(w0_64)  # [m, n] ΔW_t, exact for bf16/fp32 inputs; in place
                del w
                sp = self._spectrum(d, path, item.name)
                del d
                if final is None:
                    final = sp
                run_rows[idx] = self._row(spec, idx, item, sp, final, w0_norm)
                if o.keep_spectra and sp.S is not None:
                    spectra[(spec.name, spec.steps[idx], item.name)] = sp.S.clone()
            rows += [run_rows[i] for i in range(len(spec.paths))]
        counts = []
        for a, b in item.pairs:
            ma, mb = masks[a], masks[b]
            counts.append({"run_a": a, "run_b": b, "name": item.name, "type": item.type,
                           "numel": ma.numel(), "n_a": int(ma.sum()), "n_b": int(mb.sum()),
                           "n_ab": int((ma & mb).sum()),
                           "overlap_a_in_b": one_sided_overlap(ma, mb), "overlap_b_in_a": one_sided_overlap(mb, ma),
                           "jaccard": jaccard(ma, mb)})
        return _ItemResult(item.origin, item.name, rows, counts, spectra)

    def _row(self, spec: RunSpec, idx: int, item: _Item, sp: _Spectrum, final: _Spectrum, w0_norm: float):
        o = self.opts
        nan = float("nan")
        if sp.S is None:
            srank = hill = sim = nan
        else:
            srank = stable_rank(sp.fro**2, min(float(sp.S[0]), sp.fro))
            hill = hill_alpha(sp.S, o.k_hill) if self._defined(sp, o.k_hill) else nan
            if self._defined(sp, o.sim_k) and self._defined(final, o.sim_k):
                sim = subspace_similarity(sp.V, final.V, o.sim_k)
            else:
                sim = nan
        return {
            "run": spec.name,
            "step": spec.steps[idx],
            "progress": spec.progress[idx],
            "name": item.name,
            "type": item.type,
            "stable_rank": srank,
            "fro_norm": sp.fro,
            "rel_fro_norm": sp.fro / w0_norm if w0_norm > 0 else nan,
            "hill_alpha": hill,
            "sim_to_final": sim,
        }


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
        from opdgeo.checkpoints import TYPES

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
    settings = asdict(opts)
    settings.pop("workers")
    settings.pop("keep_spectra")
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


# ------------------------------------------------------------------------------ output


def _cell(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return value


def _csv(rows, columns) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        writer.writerow([_cell(r.get(c)) for c in columns])
    return buf.getvalue()


