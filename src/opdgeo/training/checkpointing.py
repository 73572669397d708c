"""Run folders and atomic checkpoints (SPEC §4).

A run folder holds::

    config.yaml            the resolved TrainConfig
    metrics.jsonl          one JSON record per optimizer step ({"step": 1, "train/loss": ...})
    step-000010/           Hugging Face layout: config.json, generation_config.json,
                           model.safetensors (bf16 by default), tokenizer files
        trainer_state/     master.safetensors (fp32 master weights), optimizer.pt,
                           scheduler.pt, rng.pt (tensors only), state.json (step, data position, RNG)

Every step folder is written under a temporary name in the same directory, fsynced, and
renamed: a killed run leaves either a complete folder or none (a leftover temporary
folder is ignored and removed at resume). The ``.pt`` files hold only tensors, numbers,
strings and containers and are read with ``torch.load(weights_only=True)``.
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

from opdgeo.checkpoints.steps import STEP_RE, list_step_dirs, step_dir_name
from opdgeo.errors import CheckpointError
from opdgeo.files import atomic_folder, atomic_write_text, clean_temporaries, restore_aside

__all__ = [
    "STEP_RE",
    "step_dir_name",
    "list_checkpoints",
    "latest_resumable",
    "save_checkpoint",
    "load_trainer_state",
    "TrainerState",
    "rng_state",
    "set_rng_state",
    "append_metrics",
    "read_metrics",
    "truncate_metrics",
    "remove_partial",
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
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    # clone: tied parameters share storage, which safetensors refuses to write twice
    save_file({k: v.detach().to("cpu").clone().contiguous() for k, v in state.master.items()}, folder / "master.safetensors")
    torch.save(dict(state.optimizer), folder / "optimizer.pt")
    torch.save(dict(state.scheduler), folder / "scheduler.pt")
    rng = dict(state.rng)
    torch.save({"torch": rng["torch"], "numpy_keys": rng["numpy_keys"]}, folder / "rng.pt")
    meta = {
        "step": state.step,
        "data_position": state.data_position,
        "numpy_meta": rng["numpy_meta"],
        "python_rng": rng["python"],
        "extra": dict(state.extra),
    }
    (folder / "state.json").write_text(json.dumps(meta))


def _save_hf_weights(model: torch.nn.Module, folder: Path, dtype: torch.dtype) -> None:
    """``save_pretrained`` of a ``dtype`` copy: tied weights stay tied (saved once) and
    ``config.json`` records the stored dtype; the live fp32 model is untouched."""
    import copy

    if all(p.dtype == dtype for p in model.parameters()):
        model.save_pretrained(folder, safe_serialization=True)
        return
    copy.deepcopy(model).to(dtype).save_pretrained(folder, safe_serialization=True)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    dtype: str = "bfloat16",
    trainer_state: TrainerState | None = None,
) -> Path:
    """Write ``run_dir/step-NNNNNN/`` atomically and return its path.

    The HF weights are written with ``save_pretrained`` (safetensors) in ``dtype``; the
    live model is not modified. The folder is assembled under a temporary name
    (``opdgeo.files.atomic_folder``: ``run_dir/.tmp-step-NNNNNN-PID-…``), every file and
    directory is fsynced, then it is renamed into place (an existing folder of that step is
    replaced). Any exception leaves no ``step-NNNNNN`` behind.

    Raises:
        CheckpointError: the folder cannot be written (disk full, permissions, ...).
    """
    final = Path(run_dir) / step_dir_name(step)
    try:
        with atomic_folder(final) as tmp:
            _save_hf_weights(model, tmp, DTYPES[dtype])
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if trainer_state is not None:
                _write_trainer_state(tmp / "trainer_state", trainer_state)
    except OSError as err:
        raise CheckpointError(f"{final}: cannot write checkpoint: {err}") from None
    return final


def load_trainer_state(step_dir: str | Path) -> TrainerState:
    """Read ``step_dir/trainer_state/`` (``weights_only=True``; never unpickles code).

    Raises:
        CheckpointError: a missing or unreadable file, named.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(step_dir) / "trainer_state"
    try:
        meta = json.loads((folder / "state.json").read_text())
        master = load_file(folder / "master.safetensors")
        optimizer = torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu")
        scheduler = torch.load(folder / "scheduler.pt", weights_only=True, map_location="cpu")
        rng_t = torch.load(folder / "rng.pt", weights_only=True, map_location="cpu")
    except (OSError, ValueError, RuntimeError, SafetensorError, KeyError, EOFError, pickle.UnpicklingError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{folder}: cannot read trainer state: {first}") from None
    rng = {"torch": rng_t["torch"], "numpy_keys": rng_t["numpy_keys"],
           "numpy_meta": meta["numpy_meta"], "python": meta["python_rng"]}
    return TrainerState(step=int(meta["step"]), data_position=int(meta["data_position"]), master=master,
                        optimizer=optimizer, scheduler=scheduler, rng=rng, extra=meta.get("extra", {}))


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
