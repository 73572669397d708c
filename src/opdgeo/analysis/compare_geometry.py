"""The geometry columns of one matrix of a comparison: which decomposition each side gets,
and the angles, NSS and overlaps computed from them (SPEC §1).

Cheapest exact route per side, one decomposition per matrix per side, shared by every
metric that needs it (``geometry`` holds the numerics; this module only chooses):

- **base (W0)**: all singular values plus the top ``max(k, rank)`` vectors when angles or
  overlaps are wanted (``top_singular_subspaces``), else all singular values only
  (``singular_values``); from the cache when warm. The principal mask uses the rank-r
  reconstruction from these factors only.
- **tuned (W+)**, angles wanted: with NSS too, one dense decomposition gives the values and
  the vectors together; without NSS, the base's top-k block warm-starts a block subspace
  iteration (``warm_top_subspaces``), used when it certifies convergence, else the dense
  decomposition. NSS alone: singular values only.

A side whose k reaches its dimension (k = m for the left side, k = n for the right) spans
the whole space: its angles are 0 by construction, so they are reported as not applicable
(empty cells, a note), never as 0. ``rel_gap`` = (σ_k − σ_{k+1})/σ_1 of W0 sits beside the
angles: where it is small the largest angle follows the gap, not the update.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ROUTES", "matrix_geometry", "not_applicable_note"]

#: the tuned side's routes, as counted in ``CompareResult.stats["tuned_routes"]``
ROUTES = ("dense", "warm", "values")


def not_applicable_note(side: str, k: int, dim: int) -> str:
    """The note of a side whose angles do not apply (k reaches the dimension)."""
    return f"angles {side}: k = {k} spans the whole {dim}-dim space (not applicable)"


def _append_note(row: dict[str, Any], note: str) -> None:
    row["note"] = note if not row.get("note") else f"{row['note']}; {note}"


def _base_side(item, w0, opts, cache, key, counters):
    """``(S0, U0, V0)`` of W0: all singular values and the top ``item.n_base_vectors``."""
    from opdgeo.geometry.spectrum import singular_values, top_singular_subspaces

    dtype = opts.dtype
    if cache is not None:
        hit = cache.get(key, n_vectors=item.n_base_vectors, precision=opts.precision)
        counters.add("cache_hits" if hit is not None else "cache_misses")
        if hit is not None:
            return hit.S.to(w0.device), hit.U.to(w0.device), hit.V.to(w0.device)
    counters.add("base_svds")
    if item.n_base_vectors > 0:
        sub = top_singular_subspaces(w0, item.n_base_vectors, dtype=dtype)
        S0, U0, V0 = sub.S, sub.U, sub.V
    else:
        S0 = singular_values(w0, dtype=dtype)
        U0 = torch.zeros(item.shape[0], 0, dtype=dtype, device=w0.device)
        V0 = torch.zeros(item.shape[1], 0, dtype=dtype, device=w0.device)
    if cache is not None:
        cache.put(key, n_vectors=item.n_base_vectors, precision=opts.precision, S=S0, U=U0, V=V0)
    return S0, U0, V0


def _tuned_side(item, w0, w1, base, opts, counters):
    """``(S1, U1, V1)`` of W+ by the cheapest exact route (module docstring); ``None`` parts
    are not needed by the metrics requested."""
    from opdgeo.geometry.norms import update_norms
    from opdgeo.geometry.spectrum import singular_values, top_singular_subspaces
    from opdgeo.geometry.warmstart import update_norm_estimate, warm_top_subspaces

    wants = set(opts.metrics)
    S0, _, V0 = base
    m, n = item.shape
    vectors = "angles" in wants and item.k < max(m, n)  # some side applies
    if not vectors:
        if "nss" not in wants:
            return None, None, None
        counters.add("tuned_svds")
        counters.route("values")
        return singular_values(w1, dtype=opts.dtype), None, None
    counters.add("tuned_svds")
    if "nss" not in wants and opts.dtype == torch.float64 and item.k < min(m, n):
        fro, _ = update_norms(w0, w1)
        warm = warm_top_subspaces(w1, V0, item.k, sigma0=S0, delta_fro=fro,
                                  delta_norm=update_norm_estimate(w0, w1))
        if warm.converged:
            counters.route("warm")
            return None, warm.U, warm.V
    counters.route("dense")
    sub = top_singular_subspaces(w1, item.k, dtype=opts.dtype)
    return sub.S, sub.U, sub.V


def _angles(item, base, tuned, row, keep: bool):
    """Fill the angle columns (and ``rel_gap``, ``k``); the kept vectors, or None."""
    from opdgeo.geometry.angles import principal_angles
    from opdgeo.geometry.spectrum import relative_gap

    S0, U0, V0 = base
    _, U1, V1 = tuned
    m, n = item.shape
    k = item.k
    row["k"] = k
    row["rel_gap"] = relative_gap(S0, k)
    kept = {}
    for side, dim, A, B in (("left", m, U0, U1), ("right", n, V0, V1)):
        if k >= dim:
            _append_note(row, not_applicable_note(side, k, dim))
            kept[side] = torch.zeros(0, dtype=torch.float64).numpy()
            continue
        theta = torch.rad2deg(principal_angles(A[:, :k], B).to(torch.float64))
        row[f"angle_{side}_max_deg"] = float(theta.max())
        row[f"angle_{side}_mean_deg"] = float(theta.mean())
        kept[side] = theta.cpu().numpy()
    return kept if keep else None


def _overlaps(item, w0, w1, base, opts, cache, key, row) -> None:
    """Fill the principal and low-magnitude overlap columns."""
    from opdgeo.geometry.masks import low_magnitude_mask, mask_overlap, principal_mask
    from opdgeo.geometry.sparsity import bf16_visible_mask

    S0, U0, V0 = base
    update = bf16_visible_mask(w0, w1, eta=opts.eta)  # M_upd; only the overlaps need it
    # Both masks depend on W0 only: with a cache they are base work, paid once.
    mask_key = dict(rank=item.rank, alpha=opts.alpha, n_vectors=item.n_base_vectors, precision=opts.precision)
    masks = cache.get_masks(key, shape=item.shape, **mask_key) if cache is not None else None
    if masks is None:
        pmask = principal_mask(U0, S0, V0, rank=item.rank, alpha=opts.alpha)  # rank-r reconstruction only
        lmask = low_magnitude_mask(w0, alpha=opts.alpha)
        if cache is not None:
            cache.put_masks(key, **mask_key, principal=pmask, low_magnitude=lmask)
    else:
        pmask, lmask = (m.to(update.device) for m in masks)
    row["principal_overlap"] = float(mask_overlap(pmask, update))
    row["low_magnitude_overlap"] = float(mask_overlap(lmask, update))
    if not bool(update.any()):
        _append_note(row, "no visible update: overlaps undefined (NaN)")


def matrix_geometry(item, w0, w1, row: dict[str, Any], *, opts, cache, key, counters) -> dict[str, Any] | None:
    """Fill ``row``'s angle, NSS and overlap columns for one finite geometry matrix.

    Args:
        item: the planned matrix (``shape``, capped ``k`` and ``rank``, ``n_base_vectors``).
        w0, w1: the base and tuned tensors (same shape, finite).
        row: the matrix's row, updated in place.
        opts: the ``CompareOptions``; ``cache``: an ``SvdCache`` or None, ``key`` the
            base tensor's content key; ``counters``: the run's thread-safe counters.

    Returns:
        ``{"left": ndarray, "right": ndarray}`` of all angles in degrees with
        ``keep_angles`` (empty for a side that does not apply), else None.
    """
    from opdgeo.geometry.spectrum import normalized_spectral_shift

    wants = set(opts.metrics)
    base = _base_side(item, w0, opts, cache, key, counters)
    tuned = _tuned_side(item, w0, w1, base, opts, counters)
    angles = _angles(item, base, tuned, row, opts.keep_angles) if "angles" in wants else None
    if "nss" in wants:
        row["nss"] = float(normalized_spectral_shift(base[0], tuned[0]))
    if "overlap" in wants:
        _overlaps(item, w0, w1, base, opts, cache, key, row)
    return angles
