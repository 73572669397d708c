"""Figures of the study report that are not trajectory figures of one run set.

(The paper-style trajectory figures — stable rank, ‖ΔW‖_F, Hill index, Sim_16 against
progress — come from `opdgeo.report.figures`, written by `opdgeo trajectory`.)

Each function returns a matplotlib ``Figure`` built with the Agg backend (no display);
`figure_png` turns it into PNG bytes for embedding as a ``data:`` URI, so the HTML report
needs no external file.
"""

from __future__ import annotations

import io
import math

__all__ = ["figure_png", "table1_bars", "control_panel", "accuracy_bars"]

_PALETTE = {
    "sft": "#1f77b4",
    "opd": "#d62728",
    "rlvr": "#2ca02c",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig, *, dpi: int = 110) -> bytes:
    """PNG bytes of ``fig`` (closed afterwards, so no figure leaks)."""
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _color(run: str, i: int):
    if run in _PALETTE:
        return _PALETTE[run]
    cmap = _plt().get_cmap("tab10")
    return cmap((i + 3) % 10)


def table1_bars(ours: dict[str, dict[str, float | None]], paper: dict[str, dict[str, float]]):
    """Grouped bars: each Table-1 metric (%), ours (solid) beside the paper's (hatched).

    Args:
        ours: ``{metric: {method: value_percent or None}}`` for the methods sft/opd/rlvr
            (the study's roles, `opdgeo.study.roles.MAIN_ROLES`).
        paper: same layout with the paper's numbers.
    """
    plt = _plt()
    metrics = list(paper)
    from opdgeo.study.roles import MAIN_ROLES

    runs = list(MAIN_ROLES)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.0))
    for ax, m in zip(axes, metrics):
        for i, r in enumerate(runs):
            v = ours.get(m, {}).get(r)
            ax.bar(i - 0.18, v if v is not None and math.isfinite(v) else 0.0, 0.36, color=_color(r, i), label="ours" if i == 0 else None)
            ax.bar(i + 0.18, paper[m][r], 0.36, color="white", edgecolor=_color(r, i), hatch="//", label="paper" if i == 0 else None)
        ax.set_xticks(range(len(runs)), [r.upper() for r in runs])
        ax.set_title(m.replace("_", " "), fontsize=9)
        ax.set_ylim(0, 100)
        ax.set_ylabel("%", fontsize=8)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def accuracy_bars(acc: dict[str, float | None], *, title: str = "held-out accuracy (avg@k)", errors: dict[str, float] | None = None):
    """Bars of accuracy per run/checkpoint, with ±1 standard-error whiskers when given."""
    plt = _plt()
    names = list(acc)
    fig, ax = plt.subplots(figsize=(max(3.0, 0.55 * len(names) + 1.5), 3.0))
    vals = [acc[n] if acc[n] is not None and math.isfinite(acc[n]) else 0.0 for n in names]
    errs = [((errors or {}).get(n) or 0.0) for n in names]
    ax.bar(range(len(names)), vals, yerr=errs if errors else None, color=[_color(n, i) for i, n in enumerate(names)], capsize=2)
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def control_panel(srank: dict[str, list[tuple[float, float]]], acc: dict[str, float | None], *, title: str,
                  band: tuple[float, float] | None):
    """A control panel of the paper's RQ3: stable rank vs progress (OPD band shaded) and accuracy."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.0, 3.2), gridspec_kw={"width_ratios": [1.4, 1]})
    if band is not None and all(math.isfinite(b) for b in band):
        ax1.axhspan(band[0], band[1], color="0.85", zorder=0, label="OPD band")
    for i, (run, pts) in enumerate(srank.items()):
        pts = [(x, y) for x, y in pts if y is not None and math.isfinite(y)]
        if pts:
            xs, ys = zip(*pts)
            ax1.plot(xs, ys, marker="o", ms=3, lw=1.3, color=_color(run, i), label=run)
    ax1.set_xlabel("training progress (%)")
    ax1.set_ylabel("stable rank of ΔW (mean)")
    ax1.legend(fontsize=7, ncol=2)
    names = list(acc)
    vals = [acc[n] if acc[n] is not None and math.isfinite(acc[n]) else 0.0 for n in names]
    ax2.bar(range(len(names)), vals, color=[_color(n, i) for i, n in enumerate(names)])
    ax2.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=7)
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("accuracy (avg@k)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
