"""The one place that splits work: across threads, and across torchrun processes.

- ``shard_for_rank`` — which items a rank owns (greedy LPT, balanced by cost, deterministic);
- ``map_ordered`` — a thread-pool map that yields results in item order with a bounded
  number of items in flight (torch and LAPACK kernels release the GIL);
- ``dist_context``, ``gather_to_rank0``, ``all_gather``, ``is_distributed`` — re-exported
  from ``opdgeo.distributed``, which owns every torch.distributed call.

Nothing here knows about checkpoints or metrics.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from opdgeo.errors import ConfigError, FieldError

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["shard_for_rank", "map_ordered", "dist_context", "gather_to_rank0", "is_distributed"]


def shard_for_rank(
    items: Sequence[T],
    rank: int,
    world: int,
    cost: Callable[[T], float] | Sequence[float] | None = None,
) -> list[T]:
    """The items that ``rank`` of ``world`` processes owns, in their original order.

    Greedy longest-processing-time (LPT) assignment: items sorted by decreasing cost
    (ties by position) each go to the currently least-loaded rank (ties to the lowest
    rank). LPT's makespan is at most 4/3 of the optimum. The assignment depends only on
    ``items``, ``world`` and ``cost``, so every rank computes the same partition without
    communicating, and the union over ranks is exactly ``items``.

    Args:
        items: the work items (e.g. tensor names), same sequence on every rank.
        rank: this process's rank, ``0 <= rank < world``.
        world: number of processes, ``>= 1``.
        cost: a cost per item (e.g. ``numel``) as a callable ``item -> float`` or a
            sequence aligned with ``items``; ``None`` means unit cost (round-robin-like).

    Returns:
        The sub-list of ``items`` for ``rank``, in the order of ``items``.

    Raises:
        ConfigError: ``world < 1``, ``rank`` outside ``[0, world)``, a cost sequence of
            the wrong length, or a negative/non-finite cost.
    """
    if world < 1:
        raise ConfigError(f"world size must be >= 1; got {world}")
    if not 0 <= rank < world:
        raise ConfigError(f"rank must be in [0, {world}); got {rank}")
    items = list(items)
    if cost is None:
        costs = [1.0] * len(items)
    elif callable(cost):
        costs = [float(cost(item)) for item in items]
    else:
        costs = [float(c) for c in cost]
        if len(costs) != len(items):
            raise ConfigError(f"cost has {len(costs)} entries for {len(items)} items")
    for c in costs:
        if not (c >= 0.0 and c != float("inf")):
            raise ConfigError(f"costs must be finite and >= 0; got {c}")
    if world == 1:
        return items
    order = sorted(range(len(items)), key=lambda i: (-costs[i], i))
    loads = [(0.0, r) for r in range(world)]  # heap of (load, rank): least load, lowest rank first
    owner = [0] * len(items)
    for i in order:
        load, r = heapq.heappop(loads)
        owner[i] = r
        heapq.heappush(loads, (load + costs[i], r))
    return [item for item, o in zip(items, owner) if o == rank]


def map_ordered(fn: Callable[[T], R], items: Iterable[T], workers: int = 1) -> Iterator[R]:
    """``fn`` over ``items``, yielding results in item order, at most ``workers`` in flight.

    With ``workers == 1`` this is a plain lazy loop in the calling thread. Otherwise a
    thread pool runs ``fn``; a new item is submitted only when the oldest result is taken,
    so at most ``workers`` items are being processed plus the one the caller holds —
    memory stays bounded by about ``workers + 1`` items' working sets whatever the length
    of ``items`` (which is consumed lazily). An exception raised by ``fn`` is re-raised
    when its result is reached; items not yet started are then not run.

    Args:
        fn: the function; it must be thread-safe (torch kernels release the GIL).
        items: any iterable.
        workers: number of threads, ``>= 1``.

    Raises:
        FieldError: (field ``workers``) ``workers < 1``.
    """
    if workers < 1:
        raise FieldError([("workers", f"must be >= 1; got {workers}")])
    if workers == 1:
        return (fn(item) for item in items)
    return _map_threads(fn, iter(items), workers)


def _map_threads(fn, it, workers):
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="opdgeo") as pool:
        pending: deque = deque()
        try:
            for item in it:
                pending.append(pool.submit(fn, item))
                if len(pending) >= workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:  # an error or an abandoned generator: drop what has not started
                fut.cancel()


# The collectives live in ``opdgeo.distributed`` (the package's one owner of torch.distributed).
from opdgeo.distributed import all_gather, dist_context, gather_to_rank0, is_distributed  # noqa: E402
