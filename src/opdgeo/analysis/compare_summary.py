"""The ``summary.json`` of a comparison: SPEC §1 pooling of the per-tensor rows, and the
per-expert view of a mixture-of-experts checkpoint.

- ``global_sparsity`` = Σ unchanged / Σ numel over all floating tensors (tied tensors
  appear once in the rows, so they count once);
- ``mean_*`` = unweighted mean over the geometry matrices with a finite value (a matrix
  whose metric is NaN — non-finite weights — is left out and listed in ``non_finite``);
  ``None`` when the metric was not requested or no matrix has it;
- ``by_type``: per type, its parameter-weighted sparsity and the same means;
- ``by_layer``: per layer index, parameter-weighted sparsity over its tensors;
- ``by_expert``: one record per (layer, expert) — an expert of one layer is its own
  network, unrelated to the expert of that index in another layer — with the
  parameter-weighted sparsity of its matrices, their mean density and mean NSS, and the
  expert's whole update norm ‖ΔW‖_F = sqrt(Σ over its matrices of ‖ΔW‖_F²); shared
  experts have ``expert = "shared"``; ``[]`` for a dense model;
- ``experts_moved_most``: for each of ``density``, ``nss`` and ``fro_norm``, the
  ``TOP_EXPERTS`` routed experts with the largest value, largest first;
- ``n_rank_capped``: geometry matrices whose principal-mask rank was capped at min(m, n);
- angles with their conditioning (with ``angles``): ``n_angles_not_applicable`` (per side,
  matrices whose k reaches that side's dimension: empty cells, out of every mean),
  ``ill_conditioned_gap`` (the threshold ``ILL_CONDITIONED_GAP``), ``n_ill_conditioned``
  (geometry matrices whose ``rel_gap`` = (σ_k − σ_{k+1})/σ_1 of W0 is below it), and
  ``mean_angle_left_max_deg_well_conditioned`` / ``..._right_...``: the means without
  them (``mean_angle_*_max_deg`` keep every matrix with a value).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["EXPERT_METRICS", "ILL_CONDITIONED_GAP", "SUMMARY_MEAN_KEYS", "TOP_EXPERTS", "angle_conditioning",
           "expert_records", "summarize"]

# Per-matrix columns averaged (unweighted) over the geometry set -> summary key.
SUMMARY_MEAN_KEYS = {
    "density": "mean_density",
    "nss": "mean_nss",
    "angle_left_max_deg": "mean_angle_left_max_deg",
    "angle_right_max_deg": "mean_angle_right_max_deg",
    "principal_overlap": "mean_principal_overlap",
    "low_magnitude_overlap": "mean_low_magnitude_overlap",
}
#: Relative gap (σ_k − σ_{k+1})/σ_1 of W0 below which a matrix's angles count as
#: ill-conditioned (our choice). By Wedin's theorem an update E moves the top-k subspaces
#: by up to ~||E||₂ / (σ_k − σ_{k+1}); fine-tunes have ||E||₂/σ_1 ~ 1e-5 (RLVR) to 1e-3
#: (SFT), so below 1e-4 even an RLVR-sized update can turn the largest angle at the cut
#: by degrees: on SmolLM2-135M at k = 512 of 576 the gap is 4e-5 and the max angle 15–17°
#: while the mean angle is 0.2°.
ILL_CONDITIONED_GAP = 1e-4
#: how many experts ``experts_moved_most`` lists per metric
TOP_EXPERTS = 10
#: the per-expert metrics that rank the experts
EXPERT_METRICS = ("density", "nss", "fro_norm")


def _finite_mean(values) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def _pooled(subset: list[dict], legacy: bool) -> dict[str, Any]:
    n = sum(r["numel"] for r in subset)
    unchanged = sum(round(r["sparsity"] * r["numel"]) for r in subset)  # exact: counts < 2**53
    out = {"sparsity": unchanged / n if n else None, "n_params": n, "n_tensors": len(subset)}
    if legacy:
        out["legacy_sparsity"] = sum(r["legacy_sparsity"] * r["numel"] for r in subset) / n if n else None
    return out


def _means(subset: list[dict]) -> dict[str, Any]:
    return {key: _finite_mean(r.get(column) for r in subset) for column, key in SUMMARY_MEAN_KEYS.items()}


def _type_order(rows):
    from opdgeo.checkpoints import TYPES

    present = {r["type"] for r in rows}
    return [t for t in TYPES if t in present] + sorted(present - set(TYPES))


def expert_records(rows: list[dict[str, Any]], geometry_names: set[str]) -> list[dict[str, Any]]:
    """One record per (layer, expert) of the rows that carry an expert (module docstring),
    routed experts in (layer, index) order, then each layer's shared expert."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("expert") is not None and r["name"] in geometry_names:
            groups.setdefault((r["layer"], r["expert"]), []).append(r)

    def order(key):
        layer, expert = key
        return (-1 if layer is None else layer, isinstance(expert, str), expert if isinstance(expert, int) else 0)

    out = []
    for (layer, expert) in sorted(groups, key=order):
        subset = groups[(layer, expert)]
        norms = [r.get("fro_norm") for r in subset]
        fro = math.sqrt(sum(x * x for x in norms)) if all(x is not None for x in norms) else None
        out.append({"layer": layer, "expert": expert, "n_matrices": len(subset),
                    "n_params": sum(r["numel"] for r in subset), "sparsity": _pooled(subset, False)["sparsity"],
                    "density": _finite_mean(r["density"] for r in subset),
                    "nss": _finite_mean(r.get("nss") for r in subset),
                    "fro_norm": fro if fro is None or math.isfinite(fro) else None})
    return out


def _moved_most(experts: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    routed = [e for e in experts if isinstance(e["expert"], int)]
    out = {}
    for metric in EXPERT_METRICS:
        ranked = sorted((e for e in routed if e[metric] is not None), key=lambda e: -e[metric])[:TOP_EXPERTS]
        out[metric] = [{"layer": e["layer"], "expert": e["expert"], metric: e[metric]} for e in ranked]
    return out


def angle_conditioning(geo_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary's angle-conditioning keys (module docstring) from the geometry rows."""
    with_gap = [r for r in geo_rows if r.get("rel_gap") is not None]
    ill = [r for r in with_gap if math.isfinite(r["rel_gap"]) and r["rel_gap"] < ILL_CONDITIONED_GAP]
    well = [r for r in geo_rows if r not in ill]
    note = lambda r, side: f"angles {side}:" in (r.get("note") or "")  # noqa: E731
    return {
        "n_angles_not_applicable": {side: sum(1 for r in geo_rows if note(r, side)) for side in ("left", "right")},
        "ill_conditioned_gap": ILL_CONDITIONED_GAP,
        "n_ill_conditioned": len(ill),
        "mean_angle_left_max_deg_well_conditioned": _finite_mean(r.get("angle_left_max_deg") for r in well),
        "mean_angle_right_max_deg_well_conditioned": _finite_mean(r.get("angle_right_max_deg") for r in well),
    }


def summarize(rows: list[dict[str, Any]], geometry_names: set[str], opts, settings: dict[str, Any]) -> dict[str, Any]:
    """The ``summary.json`` dict from the rows (module docstring).

    Args:
        rows: the per-tensor rows of ``compare``.
        geometry_names: the names in the geometry matrix set.
        opts: the ``CompareOptions`` of the run.
        settings: the ``settings`` entry (options that change the numbers, inputs, version).
    """
    legacy = opts.legacy_atol is not None
    summary: dict[str, Any] = {}
    everything = _pooled(rows, legacy)
    summary["global_sparsity"] = everything["sparsity"]
    geo_rows = [r for r in rows if r["name"] in geometry_names]
    summary.update(_means(geo_rows))
    by_type = {}
    for t in _type_order(rows):
        subset = [r for r in rows if r["type"] == t]
        entry = _pooled(subset, legacy)
        entry.update(_means([r for r in subset if r["name"] in geometry_names]))
        entry["n_matrices"] = sum(1 for r in subset if r["name"] in geometry_names)
        by_type[t] = entry
    summary["by_type"] = by_type
    layers = sorted({r["layer"] for r in rows if r["layer"] is not None})
    summary["by_layer"] = {str(layer): _pooled([r for r in rows if r["layer"] == layer], legacy) for layer in layers}
    summary["n_tensors"] = len(rows)
    summary["n_params"] = everything["n_params"]
    summary["n_matrices"] = len(geo_rows)
    if legacy:
        summary["global_legacy_sparsity"] = everything["legacy_sparsity"]
    summary["non_finite"] = [
        {"name": r["name"], "note": r["note"]} for r in rows if (r.get("note") or "").startswith("non-finite")
    ]
    summary["settings"] = settings
    experts = expert_records(rows, geometry_names)
    summary["by_expert"] = experts
    summary["experts_moved_most"] = _moved_most(experts)
    summary["n_rank_capped"] = sum(1 for r in geo_rows if r.get("rank") is not None and r["rank"] < opts.rank)
    summary.update(angle_conditioning(geo_rows))
    return summary
