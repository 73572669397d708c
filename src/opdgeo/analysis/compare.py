"""Pairwise diagnostics of a base -> fine-tuned checkpoint pair (SPEC §1).

``compare(base, tuned, options)`` streams the two checkpoints tensor by tensor (one pair
per worker in memory), computes

- bf16-aware update sparsity and visible density for every floating-point tensor (and,
  with ``nss``, the update's Frobenius norm ‖ΔW‖_F and ‖ΔW‖_F / ‖W0‖_F);
- for the geometry matrix set only (q, k, v, o, gate, up, down, the experts' included):
  principal-angle rotation of the top-k left/right singular subspaces, the normalized
  spectral shift over all singular values, and the overlap of the update mask with the
  principal and low-magnitude masks of W0;

and aggregates them as the SPEC says (``analysis.compare_summary``; per expert for a
mixture-of-experts checkpoint). All the numerics are the functions of ``opdgeo.geometry``;
all the reading is ``opdgeo.checkpoints``; the work goes through
``opdgeo.analysis.driver``; the files are written by ``opdgeo.report.compare_files``.
This module decides what to compute for which tensor.

Cheapest exact path per matrix: a cache-blocked bitwise bf16 count for sparsity and the
non-finite check in the same pass (``bf16_unchanged_count``: no float copy, no full-size
mask; the update mask is built only when the overlaps need it); singular values only
where vectors are not needed (``nss`` alone); the top ``max(k, rank)`` vectors of W0 and
the top ``k`` of W+ otherwise; the base's decomposition and its principal/low-magnitude
masks (functions of W0 alone) from the on-disk cache (``cache=DIR``) when it is warm, so a
warm run does only the tuned side's work.

``k`` and ``rank`` are capped per matrix at min(m, n); the ``rank`` column says which
rank each matrix's principal mask used.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from opdgeo._version import __version__
from opdgeo.analysis.cache import SvdCache
from opdgeo.analysis.compare_geometry import ROUTES, matrix_geometry
from opdgeo.analysis.compare_summary import SUMMARY_MEAN_KEYS, summarize
from opdgeo.analysis.driver import Matrix, Progress, execute, plan_matrices, resolve_options
from opdgeo.errors import FieldError

__all__ = [
    "METRICS",
    "effective_k",
    "COLUMNS",
    "EXTRA_COLUMNS",
    "SUMMARY_MEAN_KEYS",
    "CompareOptions",
    "CompareResult",
    "compare",
]

METRICS = ("sparsity", "angles", "nss", "overlap")
PRECISIONS = {"fp64": torch.float64, "fp32": torch.float32}

# The stable matrices.csv schema (README): these columns, in this order; extras only after.
COLUMNS = (
    "name",
    "layer",
    "type",
    "shape",
    "numel",
    "sparsity",
    "density",
    "angle_left_max_deg",
    "angle_left_mean_deg",
    "angle_right_max_deg",
    "angle_right_mean_deg",
    "nss",
    "principal_overlap",
    "low_magnitude_overlap",
)
EXTRA_COLUMNS = ("legacy_sparsity", "note", "expert", "fro_norm", "rel_fro_norm", "rank", "k", "rel_gap")


@dataclass(frozen=True)
class CompareOptions:
    """Settings of one comparison (SPEC §1): the one place of their defaults (the CLI and
    the study read them here). ``validate()`` lists every problem at once, naming fields.

    Attributes:
        metrics: subset of ``METRICS`` (a tuple, or a comma-separated string); ``sparsity``
            is always computed (it is also the update mask of the overlaps) for every
            floating tensor, the others only for the geometry matrix set (``nss`` also
            gives ``fro_norm``/``rel_fro_norm`` for every floating tensor).
        k: principal-angle subspace size: an integer, capped per matrix at ``min(m, n)``,
            or a fraction of each matrix's ``min(m, n)`` written ``"a/b"`` (e.g. ``"1/8"``,
            the paper's 512 of 4096), rounded half up, at least 1 (``effective_k``).
        rank: rank r of the W0 reconstruction behind the principal mask, capped per
            matrix at ``min(m, n)`` (the ``rank`` column reports the value used).
        alpha: mask fraction of the principal and low-magnitude masks (our choice: 0.3,
            see SPEC §1).
        eta: relative tolerance of the bf16 unchanged rule.
        legacy_atol: when set, also report Mukherjee et al.'s ``|Δ| <= atol`` sparsity
            in the ``legacy_sparsity`` column. Never the default.
        precision: ``"fp64"`` (default; near-identical matrices need it) or ``"fp32"``
            for the SVDs.
        device: ``"cpu"`` or ``"cuda"``/``"cuda:N"``: where the metrics run.
        workers: threads working on different tensors at once.
        keep_angles: keep every matrix's full angle vectors (degrees) in
            ``CompareResult.angles``.
        cache: a folder (or an ``SvdCache``) holding the base's decompositions and masks;
            reused when warm, filled when cold.
        ignore_missing: skip tensors present in only one checkpoint instead of failing.
        allow_pickle: allow ``pytorch_model*.bin`` (loaded with ``weights_only=True``).
        progress: a progress bar on stderr (rank 0 only).
    """

    metrics: tuple[str, ...] | str | None = METRICS
    k: int | str = 512
    rank: int = 64
    alpha: float = 0.3
    eta: float = 1e-3
    legacy_atol: float | None = None
    precision: str = "fp64"
    device: str = "cpu"
    workers: int = 1
    keep_angles: bool = False
    cache: str | os.PathLike | SvdCache | None = None
    ignore_missing: bool = False
    allow_pickle: bool = False
    progress: bool = False

    #: fields that change how the work runs or what is kept, not the numbers
    RUN_FIELDS = ("workers", "keep_angles", "cache", "ignore_missing", "allow_pickle", "progress")

    def __post_init__(self):
        metrics = METRICS if self.metrics is None else self.metrics
        if isinstance(metrics, str):
            metrics = tuple(m.strip() for m in metrics.split(",") if m.strip())
        requested = tuple(m for m in METRICS if m in set(metrics) | {"sparsity"})
        object.__setattr__(self, "metrics", requested + tuple(m for m in metrics if m not in METRICS))
        object.__setattr__(self, "device", str(self.device))

    def validate(self) -> None:
        """Raise ``FieldError`` listing every invalid field."""
        problems = []
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            problems.append(("metrics", f"unknown {', '.join(map(repr, unknown))} (choose from {', '.join(METRICS)})"))
        if isinstance(self.k, str) and _parse_fraction(self.k) is None:
            problems.append(("k", f"must be an integer >= 1 or a fraction a/b in (0, 1]; got {self.k!r}"))
        elif not isinstance(self.k, str) and not _is_count(self.k):
            problems.append(("k", f"must be an integer >= 1; got {self.k!r}"))
        for name in ("rank", "workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append((name, f"must be an integer >= 1; got {value!r}"))
        if not (_is_number(self.alpha) and 0.0 <= self.alpha <= 1.0):
            problems.append(("alpha", f"must be in [0, 1]; got {self.alpha!r}"))
        if not (_is_number(self.eta) and 0.0 <= self.eta < 1.0):
            problems.append(("eta", f"must be in [0, 1); got {self.eta!r}"))
        if self.legacy_atol is not None and not (_is_number(self.legacy_atol) and self.legacy_atol >= 0):
            problems.append(("legacy_atol", f"must be a finite number >= 0; got {self.legacy_atol!r}"))
        if self.precision not in PRECISIONS:
            problems.append(("precision", f"must be fp64 or fp32; got {self.precision!r}"))
        device = self.device
        if device == "cuda" or device.startswith("cuda:"):
            if not torch.cuda.is_available():
                problems.append(("device", f"{device}: CUDA is not available on this machine"))
            elif device.startswith("cuda:"):
                index = device.split(":", 1)[1]
                if not index.isdigit() or int(index) >= torch.cuda.device_count():
                    problems.append(("device", f"{device}: no such CUDA device ({torch.cuda.device_count()} visible)"))
        elif device != "cpu":
            problems.append(("device", f"must be cpu, cuda or cuda:N; got {device!r}"))
        if problems:
            raise FieldError(problems)

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    def settings(self) -> dict[str, Any]:
        """The fields that change the numbers (``summary.json`` ``settings``)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.RUN_FIELDS}
        out["metrics"] = list(self.metrics)
        return out


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def _parse_fraction(k) -> tuple[int, int] | None:
    """``(a, b)`` for a string ``"a/b"`` with ``0 < a/b <= 1``, else None."""
    if not isinstance(k, str):
        return None
    parts = k.strip().split("/")
    if len(parts) != 2 or not all(x.strip().isdigit() for x in parts):
        return None
    a, b = int(parts[0]), int(parts[1])
    return (a, b) if 0 < a <= b else None


def effective_k(k: int | str, p: int) -> int:
    """The angle subspace size of a matrix with ``p = min(m, n)``: ``min(k, p)`` for an
    integer ``k``; for a fraction ``"a/b"``, ``floor(p·a/b + 1/2)`` (round half up, exact
    integer arithmetic), at least 1."""
    frac = _parse_fraction(k)
    if frac is None:
        return min(int(k), p)
    a, b = frac
    return max(1, min(p, (2 * p * a + b) // (2 * b)))


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class CompareResult:
    """The tables of one comparison.

    Attributes:
        matrices: one row dict per floating-point tensor, keys ``COLUMNS + EXTRA_COLUMNS``,
            ``None`` where a metric does not apply, NaN where it could not be computed
            (the row's ``note`` says why).
        summary: the ``summary.json`` dict (see ``docs/compare.md``).
        angles: with ``keep_angles``, ``{name: {"left": ndarray, "right": ndarray}}`` of
            all k principal angles in degrees, ascending; else empty.
        stats: run statistics that are not results (SVD counts, cache hits, seconds);
            not written to ``summary.json`` so that reruns compare equal.
    """

    matrices: list[dict[str, Any]]
    summary: dict[str, Any]
    angles: dict[str, dict[str, Any]] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    def write(self, out_dir: str | os.PathLike, *, figures: bool = True) -> list[Path]:
        """Write ``matrices.csv``, ``summary.json``, ``summary.md`` (``angles.safetensors``
        when angle vectors were kept; the expert density heatmap for a mixture of experts)
        into ``out_dir``, each file atomically (``opdgeo.report.compare_files``)."""
        from opdgeo.report.compare_files import write_compare

        return write_compare(self, out_dir, figures=figures)

    def to_csv(self) -> str:
        """``matrices.csv`` as text: empty cell for ``None``, full ``repr`` precision."""
        from opdgeo.report.compare_files import matrices_csv

        return matrices_csv(self.matrices)

    def to_markdown(self) -> str:
        """``summary.md``: the headline numbers and the per-type table."""
        from opdgeo.report.compare_files import summary_markdown

        return summary_markdown(self.summary)


def compare(base, tuned, options: CompareOptions | None = None, **fields_) -> CompareResult:
    """Diagnose the update from ``base`` to ``tuned`` (SPEC §1).

    Args:
        base, tuned: checkpoints — an HF folder, a ``.safetensors`` file, a local-cache
            model id, ``smollm2``, or an opened ``opdgeo.checkpoints.Checkpoint``.
        options: ``CompareOptions``; keyword arguments named after its fields override
            them (``compare(base, tuned, k=16, cache="svd/")``).

    Returns:
        ``CompareResult``; the same on every rank of a distributed run.

    Raises:
        FieldError: invalid options (every offending field named), before any tensor is
            read.
        CheckpointError: unreadable checkpoints, one-sided tensors (without
            ``ignore_missing``), shape mismatches.
        TypeError: a keyword that is not a field of ``CompareOptions``.
    """
    from opdgeo.checkpoints import open_checkpoint

    opts = resolve_options(CompareOptions, options, fields_, "compare")
    svd_cache = opts.cache if isinstance(opts.cache, SvdCache) or opts.cache is None else SvdCache(opts.cache)

    t0 = time.perf_counter()
    base_ckpt = base if hasattr(base, "load") else open_checkpoint(base, allow_pickle=opts.allow_pickle)
    tuned_ckpt = tuned if hasattr(tuned, "load") else open_checkpoint(tuned, allow_pickle=opts.allow_pickle,
                                                                       base=base_ckpt)  # base of a LoRA adapter
    plan = _plan(base_ckpt, tuned_ckpt, opts)
    counters = _Counters()
    worker = _Worker(base_ckpt, tuned_ckpt, opts, svd_cache, counters)
    progress = Progress("compare", "of parameters", weight=lambda item: item.numel) if opts.progress else None
    done = execute(plan, worker, cost=lambda item: item.cost, workers=opts.workers, progress=progress,
                   stats=counters.as_dict)
    rows = [row for row, _ in done.results]
    angles = {item.name: ang for item, (_, ang) in zip(plan, done.results) if ang is not None}
    stats = _sum_stats(done.stats)
    stats["world"] = done.world
    stats["elapsed_s"] = time.perf_counter() - t0

    geometry_names = {item.name for item in plan if item.geometry}
    settings = dict(opts.settings(), base=str(getattr(base_ckpt, "path", base)),
                    tuned=str(getattr(tuned_ckpt, "path", tuned)), opdgeo_version=__version__)
    summary = summarize(rows, geometry_names, opts, settings)
    return CompareResult(matrices=rows, summary=summary, angles=angles if opts.keep_angles else {}, stats=stats)


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class _Item(Matrix):
    """One tensor to compare (a planned ``Matrix``): what to compute for it, and its cost
    for load balancing."""

    k: int = 0  # angle subspace size, capped at min(m, n)
    rank: int = 0  # principal-mask rank, capped at min(m, n) (0 when the overlaps do not run)
    n_base_vectors: int = 0  # vectors of W0 needed (angles: k, overlap: rank)
    cost: float = 0.0


def _plan(base, tuned, opts: CompareOptions) -> list[_Item]:
    """Pair the names, classify each tensor, and size each matrix's work."""
    from opdgeo.checkpoints import pair_names

    wants = set(opts.metrics)
    items = []
    for mat in plan_matrices(base, _comparable(base, tuned, pair_names(base, tuned, ignore_missing=opts.ignore_missing))):
        k_eff = rank = n_vec = 0
        cost = float(mat.numel)
        if mat.geometry and wants - {"sparsity"}:
            m, n = mat.shape
            p = min(m, n)
            k_eff = effective_k(opts.k, p) if "angles" in wants else 0
            rank = min(opts.rank, p) if "overlap" in wants else 0
            n_vec = min(max(k_eff, rank), p)
            cost += 2.0 * m * n * p  # two SVDs dominate: O(m n min(m, n))
        items.append(_Item(**{f.name: getattr(mat, f.name) for f in fields(Matrix)}, k=k_eff, rank=rank,
                           n_base_vectors=n_vec, cost=cost))
    return items


def _comparable(base, tuned, names: list[str]) -> list[str]:
    """``names`` after the checks that need both sides' headers, before any tensor is read.

    Raises:
        CheckpointError: a tensor floating-point on one side and integer on the other, a
            zero-size floating-point tensor (no entries, so no sparsity), or no
            floating-point tensor at all (nothing would be compared).
    """
    from opdgeo.errors import CheckpointError

    mixed = [n for n in names if base.info(n).dtype.is_floating_point != tuned.info(n).dtype.is_floating_point]
    if mixed:
        n, more = mixed[0], f" (and {len(mixed) - 1} more)" if len(mixed) > 1 else ""
        raise CheckpointError(f"tensor {n}: {str(base.info(n).dtype).removeprefix('torch.')} in {base.path} but "
                              f"{str(tuned.info(n).dtype).removeprefix('torch.')} in {tuned.path}{more}; both sides "
                              "must be floating-point to be compared")
    floating = [n for n in names if base.info(n).dtype.is_floating_point]
    empty = [n for n in floating if base.info(n).numel == 0]
    if empty:
        n, more = empty[0], f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise CheckpointError(f"{base.path}: tensor {n} has zero size (shape {list(base.info(n).shape)}){more}; "
                              "a tensor without entries has no sparsity or geometry")
    if not floating:
        raise CheckpointError(f"nothing to compare: none of the {len(names)} tensors in common between {base.path} "
                              f"and {tuned.path} is floating-point (integer and bool tensors are not weights)")
    return names


# --------------------------------------------------------------------------- per tensor


class _Counters:
    """Thread-safe counts of the expensive steps (for stats and tests)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts = {"base_svds": 0, "tuned_svds": 0, "cache_hits": 0, "cache_misses": 0, "tensors": 0,
                       **{f"tuned_{r}": 0 for r in ROUTES}}

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def route(self, name: str) -> None:
        """Count the tuned side's route (``compare_geometry.ROUTES``)."""
        self.add(f"tuned_{name}")

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)


def _sum_stats(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {}
    for s in per_rank:
        for key, value in s.items():
            total[key] = total.get(key, 0) + value
    return total


class _Worker:
    """Computes one tensor's row; called from the driver's threads (holds no state
    between calls except the thread-safe counters and cache)."""

    def __init__(self, base, tuned, opts: CompareOptions, cache: SvdCache | None, counters: _Counters):
        self.base, self.tuned, self.opts, self.cache, self.counters = base, tuned, opts, cache, counters

    def __call__(self, item: _Item) -> tuple[dict[str, Any], dict[str, Any] | None]:
        from opdgeo.geometry.norms import update_norms
        from opdgeo.geometry.sparsity import bf16_unchanged_count, legacy_unchanged_count

        opts = self.opts
        device = torch.device(opts.device)
        w0 = self.base.load(item.name).to(device)
        w1 = self.tuned.load(item.name).to(device)
        self.counters.add("tensors")
        row: dict[str, Any] = {c: None for c in COLUMNS + EXTRA_COLUMNS}
        row.update(name=item.name, layer=item.layer, type=item.type, shape="x".join(map(str, item.shape)),
                   numel=item.numel, expert=item.expert)
        # One cache-blocked pass: the unchanged count and the NaN/Inf counts, no mask.
        counts = bf16_unchanged_count(w0, w1, eta=opts.eta)
        row["sparsity"] = counts.sparsity
        row["density"] = 1.0 - row["sparsity"] if item.numel else float("nan")
        if opts.legacy_atol is not None:  # blocked as well: memory of the bf16 count
            legacy = legacy_unchanged_count(w0, w1, atol=opts.legacy_atol)
            row["legacy_sparsity"] = legacy / item.numel if item.numel else float("nan")
        note = _non_finite_note(counts)
        if note:
            row["note"] = note
        if "nss" in opts.metrics:
            fro, base_fro = update_norms(w0, w1) if not note else (float("nan"), float("nan"))
            row["fro_norm"] = fro
            row["rel_fro_norm"] = fro / base_fro if base_fro > 0 else float("nan")
        if item.rank:
            row["rank"] = item.rank
        angles = None
        if item.geometry and set(opts.metrics) - {"sparsity"}:
            if note:
                for column, metric in _GEOMETRY_COLUMNS.items():
                    if metric in opts.metrics:
                        row[column] = float("nan")
            else:
                angles = self._geometry(item, w0, w1, row)
        return row, angles

    def _geometry(self, item: _Item, w0, w1, row) -> dict[str, Any] | None:
        key = self.base.content_key(item.name) if self.cache is not None else None
        return matrix_geometry(item, w0, w1, row, opts=self.opts, cache=self.cache, key=key, counters=self.counters)


_GEOMETRY_COLUMNS = {
    "angle_left_max_deg": "angles",
    "angle_left_mean_deg": "angles",
    "angle_right_max_deg": "angles",
    "angle_right_mean_deg": "angles",
    "nss": "nss",
    "principal_overlap": "overlap",
    "low_magnitude_overlap": "overlap",
}


def _non_finite_note(counts) -> str | None:
    """``None`` if both tensors are finite, else a reason such as
    ``"non-finite weights: base 2 NaN; tuned 1 Inf"``, from the NaN/Inf counts that
    ``bf16_unchanged_count`` gathers in its single pass (no extra pass over the data)."""
    parts = []
    for side, label in enumerate(("base", "tuned")):
        n_nan, n_inf = counts.nan[side], counts.inf[side]
        if not (n_nan or n_inf):
            continue
        what = ", ".join(p for p in (f"{n_nan} NaN" if n_nan else "", f"{n_inf} Inf" if n_inf else "") if p)
        parts.append(f"{label} {what}")
    return "non-finite weights: " + "; ".join(parts) if parts else None
