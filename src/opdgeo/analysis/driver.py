"""The one analysis driver: plan the matrices, shard them over ranks, map them in order over
worker threads, gather the results on every rank, and re-raise errors with their type.

``compare`` and ``trajectory`` are its two users. Each builds a plan (a list of work
items, each with a cost) from ``plan_matrices`` and hands the driver a thread-safe
function of one item; ``execute`` does the rest:

1. **shard** — under an initialized ``torch.distributed`` group each rank takes a
   cost-balanced share of the plan (``parallel.shard_for_rank``: every rank computes the
   same partition without talking);
2. **map** — ``parallel.map_ordered`` runs the items on ``workers`` threads, at most
   ``workers`` in flight, results in plan order; a progress bar on rank 0 advances by
   each item's weight;
3. **gather** — every rank's results (and its statistics) reach every rank
   (``parallel.all_gather``), reassembled in plan order, so every rank returns the same;
4. **fail together** — an error on any rank is shared before anyone returns: the
   failing rank re-raises its own exception, the others the same error (an
   ``OpdgeoError`` keeps its type and message; anything else becomes a ``RuntimeError``
   naming the rank), so no rank waits forever in a collective.

Nothing here knows about metrics or files.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Generic, TypeVar

from opdgeo.analysis.parallel import all_gather, map_ordered, shard_for_rank
from opdgeo.analysis.progress import progress_bar
from opdgeo.errors import OpdgeoError

__all__ = ["Executed", "Matrix", "Progress", "SELECTIONS", "execute", "plan_matrices", "resolve_options", "world"]

T = TypeVar("T")
R = TypeVar("R")

#: Named matrix selections of ``plan_matrices`` (anything else is a regular expression).
SELECTIONS = ("floating", "all", "attention")


@dataclass(frozen=True)
class Matrix:
    """One tensor of a plan, with what its name and header say.

    Attributes:
        name: logical tensor name.
        layer, type, expert: from ``checkpoints.parse_tensor_name``.
        shape: the tensor's shape; ``numel`` its number of entries.
        geometry: in the geometry matrix set (2-D q, k, v, o, gate, up, down).
    """

    name: str
    layer: int | None
    type: str
    expert: int | str | None
    shape: tuple[int, ...]
    numel: int
    geometry: bool


def resolve_options(cls: type[T], options: T | None, overrides: Mapping[str, Any], caller: str) -> T:
    """``options`` (default ``cls()``) with ``overrides`` replacing fields, validated: how an
    entry point's keyword arguments stay a thin wrapper over its options dataclass.

    Raises:
        TypeError: an override that is not a field of ``cls`` (a programming error).
        FieldError: from ``validate()``.
    """
    unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
    if unknown:
        raise TypeError(f"{caller}() got unexpected option(s) {', '.join(unknown)} (fields of {cls.__name__})")
    opts = replace(options or cls(), **overrides)
    opts.validate()
    return opts


def plan_matrices(checkpoint, names: Sequence[str] | None = None, *, select: str = "floating") -> list[Matrix]:
    """The tensors of ``checkpoint`` (in ``names`` order, default all) that ``select`` keeps.

    Args:
        checkpoint: an opened ``Checkpoint`` (headers only are read).
        names: the candidate names (e.g. ``pair_names(base, tuned)``).
        select: ``"floating"`` — every floating-point tensor (integer buffers are not
            weights); ``"all"`` — the geometry matrix set; ``"attention"`` — its q, k, v,
            o; otherwise a regular expression matched (``re.search``) against the names
            of 2-D floating-point tensors.

    Returns:
        ``Matrix`` records, in ``names`` order.
    """
    from opdgeo.checkpoints import ATTENTION_TYPES, is_geometry_matrix, parse_tensor_name

    pattern = None if select in SELECTIONS else re.compile(select)
    out = []
    for name in checkpoint.names() if names is None else names:
        info = checkpoint.info(name)
        if not info.dtype.is_floating_point:
            continue
        shape = tuple(int(d) for d in info.shape)
        parsed = parse_tensor_name(name)
        geometry = bool(is_geometry_matrix(name, shape))
        if select == "all" and not geometry:
            continue
        if select == "attention" and not (geometry and parsed.type in ATTENTION_TYPES):
            continue
        if pattern is not None and not (len(shape) == 2 and pattern.search(name)):
            continue
        out.append(Matrix(name, parsed.layer, parsed.type, parsed.expert, shape, int(info.numel), geometry))
    return out


@dataclass(frozen=True)
class Progress:
    """A progress bar over a plan: ``label`` at the left, advanced by ``weight(item)``
    (default the item's cost), ``unit`` after the percentage."""

    label: str
    unit: str = ""
    weight: Callable[[Any], float] | None = None


@dataclass(frozen=True)
class Executed(Generic[R]):
    """What ``execute`` returns (the same on every rank).

    Attributes:
        results: one result per plan item, in plan order.
        stats: each rank's ``stats()`` (rank order); ``[]`` without a ``stats`` callable.
        world: the number of ranks.
    """

    results: list[R]
    stats: list[Any]
    world: int


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialized process group, ``(0, 1)`` without one."""
    from opdgeo.analysis.parallel import is_distributed

    if not is_distributed():
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def execute(
    items: Sequence[T],
    work: Callable[[T], R],
    *,
    cost: Callable[[T], float],
    workers: int = 1,
    progress: Progress | None = None,
    stats: Callable[[], Any] | None = None,
) -> Executed[R]:
    """Run ``work`` on every item of the plan across ranks and threads (module docstring).

    Args:
        items: the plan, identical on every rank.
        work: a thread-safe function of one item.
        cost: the item's cost, for the balance across ranks.
        workers: threads on this rank.
        progress: a progress bar on rank 0 (``None``: none).
        stats: called once this rank's items are done; its value (picklable) is gathered.

    Returns:
        ``Executed(results, stats, world)``.

    Raises:
        Whatever ``work`` raised on any rank (see the module docstring).
    """
    rank, size = world()
    costs = [float(cost(item)) for item in items]
    mine = shard_for_rank(list(range(len(items))), rank, size, cost=costs)
    weight = (progress.weight or cost) if progress is not None else cost
    done: list[tuple[int, R]] = []
    failure: BaseException | None = None
    enabled = progress is not None and rank == 0
    label, unit = (progress.label, progress.unit) if progress is not None else ("", "")
    try:
        with progress_bar(label, enabled, sum(weight(items[i]) for i in mine), unit) as advance:
            for i, result in zip(mine, map_ordered(lambda j: work(items[j]), mine, workers)):
                done.append((i, result))
                advance(weight(items[i]))
    except Exception as err:
        if size == 1:
            raise
        failure = err
    local_stats = stats() if stats is not None else None
    if size == 1:
        return Executed([r for _, r in done], [local_stats] if stats is not None else [], 1)
    gathered = all_gather((_portable(failure), done, local_stats))
    _raise_first(gathered, failure)
    results: list[Any] = [None] * len(items)
    for _, part, _ in gathered:
        for i, result in part:
            results[i] = result
    return Executed(results, [s for *_, s in gathered] if stats is not None else [], size)


def _portable(err: BaseException | None):
    """An error as it can travel to other ranks: the exception itself when it is an
    ``OpdgeoError`` (picklable by construction), else its type name and message."""
    if err is None:
        return None
    if isinstance(err, OpdgeoError):
        return err
    return (type(err).__name__, str(err))


def _raise_first(gathered: list, own: BaseException | None) -> None:
    """Raise on every rank once any rank failed (module docstring, step 4)."""
    if own is not None:
        raise own
    for r, (err, _, _) in enumerate(gathered):
        if err is None:
            continue
        if isinstance(err, OpdgeoError):
            raise err
        kind, message = err
        raise RuntimeError(f"rank {r} failed: {kind}: {message}")
