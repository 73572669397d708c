"""The files of ``opdgeo trajectory --out DIR``: ``trajectory.csv``, ``summary.json``,
``overlap.csv`` and the figures (schemas in docs/trajectory.md)."""

from __future__ import annotations

import os
from pathlib import Path

from opdgeo.files import atomic_write_text
from opdgeo.report.files import csv_text, output_folder, write_json

__all__ = ["csv_text", "write_trajectory"]


def write_trajectory(result, out_dir: str | os.PathLike, *, figures: bool = True) -> list[Path]:
    """Write a ``TrajectoryResult`` into ``out_dir`` (created if needed), each file atomically.

    Returns:
        The paths written: the three tables, then the figures (``report.figures``).

    Raises:
        OutputError: the folder cannot be created or written (nothing of this call is
            left in it).
    """
    from opdgeo.analysis.trajectory import COLUMNS, OVERLAP_COLUMNS

    with output_folder(out_dir) as out:
        paths = [out / "trajectory.csv", out / "summary.json", out / "overlap.csv"]
        atomic_write_text(paths[0], csv_text(result.rows, COLUMNS))
        write_json(paths[1], result.summary)
        atomic_write_text(paths[2], csv_text(result.overlap, OVERLAP_COLUMNS))
        if figures:
            from opdgeo.report.figures import write_trajectory_figures

            paths += write_trajectory_figures(result.summary, out)
    return [Path(out_dir) / p.relative_to(out) for p in paths]
