"""Run folders and atomic checkpoints (SPEC §4).

A run folder holds::

    config.yaml            the resolved TrainConfig
    metrics.jsonl          one JSON record per optimizer step ({"step": 1, "train/loss": ...})
    step-000010/           Hugging Face layout: config.json, generation_config.json,
                           model.safetensors (bf16 by default), tokenizer files
        trainer_state/     dcp/ (torch.distributed.checkpoint: fp32 master weights and
                           AdamW state, sharded per rank), rng-rank<r>.safetensors,
                           state.json (step, data position, scheduler, param groups, RNG)

Every step folder is written under a temporary name in the same directory, fsynced, and
renamed: a killed run leaves either a complete folder or none (a leftover temporary
folder is ignored and removed at resume). Only tensors go through DCP; everything else is
JSON, and nothing is unpickled except DCP's metadata, through an allow-list
(``training/sharded.py``).
"""

from __future__ import annotations

import json
import os
import pickle
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from safetensors import SafetensorError

from opdgeo import distributed
from opdgeo.checkpoints.steps import STEP_RE, list_step_dirs, step_dir_name
from opdgeo.errors import CheckpointError
from opdgeo.files import atomic_folder, atomic_write_text, clean_temporaries, restore_aside
from opdgeo.training import sharded

__all__ = [
    "STEP_RE",
    "step_dir_name",
    "list_checkpoints",
    "latest_resumable",
    "save_checkpoint",
    "load_trainer_state",
    "load_into",
    "TrainerState",
    "rng_state",
    "set_rng_state",
    "append_metrics",
    "read_metrics",
    "truncate_metrics",
    "remove_partial",
    "prune_trainer_states",
]

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete step folders of a run, ascending by step (temporary folders excluded)."""
    return list_step_dirs(run_dir)


def latest_resumable(run_dir: str | Path) -> Path | None:
    """The last step folder that carries a complete ``trainer_state/`` (None if there is none);
    a step folder a kill left renamed aside mid-replacement is put back first."""
    restore_aside(run_dir)
    for _, path in reversed(list_checkpoints(run_dir)):
        if (path / "trainer_state" / "state.json").is_file():
            return path
    return None


def remove_partial(run_dir: str | Path) -> list[Path]:
    """Delete what a killed save left (``opdgeo.files.clean_temporaries``: a previous step
    folder renamed aside is restored, never deleted); returns what was removed."""
    return clean_temporaries(run_dir)


def prune_trainer_states(run_dir: str | Path, keep: set[int] | frozenset[int]) -> list[Path]:
    """Delete the ``trainer_state/`` of every step folder of ``run_dir`` whose step is not in
    ``keep`` (their HF weights stay); returns the step folders pruned.

    Each ``trainer_state/`` is first renamed to a temporary name in the run folder (one
    atomic rename), then deleted: a kill midway leaves either the whole trainer state in its
    step folder or a temporary folder that ``remove_partial`` deletes at resume, never a
    step folder with half a trainer state. Main process only, after the step folder of the
    state to keep is complete.
    """
    import shutil

    from opdgeo.files import temporary_sibling

    run_dir = Path(run_dir)
    pruned = []
    for step, folder in list_checkpoints(run_dir):
        state = folder / "trainer_state"
        if step in keep or not state.is_dir():
            continue
        aside = temporary_sibling(run_dir / f"trainer_state-{folder.name}", folder=True)
        os.replace(state, aside)  # onto the empty folder just made: atomic, same file system
        shutil.rmtree(aside, ignore_errors=True)
        pruned.append(folder)
    return pruned


# ------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """The torch, numpy and Python global RNG states as tensors + JSON-able values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_meta": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(state["torch"])
    name, pos, has_gauss, cached = state["numpy_meta"]
    np.random.set_state((name, state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# ------------------------------------------------------------------------ trainer state


@dataclass(frozen=True)
class TrainerState:
    """Everything needed to continue a run exactly (besides the config).

    ``master`` are the fp32 master weights (the HF folder may be bf16), ``optimizer`` and
    ``scheduler`` their ``state_dict()``, ``rng`` from ``rng_state()``, ``step`` the number of
    optimizer steps done and ``data_position`` the number of prompts consumed.
    """

    step: int
    data_position: int
    master: Mapping[str, torch.Tensor]
    optimizer: Mapping[str, Any]
    scheduler: Mapping[str, Any]
    rng: Mapping[str, Any]
    extra: Mapping[str, Any]


def _write_trainer_state(folder: Path, state: TrainerState) -> None:
    """``trainer_state/`` through ``torch.distributed.checkpoint`` (``sharded.save_state``);
    collective when distributed (``state`` holds this rank's shards and RNG)."""
    rng = dict(state.rng)
    meta = {"step": state.step, "data_position": state.data_position, "scheduler": dict(state.scheduler),
            "extra": dict(state.extra)}
    sharded.save_state(folder, meta=meta, master=state.master, optimizer=state.optimizer,
                       rng_tensors={"torch": rng["torch"], "numpy_keys": rng["numpy_keys"]},
                       rng_meta={"numpy_meta": rng["numpy_meta"], "python": rng["python"]})


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    dtype: str = "bfloat16",
    trainer_state: TrainerState | None = None,
    max_shard_bytes: int = sharded.MAX_SHARD_BYTES,
) -> Path:
    """Write ``run_dir/step-NNNNNN/`` atomically and return its path.

    The HF weights are streamed tensor by tensor in ``dtype`` (``sharded.export_hf``:
    ``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` plus an index above
    ``max_shard_bytes``); the live model is neither modified nor copied. Under
    ``torch.distributed`` every rank must call this (FSDP2 shards are gathered one tensor
    at a time, DCP writes each rank's trainer-state shards) and rank 0 renames. The folder is assembled under a temporary name
    (``opdgeo.files.atomic_folder``: ``run_dir/.tmp-step-NNNNNN-PID-…``), every file and
    directory is fsynced, then it is renamed into place (an existing folder of that step is
    replaced). Any exception leaves no ``step-NNNNNN`` behind.

    Raises:
        CheckpointError: the folder cannot be written (disk full, permissions, ...).
    """
    final = Path(run_dir) / step_dir_name(step)
    try:
        if distributed.is_distributed():
            _save_collective(final, model, tokenizer, DTYPES[dtype], trainer_state, max_shard_bytes)
        else:
            with atomic_folder(final) as tmp:
                _fill_step_folder(tmp, model, tokenizer, DTYPES[dtype], trainer_state, max_shard_bytes)
    except OSError as err:
        raise CheckpointError(f"{final}: cannot write checkpoint: {err}") from None
    return final


def _fill_step_folder(tmp: Path, model, tokenizer, dtype: torch.dtype, trainer_state: TrainerState | None,
                      max_shard_bytes: int) -> None:
    """The step folder's content (collective when distributed; rank 0 writes the HF files)."""
    sharded.export_hf(model, tmp, dtype, max_shard_bytes=max_shard_bytes)
    if tokenizer is not None and distributed.rank() == 0:
        tokenizer.save_pretrained(tmp)
    if trainer_state is not None:
        _write_trainer_state(tmp / "trainer_state", trainer_state)


def _save_collective(final: Path, model, tokenizer, dtype: torch.dtype, trainer_state: TrainerState | None,
                     max_shard_bytes: int) -> None:
    """Every rank fills rank 0's temporary folder; rank 0 alone renames it into place."""
    if distributed.rank() == 0:
        with atomic_folder(final) as tmp:
            distributed.broadcast_object(str(tmp))
            _fill_step_folder(tmp, model, tokenizer, dtype, trainer_state, max_shard_bytes)
            distributed.barrier()  # every rank's shards are written before the rename
    else:
        tmp = Path(distributed.broadcast_object(None))
        _fill_step_folder(tmp, model, tokenizer, dtype, trainer_state, max_shard_bytes)
        distributed.barrier()
    distributed.barrier()  # the folder exists (or not) for every rank after the call


def load_trainer_state(step_dir: str | Path) -> TrainerState:
    """Read ``step_dir/trainer_state/`` whole, in this process (CPU tensors; the optimizer
    state keyed as it was saved). DCP's metadata is read with a restricted unpickler and
    tensors with ``weights_only``: nothing in the folder can run code.

    Raises:
        CheckpointError: a missing or unreadable file, named.
    """
    folder = Path(step_dir) / "trainer_state"
    try:
        meta = json.loads((folder / "state.json").read_text())
        master, state = sharded.unflatten(sharded.read_state_tensors(folder), meta["optimizer_keys"])
        rng = _read_rng(folder, meta, rank=0)
    except (OSError, ValueError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError, SafetensorError) as err:
        raise CheckpointError(f"{folder}: cannot read trainer state: {_first_line(err)}") from None
    optimizer = {"state": state, "param_groups": sharded.restore_groups(meta["param_groups"])}
    return TrainerState(step=int(meta["step"]), data_position=int(meta["data_position"]), master=master,
                        optimizer=optimizer, scheduler=meta["scheduler"], rng=rng, extra=meta.get("extra", {}))


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _read_rng(folder: Path, meta: Mapping[str, Any], *, rank: int) -> dict[str, Any]:
    """Rank ``rank``'s RNG state (rank 0's when the run had fewer ranks)."""
    from safetensors.torch import load_file

    rank = rank if rank < len(meta["rng"]) else 0
    tensors = load_file(str(folder / f"rng-rank{rank}.safetensors"))
    info = meta["rng"][rank]
    return {"torch": tensors["torch"], "numpy_keys": tensors["numpy_keys"], "numpy_meta": info["numpy_meta"],
            "python": info["python"]}


def load_into(step_dir: str | Path, model: torch.nn.Module, optimizer, scheduler) -> int:
    """Restore a run IN PLACE from ``step_dir/trainer_state/``: the (possibly FSDP2-sharded)
    weights, the optimizer state, the scheduler and this rank's RNG; returns the step.

    Collective when distributed. DCP reshards, so the state of a run with W ranks loads
    into another number of ranks (ranks beyond the saved ones take rank 0's RNG state).

    Raises:
        CheckpointError: a missing, unreadable or mismatched trainer state, named.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = Path(step_dir) / "trainer_state"
    try:
        meta = json.loads((folder / "state.json").read_text())
        keys = sharded.state_keys(folder)
        master, _ = get_state_dict(model, optimizer)
        state = _optimizer_template(keys, master)
        sharded.load_state(folder, master=master, optimizer_state=state)
        groups = sharded.restore_groups(meta["param_groups"])
        set_state_dict(model, optimizer, model_state_dict=master, optim_state_dict={"state": state, "param_groups": groups})
        rng = _read_rng(folder, meta, rank=distributed.rank())
    except (OSError, ValueError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError, SafetensorError) as err:
        raise CheckpointError(f"{folder}: cannot read trainer state: {_first_line(err)}") from None
    scheduler.load_state_dict(meta["scheduler"])
    set_rng_state(rng)
    return int(meta["step"])


def _optimizer_template(keys: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                        master: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Tensors for DCP to load the optimizer state into: shaped (and sharded) like the
    parameter where the saved tensor has the parameter's shape, else plain (AdamW's step)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, (shape, dtype) in keys.items():
        if not k.startswith("optimizer/"):
            continue
        fqn, _, key = k.removeprefix("optimizer/").rpartition("/")
        p = master.get(fqn)
        like = p is not None and tuple(p.shape) == shape
        out.setdefault(fqn, {})[key] = torch.zeros_like(p, dtype=dtype) if like else torch.zeros(shape, dtype=dtype)
    return out


# ---------------------------------------------------------------------------- metrics


def append_metrics(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line and flush it to disk."""
    with open(path, "a") as fh:
        fh.write(json.dumps(dict(record), allow_nan=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` (a torn last line from a kill is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """Keep only the records with ``step <= last_step`` (before resuming from that step)."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if int(r.get("step", 0)) <= last_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
