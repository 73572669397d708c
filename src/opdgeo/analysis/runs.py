"""Runs of a trajectory analysis: their checkpoints in order, their origins, and the
pairs of runs whose update masks are compared.

A run is a folder of step folders (``opdgeo.checkpoints.steps``: ``step-NNNNNN``, and
other trainers' ``checkpoint-N``, ``global_step_N/actor/huggingface``, ``iter_N``; the step
from the name) or an explicit ordered list of checkpoints. Every check here runs on
names and headers only, before any weight is read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from opdgeo.checkpoints.steps import checkpoint_step_of, list_checkpoint_dirs
from opdgeo.errors import CheckpointError, ConfigError, FieldError

__all__ = ["RunSpec", "check_architectures", "overlap_pairs", "resolve_run", "resolve_runs"]


@dataclass(frozen=True)
class RunSpec:
    """One run: its ordered checkpoints and their steps.

    Attributes:
        name: run name (CSV ``run`` column, legend label).
        steps: training steps, strictly increasing.
        paths: checkpoint folders (or files), same order.
        origin: the checkpoint W0 the updates are measured from.
    """

    name: str
    steps: tuple[int, ...]
    paths: tuple[Path, ...]
    origin: Path

    @property
    def progress(self) -> tuple[float, ...]:
        """100 · step / last step per checkpoint (our convention, docs/trajectory.md)."""
        last = self.steps[-1]
        return tuple(100.0 * s / last if last > 0 else 100.0 for s in self.steps)


def _run_folder(name: str, folder: Path, origin: Path) -> RunSpec:
    if not folder.is_dir():
        raise CheckpointError(f"run '{name}': {folder} is not a folder")
    children = list_checkpoint_dirs(folder)
    if not children:
        unnumbered = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.startswith("step"))
        if unnumbered:
            raise CheckpointError(f"run '{name}': cannot order {folder / unnumbered[0]}: the folder name has no step "
                                  "number (step-N)")
        raise CheckpointError(f"run '{name}': {folder} has no checkpoints (step-N, checkpoint-N, "
                              "global_step_N/actor/huggingface or iter_N folders)")
    by_step: dict[int, Path] = {}
    for step, p in children:
        if step in by_step:
            raise CheckpointError(f"run '{name}': steps cannot be ordered: {by_step[step].name} and {p.name} "
                                  f"are both step {step}")
        by_step[step] = p
    order = sorted(by_step)
    return RunSpec(name, tuple(order), tuple(by_step[s] for s in order), origin)


def resolve_run(name: str, spec, origin) -> RunSpec:
    """A run's checkpoints and steps from a run folder or an explicit list of checkpoints.

    A folder: its step folders (``checkpoints.steps.list_checkpoint_dirs``: ``step-N``,
    ``checkpoint-N``, ``global_step_N/actor/huggingface``, ``iter_N``), step from the name
    (``step-000063`` → 63), ordered by step. A list: the checkpoints in the order given;
    steps from the names when every name carries one (``checkpoint_step_of``; then they
    must increase), else 1..T.

    Raises:
        CheckpointError: a missing path, a run folder with no ``step-*`` checkpoints, a
            ``step-*`` name without a number, duplicate or decreasing steps.
    """
    origin = Path(origin)
    if isinstance(spec, (str, os.PathLike)):
        return _run_folder(name, Path(spec), origin)
    paths = [Path(p) for p in spec]
    if not paths:
        raise CheckpointError(f"run '{name}': no checkpoints given")
    for p in paths:
        if not p.exists():
            raise CheckpointError(f"run '{name}': checkpoint {p} does not exist")
    steps = [checkpoint_step_of(p) for p in paths]
    if all(s is not None for s in steps):
        for a, b, pa, pb in zip(steps, steps[1:], paths, paths[1:]):
            if b <= a:
                raise CheckpointError(f"run '{name}': steps cannot be ordered: {pb.name} (step {b}) is listed after "
                                      f"{pa.name} (step {a})")
    else:
        steps = list(range(1, len(paths) + 1))
    return RunSpec(name, tuple(steps), tuple(paths), origin)


def resolve_runs(runs, origins) -> list[RunSpec]:
    """``RunSpec`` of every run: ``runs`` is ``{name: folder | [checkpoint, ...]}`` (a bare
    folder or list is one run named after the folder), ``origins`` one origin per run or
    one for all.

    Raises:
        FieldError: (field ``origins``) runs without an origin, origins of unknown runs.
        ConfigError: no runs, origins of the wrong type.
        CheckpointError: as ``resolve_run``.
    """
    if isinstance(runs, (str, os.PathLike)):
        runs = {Path(runs).name: runs}
    elif not isinstance(runs, Mapping):
        runs = list(runs)
        if not runs:
            raise ConfigError("no runs given")
        runs = {Path(runs[0]).parent.name or "run": runs}
    if not runs:
        raise ConfigError("no runs given")
    if isinstance(origins, (str, os.PathLike)):
        origins = {name: origins for name in runs}
    elif not isinstance(origins, Mapping):
        raise ConfigError(f"origins must be a path or a mapping run -> path; got {type(origins).__name__}")
    problems = []
    missing = [name for name in runs if name not in origins]
    extra = [name for name in origins if name not in runs]
    if missing:
        problems.append(("origins", f"missing for run(s) {', '.join(missing)}"))
    if extra:
        problems.append(("origins", f"given for unknown run(s) {', '.join(extra)}"))
    if problems:
        raise FieldError(problems)
    return [resolve_run(str(name), spec, origins[name]) for name, spec in runs.items()]


def overlap_pairs(specs: list[RunSpec], overlap) -> list[tuple[str, str]]:
    """The pairs of runs whose final update masks are compared.

    ``None``/``True``: every pair of runs with the same origin; ``False`` or ``[]``: none;
    a list of ``(run_a, run_b)``: those, checked.

    Raises:
        FieldError: (field ``overlap``) a malformed pair, an unknown run, a run with
            itself, or runs with different origins.
    """
    same: dict[str, list[str]] = {}
    for s in specs:
        same.setdefault(os.path.abspath(s.origin), []).append(s.name)
    if overlap is False or (overlap is not None and overlap is not True and len(overlap) == 0):
        return []
    if overlap is None or overlap is True:
        return [(a, b) for names in same.values() for i, a in enumerate(names) for b in names[i + 1:]]
    origin_of = {s.name: os.path.abspath(s.origin) for s in specs}
    pairs, problems = [], []
    for pair in overlap:
        try:
            a, b = pair
        except (TypeError, ValueError):
            problems.append(("overlap", f"pair {pair!r} is not (run_a, run_b)"))
            continue
        unknown = [r for r in (a, b) if r not in origin_of]
        if unknown:
            problems.append(("overlap", f"pair ({a}, {b}): unknown run {', '.join(unknown)}"))
        elif a == b:
            problems.append(("overlap", f"pair ({a}, {b}): a run with itself"))
        elif origin_of[a] != origin_of[b]:
            problems.append(("overlap", f"pair ({a}, {b}): the runs have different origins"))
        else:
            pairs.append((a, b))
    if problems:
        raise FieldError(problems)
    return pairs


def _signature(c) -> dict[str, tuple]:
    return {name: tuple(c.info(name).shape) for name in c.names()}


def _first_difference(a: dict[str, tuple], b: dict[str, tuple], label_a: str, label_b: str) -> str | None:
    """The first tensor that tells two checkpoints' architectures apart, in words."""
    only_a = [n for n in a if n not in b]
    only_b = [n for n in b if n not in a]
    if only_a:
        return f"tensor {only_a[0]} is in {label_a} but not in {label_b} ({len(only_a)} such tensors)"
    if only_b:
        return f"tensor {only_b[0]} is in {label_b} but not in {label_a} ({len(only_b)} such tensors)"
    for n, shape in a.items():
        if b[n] != shape:
            return f"tensor {n} has shape {list(shape)} in {label_a} but {list(b[n])} in {label_b}"
    return None


def check_architectures(specs: list[RunSpec], ckpt) -> None:
    """Every checkpoint of a run has its first checkpoint's tensors and shapes, and so has
    the run's origin (headers only; ``ckpt(path)`` opens a checkpoint).

    Raises:
        CheckpointError: naming the run, the two checkpoints and the first difference.
    """
    for spec in specs:
        ckpts = [ckpt(p) for p in spec.paths]
        ref = _signature(ckpts[0])
        for p, c in zip(spec.paths[1:], ckpts[1:]):
            diff = _first_difference(ref, _signature(c), spec.paths[0].name, p.name)
            if diff:
                raise CheckpointError(f"run '{spec.name}': checkpoints of different architectures in "
                                      f"{spec.paths[0].parent}: {diff}")
        diff = _first_difference(_signature(ckpt(spec.origin)), ref, "the origin", str(spec.paths[0]))
        if diff:
            raise CheckpointError(f"origin {spec.origin} does not match run {spec.name}: {diff}")
