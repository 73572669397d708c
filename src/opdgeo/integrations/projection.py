"""Subspace-projected training in any ``transformers.Trainer``: ``SubspaceProjection``.

The semantics of ``project`` in ``opdgeo train`` (SPEC §3 "Subspace projection"):

- at the projection point — after optimizer step ``start`` (an int), or at the start of
  training when ``start`` is a checkpoint — take for every monitored block matrix (the
  geometry set q, k, v, o, gate, up, down; or only the attention q, k, v, o) the top-K right
  singular vectors V_K of its cumulative update ΔW = W_from − W_origin (W_from: the
  weights at step ``start`` or the ``start`` checkpoint; W_origin: the weights when
  training began, or the ``origin`` checkpoint);
- from then on, after every optimizer step, put each such matrix back to
  W_p + (W − W_p) V_K V_Kᵀ (``opdgeo.geometry.rowspace.project_change``), W_p its weights
  at the projection point: the change since the projection point stays in span(V_K)
  row-wise to rounding, with AdamW as with SGD;
- every other parameter is frozen while projecting (our choice, as ``opdgeo train``):
  restored to its value at the projection point after every step, which holds for any
  optimizer (weight decay and momentum included) and any wrapper;
- logged through the trainer every ``logging_steps``, as ``opdgeo train`` logs them:
  ``project/out_of_subspace_fraction`` = Σ‖D − D V Vᵀ‖² / Σ‖D‖² over the projected
  matrices, D the change of the step as stored (the weights after the projection minus
  those before ``optimizer.step()``, float64: only rounding remains, ~1e-14), and
  ``project/out_of_subspace_max``, the worst matrix's own fraction; beside them
  ``project/removed_fraction``, the same pooled share of the optimizer's own update
  before the projection (what the projection took away: ~0.8 for AdamW at K = 4 on the
  tiny model).

Distributed: under DDP every rank projects its replica (the same numbers, so replicas stay
equal); under FSDP2 (row-sharded ``DTensor`` s, ``Shard(0)``) every rank projects its own
rows — projection acts on rows, so no communication but the V_K computation's one gather
per matrix and one all-reduce of the energies per logged step. DeepSpeed ZeRO-3's flat
partitions are not row-aligned: not supported (``ConfigError``).

Memory: V_K per matrix (n·K float64), W_p of the projected matrices and a copy of the
frozen parameters (as stored: shards under FSDP2).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainerCallback

from opdgeo import distributed
from opdgeo.errors import CheckpointError, ConfigError
from opdgeo.geometry.rowspace import out_of_span_energy, project_change
from opdgeo.geometry.spectrum import top_singular_subspaces
from opdgeo.integrations.weights import full_matrix, named_matrices
from opdgeo.training.monitor import MATRIX_SETS, monitored_names

__all__ = ["SubspaceProjection"]


def _local(p: torch.Tensor) -> torch.Tensor:
    """The rows this rank holds of a parameter (all of them unless FSDP2 shards it)."""
    from torch.distributed.tensor import DTensor, Shard

    from opdgeo.integrations.weights import LoraMatrix

    if isinstance(p, LoraMatrix):
        raise ConfigError("SubspaceProjection constrains full matrices; this model trains LoRA adapters")
    if isinstance(p, DTensor):
        if any(not isinstance(pl, Shard) or pl.dim != 0 for pl in p.placements):
            raise ConfigError(f"SubspaceProjection needs row-sharded (Shard(0)) parameters; got {p.placements}")
        return p.to_local()
    if hasattr(p, "ds_id"):
        raise ConfigError("SubspaceProjection does not support DeepSpeed ZeRO-3 (flat, not row-aligned "
                          "partitions); use DDP or FSDP2")
    return p.data


class SubspaceProjection(TrainerCallback):
    """Keep the update after a projection point inside span(V_K) (module docstring).

    Args:
        rank: K, 1 ≤ K ≤ min(m, n) of every projected matrix.
        start: an optimizer step S ≥ 1 (V_K from the weights after step S; steps S+1, …
            projected) or a checkpoint (folder or file: V_K of checkpoint − origin,
            projecting from the first step; e.g. the checkpoint the run resumes from).
        origin: W_origin checkpoint; default the weights when training begins (then
            ``start`` must be a step). Required when ``start`` is a checkpoint.
        matrices: ``"all"`` (the geometry set, as ``opdgeo train``) or ``"attention"``.
        freeze_others: freeze every other parameter while projecting (default True, our choice).

    Attributes:
        subspaces: name -> V_K [n, K] float64 once projecting.
        last: the metrics of the last projected step.

    Raises:
        ConfigError: invalid arguments, a rank too large for a matrix, ZeRO-3.
        CheckpointError: a checkpoint without a projected matrix or with another shape.
    """

    def __init__(self, rank: int = 16, start=None, *, origin=None, matrices: str = "all",
                 freeze_others: bool = True):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"SubspaceProjection rank must be an integer >= 1; got {rank!r}")
        if matrices not in MATRIX_SETS:
            raise ConfigError(f"SubspaceProjection matrices must be one of {', '.join(MATRIX_SETS)}; got {matrices!r}")
        if isinstance(start, bool) or start is None or (isinstance(start, int) and start < 1):
            raise ConfigError(f"SubspaceProjection start must be a step >= 1 or a checkpoint; got {start!r}")
        if not isinstance(start, int) and origin is None:
            raise ConfigError("SubspaceProjection: start is a checkpoint, so origin (the checkpoint its update is "
                              "measured from) is needed")
        self.rank, self.start, self.origin, self.matrices = rank, start, origin, matrices
        self.freeze_others = freeze_others
        self.subspaces: dict[str, torch.Tensor] = {}
        self.last: dict[str, float] = {}
        self._params: dict[str, torch.Tensor] = {}
        self._origin: dict[str, torch.Tensor] = {}
        self._from: dict[str, torch.Tensor] = {}
        self._frozen: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._energy: dict[str, tuple[float, float, float]] = {}  # name -> (outside, ‖D‖², removed) of the step
        self._before: dict[str, torch.Tensor] = {}  # name -> rows before optimizer.step()
        self._trainer = None

    # ------------------------------------------------------------------ trainer events

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from opdgeo.integrations.transformers import calling_trainer

        self._trainer = calling_trainer()
        mats = named_matrices(model)
        names = monitored_names(((n, tuple(p.shape)) for n, p in mats.items()), self.matrices)
        if not names:
            raise ConfigError(f"SubspaceProjection: the model has no {self.matrices} block matrices")
        for name in names:
            m, n = mats[name].shape
            if self.rank > min(m, n):
                raise ConfigError(f"SubspaceProjection rank must be <= min(m, n) = {min(m, n)} for {name}; "
                                  f"got {self.rank}")
        self._params = {n: mats[n] for n in names}
        self._model = model
        if self.origin is None:  # W_origin: the weights now, on CPU (every rank: each computes V_K)
            self._origin = {n: full_matrix(p).to("cpu", copy=True) for n, p in self._params.items()}
        if not isinstance(self.start, int):
            self._activate(self._read(self.start))
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.subspaces:
            self._before = {n: _local(p).detach().clone() for n, p in self._params.items()}
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.subspaces:
            self._project()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if isinstance(self.start, int) and state.global_step == self.start and not self.subspaces:
            self._activate({n: full_matrix(p).to("cpu") for n, p in self._params.items()})
        every = int(args.logging_steps) if args.logging_steps >= 1 else 1
        if self._energy and state.global_step % every == 0:
            self.last = self._metrics()
            if state.is_world_process_zero:
                from opdgeo.integrations.transformers import log_through

                log_through(self._trainer, state, self.last)
        return control

    # ------------------------------------------------------------------------ the work

    def _read(self, path) -> dict[str, torch.Tensor]:
        from opdgeo.checkpoints import open_checkpoint

        ckpt = open_checkpoint(Path(path))
        out = {}
        for name, p in self._params.items():
            if name not in ckpt:
                raise CheckpointError(f"{path}: no tensor {name} (a projected matrix)")
            w = ckpt.load(name)
            if tuple(w.shape) != tuple(p.shape):
                raise CheckpointError(f"{path}: tensor {name} has shape {list(w.shape)}; the model's is "
                                      f"{list(p.shape)}")
            out[name] = w
        return out

    @torch.no_grad()
    def _activate(self, w_from) -> None:
        """V_K of ΔW = W_from − W_origin per matrix; W_p = the weights now; freeze the rest."""
        origin = self._origin if self.origin is None else self._read(self.origin)
        for name, p in self._params.items():
            delta = w_from[name].to(torch.float64) - origin[name].to(torch.float64)  # [m, n]
            if not bool(torch.isfinite(delta).all()):
                raise ConfigError(f"SubspaceProjection: the update of {name} has non-finite entries")
            self.subspaces[name] = top_singular_subspaces(delta, self.rank).V.to(_local(p).device)  # [n, K]
            self._from[name] = _local(p).detach().clone()
        self._origin = {}
        if self.freeze_others:
            projected = {id(p) for p in self._params.values()}
            self._frozen = [(p, _local(p).detach().clone()) for p in self._model.parameters()
                            if p.requires_grad and id(p) not in projected]

    @torch.no_grad()
    def _project(self) -> None:
        for name, p in self._params.items():
            local = _local(p)
            new, _, removed = project_change(local, self._from[name], self.subspaces[name])
            local.copy_(new)
            before = self._before.pop(name)
            outside, total = out_of_span_energy(local.double() - before.double(), self.subspaces[name])  # D, stored
            self._energy[name] = (outside, total, removed)
        for p, saved in self._frozen:
            _local(p).copy_(saved)

    def _metrics(self) -> dict[str, float]:
        energy = torch.tensor([self._energy[n] for n in self._params], dtype=torch.float64)  # [matrices, 3]
        if self._sharded():  # each rank holds some rows of every matrix
            energy = distributed.all_reduce_sum(energy)
        outside, total, removed = energy[:, 0], energy[:, 1], energy[:, 2]
        nan = float("nan")
        moved = total > 0
        # the optimizer's own update U: ‖U‖² = ‖D‖² (kept) + removed (orthogonal parts)
        own = float((total + removed).sum())
        return {"project/out_of_subspace_fraction": float(outside.sum() / total.sum()) if bool(moved.any()) else nan,
                "project/out_of_subspace_max": float((outside[moved] / total[moved]).max()) if bool(moved.any())
                else nan,
                "project/removed_fraction": float(removed.sum()) / own if own > 0 else nan}

    def _sharded(self) -> bool:
        from torch.distributed.tensor import DTensor

        return any(isinstance(p, DTensor) for p in self._params.values())
