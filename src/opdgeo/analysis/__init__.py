"""Checkpoint analyses built on ``opdgeo.checkpoints`` and ``opdgeo.geometry``.

- ``opdgeo.compare`` (``opdgeo.analysis.compare.compare``) — pairwise diagnostics (SPEC §1);
- ``opdgeo.trajectory`` (``opdgeo.analysis.trajectory.trajectory``) — trajectory
  diagnostics (SPEC §2); ``update.update_metrics`` — its per-matrix function;
- ``driver`` — the one driver both use: plan, shard over ranks, ordered thread map,
  gather, errors raised on every rank;
- ``parallel`` — sharding across ranks, ordered thread maps, torch.distributed context;
- ``cache.SvdCache`` — the on-disk cache of base-checkpoint SVDs and masks.

Submodules are imported on demand (``opdgeo.analysis.compare`` is the module; the
function is ``opdgeo.compare``), so ``import opdgeo.analysis.parallel`` stays light.
"""

__all__ = ["CompareResult", "CompareOptions", "SvdCache", "TrajectoryOptions", "update_metrics"]


def __getattr__(name):
    import importlib

    if name in ("CompareResult", "CompareOptions"):
        return getattr(importlib.import_module("opdgeo.analysis.compare"), name)
    if name == "TrajectoryOptions":
        return importlib.import_module("opdgeo.analysis.trajectory").TrajectoryOptions
    if name == "update_metrics":
        return importlib.import_module("opdgeo.analysis.update").update_metrics
    if name == "SvdCache":
        return importlib.import_module("opdgeo.analysis.cache").SvdCache
    raise AttributeError(f"module 'opdgeo.analysis' has no attribute {name!r}")
