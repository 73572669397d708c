"""opdgeo: parameter-space geometry of LLM post-training.

Library entry points (imported lazily so that ``import opdgeo`` stays cheap):

- ``opdgeo.compare(base, tuned, **options)`` -> pairwise diagnostics (SPEC §1);
- ``opdgeo.trajectory(...)`` -> trajectory diagnostics over a run's checkpoints (SPEC §2);
- ``opdgeo.geometry`` -> the pure metric functions.
"""

from opdgeo._version import __version__
from opdgeo.errors import CheckpointError, ConfigError, OpdgeoError

__all__ = ["compare", "trajectory", "OpdgeoError", "CheckpointError", "ConfigError", "__version__"]


def __getattr__(name):
    if name == "compare":
        from opdgeo.analysis.compare import compare

        return compare
    if name == "trajectory":
        from opdgeo.analysis.trajectory import trajectory

        return trajectory
    raise AttributeError(f"module 'opdgeo' has no attribute {name!r}")
