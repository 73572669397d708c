"""Checkpoint analyses built on ``opdgeo.checkpoints`` and ``opdgeo.geometry``.

- ``opdgeo.compare`` (``opdgeo.analysis.compare.compare``) — pairwise diagnostics (SPEC §1);
- ``parallel`` — sharding across ranks, ordered thread maps, torch.distributed context;
- ``cache.SvdCache`` — the on-disk cache of base-checkpoint SVDs.

Submodules are imported on demand (``opdgeo.analysis.compare`` is the module; the
function is ``opdgeo.compare``), so ``import opdgeo.analysis.parallel`` stays light.
"""

__all__ = ["CompareResult", "CompareOptions", "SvdCache"]


def __getattr__(name):
    import importlib

    if name in ("CompareResult", "CompareOptions"):
        return getattr(importlib.import_module("opdgeo.analysis.compare"), name)
    if name == "SvdCache":
        return importlib.import_module("opdgeo.analysis.cache").SvdCache
    raise AttributeError(f"module 'opdgeo.analysis' has no attribute {name!r}")
