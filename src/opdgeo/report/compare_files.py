"""The files of ``opdgeo compare --out DIR`` (schemas in docs/compare.md): ``matrices.csv``,
``summary.json``, ``summary.md``, ``angles.safetensors`` (kept angle vectors) and, for a
mixture of experts, the per-layer × per-expert density heatmap ``expert_density.png/svg``.
Also the number formats the CLI prints with."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from opdgeo.files import atomic_write, atomic_write_text
from opdgeo.report.files import csv_text, output_folder, write_json

__all__ = ["format_percent", "format_value", "matrices_csv", "summary_markdown", "write_compare"]


def format_percent(x) -> str:
    """``"12.34 %"`` of a fraction, ``"—"`` for None."""
    return "—" if x is None else f"{100 * x:.2f} %"


def format_value(x, key: str) -> str:
    """A summary value as text: overlaps and densities in percent, angles in degrees,
    everything else in scientific notation; ``"—"`` for None."""
    if x is None:
        return "—"
    if "overlap" in key or "density" in key:
        return f"{100 * x:.2f} %"
    if "deg" in key:
        return f"{x:.4g}°"
    return f"{x:.3e}"


def matrices_csv(rows: list[dict[str, Any]]) -> str:
    """``matrices.csv`` as text: empty cell for ``None``, ``nan`` for NaN, full ``repr``
    precision."""
    from opdgeo.analysis.compare import COLUMNS, EXTRA_COLUMNS

    return csv_text(rows, COLUMNS + EXTRA_COLUMNS, nan="nan")


def _experts_markdown(s: dict[str, Any]) -> list[str]:
    moved = s.get("experts_moved_most") or {}
    if not s.get("by_expert"):
        return []
    lines = ["", "## Experts that moved most", "", f"{len(s['by_expert'])} experts (layer, expert).", ""]
    for metric, ranked in moved.items():
        cells = ", ".join(f"{e['layer']}.{e['expert']} ({format_value(e[metric], metric)})" for e in ranked)
        lines.append(f"- {metric}: {cells or '—'}")
    return lines


def summary_markdown(s: dict[str, Any]) -> str:
    """``summary.md``: the headline numbers, the per-type and per-layer tables, the experts
    that moved most, and the non-finite weights."""
    from opdgeo.analysis.compare_summary import SUMMARY_MEAN_KEYS

    lines = ["# opdgeo compare", ""]
    lines.append(f"- base: `{s['settings']['base']}`")
    lines.append(f"- tuned: `{s['settings']['tuned']}`")
    lines.append(f"- tensors: {s['n_tensors']} ({s['n_params']:,} parameters), geometry matrices: {s['n_matrices']}")
    lines.append(f"- global sparsity (parameter-weighted, bf16-aware): {format_percent(s['global_sparsity'])}")
    for key in SUMMARY_MEAN_KEYS.values():
        lines.append(f"- {key}: {format_value(s[key], key)}")
    if s.get("global_legacy_sparsity") is not None:
        lines.append(f"- global legacy sparsity (|Δ| ≤ {s['settings']['legacy_atol']}): "
                     f"{format_percent(s['global_legacy_sparsity'])}")
    if s.get("n_rank_capped"):
        lines.append(f"- principal-mask rank capped at min(m, n) for {s['n_rank_capped']} matrices (column `rank`)")
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
    lines += _experts_markdown(s)
    if s["non_finite"]:
        lines += ["", "## Non-finite weights", ""]
        lines += [f"- `{item['name']}`: {item['note']}" for item in s["non_finite"]]
    return "\n".join(lines) + "\n"


def _write_angles(angles: dict[str, dict[str, Any]], path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    tensors = {f"{name}.{side}": torch.as_tensor(values, dtype=torch.float64)
               for name, sides in angles.items() for side, values in sides.items()}
    meta = {"unit": "degrees", "order": "ascending"}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def write_compare(result, out_dir: str | os.PathLike, *, figures: bool = True) -> list[Path]:
    """Write a ``CompareResult`` into ``out_dir`` (created if needed), each file atomically.

    Returns:
        The paths written: ``matrices.csv``, ``summary.json``, ``summary.md``, then
        ``angles.safetensors`` (kept angles) and the expert heatmap (``figures``, experts).

    Raises:
        OutputError: the folder cannot be created or written (nothing of this call is
            left in it).
    """
    with output_folder(out_dir) as out:
        paths = [out / "matrices.csv", out / "summary.json", out / "summary.md"]
        atomic_write_text(paths[0], matrices_csv(result.matrices))
        write_json(paths[1], result.summary)
        atomic_write_text(paths[2], summary_markdown(result.summary))
        if result.angles:
            paths.append(_write_angles(result.angles, out / "angles.safetensors"))
        if figures and result.summary.get("by_expert"):
            from opdgeo.report.figures import write_expert_figures

            paths += write_expert_figures(result.summary["by_expert"], out)
    return [Path(out_dir) / p.relative_to(out) for p in paths]
