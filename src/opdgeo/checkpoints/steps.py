"""The step-folder convention of a run folder (SPEC §4): one owner for "a step folder".

A run saves its checkpoint after optimizer step ``s`` as ``step-NNNNNN`` (``step_dir_name``:
six digits, more when needed). Readers accept ``step-N`` with any number of digits, and
also ``step_N`` and ``stepN`` (folders written by other tools); the step is the number
(``step_of``, ``list_step_dirs``: what a run of ``opdgeo train`` resumes from).

The analyses also read the checkpoints other trainers write (``checkpoint_step_of``,
``list_checkpoint_dirs``), the step always read from the name:

==============================================  =========================  ====================
folder in the run folder                        written by                 checkpoint read
==============================================  =========================  ====================
``step-N``, ``step_N``, ``stepN``               opdgeo train, others       the folder
``checkpoint-N``                                transformers / TRL Trainer the folder
``global_step_N``                               verl                       ``actor/huggingface``
``iter_N`` (``iter_0000100``)                   Megatron / NeMo style      the folder
==============================================  =========================  ====================

(verl saves its actor as sharded trainer state plus a Hugging Face export in
``global_step_N/actor/huggingface``; that export is the checkpoint. A ``global_step_N``
without it is not a checkpoint opdgeo can read.) Names starting with ``files.TMP_PREFIX``
(an interrupted atomic write) are never step folders.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = [
    "FOREIGN_STEP_RES",
    "STEP_RE",
    "checkpoint_step_of",
    "list_checkpoint_dirs",
    "list_step_dirs",
    "step_dir_name",
    "step_of",
]

STEP_RE = re.compile(r"^step[-_]?(\d+)$")

VERL_EXPORT = ("actor", "huggingface")
"""Where verl's Hugging Face export sits inside ``global_step_N``."""

FOREIGN_STEP_RES = (
    (re.compile(r"^checkpoint-(\d+)$"), ()),  # transformers / TRL
    (re.compile(r"^global_step_(\d+)$"), VERL_EXPORT),  # verl
    (re.compile(r"^iter_(\d+)$"), ()),  # Megatron / NeMo
)
"""Other trainers' step-folder names: (pattern, the checkpoint's path inside the folder)."""


def step_dir_name(step: int) -> str:
    """``step-NNNNNN``: the name a run gives its checkpoint after ``step`` steps."""
    return f"step-{step:06d}"


def step_of(path: str | os.PathLike) -> int | None:
    """The step number of an opdgeo step folder's name (``step-000063`` → 63), None for other names."""
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


def _foreign_step(name: str) -> tuple[int, tuple[str, ...]] | None:
    for pattern, inner in FOREIGN_STEP_RES:
        m = pattern.match(name)
        if m:
            return int(m.group(1)), inner
    return None


def checkpoint_step_of(path: str | os.PathLike) -> int | None:
    """The step of any trainer's checkpoint from its path (module docstring's table):
    ``step-63`` → 63, ``checkpoint-500`` → 500, ``iter_0000100`` → 100, and both
    ``global_step_20`` and ``global_step_20/actor/huggingface`` → 20; None otherwise."""
    p = Path(path)
    s = step_of(p)
    if s is not None:
        return s
    found = _foreign_step(p.name)
    if found is not None:
        return found[0]
    if tuple(p.parts[-len(VERL_EXPORT):]) == VERL_EXPORT:
        found = _foreign_step(p.parents[len(VERL_EXPORT) - 1].name)
        if found is not None and found[1] == VERL_EXPORT:
            return found[0]
    return None


def list_checkpoint_dirs(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, checkpoint)`` of every step folder of any trainer in ``run_dir`` (module
    docstring's table; for verl the ``actor/huggingface`` export inside it), ascending
    by step then path. A ``global_step_N`` without its export is left out. Duplicate
    steps are all listed; the caller decides."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    out = []
    for p in run_dir.iterdir():
        if not p.is_dir():
            continue
        s = step_of(p)
        if s is not None:
            out.append((s, p))
            continue
        found = _foreign_step(p.name)
        if found is not None:
            target = p.joinpath(*found[1])
            if target.is_dir():
                out.append((found[0], target))
    return sorted(out)
