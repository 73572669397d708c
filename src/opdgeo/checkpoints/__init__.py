"""Streaming checkpoint reader (SPEC §4): open a checkpoint, list and load tensors one by one.

See ``opdgeo.checkpoints.reader`` for the supported sources, the naming rules (tied
tensors listed once, fused projections split) and ``opdgeo.checkpoints.names`` for the
tensor-name parser.
"""

from opdgeo.checkpoints.names import (
    ATTENTION_TYPES,
    GEOMETRY_TYPES,
    TYPES,
    TensorName,
    is_geometry_matrix,
    parse_tensor_name,
)
from opdgeo.checkpoints.reader import Checkpoint, TensorInfo, open_checkpoint, pair_names
from opdgeo.checkpoints.steps import checkpoint_step_of, list_checkpoint_dirs, list_step_dirs, step_dir_name, step_of
from opdgeo.sources import hf_hub_cache

__all__ = [
    "ATTENTION_TYPES",
    "GEOMETRY_TYPES",
    "TYPES",
    "Checkpoint",
    "TensorInfo",
    "TensorName",
    "hf_hub_cache",
    "is_geometry_matrix",
    "checkpoint_step_of",
    "list_checkpoint_dirs",
    "list_step_dirs",
    "open_checkpoint",
    "pair_names",
    "parse_tensor_name",
    "step_dir_name",
    "step_of",
]
