"""Figures of the analyses, PNG and SVG, matplotlib with the Agg backend (no display).

- Trajectory figures in the style of the paper's Fig. 4-5: runs overlaid against
  progress. One panel per metric (mean over matrices per checkpoint, from a trajectory
  ``summary.json``): stable rank, ‖ΔW‖_F (log y), Hill index, Sim_K to the final
  checkpoint (with the locking threshold). x = training progress (%); one line with
  markers per run, a legend. The study report reuses these functions.
- The expert density heatmap of a mixture-of-experts comparison: layers × experts, the
  mean bf16-visible update density of each expert's matrices (``summary.json``
  ``by_expert``), shared experts in a last column.

Files are written atomically with fixed metadata: the same inputs give the same bytes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["FIGURES", "expert_density_figure", "trajectory_figure", "write_expert_figures",
           "write_trajectory_figures"]

# metric -> (file stem, y label, log y)
FIGURES = {
    "stable_rank": ("stable_rank", "stable rank of ΔW", False),
    "fro_norm": ("fro_norm", "‖ΔW‖$_F$", True),
    "hill_alpha": ("hill_alpha", "Hill tail index α̂", False),
    "sim_to_final": ("sim_to_final", "Sim$_{K}$ to the final update", False),
}

# Paper colours for the three post-training methods; other runs cycle through tab10.
_RUN_COLORS = {"sft": "#1f77b4", "opd": "#d62728", "rlvr": "#2ca02c"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _color(run: str, i: int):
    for key, color in _RUN_COLORS.items():
        if run.lower() == key or run.lower().startswith(key + "-") or run.lower().startswith(key + "_"):
            return color
    import matplotlib

    return matplotlib.colormaps["tab10"](i % 10)


def trajectory_figure(summary: dict[str, Any], metric: str, *, title: str | None = None):
    """A matplotlib Figure of one metric's per-checkpoint mean against progress, runs overlaid.

    Args:
        summary: a trajectory summary (``TrajectoryResult.summary`` or ``summary.json``):
            ``{"runs": {run: {"means": [{"progress", metric...}], "locking_step"...}}}``.
        metric: one of ``FIGURES``.
        title: optional axes title.

    Returns:
        The Figure (caller closes it).

    Raises:
        ValueError: an unknown metric.
    """
    if metric not in FIGURES:
        raise ValueError(f"unknown trajectory metric {metric!r}; expected one of {', '.join(FIGURES)}")
    _, ylabel, logy = FIGURES[metric]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 3.3), layout="constrained")
    runs = summary.get("runs", summary)
    settings = summary.get("settings", {})
    for i, (run, info) in enumerate(runs.items()):
        pts = [(m.get("progress"), m.get(metric)) for m in info.get("means", [])]
        pts = [(x, y) for x, y in pts if x is not None and y is not None and math.isfinite(y)
               and (not logy or y > 0)]
        if not pts:
            continue
        xs, ys = zip(*pts)
        label = run
        if metric == "sim_to_final":
            lock = info.get("locking_progress")
            label = f"{run} (locks at {lock:.0f} %)" if lock is not None else f"{run} (never locks)"
        ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.6, color=_color(run, i), label=label)
    if metric == "sim_to_final":
        thr = settings.get("lock_threshold")
        if thr is not None:
            ax.axhline(thr, color="0.5", linestyle="--", linewidth=0.9, label=f"threshold {thr:g}")
        ax.set_ylim(-0.02, 1.04)
        k = settings.get("sim_k")
        if k is not None:
            ylabel = f"Sim$_{{{k}}}$ to the final update"
    if metric == "hill_alpha" and settings.get("k_hill") is not None:
        ylabel = f"Hill index α̂ (top {settings['k_hill']})"
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("training progress (%)")
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 103)
    ax.grid(True, alpha=0.3, linewidth=0.6)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if ax.lines:
        ax.legend(frameon=False, fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def _save(fig, out: Path, stem: str, formats, dpi: int) -> list[Path]:
    """Save ``fig`` as ``<stem>.<fmt>`` for each format, atomically, then close it."""
    from opdgeo.files import atomic_write

    plt = _plt()
    paths = []
    try:
        for fmt in formats:
            # fixed metadata: the same inputs give the same bytes
            meta = {"Software": None} if fmt == "png" else {"Date": None, "Creator": None}
            save = lambda tmp, fmt=fmt, meta=meta: fig.savefig(tmp, format=fmt, dpi=dpi, metadata=meta)  # noqa: E731
            paths.append(atomic_write(out / f"{stem}.{fmt}", save))
    finally:
        plt.close(fig)
    return paths


def write_trajectory_figures(summary: dict[str, Any], out_dir, *, formats=("png", "svg"), dpi: int = 150) -> list[Path]:
    """Write the four trajectory figures (``<stem>.png`` and ``<stem>.svg``) into ``out_dir``.

    Returns:
        The paths written, in ``FIGURES`` order.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric, (stem, _, _) in FIGURES.items():
        paths += _save(trajectory_figure(summary, metric), out, stem, formats, dpi)
    return paths


def expert_density_figure(by_expert: list[dict[str, Any]], *, title: str | None = None):
    """A heatmap Figure of the per-(layer, expert) update density (module docstring).

    Args:
        by_expert: ``summary["by_expert"]`` of a comparison: records with ``layer``,
            ``expert`` (an index, or ``"shared"``) and ``density``.
        title: optional axes title.

    Returns:
        The Figure (caller closes it). Cells without a value are blank.
    """
    import numpy as np

    plt = _plt()
    layers = sorted({e["layer"] for e in by_expert}, key=lambda x: -1 if x is None else x)
    routed = sorted({e["expert"] for e in by_expert if isinstance(e["expert"], int)})
    columns = routed + (["shared"] if any(e["expert"] == "shared" for e in by_expert) else [])
    grid = np.full((len(layers), len(columns)), np.nan)  # [layers, experts]
    for e in by_expert:
        if e["density"] is not None:
            grid[layers.index(e["layer"]), columns.index(e["expert"])] = 100.0 * e["density"]
    width = min(16.0, 2.5 + 0.25 * len(columns))
    fig, ax = plt.subplots(figsize=(width, 1.5 + 0.3 * len(layers)))
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="update density (%)")
    step = max(1, len(columns) // 32)
    ax.set_xticks(range(0, len(columns), step), [str(c) for c in columns[::step]], fontsize=7)
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title or "bf16-visible update density per expert", fontsize=10)
    fig.tight_layout()
    return fig


def write_expert_figures(by_expert: list[dict[str, Any]], out_dir, *, formats=("png", "svg"), dpi: int = 150) -> list[Path]:
    """Write ``expert_density.png`` and ``.svg`` into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return _save(expert_density_figure(by_expert), out, "expert_density", formats, dpi)
