"""Pure geometry functions (torch in -> torch/float out; no I/O).

Pairwise diagnostics (SPEC §1): ``sparsity`` (bf16-aware update masks), ``spectrum``
(exact singular values and subspaces, normalized spectral shift), ``angles`` (principal
angles), ``masks`` (principal / low-magnitude masks and their overlap with the update).
Trajectory diagnostics (SPEC §2): ``lowrank``, ``subspace``, ``overlap``.
"""

from opdgeo.geometry.angles import principal_angles
from opdgeo.geometry.masks import low_magnitude_mask, mask_overlap, principal_mask
from opdgeo.geometry.sparsity import (
    BITWISE_ETA_BOUND,
    bf16_unchanged_mask,
    bf16_visible_mask,
    legacy_unchanged_mask,
)
from opdgeo.geometry.spectrum import (
    Subspaces,
    normalized_spectral_shift,
    singular_values,
    top_singular_subspaces,
)

__all__ = [
    "BITWISE_ETA_BOUND",
    "Subspaces",
    "bf16_unchanged_mask",
    "bf16_visible_mask",
    "legacy_unchanged_mask",
    "low_magnitude_mask",
    "mask_overlap",
    "normalized_spectral_shift",
    "principal_angles",
    "principal_mask",
    "singular_values",
    "top_singular_subspaces",
]

# modules written concurrently; remove guard at integration
try:
    from opdgeo.geometry.lowrank import *  # noqa: F401,F403
    from opdgeo.geometry.lowrank import __all__ as _lowrank_all

    __all__ += list(_lowrank_all)
except ImportError:
    pass
try:
    from opdgeo.geometry.subspace import *  # noqa: F401,F403
    from opdgeo.geometry.subspace import __all__ as _subspace_all

    __all__ += list(_subspace_all)
except ImportError:
    pass
try:
    from opdgeo.geometry.overlap import *  # noqa: F401,F403
    from opdgeo.geometry.overlap import __all__ as _overlap_all

    __all__ += list(_overlap_all)
except ImportError:
    pass
