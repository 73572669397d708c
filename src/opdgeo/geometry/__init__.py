"""Pure geometry functions (torch in -> torch/float out; no I/O).

Pairwise diagnostics (SPEC §1): ``sparsity`` (bf16-aware update masks), ``spectrum``
(exact singular values and subspaces, normalized spectral shift), ``angles`` (principal
angles), ``masks`` (principal / low-magnitude masks and their overlap with the update),
``norms`` (‖ΔW‖_F in float64 blocks).
Trajectory diagnostics (SPEC §2): ``lowrank``, ``subspace``, ``overlap``.
Subspace-projected training (SPEC §3): ``rowspace`` (an update kept inside span(V_K)).
"""

from opdgeo.geometry.angles import principal_angles
from opdgeo.geometry.masks import low_magnitude_mask, mask_overlap, principal_mask
from opdgeo.geometry.sparsity import (
    BITWISE_ETA_BOUND,
    UnchangedCount,
    bf16_unchanged_count,
    bf16_unchanged_mask,
    bf16_visible_mask,
    legacy_unchanged_count,
    legacy_unchanged_mask,
)
from opdgeo.geometry.norms import update_norms
from opdgeo.geometry.rowspace import out_of_span_energy, project_change, project_rows
from opdgeo.geometry.spectrum import (
    Subspaces,
    normalized_spectral_shift,
    singular_values,
    top_singular_subspaces,
)

__all__ = [
    "BITWISE_ETA_BOUND",
    "Subspaces",
    "UnchangedCount",
    "bf16_unchanged_count",
    "bf16_unchanged_mask",
    "bf16_visible_mask",
    "legacy_unchanged_count",
    "legacy_unchanged_mask",
    "low_magnitude_mask",
    "mask_overlap",
    "normalized_spectral_shift",
    "out_of_span_energy",
    "principal_angles",
    "principal_mask",
    "project_change",
    "project_rows",
    "singular_values",
    "top_singular_subspaces",
    "update_norms",
]

from opdgeo.geometry.lowrank import __all__ as _lowrank_all
from opdgeo.geometry.lowrank import *  # noqa: E402,F401,F403
from opdgeo.geometry.overlap import __all__ as _overlap_all
from opdgeo.geometry.overlap import *  # noqa: E402,F401,F403
from opdgeo.geometry.subspace import __all__ as _subspace_all
from opdgeo.geometry.subspace import *  # noqa: E402,F401,F403

__all__ += list(_lowrank_all) + list(_subspace_all) + list(_overlap_all)
