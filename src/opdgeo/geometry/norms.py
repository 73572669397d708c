"""Frobenius norms of an update, in float64, without a full-size float64 copy."""

from __future__ import annotations

import math

import torch

__all__ = ["update_norms"]

#: Elements per block (a few MiB of float64 scratch; the result does not depend on it).
DEFAULT_CHUNK = 1 << 18


def update_norms(w0: torch.Tensor, w1: torch.Tensor, *, chunk: int = DEFAULT_CHUNK) -> tuple[float, float]:
    """``(‖w1 − w0‖_F, ‖w0‖_F)`` of the values as stored, accumulated in float64.

    Formula: ``‖ΔW‖_F = sqrt(Σ_i (w1_i − w0_i)²)`` with each difference taken in float64
    (exact for bf16/fp16/fp32 inputs), summed block by block (``chunk`` elements, so
    memory is ``O(chunk)``); ``‖W0‖_F`` likewise. Non-finite inputs give a non-finite
    norm.

    Args:
        w0, w1: tensors of one shape on one device, any floating dtypes.
        chunk: elements per block, >= 1.

    Returns:
        ``(fro_norm, w0_fro_norm)`` as Python floats.

    Raises:
        ValueError: different shapes, non-floating inputs, ``chunk < 1``.
    """
    if w0.shape != w1.shape:
        raise ValueError(f"w0 and w1 must have the same shape; got {tuple(w0.shape)} and {tuple(w1.shape)}")
    if not (w0.is_floating_point() and w1.is_floating_point()):
        raise ValueError(f"w0 and w1 must be floating-point tensors; got {w0.dtype} and {w1.dtype}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1; got {chunk!r}")
    f0, f1 = w0.detach().reshape(-1), w1.detach().reshape(-1)  # [N]
    delta_sq = base_sq = 0.0
    for lo in range(0, f0.numel(), chunk):
        a = f0[lo : lo + chunk].to(torch.float64)
        d = f1[lo : lo + chunk].to(torch.float64) - a  # [chunk]; out of place: a float64 input is not copied by .to
        delta_sq += float(torch.dot(d, d))
        base_sq += float(torch.dot(a, a))
    return math.sqrt(delta_sq), math.sqrt(base_sq)
