"""The trajectory's metrics of one matrix's update, as one public function (SPEC §2).

``update_metrics(w0, w_t, options)`` is what ``opdgeo trajectory`` computes for every
matrix of every checkpoint, what the training monitor computes at every probe, and what a
callback of any other trainer should call: one implementation, so a number logged during
training equals the number ``opdgeo trajectory`` gives for the saved checkpoint.

For ΔW = W_t − W0 (float64, exact for bf16/fp16/fp32 inputs):

- ``fro_norm`` = ‖ΔW‖_F; ``rel_fro_norm`` = ‖ΔW‖_F / ‖W0‖_F;
- ``stable_rank`` = ‖ΔW‖_F² / σ1(ΔW)² (``geometry.lowrank.stable_rank``, with σ1 clipped
  to ‖ΔW‖_F against round-off);
- ``hill_alpha``: Hill tail index of the top ``k_hill`` singular values
  (``geometry.lowrank.hill_alpha``);
- the top ``K' = min(max(k_hill, sim_k), min(m, n))`` singular values ``S`` and right
  singular vectors ``V`` (``geometry.lowrank.top_svd``: the exact float64 thin SVD when
  min(m, n) ≤ ``EXACT_SVD_MAX_DIM`` = 192, where it is the cheaper route, the randomized
  top-K' SVD above; a full float64 SVD of every matrix with ``exact_svd``), kept so that
  ``subspace_similarity`` of two updates can follow (``sim(a, b, K)``).

Conventions (documented in docs/trajectory.md): a metric that is undefined is NaN — the
stable rank of a zero update; the Hill index when min(m, n) < k_hill or
σ_{k_hill} ≤ ``RANK_RTOL``·σ1 (numerical rank below k_hill); Sim_K when either update has
min(m, n) < K or σ_K ≤ ``RANK_RTOL``·σ1. A non-finite W_t gives non-finite ``fro_norm``
and NaN elsewhere (callers decide whether that is an error).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from opdgeo.geometry.lowrank import exact_svd, hill_alpha, stable_rank, top_svd
from opdgeo.geometry.subspace import subspace_similarity

__all__ = ["RANK_RTOL", "UpdateMetrics", "sim", "update_metrics"]

# A singular value at or below RANK_RTOL · σ1 counts as zero (numerical rank): the
# float32 iteration of the randomized top-k SVD leaves ~1e-7 σ1 on zero singular values.
RANK_RTOL = 1e-6


@dataclass(frozen=True)
class UpdateMetrics:
    """The trajectory's numbers of one update ΔW = W_t − W0.

    Attributes:
        fro_norm: ‖ΔW‖_F.
        rel_fro_norm: ‖ΔW‖_F / ‖W0‖_F (NaN when W0 = 0).
        stable_rank: ‖ΔW‖_F² / σ1² (NaN for a zero update).
        hill_alpha: Hill index of the top ``k_hill`` singular values (NaN when undefined).
        S: top K' singular values, descending, float64 (None for a zero or non-finite update).
        V: ``[n, K']`` top right singular vectors, float64 (None likewise).
    """

    fro_norm: float
    rel_fro_norm: float
    stable_rank: float
    hill_alpha: float
    S: torch.Tensor | None
    V: torch.Tensor | None

    def defined(self, k: int) -> bool:
        """True when the top-``k`` subspace is defined: k ≤ K' and σ_k > RANK_RTOL·σ1."""
        return self.S is not None and self.S.numel() >= k and float(self.S[k - 1]) > RANK_RTOL * float(self.S[0])


def update_metrics(w0: torch.Tensor, w_t: torch.Tensor, options=None, *, w0_norm: float | None = None) -> UpdateMetrics:
    """The trajectory's metrics of ΔW = ``w_t`` − ``w0`` (module docstring).

    Args:
        w0, w_t: ``[m, n]`` the origin and the later matrix, any floating dtypes.
        options: a ``TrajectoryOptions`` (``k_hill``, ``sim_k``, ``oversample``, ``n_iter``,
            ``tol``, ``seed``, ``exact_svd``); ``None`` means its defaults.
        w0_norm: ‖W0‖_F when the caller already has it (several checkpoints of one origin).

    Returns:
        ``UpdateMetrics``.

    Raises:
        ValueError: shapes that differ or are not 2-D.
    """
    if options is None:
        from opdgeo.analysis.trajectory import TrajectoryOptions

        options = TrajectoryOptions()
    if w0.ndim != 2 or w0.shape != w_t.shape:
        raise ValueError(f"w0 and w_t must be matrices of one shape; got {tuple(w0.shape)} and {tuple(w_t.shape)}")
    a = w0.to(torch.float64)
    if w0_norm is None:
        w0_norm = float(torch.linalg.matrix_norm(a))
    d = w_t.to(torch.float64) - a  # [m, n] ΔW_t, exact for bf16/fp32 inputs
    del a
    fro = float(torch.linalg.matrix_norm(d))
    nan = float("nan")
    rel = fro / w0_norm if w0_norm > 0 else nan
    if fro == 0.0 or not math.isfinite(fro):
        return UpdateMetrics(fro, rel, nan, nan, None, None)
    kk = min(max(options.k_hill, options.sim_k), min(d.shape))
    if options.exact_svd:
        _, s, v = exact_svd(d)
        s, v = s[:kk], v[:, :kk]
    else:
        _, s, v = top_svd(d, kk, oversample=options.oversample, n_iter=options.n_iter, tol=options.tol,
                          seed=options.seed)
    del d
    srank = stable_rank(fro**2, min(float(s[0]), fro))
    out = UpdateMetrics(fro, rel, srank, nan, s, v)
    if out.defined(options.k_hill):
        out = UpdateMetrics(fro, rel, srank, hill_alpha(s, options.k_hill), s, v)
    return out


def sim(a: UpdateMetrics, b: UpdateMetrics, k: int) -> float:
    """Sim_K of two updates of one matrix: ‖V_K(a)ᵀ V_K(b)‖_F² / K, NaN when either top-K
    subspace is undefined (``UpdateMetrics.defined``)."""
    if not (a.defined(k) and b.defined(k)):
        return float("nan")
    return subspace_similarity(a.V, b.V, k)
