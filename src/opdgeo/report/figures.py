"""Trajectory figures in the style of the paper's Fig. 4-5: runs overlaid against progress.

One panel per metric (mean over matrices per checkpoint, from a trajectory
``summary.json``): stable rank, ‖ΔW‖_F (log y), Hill index, Sim_K to the final
checkpoint (with the locking threshold). x = training progress (%); one line with
markers per run, a legend; PNG and SVG. Matplotlib with the Agg backend (no display);
the study report reuses these functions.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["FIGURES", "trajectory_figure", "write_trajectory_figures"]

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


def write_trajectory_figures(summary: dict[str, Any], out_dir, *, formats=("png", "svg"), dpi: int = 150) -> list[Path]:
    """Write the four trajectory figures (``<stem>.png`` and ``<stem>.svg``) into ``out_dir``.

    Returns:
        The paths written, in ``FIGURES`` order.
    """
    plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric, (stem, _, _) in FIGURES.items():
        fig = trajectory_figure(summary, metric)
        try:
            for fmt in formats:
                p = out / f"{stem}.{fmt}"
                # fixed metadata: the same inputs give the same bytes
                meta = {"Software": None} if fmt == "png" else {"Date": None, "Creator": None}
                fig.savefig(p, format=fmt, dpi=dpi, metadata=meta)
                paths.append(p)
        finally:
            plt.close(fig)
    return paths
