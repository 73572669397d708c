"""The step-folder convention of a run folder (SPEC §4): one owner for "a step folder".

A run saves its checkpoint after optimizer step ``s`` as ``step-NNNNNN`` (``step_dir_name``:
six digits, more when needed). Readers accept ``step-N`` with any number of digits, and
also ``step_N`` and ``stepN`` (folders written by other tools); the step is the number.
Names starting with ``files.TMP_PREFIX`` (an interrupted atomic write) are never step
folders.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["STEP_RE", "list_step_dirs", "step_dir_name", "step_of"]

STEP_RE = re.compile(r"^step[-_]?(\d+)$")


def step_dir_name(step: int) -> str:
    """``step-NNNNNN``: the name a run gives its checkpoint after ``step`` steps."""
    return f"step-{step:06d}"


def step_of(path: str | os.PathLike) -> int | None:
    """The step number of a step folder's name (``step-000063`` → 63), None for other names."""
    m = STEP_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_step_dirs(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every step folder in ``run_dir``, ascending by step then name
    (an absent folder has none). Duplicate steps (``step-10`` and ``step-010``) are all
    listed; a caller that needs one folder per step decides."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    out = [(s, p) for p in run_dir.iterdir() if p.is_dir() and (s := step_of(p)) is not None]
    return sorted(out)
