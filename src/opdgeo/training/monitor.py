"""Live geometry monitor (SPEC §3 Controls, our addition): the trajectory diagnostics of
SPEC §2, computed during training every N steps.

At each probe, for the cumulative update ΔW = W_step − W_origin of every monitored matrix
(the attention q, k, v, o of every layer, or the whole geometry set), it computes

- the stable rank ‖ΔW‖_F² / σ1², and ‖ΔW‖_F;
- Sim_16 = ‖V_16(prev)ᵀ V_16(now)‖_F² / 16 against the previous probe (not against the
  final checkpoint, which does not exist yet; absent at the first probe);
- the bf16-visible update density (fraction of entries visibly changed, SPEC §1);

then their unweighted means over matrices (``geometry/stable_rank``, ``geometry/fro_norm``,
``geometry/sim_prev``, ``geometry/density``) and, once Sim_16 has stayed ≥ 0.8 for M
consecutive probes, ``geometry/locked_at``: the probe step from which it has stayed there
(``geometry.subspace.locking_step`` on the probes so far). The lock is latched: once
reported, the step stays fixed for the rest of the run (our choice).

One implementation: ``probe_matrix`` calls ``opdgeo.analysis.update.update_metrics``, the
per-matrix function of ``opdgeo trajectory``, with the same settings (``TrajectoryOptions``
defaults, overridable here) and conventions (NaN for a zero update, V_K only when Sim_K is
defined). The live weights are first rounded to the run's checkpoint dtype (bf16 by
default, as the checkpoint's ``save_pretrained`` of a bf16 copy does), so a probe at step
s equals ``opdgeo trajectory`` on the ``step-s`` checkpoint (tested: stable rank and
‖ΔW‖_F per matrix, and Sim_16 against trajectory's Sim on the two-checkpoint run
[step-(s−N), step-s]).

The monitor keeps a copy of the origin's monitored matrices (in the checkpoint dtype) and
the previous probe's V_16 per matrix; nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import torch

from opdgeo.analysis.trajectory import TrajectoryOptions
from opdgeo.analysis.update import update_metrics
from opdgeo.checkpoints import ATTENTION_TYPES, GEOMETRY_TYPES, parse_tensor_name
from opdgeo.geometry.sparsity import bf16_visible_mask
from opdgeo.geometry.subspace import locking_step, subspace_similarity

__all__ = [
    "MATRIX_SETS",
    "MonitorSettings",
    "MatrixProbe",
    "Probe",
    "MonitorState",
    "monitored_names",
    "start_monitor",
    "probe_matrix",
    "probe",
    "restore_monitor",
]

MATRIX_SETS = {"attention": ATTENTION_TYPES, "all": GEOMETRY_TYPES}
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_TRAJ = TrajectoryOptions()  # the trajectory's defaults: the monitor uses the same settings


@dataclass(frozen=True)
class MonitorSettings:
    """What the monitor computes (validated by the training config)."""

    matrices: str = "attention"
    """``"attention"`` (q, k, v, o of every layer, the paper's set) or ``"all"`` (the
    geometry set: also gate, up, down)."""
    lock_probes: int = 3
    """M: report the locking step once Sim_16 has stayed ≥ ``threshold`` for M probes."""
    threshold: float = _TRAJ.lock_threshold
    """Locking level of Sim_16 (SPEC §2: 0.8)."""
    k: int = _TRAJ.sim_k
    """K of Sim_K (16). Sim is NaN for a matrix with min(m, n) < K, as in the trajectory."""
    k_hill: int = _TRAJ.k_hill
    """Top singular triplets computed per ΔW: max(k_hill, K) (as the trajectory, which also
    needs them for its Hill index), capped at min(m, n)."""
    eta: float = _TRAJ.eta
    """bf16 visibility tolerance η (SPEC §1)."""
    dtype: str = "bfloat16"
    """Weights are rounded to this dtype before differencing: the run's checkpoint dtype,
    so that probes equal the trajectory of the saved checkpoints."""
    per_matrix: bool = False
    """Also return ``geometry/<metric>/<tensor name>`` for every monitored matrix."""
    seed: int = _TRAJ.seed
    """Seed of the randomized SVD (as the trajectory's)."""
    oversample: int = _TRAJ.oversample
    n_iter: int = _TRAJ.n_iter
    tol: float = _TRAJ.tol

    def __post_init__(self):
        if self.matrices not in MATRIX_SETS:
            raise ValueError(f"matrices must be one of {', '.join(MATRIX_SETS)}; got {self.matrices!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}; got {self.dtype!r}")
        if self.lock_probes < 1 or self.k < 1:
            raise ValueError(f"lock_probes and k must be >= 1; got {self.lock_probes}, {self.k}")


@dataclass(frozen=True)
class MatrixProbe:
    """The trajectory numbers of one matrix's cumulative update ΔW."""

    stable_rank: float
    fro_norm: float
    density: float
    V: torch.Tensor | None  # [n, K'] float64 top right singular vectors; None when Sim_K is undefined
    rel_fro_norm: float = float("nan")
    """‖ΔW‖_F / ‖W0‖_F (the trajectory's ``rel_fro_norm``)."""
    hill_alpha: float = float("nan")
    """Hill index of the top ``k_hill`` singular values (the trajectory's ``hill_alpha``)."""


@dataclass(frozen=True)
class Probe:
    """Result of one probe (means over the monitored matrices)."""

    step: int
    stable_rank: float
    fro_norm: float
    density: float
    sim_prev: float | None
    """Mean Sim_K to the previous probe; None at the first probe."""
    locked_at: int | None
    per_matrix: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    matrices: Mapping[str, MatrixProbe] = field(default_factory=dict)
    """Every monitored matrix's ``MatrixProbe`` (the rows of a ``trajectory.csv``)."""

    def as_metrics(self) -> dict[str, float]:
        """``metrics.jsonl`` entries (stable names)."""
        out = {
            "geometry/stable_rank": self.stable_rank,
            "geometry/fro_norm": self.fro_norm,
            "geometry/density": self.density,
        }
        if self.sim_prev is not None:
            out["geometry/sim_prev"] = self.sim_prev
        if self.locked_at is not None:
            out["geometry/locked_at"] = float(self.locked_at)
        for name, row in self.per_matrix.items():
            for metric, value in row.items():
                out[f"geometry/{metric}/{name}"] = value
        return out

    def summary(self) -> str:
        """Short text for the progress bar."""
        text = f"srank {self.stable_rank:.1f} dens {100 * self.density:.0f}%"
        if self.sim_prev is not None:
            text += f" sim {self.sim_prev:.2f}"
        if self.locked_at is not None:
            text += f" locked@{self.locked_at}"
        return text


@dataclass(frozen=True)
class MonitorState:
    """Everything the monitor carries between probes."""

    settings: MonitorSettings
    origin: Mapping[str, torch.Tensor]  # name -> W_origin in settings.dtype, CPU
    steps: tuple[int, ...] = ()  # probes that have a sim_prev
    sims: tuple[float, ...] = ()
    prev_V: Mapping[str, torch.Tensor | None] | None = None
    locked_at: int | None = None


def monitored_names(named_shapes: Iterable[tuple[str, tuple]], matrices: str) -> list[str]:
    """Names of the 2-D block weights of the chosen set (``"attention"`` or ``"all"``), in order."""
    types = MATRIX_SETS[matrices]
    return [name for name, shape in named_shapes if len(tuple(shape)) == 2 and parse_tensor_name(name).type in types]


def _rounded(w: torch.Tensor, dtype: torch.dtype, *, copy: bool = False) -> torch.Tensor:
    return w.detach().to(device="cpu", dtype=dtype, copy=copy)


def start_monitor(weights: Mapping[str, torch.Tensor], settings: MonitorSettings) -> MonitorState:
    """Snapshot the origin: the monitored matrices of ``weights`` rounded to the checkpoint dtype.

    Args:
        weights: name -> tensor of the run's origin (e.g. ``dict(model.named_parameters())``
            before the first step, or a loaded origin checkpoint).
        settings: ``MonitorSettings``.

    Raises:
        ValueError: no matrix of the chosen set in ``weights``.
    """
    names = monitored_names(((n, tuple(w.shape)) for n, w in weights.items()), settings.matrices)
    if not names:
        raise ValueError(f"no {settings.matrices} matrices to monitor")
    dtype = _DTYPES[settings.dtype]
    origin = {n: _rounded(weights[n], dtype, copy=True) for n in names}  # never an alias of live weights
    return MonitorState(settings=settings, origin=MappingProxyType(origin))


def probe_matrix(w0: torch.Tensor, w1: torch.Tensor, settings: MonitorSettings | None = None) -> MatrixProbe:
    """Trajectory numbers of one matrix's update ΔW = w1 − w0: stable rank, ‖ΔW‖_F, V_K, density.

    ``opdgeo.analysis.update.update_metrics`` (the trajectory's per-matrix function) with
    the monitor's settings, plus the bf16-visible density ``mean(bf16_visible_mask(w0, w1, eta))``.

    Args:
        w0, w1: [m, n] the origin and current matrix (any floating dtype; the monitor
            passes them rounded to the checkpoint dtype).
        settings: ``MonitorSettings`` (defaults: the trajectory's).

    Returns:
        ``MatrixProbe``; a zero update has NaN stable rank and ``V = None``; ``V`` is also
        None when Sim_K is undefined (σ_K ≤ RANK_RTOL·σ1 or min(m, n) < K).
    """
    s = settings or MonitorSettings()
    density = float(bf16_visible_mask(w0, w1, eta=s.eta).to(torch.float64).mean())
    options = TrajectoryOptions(k_hill=s.k_hill, sim_k=s.k, eta=s.eta, oversample=s.oversample, n_iter=s.n_iter,
                                tol=s.tol, seed=s.seed)
    um = update_metrics(w0, w1, options)
    return MatrixProbe(stable_rank=um.stable_rank, fro_norm=um.fro_norm, density=density,
                       V=um.V if um.defined(s.k) else None, rel_fro_norm=um.rel_fro_norm, hill_alpha=um.hill_alpha)


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def probe(state: MonitorState, step: int, weights: Mapping[str, torch.Tensor]) -> tuple[Probe, MonitorState]:
    """One probe of the cumulative update at ``step``; returns the probe and the new state.

    Args:
        state: from ``start_monitor`` or the previous ``probe``.
        step: the optimizer step just taken (1-based, as the checkpoint names).
        weights: name -> current tensor (e.g. ``dict(model.named_parameters())``); only the
            monitored names are read, each rounded to the checkpoint dtype first.

    Returns:
        ``(Probe, MonitorState)``. Means over matrices ignore NaNs (the stable rank of a
        matrix that has not changed is undefined), and are NaN when every matrix is.

    Raises:
        KeyError: a monitored matrix missing from ``weights`` (internal).
    """
    s = state.settings
    dtype = _DTYPES[s.dtype]
    rows: dict[str, dict[str, float]] = {}
    Vs: dict[str, torch.Tensor] = {}
    probes: dict[str, MatrixProbe] = {}
    srs, fros, dens, sims = [], [], [], []
    for name, w0 in state.origin.items():
        w1 = _rounded(weights[name], dtype)
        mp = probe_matrix(w0, w1, s)
        del w1  # one gathered matrix at a time: released before the next one is read
        probes[name] = mp
        Vs[name] = mp.V
        srs.append(mp.stable_rank)
        fros.append(mp.fro_norm)
        dens.append(mp.density)
        row = {"stable_rank": mp.stable_rank, "fro_norm": mp.fro_norm, "density": mp.density}
        if state.prev_V is not None:
            prev = state.prev_V[name]
            sim = subspace_similarity(prev, mp.V, K=s.k) if prev is not None and mp.V is not None else float("nan")
            sims.append(sim)
            row["sim_prev"] = sim
        rows[name] = row
    sim_prev = _nanmean(sims) if state.prev_V is not None else None
    steps, hist = state.steps, state.sims
    locked = state.locked_at
    if sim_prev is not None:
        steps, hist = steps + (step,), hist + (sim_prev,)
        if locked is None and len(hist) >= s.lock_probes and all(x >= s.threshold for x in hist[-s.lock_probes:]):
            locked = locking_step(list(steps), list(hist), threshold=s.threshold)
    result = Probe(
        step=step,
        stable_rank=_nanmean(srs),
        fro_norm=_nanmean(fros),
        density=_nanmean(dens),
        sim_prev=sim_prev,
        locked_at=locked,
        per_matrix=MappingProxyType(rows) if s.per_matrix else MappingProxyType({}),
        matrices=MappingProxyType(probes),
    )
    new_state = replace(state, steps=steps, sims=hist, prev_V=MappingProxyType(Vs), locked_at=locked)
    return result, new_state


def restore_monitor(
    state: MonitorState,
    records: Iterable[Mapping],
    *,
    every: int,
    step: int,
    weights: Mapping[str, torch.Tensor],
) -> MonitorState:
    """The monitor's state after ``step`` steps of a run that is being resumed.

    The probe history (steps, Sim_16 to the previous probe, the latched locking step) is
    read back from the run's ``metrics.jsonl`` records up to ``step`` (JSON floats round-trip
    exactly); the previous probe's V_K is recomputed from ``weights`` when ``step`` was a
    probe step (the restored master weights are the ones that probe saw, so the basis is
    the same). A resumed run therefore logs what an uninterrupted one would.

    Args:
        state: a fresh ``start_monitor`` state (same origin as the run).
        records: the run's metrics records (``{"step": s, "geometry/...": ...}``).
        every: ``run.monitor_every``.
        step: the step the run resumes after.
        weights: the restored weights (name -> tensor).
    """
    steps, sims, locked = [], [], None
    for rec in records:
        s = int(rec.get("step", 0))
        if s > step:
            continue
        if "geometry/sim_prev" in rec:
            steps.append(s)
            sims.append(float(rec["geometry/sim_prev"]))
        if "geometry/locked_at" in rec:
            locked = int(rec["geometry/locked_at"])
    state = replace(state, steps=tuple(steps), sims=tuple(sims), locked_at=locked)
    if step > 0 and step % every == 0:
        dtype = _DTYPES[state.settings.dtype]
        s = state.settings
        Vs = {name: probe_matrix(w0, _rounded(weights[name], dtype), s).V for name, w0 in state.origin.items()}
        state = replace(state, prev_V=MappingProxyType(Vs))
    return state
