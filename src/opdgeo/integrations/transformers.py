"""opdgeo's geometry monitor and subspace projection as ``transformers.TrainerCallback`` s.

Add them to any ``transformers.Trainer`` — and so to TRL's ``SFTTrainer``, ``GRPOTrainer``,
``GKDTrainer`` and their kin — with ``callbacks=[...]``::

    from opdgeo.integrations.transformers import GeometryMonitor, SubspaceProjection
    trainer = SFTTrainer(..., callbacks=[GeometryMonitor(every=10), SubspaceProjection(rank=16, start=40)])

``GeometryMonitor`` computes, every ``every`` optimizer steps, the live geometry monitor of
``opdgeo train`` (``opdgeo.training.monitor.probe``: the per-matrix function
``opdgeo.analysis.update.update_metrics`` of ``opdgeo trajectory``, with its settings), logs
the ``geometry/...`` keys through the trainer's own ``log`` (so they reach whatever
``report_to`` names, and ``trainer.state.log_history``), and writes a ``trajectory.csv``
with the schema of ``opdgeo trajectory`` (``opdgeo.analysis.trajectory.COLUMNS``).

``SubspaceProjection``: see ``opdgeo.integrations.projection``.

Distributed: under DDP rank 0 computes and logs, the other ranks do nothing; under FSDP2 /
DeepSpeed ZeRO-3 every rank takes part in gathering one matrix at a time
(``opdgeo.integrations.weights``) and rank 0 computes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from transformers import TrainerCallback

from opdgeo.errors import CheckpointError, ConfigError
from opdgeo.integrations.projection import SubspaceProjection
from opdgeo.integrations.weights import LiveWeights, full_matrix, is_sharded, matrix_shape, named_matrices
from opdgeo.training.monitor import MonitorSettings, MonitorState, MatrixProbe, monitored_names, probe

__all__ = ["GeometryMonitor", "SubspaceProjection", "calling_trainer", "log_through", "trajectory_rows"]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def calling_trainer():
    """The ``transformers.Trainer`` whose training loop is running the current callback
    event (the nearest ``self`` on the call stack that is a ``Trainer``), or None.

    A ``TrainerCallback`` receives the model, the optimizer and the state, but not the
    trainer; logging "through the trainer" (``Trainer.log``, which feeds ``log_history``
    and every ``report_to`` integration) needs it.
    """
    from transformers import Trainer

    frame = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, Trainer):
            return obj
        frame = frame.f_back
    return None


def log_through(trainer, state, metrics: Mapping[str, float]) -> None:
    """``trainer.log(metrics)`` (history and every reporting integration); without a
    trainer, appended to ``state.log_history`` with the step.

    ``transformers.Trainer.log`` itself, not a subclass's override: TRL's trainers override
    ``log`` to flush their own accumulated metrics into whatever is logged, which would move
    them into this record. ``Trainer.log`` resets ``control.should_log``; the flags are
    restored afterwards, or a rank that logs (rank 0) would skip the step's own loss logging
    — a collective gather under DDP — while the others wait in it.
    """
    if trainer is not None:
        from transformers import Trainer

        flags = dict(vars(trainer.control))
        Trainer.log(trainer, dict(metrics))
        vars(trainer.control).update(flags)
    else:
        state.log_history.append({**metrics, "step": state.global_step})


class _CheckpointOrigin(Mapping):
    """name -> W0 read from the starting checkpoint (rounded to ``dtype``) when asked:
    the monitor keeps no copy of the origin in memory."""

    def __init__(self, path, names: list[str], shapes: Mapping[str, tuple], dtype: torch.dtype):
        from opdgeo.checkpoints import open_checkpoint

        self._ckpt = open_checkpoint(path)
        self._names = list(names)
        self._dtype = dtype
        have = set(self._ckpt.names())
        for name in self._names:
            if name not in have:
                raise CheckpointError(f"{path}: no tensor {name} (the origin of the monitored matrix {name})")
            shape = tuple(self._ckpt.info(name).shape)
            if shape != tuple(shapes[name]):
                raise CheckpointError(f"{path}: tensor {name} has shape {list(shape)}; the model's is "
                                      f"{list(shapes[name])}")

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._ckpt.load(name).to(self._dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def trajectory_rows(run: str, history: list[tuple[int, Mapping[str, MatrixProbe]]], k: int) -> list[dict]:
    """``trajectory.csv`` rows (``opdgeo.analysis.trajectory.COLUMNS``) of a monitor's probes.

    ``sim_to_final`` is Sim_K to the last probe (the run's final checkpoint when the
    monitor probes it), NaN where either top-K subspace is undefined, as in the trajectory;
    progress = 100 · step / last probed step.
    """
    from opdgeo.checkpoints import parse_tensor_name
    from opdgeo.geometry.subspace import subspace_similarity

    if not history:
        return []
    last, final = history[-1]
    rows = []
    for step, mats in history:
        for name, mp in mats.items():
            ref = final[name].V
            parsed = parse_tensor_name(name)
            rows.append({
                "run": run, "step": step, "progress": 100.0 * step / last if last > 0 else 100.0,
                "name": name, "type": parsed.type, "stable_rank": mp.stable_rank, "fro_norm": mp.fro_norm,
                "rel_fro_norm": mp.rel_fro_norm, "hill_alpha": mp.hill_alpha,
                "sim_to_final": subspace_similarity(mp.V, ref, k) if mp.V is not None and ref is not None
                else float("nan"),
                "expert": parsed.expert,
            })
    return rows


class GeometryMonitor(TrainerCallback):
    """The live geometry monitor of ``opdgeo train`` for any ``transformers.Trainer``.

    Every ``every`` optimizer steps (``state.global_step % every == 0``, and once more at
    the end of training unless the last step was a probe), for the cumulative update
    ΔW = W_step − W_origin of every monitored matrix: stable rank, ‖ΔW‖_F, Sim_K to the
    previous probe and the bf16-visible density, averaged over matrices and logged as
    ``geometry/stable_rank``, ``geometry/fro_norm``, ``geometry/sim_prev``,
    ``geometry/density`` (and ``geometry/locked_at`` once locked), exactly as
    ``opdgeo train``'s ``run.monitor_every`` does. Weights are rounded to ``dtype`` first:
    the dtype the checkpoints are saved in, so that a probe equals ``opdgeo trajectory``
    on the checkpoint of that step (a Trainer saves the parameters' dtype: pass
    ``dtype="float32"`` for an fp32 model to match its ``checkpoint-N`` folders).

    Args:
        every: probe every N optimizer steps (N ≥ 1).
        matrices: ``"attention"`` (q, k, v, o of every block) or ``"all"`` (also gate, up, down).
        k: K of Sim_K (16).
        origin: W_origin: ``None`` — the weights when training begins, kept rounded to
            ``dtype`` on CPU (rank 0); or a checkpoint (folder or file) read one matrix at
            a time at every probe (no copy kept; the choice for a resumed run).
        dtype: ``"bfloat16"`` (default, as ``opdgeo train`` saves), ``"float16"`` or ``"float32"``.
        out: folder of ``trajectory.csv`` (default ``<output_dir>/geometry``), written at
            every checkpoint save and at the end of training; ``False``: none.
        run: the ``run`` column (default: the name of ``output_dir``).
        lock_probes, per_matrix: as ``MonitorSettings``.

    Attributes:
        probes: the ``Probe`` records so far (rank 0).
        history: ``(step, {name: MatrixProbe})`` per probe (rank 0), the table's rows. Keeps
            each matrix's top right singular vectors per probe (n·K' float64 each).

    Raises:
        ConfigError: invalid arguments; a model without matrices of the set; FSDP1.
        CheckpointError: an ``origin`` that lacks a monitored matrix or has another shape.
    """

    def __init__(self, every: int = 10, matrices: str = "attention", k: int = 16, *, origin=None,
                 dtype: str = "bfloat16", out=None, run: str | None = None, lock_probes: int = 3,
                 per_matrix: bool = False):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"GeometryMonitor every must be an integer >= 1; got {every!r}")
        try:
            self.settings = MonitorSettings(matrices=matrices, k=k, dtype=dtype, lock_probes=lock_probes,
                                            per_matrix=per_matrix)
        except ValueError as err:
            raise ConfigError(f"GeometryMonitor: {err}") from None
        self.every, self.origin, self.out, self.run = every, origin, out, run
        self.probes: list = []
        self.history: list[tuple[int, Mapping[str, MatrixProbe]]] = []
        self._state: MonitorState | None = None
        self._params: dict[str, torch.Tensor] = {}
        self._sharded = False
        self._trainer = None
        self._table: Path | None = None
        self._last: int | None = None  # the last probed step (every rank)
        self._written = 0  # probes in the table on disk

    # ------------------------------------------------------------------ trainer events

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._trainer = calling_trainer()
        params = named_matrices(model)
        names = monitored_names(((n, matrix_shape(p)) for n, p in params.items()), self.settings.matrices)
        if not names:
            raise ConfigError(f"GeometryMonitor: the model has no {self.settings.matrices} matrices "
                              "(q/k/v/o[/gate/up/down] of the blocks)")
        self._params = {n: params[n] for n in names}
        self._sharded = any(is_sharded(p) for p in self._params.values())
        self.probes, self.history, self._last, self._written = [], [], None, 0
        dtype = _DTYPES[self.settings.dtype]
        if self.origin is not None:
            origin = _CheckpointOrigin(self.origin, names, {n: matrix_shape(p) for n, p in self._params.items()},
                                       dtype)
        elif state.is_world_process_zero:
            origin = {n: full_matrix(p).to(device="cpu", dtype=dtype, copy=True) for n, p in self._params.items()}
        else:
            for p in self._params.values() if self._sharded else ():  # take part in rank 0's gathers
                full_matrix(p)
            origin = {}
        self._state = MonitorState(settings=self.settings, origin=origin)
        if state.is_world_process_zero and self.out is not False:
            folder = Path(self.out) if self.out is not None else Path(args.output_dir) / "geometry"
            self._table = folder / "trajectory.csv"
            if self.run is None:
                self.run = Path(os.path.abspath(args.output_dir)).name
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self._probe(state)
        return control

    def on_save(self, args, state, control, **kwargs):
        self._write()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if state.global_step > 0 and self._last != state.global_step:  # the final weights, once
            self._probe(state)
        self._write()
        return control

    # ------------------------------------------------------------------------- probing

    def _probe(self, state) -> None:
        self._last = state.global_step
        if not state.is_world_process_zero:
            if self._sharded:  # take part in every gather, in rank 0's order
                for p in self._params.values():
                    full_matrix(p)
            return
        result, self._state = probe(self._state, state.global_step, LiveWeights(self._params))
        self.probes.append(result)
        self.history.append((state.global_step, result.matrices))
        log_through(self._trainer, state, result.as_metrics())

    def _write(self) -> None:
        """Write the table (rank 0) at a checkpoint save and at the end of training, not at
        every probe: ``sim_to_final`` is against the last probe, so each probe changes every
        row and a write costs probes × matrices Sim_K's (measured: 0.43 s at the 100th probe
        of 12 matrices, against 0.06 s for the probe itself)."""
        if self._table is not None and self.history and self._written != len(self.history):
            self.write_table(self._table)
            self._written = len(self.history)

    def write_table(self, path) -> Path:
        """Write ``trajectory.csv`` of the probes so far, atomically (rank 0)."""
        from opdgeo.analysis.trajectory import COLUMNS
        from opdgeo.files import atomic_write_text
        from opdgeo.report.files import csv_text

        rows = trajectory_rows(self.run or "run", self.history, self.settings.k)
        return atomic_write_text(Path(path), csv_text(rows, COLUMNS))
