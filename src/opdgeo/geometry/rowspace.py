"""Keeping an update inside a row space: the projection step of subspace-projected training.

For a matrix whose training is confined to span(V_K) (V [n, K] orthonormal, the top-K right
singular vectors of an earlier update), the weights after every optimizer step are put
back to

    W ← W_p + (W − W_p) V Vᵀ

with W_p the weights at the projection point. Every row of W − W_p then lies in span(V_K)
whatever the optimizer did (AdamW's elementwise scaling and decoupled weight decay move
the weights out of span(V) even when every gradient lies in it; projecting the change
after the step keeps them in). ``project_change`` also returns the energy the optimizer
put outside, ‖D − D V Vᵀ‖_F² with D = W − W_p before the projection, and the coordinates
D V [m, K] of what it kept, from which a caller gets the step's own update energy and
pools ``out_of_subspace_fraction`` = Σ outside / Σ ‖update‖² over matrices.

Pure torch; float64 by default (the projector is applied to a small difference of two
large, nearly equal matrices: float64 keeps the change's own rounding below 1e-12 of it).

Source: SPEC §3 "Subspace projection (functional sufficiency)" (Shen et al. 2026); V_K as
in Sim_K (SPEC §2).
"""

from __future__ import annotations

import torch

__all__ = ["project_rows", "project_change", "out_of_span_energy"]


def _check(d: torch.Tensor, basis: torch.Tensor) -> None:
    if d.dim() != 2 or basis.dim() != 2 or basis.shape[0] != d.shape[1]:
        raise ValueError(f"need a matrix [m, n] and a basis [n, K]; got {tuple(d.shape)} and {tuple(basis.shape)}")


def project_rows(d: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """D V Vᵀ: every row of ``d`` projected onto span(V).

    Args:
        d: [m, n] floating matrix.
        basis: [n, K] V with orthonormal columns.

    Returns:
        [m, n] in ``d``'s dtype, computed as (D V) Vᵀ (2·m·n·K flops; never the n×n projector).

    Raises:
        ValueError: shapes that do not fit.
    """
    _check(d, basis)
    v = basis.to(device=d.device, dtype=d.dtype)
    return (d @ v) @ v.T  # [m, K] @ [K, n]


def out_of_span_energy(d: torch.Tensor, basis: torch.Tensor) -> tuple[float, float]:
    """(‖D − D V Vᵀ‖_F², ‖D‖_F²) in float64: the energy of ``d`` outside span(V), and its total."""
    d64 = d.to(torch.float64)
    outside = d64 - project_rows(d64, basis)
    return float(outside.pow(2).sum()), float(d64.pow(2).sum())


@torch.no_grad()
def project_change(w: torch.Tensor, w_from: torch.Tensor, basis: torch.Tensor, *,
                   dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, float]:
    """W_p + (W − W_p) V Vᵀ, with the coordinates of the kept change and the energy removed.

    Args:
        w: [m, n] the weights after an optimizer step.
        w_from: [m, n] W_p, the weights at the projection point (same shape).
        basis: [n, K] V with orthonormal columns.
        dtype: compute dtype (float64 default; module docstring).

    Returns:
        ``(w_new, coeff, outside)``: ``w_new`` [m, n] in ``w``'s dtype and device;
        ``coeff`` = D V [m, K] in ``dtype`` (the kept change is ``coeff @ Vᵀ``, and
        ‖D V Vᵀ‖_F² = ‖coeff‖_F²); ``outside`` = ‖D − D V Vᵀ‖_F² (float64), D = W − W_p.
        For the step's own update U = W − W_before, with W_before = W_p + coeff_prev Vᵀ the
        previous projected weights, ‖U‖² = outside + ‖coeff − coeff_prev‖² (the part of D
        outside span(V) is all the step's, since W_before − W_p lies in span(V)).

    Raises:
        ValueError: shapes that do not fit.
    """
    if w.shape != w_from.shape:
        raise ValueError(f"w and w_from must have one shape; got {tuple(w.shape)} and {tuple(w_from.shape)}")
    _check(w, basis)
    base = w_from.to(dtype)
    d = w.to(dtype) - base  # [m, n] D, the change since the projection point
    v = basis.to(device=d.device, dtype=dtype)
    coeff = d @ v  # [m, K]
    kept = coeff @ v.T  # [m, n]
    outside = float((d - kept).pow(2).sum(dtype=torch.float64))
    return (base + kept).to(w.dtype), coeff, outside
