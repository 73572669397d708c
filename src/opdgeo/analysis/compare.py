"""Pairwise diagnostics of a base -> fine-tuned checkpoint pair (SPEC §1).

``compare(base, tuned, **options)`` streams the two checkpoints tensor by tensor (one pair
per worker in memory), computes

- bf16-aware update sparsity and visible density for every floating-point tensor;
- for the geometry matrix set only (q, k, v, o, gate, up, down): principal-angle rotation
  of the top-k left/right singular subspaces, the normalized spectral shift over all
  singular values, and the overlap of the update mask with the principal and
  low-magnitude masks of W0;

and aggregates them as the SPEC says. All the numerics are the functions of
``opdgeo.geometry``; all the reading is ``opdgeo.checkpoints``; this module only decides
what to compute for which tensor, in which order, and how to pool it.

Cheapest exact path per matrix: a cache-blocked bitwise bf16 count for sparsity and the
non-finite check in the same pass (``bf16_unchanged_count``: no float copy, no full-size
mask; the update mask is built only when the overlaps need it); singular values only where vectors are not needed (``nss`` alone); the top
``max(k, rank)`` vectors of W0 and the top ``k`` of W+ otherwise; the base's decomposition
and its principal/low-magnitude masks (functions of W0 alone) from the on-disk cache
(``cache=DIR``) when it is warm, so a warm run does only the tuned side's work.

Work is split across threads (``workers``) and across torchrun processes (an initialized
``torch.distributed`` group: each rank takes a cost-balanced shard of the tensors, and the
rows are gathered so that every rank returns the same result; the CLI writes on rank 0).
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from opdgeo.analysis.cache import SvdCache
from opdgeo.analysis.files import atomic_write_text, json_safe
from opdgeo.analysis.parallel import all_gather, map_ordered, shard_for_rank
from opdgeo.analysis.progress import progress_bar
from opdgeo.errors import ConfigError, OpdgeoError

__all__ = [
    "METRICS",
    "COLUMNS",
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
EXTRA_COLUMNS = ("legacy_sparsity", "note")

# Per-matrix columns averaged (unweighted) over the geometry set -> summary key.
SUMMARY_MEAN_KEYS = {
    "density": "mean_density",
    "nss": "mean_nss",
    "angle_left_max_deg": "mean_angle_left_max_deg",
    "angle_right_max_deg": "mean_angle_right_max_deg",
    "principal_overlap": "mean_principal_overlap",
    "low_magnitude_overlap": "mean_low_magnitude_overlap",
}


@dataclass(frozen=True)
class CompareOptions:
    """Settings of one comparison (SPEC §1); ``validate()`` lists every problem at once.

    Attributes:
        metrics: subset of ``METRICS``; ``sparsity`` is always computed (it is also the
            update mask of the overlaps) for every floating tensor, the others only for
            the geometry matrix set.
        k: principal-angle subspace size, capped per matrix at ``min(m, n)``.
        rank: rank r of the W0 reconstruction behind the principal mask; must be
            ``<= min(m, n)`` of every geometry matrix when ``overlap`` is requested.
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
    """

    metrics: tuple[str, ...] = METRICS
    k: int = 512
    rank: int = 64
    alpha: float = 0.3
    eta: float = 1e-3
    legacy_atol: float | None = None
    precision: str = "fp64"
    device: str = "cpu"
    workers: int = 1
    keep_angles: bool = False

    def validate(self) -> None:
        """Raise ``ConfigError`` listing every invalid field (one line)."""
        problems = []
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            problems.append(f"--metrics: unknown {', '.join(map(repr, unknown))} (choose from {', '.join(METRICS)})")
        if not isinstance(self.k, int) or self.k < 1:
            problems.append(f"--k must be an integer >= 1; got {self.k!r}")
        if not isinstance(self.rank, int) or self.rank < 1:
            problems.append(f"--rank must be an integer >= 1; got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            problems.append(f"--alpha must be in [0, 1]; got {self.alpha!r}")
        if not (isinstance(self.eta, (int, float)) and 0.0 <= self.eta < 1.0 and math.isfinite(self.eta)):
            problems.append(f"--eta must be in [0, 1); got {self.eta!r}")
        if self.legacy_atol is not None and not (
            isinstance(self.legacy_atol, (int, float)) and self.legacy_atol >= 0 and math.isfinite(self.legacy_atol)
        ):
            problems.append(f"--legacy-atol must be a finite number >= 0; got {self.legacy_atol!r}")
        if self.precision not in PRECISIONS:
            problems.append(f"--precision must be fp64 or fp32; got {self.precision!r}")
        if not isinstance(self.workers, int) or self.workers < 1:
            problems.append(f"--workers must be an integer >= 1; got {self.workers!r}")
        device = str(self.device)
        if device == "cuda" or device.startswith("cuda:"):
            if not torch.cuda.is_available():
                problems.append(f"--device {device}: CUDA is not available on this machine")
            elif device.startswith("cuda:"):
                index = device.split(":", 1)[1]
                if not index.isdigit() or int(index) >= torch.cuda.device_count():
                    problems.append(f"--device {device}: no such CUDA device ({torch.cuda.device_count()} visible)")
        elif device != "cpu":
            problems.append(f"--device must be cpu, cuda or cuda:N; got {device!r}")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]


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

    def write(self, out_dir: str | os.PathLike) -> list[Path]:
        """Write ``matrices.csv``, ``summary.json``, ``summary.md`` (and
        ``angles.safetensors`` when angle vectors were kept) into ``out_dir``.

        Each file is written to a temporary name and renamed into place.
        """
        out = Path(out_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"--out {out}: cannot create the folder ({err.strerror})") from None
        paths = [out / "matrices.csv", out / "summary.json", out / "summary.md"]
        atomic_write_text(paths[0], self.to_csv())
        atomic_write_text(paths[1], json.dumps(json_safe(self.summary), indent=2) + "\n")
        atomic_write_text(paths[2], self.to_markdown())
        if self.angles:
            from safetensors.torch import save_file

            tensors = {}
            for name, sides in self.angles.items():
                for side, values in sides.items():
                    tensors[f"{name}.{side}"] = torch.as_tensor(values, dtype=torch.float64)
            path = out / "angles.safetensors"
            tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
            save_file(tensors, str(tmp), metadata={"unit": "degrees", "order": "ascending"})
            os.replace(tmp, path)
            paths.append(path)
        return paths

    def to_csv(self) -> str:
        """``matrices.csv`` as text: empty cell for ``None``, full ``repr`` precision."""
        import io

        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        columns = COLUMNS + EXTRA_COLUMNS
        writer.writerow(columns)
        for row in self.matrices:
            writer.writerow(["" if row.get(c) is None else _cell(row[c]) for c in columns])
        return buf.getvalue()

    def to_markdown(self) -> str:
        """``summary.md``: the headline numbers and the per-type table."""
        s = self.summary
        lines = ["# opdgeo compare", ""]
        lines.append(f"- base: `{s['settings']['base']}`")
        lines.append(f"- tuned: `{s['settings']['tuned']}`")
        lines.append(f"- tensors: {s['n_tensors']} ({s['n_params']:,} parameters), geometry matrices: {s['n_matrices']}")
        lines.append(f"- global sparsity (parameter-weighted, bf16-aware): {format_percent(s['global_sparsity'])}")
        for key in SUMMARY_MEAN_KEYS.values():
            lines.append(f"- {key}: {format_value(s[key], key)}")
        if s.get("global_legacy_sparsity") is not None:
            lines.append(f"- global legacy sparsity (|Δ| ≤ {s['settings']['legacy_atol']}): {format_percent(s['global_legacy_sparsity'])}")
        lines += ["", "## By type", ""]
        head = ["type", "tensors", "params", "sparsity", *SUMMARY_MEAN_KEYS.values()]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for t, d in s["by_type"].items():
            cells = [t, str(d["n_tensors"]), f"{d['n_params']:,}", format_percent(d["sparsity"])]
            cells += [format_value(d[key], key) for key in SUMMARY_MEAN_KEYS.values()]
            lines.append("| " + " | ".join(cells) + " |")
        if s["by_layer"]:
            lines += ["", "## By layer", "", "| layer | params | sparsity |", "|---|---|---|"]
            for layer, d in s["by_layer"].items():
                lines.append(f"| {layer} | {d['n_params']:,} | {format_percent(d['sparsity'])} |")
        if s["non_finite"]:
            lines += ["", "## Non-finite weights", ""]
            lines += [f"- `{item['name']}`: {item['note']}" for item in s["non_finite"]]
        return "\n".join(lines) + "\n"


def compare(
    base,
    tuned,
    *,
    metrics: Sequence[str] | str | None = None,
    k: int = 512,
    rank: int = 64,
    alpha: float = 0.3,
    eta: float = 1e-3,
    legacy_atol: float | None = None,
    precision: str = "fp64",
    device: str = "cpu",
    workers: int = 1,
    cache: str | os.PathLike | SvdCache | None = None,
    ignore_missing: bool = False,
    allow_pickle: bool = False,
    progress: bool = False,
    keep_angles: bool = False,
) -> CompareResult:
    """Diagnose the update from ``base`` to ``tuned`` (SPEC §1).

    Args:
        base, tuned: checkpoints — an HF folder, a ``.safetensors`` file, a local-cache
            model id, or an opened ``opdgeo.checkpoints.Checkpoint``.
        metrics: names from ``METRICS`` (a list or a comma-separated string); ``None``
            means all. ``sparsity`` is always included.
        k, rank, alpha, eta, legacy_atol, precision, device, workers, keep_angles: see
            ``CompareOptions``.
        cache: a folder (or ``SvdCache``) holding the base's decompositions (and, with
            ``overlap``, its two masks as packed bits under ``masks/``); reused when
            warm, filled when cold.
        ignore_missing: skip tensors present in only one checkpoint instead of failing.
        allow_pickle: allow ``pytorch_model*.bin`` (loaded with ``weights_only=True``).
        progress: show a rich progress bar on stderr (rank 0 only).

    Returns:
        ``CompareResult``; the same on every rank of a distributed run.

    Raises:
        ConfigError: invalid options, or ``rank`` larger than some matrix allows (every
            offending tensor named), before any tensor is read.
        CheckpointError: unreadable checkpoints, one-sided tensors (without
            ``ignore_missing``), shape mismatches.
    """
    from opdgeo.checkpoints import open_checkpoint

    if metrics is None:
        metrics = METRICS
    elif isinstance(metrics, str):
        metrics = tuple(m.strip() for m in metrics.split(",") if m.strip())
    requested = tuple(m for m in METRICS if m in set(metrics) | {"sparsity"})
    opts = CompareOptions(
        metrics=requested + tuple(m for m in metrics if m not in METRICS),
        k=k,
        rank=rank,
        alpha=alpha,
        eta=eta,
        legacy_atol=legacy_atol,
        precision=precision,
        device=str(device),
        workers=workers,
        keep_angles=keep_angles,
    )
    opts.validate()
    svd_cache = cache if isinstance(cache, SvdCache) or cache is None else SvdCache(cache)

    t0 = time.perf_counter()
    base_ckpt = base if hasattr(base, "load") else open_checkpoint(base, allow_pickle=allow_pickle)
    tuned_ckpt = tuned if hasattr(tuned, "load") else open_checkpoint(tuned, allow_pickle=allow_pickle)
    plan = _plan(base_ckpt, tuned_ckpt, opts, ignore_missing)

    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank_id, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    mine = shard_for_rank(plan, rank_id, world, cost=lambda item: item.cost)

    counters = _Counters()
    worker = _Worker(base_ckpt, tuned_ckpt, opts, svd_cache, counters)
    rows: list[dict[str, Any]] = []
    angles: dict[str, dict[str, Any]] = {}
    error: str | None = None
    try:
        with progress_bar("compare", progress and rank_id == 0, sum(item.numel for item in mine), "of parameters") as advance:
            for item, (row, ang) in zip(mine, map_ordered(worker, mine, opts.workers)):
                rows.append(row)
                if ang is not None:
                    angles[item.name] = ang
                advance(item.numel)
    except OpdgeoError as err:
        if not distributed:
            raise
        error = f"{type(err).__name__}\t{err}"

    stats = counters.as_dict()
    if distributed:
        # every rank learns every rank's rows (and errors), so all fail or finish together
        gathered = all_gather((error, rows, angles, stats))
        errors = [e for e, *_ in gathered if e is not None]
        if errors:
            kind, message = errors[0].split("\t", 1)
            from opdgeo import errors as err_mod

            raise getattr(err_mod, kind, OpdgeoError)(message)
        by_name = {}
        for _, r, a, _ in gathered:
            by_name.update({row["name"]: row for row in r})
            angles.update(a)
        rows = [by_name[item.name] for item in plan]
        stats = _sum_stats([s for *_, s in gathered])
    stats["world"] = world
    stats["elapsed_s"] = time.perf_counter() - t0

    geometry_names = {item.name for item in plan if item.geometry}
    summary = summarize(rows, geometry_names, opts, base=str(getattr(base_ckpt, "path", base)), tuned=str(getattr(tuned_ckpt, "path", tuned)))
    return CompareResult(matrices=rows, summary=summary, angles=angles if keep_angles else {}, stats=stats)


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class _Item:
    """One tensor to compare: what to compute for it, and its cost for load balancing."""

    name: str
    layer: int | None
    type: str
    shape: tuple[int, ...]
    numel: int
    geometry: bool  # in the geometry matrix set: angles/nss/overlap apply, density is pooled
    k: int  # angle subspace size, capped at min(m, n)
    n_base_vectors: int  # vectors of W0 needed (angles: k, overlap: rank)
    cost: float


def _plan(base, tuned, opts: CompareOptions, ignore_missing: bool) -> list[_Item]:
    """Pair the names, classify each tensor, and validate ``rank`` against every matrix."""
    from opdgeo.checkpoints import is_geometry_matrix, pair_names, parse_tensor_name

    names = pair_names(base, tuned, ignore_missing=ignore_missing)
    wants = set(opts.metrics)
    items, too_small = [], []
    for name in names:
        info = base.info(name)
        if not info.dtype.is_floating_point:
            continue  # integer buffers (e.g. position ids) are not weights
        shape = tuple(int(s) for s in info.shape)
        parsed = parse_tensor_name(name)
        geometry = bool(is_geometry_matrix(name, shape))
        k_eff, n_vec, cost = 0, 0, float(info.numel)
        if geometry and wants - {"sparsity"}:
            m, n = shape
            p = min(m, n)
            if "overlap" in wants and opts.rank > p:
                too_small.append((name, p))
            k_eff = min(opts.k, p) if "angles" in wants else 0
            n_vec = min(max(k_eff, opts.rank if "overlap" in wants else 0), p)
            cost += 2.0 * m * n * p  # two SVDs dominate: O(m n min(m, n))
        items.append(
            _Item(name, parsed.layer, parsed.type, shape, int(info.numel), geometry, k_eff, n_vec, cost)
        )
    if too_small:
        listed = "; ".join(f"min(m, n) = {p} for {name}" for name, p in too_small[:3])
        more = f" (and {len(too_small) - 3} more)" if len(too_small) > 3 else ""
        raise ConfigError(f"--rank must be <= min(m, n) of every matrix; got {opts.rank}, but {listed}{more}")
    return items


# --------------------------------------------------------------------------- per tensor


class _Counters:
    """Thread-safe counts of the expensive steps (for stats and tests)."""

    def __init__(self):
        import threading

        self._lock = threading.Lock()
        self.counts = {"base_svds": 0, "tuned_svds": 0, "cache_hits": 0, "cache_misses": 0, "tensors": 0}

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

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
    """Computes one tensor's row; called from ``map_ordered`` threads (holds no state
    between calls except the thread-safe counters and cache)."""

    def __init__(self, base, tuned, opts: CompareOptions, cache: SvdCache | None, counters: _Counters):
        self.base, self.tuned, self.opts, self.cache, self.counters = base, tuned, opts, cache, counters

    def __call__(self, item: _Item) -> tuple[dict[str, Any], dict[str, Any] | None]:
        from opdgeo.geometry.sparsity import bf16_unchanged_count, legacy_unchanged_mask

        opts = self.opts
        device = torch.device(opts.device)
        w0 = self.base.load(item.name).to(device)
        w1 = self.tuned.load(item.name).to(device)
        self.counters.add("tensors")
        row: dict[str, Any] = {c: None for c in COLUMNS + EXTRA_COLUMNS}
        row.update(
            name=item.name,
            layer=item.layer,
            type=item.type,
            shape="x".join(map(str, item.shape)),
            numel=item.numel,
        )
        # One cache-blocked pass: the unchanged count and the NaN/Inf counts, no mask.
        counts = bf16_unchanged_count(w0, w1, eta=opts.eta)
        row["sparsity"] = counts.sparsity
        row["density"] = 1.0 - row["sparsity"] if item.numel else float("nan")
        if opts.legacy_atol is not None:
            legacy = legacy_unchanged_mask(w0, w1, atol=opts.legacy_atol)
            row["legacy_sparsity"] = int(torch.count_nonzero(legacy)) / item.numel if item.numel else float("nan")
            del legacy

        note = _non_finite_note(counts)
        if note:
            row["note"] = note
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
        from opdgeo.geometry.angles import principal_angles
        from opdgeo.geometry.masks import low_magnitude_mask, mask_overlap, principal_mask
        from opdgeo.geometry.spectrum import normalized_spectral_shift, singular_values, top_singular_subspaces

        opts, wants = self.opts, set(self.opts.metrics)
        dtype = opts.dtype

        # W0: all singular values + top n_base_vectors vectors, from the cache when warm
        S0 = U0 = V0 = None
        key = None
        if self.cache is not None:
            key = self.base.content_key(item.name)
            hit = self.cache.get(key, n_vectors=item.n_base_vectors, precision=opts.precision)
            self.counters.add("cache_hits" if hit is not None else "cache_misses")
            if hit is not None:
                device = w0.device
                S0, U0, V0 = hit.S.to(device), hit.U.to(device), hit.V.to(device)
        if S0 is None:
            self.counters.add("base_svds")
            if item.n_base_vectors > 0:
                sub = top_singular_subspaces(w0, item.n_base_vectors, dtype=dtype)
                S0, U0, V0 = sub.S, sub.U, sub.V
            else:
                S0 = singular_values(w0, dtype=dtype)
                U0 = torch.zeros(item.shape[0], 0, dtype=dtype, device=w0.device)
                V0 = torch.zeros(item.shape[1], 0, dtype=dtype, device=w0.device)
            if self.cache is not None:
                self.cache.put(key, n_vectors=item.n_base_vectors, precision=opts.precision, S=S0, U=U0, V=V0)

        # W+: top-k vectors only if angles are wanted, else singular values only
        angles = None
        if "angles" in wants:
            self.counters.add("tuned_svds")
            sub1 = top_singular_subspaces(w1, item.k, dtype=dtype)
            S1 = sub1.S
            left = torch.rad2deg(principal_angles(U0[:, : item.k], sub1.U).to(torch.float64))
            right = torch.rad2deg(principal_angles(V0[:, : item.k], sub1.V).to(torch.float64))
            row["angle_left_max_deg"] = float(left.max())
            row["angle_left_mean_deg"] = float(left.mean())
            row["angle_right_max_deg"] = float(right.max())
            row["angle_right_mean_deg"] = float(right.mean())
            if opts.keep_angles:
                angles = {"left": left.cpu().numpy(), "right": right.cpu().numpy()}
            del sub1
        elif "nss" in wants:
            self.counters.add("tuned_svds")
            S1 = singular_values(w1, dtype=dtype)
        if "nss" in wants:
            row["nss"] = float(normalized_spectral_shift(S0, S1))

        if "overlap" in wants:
            from opdgeo.geometry.sparsity import bf16_visible_mask

            update = bf16_visible_mask(w0, w1, eta=opts.eta)  # M_upd; only the overlaps need it
            # Both masks depend on W0 only: with a cache they are base work, paid once.
            masks = _load_base_masks(self.cache, key, item, opts) if self.cache is not None else None
            if masks is None:
                pmask = principal_mask(U0, S0, V0, rank=opts.rank, alpha=opts.alpha)
                lmask = low_magnitude_mask(w0, alpha=opts.alpha)
                if self.cache is not None:
                    _store_base_masks(self.cache, key, item, opts, pmask, lmask)
            else:
                pmask, lmask = (m.to(update.device) for m in masks)
            row["principal_overlap"] = float(mask_overlap(pmask, update))
            row["low_magnitude_overlap"] = float(mask_overlap(lmask, update))
            del pmask, lmask
            if not bool(update.any()):
                row["note"] = "no visible update: overlaps undefined (NaN)"
        return angles


# Base masks (principal, low-magnitude) next to the SVD cache: a function of W0's bytes and
# of (rank, alpha, n_vectors, precision) only, stored as packed bits (1/8 byte per entry).
_MASK_CACHE_FORMAT = 1


def _mask_cache_path(cache: SvdCache, content_key: str, item: _Item, opts: CompareOptions) -> Path:
    import hashlib

    from opdgeo import __version__

    payload = json.dumps(
        {
            "content": content_key,
            "rank": opts.rank,
            "alpha": float(opts.alpha),
            "n_vectors": item.n_base_vectors,
            "precision": opts.precision,
            "format": _MASK_CACHE_FORMAT,
            "opdgeo": __version__,
        },
        sort_keys=True,
    )
    key = hashlib.sha256(payload.encode()).hexdigest()
    # safetensors content under a ".bits" suffix: ``*.safetensors`` in the cache folder
    # stay the SVD entries of ``SvdCache`` alone.
    return cache.root / "masks" / key[:2] / f"{key}.bits"


def _load_base_masks(cache: SvdCache, content_key: str, item: _Item, opts: CompareOptions):
    """``(principal_mask, low_magnitude_mask)`` of W0 from the cache, or None (a miss; an
    unreadable or mismatched entry is a miss and gets rewritten)."""
    import numpy as np
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _mask_cache_path(cache, content_key, item, opts)
    if not path.is_file():
        return None
    try:
        packed = load_file(str(path))
        masks = []
        for name in ("principal", "low_magnitude"):
            if packed[name].dtype != torch.uint8 or packed[name].numel() != -(-item.numel // 8):
                return None  # not this matrix's entry (unpackbits would zero-pad silently)
            bits = np.unpackbits(packed[name].numpy(), count=item.numel)  # [m*n] uint8
            masks.append(torch.from_numpy(bits.view(np.bool_)).reshape(item.shape))
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError):
        return None
    return masks[0], masks[1]


def _store_base_masks(cache: SvdCache, content_key: str, item: _Item, opts: CompareOptions, pmask, lmask) -> None:
    """Write both masks atomically (temporary file + rename), as ``SvdCache.put`` does."""
    import tempfile

    import numpy as np
    from safetensors.torch import save_file

    path = _mask_cache_path(cache, content_key, item, opts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: torch.from_numpy(np.packbits(m.detach().to("cpu").reshape(-1).numpy()))
        for name, m in (("principal", pmask), ("low_magnitude", lmask))
    }
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".bits", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"content_key": content_key, "shape": "x".join(map(str, item.shape))})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


# --------------------------------------------------------------------------- aggregation


def summarize(
    rows: list[dict[str, Any]], geometry_names: set[str], opts: CompareOptions, *, base: str, tuned: str
) -> dict[str, Any]:
    """The ``summary.json`` dict from the rows (SPEC §1 pooling).

    - ``global_sparsity`` = Σ unchanged / Σ numel over all floating tensors (tied tensors
      appear once in the rows, so they count once);
    - ``mean_*`` = unweighted mean over the geometry matrices with a finite value (a
      matrix whose metric is NaN — non-finite weights — is left out and listed in
      ``non_finite``); ``None`` when the metric was not requested or no matrix has it;
    - ``by_type``: per type, its parameter-weighted sparsity and the same means;
    - ``by_layer``: per layer index, parameter-weighted sparsity over its tensors.
    """
    def pooled(subset):
        n = sum(r["numel"] for r in subset)
        unchanged = sum(round(r["sparsity"] * r["numel"]) for r in subset)  # exact: counts < 2**53
        out = {"sparsity": unchanged / n if n else None, "n_params": n, "n_tensors": len(subset)}
        if opts.legacy_atol is not None:
            out["legacy_sparsity"] = (
                sum(r["legacy_sparsity"] * r["numel"] for r in subset) / n if n else None
            )
        return out

    def means(subset):
        out = {}
        for column, key in SUMMARY_MEAN_KEYS.items():
            values = [r[column] for r in subset if r.get(column) is not None and math.isfinite(r[column])]
            out[key] = sum(values) / len(values) if values else None
        return out

    summary: dict[str, Any] = {}
    everything = pooled(rows)
    summary["global_sparsity"] = everything["sparsity"]
    geo_rows = [r for r in rows if r["name"] in geometry_names]
    summary.update(means(geo_rows))
    by_type = {}
    for t in _type_order(rows):
        subset = [r for r in rows if r["type"] == t]
        entry = pooled(subset)
        entry.update(means([r for r in subset if r["name"] in geometry_names]))
        entry["n_matrices"] = sum(1 for r in subset if r["name"] in geometry_names)
        by_type[t] = entry
    summary["by_type"] = by_type
    layers = sorted({r["layer"] for r in rows if r["layer"] is not None})
    summary["by_layer"] = {str(layer): pooled([r for r in rows if r["layer"] == layer]) for layer in layers}
    summary["n_tensors"] = len(rows)
    summary["n_params"] = everything["n_params"]
    summary["n_matrices"] = len(geo_rows)
    if opts.legacy_atol is not None:
        summary["global_legacy_sparsity"] = everything["legacy_sparsity"]
    summary["non_finite"] = [
        {"name": r["name"], "note": r["note"]} for r in rows if (r.get("note") or "").startswith("non-finite")
    ]
    settings = asdict(opts)
    settings["metrics"] = list(opts.metrics)
    settings.pop("workers")  # does not change the numbers
    settings.pop("keep_angles")
    from opdgeo import __version__

    settings.update(base=base, tuned=tuned, opdgeo_version=__version__)
    summary["settings"] = settings
    return summary


def _type_order(rows):
    from opdgeo.checkpoints import TYPES

    present = {r["type"] for r in rows}
    return [t for t in TYPES if t in present] + sorted(present - set(TYPES))


# --------------------------------------------------------------------------- helpers


def _cell(value):
    if isinstance(value, float):
        return repr(value)
    return value


def format_percent(x) -> str:
    return "—" if x is None else f"{100 * x:.2f} %"


def format_value(x, key: str) -> str:
    if x is None:
        return "—"
    if "overlap" in key or "density" in key:
        return f"{100 * x:.2f} %"
    if "deg" in key:
        return f"{x:.4g}°"
    return f"{x:.3e}"
