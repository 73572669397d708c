"""Checkpoint I/O that scales past one process's memory: the trainer state through
``torch.distributed.checkpoint`` (DCP) and the Hugging Face export streamed tensor by tensor.

Trainer state (``trainer_state/``)::

    dcp/                   DCP: every tensor, one flat mapping ``master/<name>`` (fp32
                           master weights) and ``optimizer/<param>/<key>`` (AdamW moments,
                           step), as safetensors files (DCP's ``HuggingFaceStorageWriter``);
                           each rank writes its own shards (FSDP2 DTensors) in parallel
    rng-rank<r>.safetensors   rank r's torch RNG state and numpy key array
    state.json             step, data position, scheduler state, optimizer param groups,
                           Python/numpy RNG metadata per rank, world size

Only tensors go through DCP (DCP pickles non-tensor values and reads them back with
``torch.load(weights_only=False)``), everything else is JSON, and DCP's metadata is the
safetensors headers' JSON, so loading a checkpoint never runs code from it. A state
written by an earlier version (torch.save records, a pickled ``.metadata``) still loads:
that file is read with an unpickler that admits only DCP's metadata classes. DCP reshards
on load: a state saved by W ranks loads into any other number of ranks (FSDP2 or a plain
model).

HF export: ``model.safetensors`` or, above ``max_shard_bytes``,
``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json``, in the checkpoint
dtype, written from the (possibly sharded) parameters one tensor at a time: under FSDP2
each DTensor is gathered (``full_tensor``, a collective every rank joins), cast and kept
only until its file is written; no copy of the model is made.
"""

from __future__ import annotations

import copy
import io
import json
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from opdgeo import distributed

__all__ = ["MAX_SHARD_BYTES", "export_hf", "hf_names", "save_state", "load_state", "read_state_tensors", "unflatten",
           "restore_groups", "state_keys"]

MAX_SHARD_BYTES = 5 * 2**30  # Hugging Face's default shard size


# ------------------------------------------------------------------------ HF export


def hf_names(model: torch.nn.Module) -> list[str]:
    """The state-dict keys the HF folder stores: each shared tensor once (tied embeddings
    are saved under the first name, as ``save_pretrained`` does)."""
    keep = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return [n for n in model.state_dict() if n in keep]


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _shard_plan(model: torch.nn.Module, names: list[str], dtype: torch.dtype, max_shard_bytes: int) -> list[list[str]]:
    """Names grouped into files of at most ``max_shard_bytes`` (a larger tensor gets its own file)."""
    size = torch.tensor([], dtype=dtype).element_size()
    sd = model.state_dict()
    groups: list[list[str]] = [[]]
    used = 0
    for n in names:
        b = sd[n].numel() * size
        if groups[-1] and used + b > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(n)
        used += b
    return groups


def export_hf(model: torch.nn.Module, folder: Path, dtype: torch.dtype, *,
              max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write ``model`` (plain, or FSDP2-sharded) as a HF folder in ``dtype``: ``config.json``
    (recording ``dtype``), ``generation_config.json``, safetensors weights.

    Collective under FSDP2 (every rank must call it, in the same order); only rank 0 writes.
    The live model is never modified or copied: each tensor is gathered and cast alone.
    """
    from safetensors.torch import save_file

    main = not distributed.is_distributed() or distributed.rank() == 0
    sharded = distributed.is_sharded(model)
    if not main and not sharded:
        return
    if not sharded and _has_fused_experts(model):
        _export_converted(model, folder, dtype, max_shard_bytes)
        return
    names = hf_names(model)
    groups = _shard_plan(model, names, dtype, max_shard_bytes)
    sd = model.state_dict()
    files = ["model.safetensors"] if len(groups) == 1 else \
        [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
    weight_map = {}
    for fname, group in zip(files, groups):
        part = {}
        for n in group:
            full = _full(sd[n].detach())  # a collective under FSDP2
            if main:
                part[n] = full.to(device="cpu", dtype=dtype if full.is_floating_point() else full.dtype).contiguous()
            del full
        if main:
            save_file(part, str(folder / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, fname))
        del part
    if not main:
        return
    if len(files) > 1:
        total = sum(sd[n].numel() * torch.tensor([], dtype=dtype).element_size() for n in names)
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    _write_configs(model, folder, dtype)


def _has_fused_experts(model: torch.nn.Module) -> bool:
    """True when the live model holds tensors of 3 or more dimensions (transformers 5 fuses MoE
    experts into [E, ., .] tensors in memory but stores them per expert on disk)."""
    return any(t.ndim >= 3 for t in model.state_dict().values())


def _export_converted(model: torch.nn.Module, folder: Path, dtype: torch.dtype, max_shard_bytes: int) -> None:
    """One process, a model whose on-disk layout differs from its in-memory one: transformers'
    own ``save_pretrained`` (which converts fused experts back to the per-expert layout) on a
    ``dtype`` copy of the state dict, the live model untouched. Costs one ``dtype`` copy of the
    weights, which the streamed path avoids for every other model."""
    plain = distributed.unwrap(model)
    sd = {n: t.detach().to(dtype=dtype if t.is_floating_point() else t.dtype) for n, t in plain.state_dict().items()}
    plain.save_pretrained(folder, state_dict=sd, max_shard_size=max_shard_bytes, safe_serialization=True)
    del sd
    _write_configs(model, folder, dtype)


def _write_configs(model: torch.nn.Module, folder: Path, dtype: torch.dtype) -> None:
    config = copy.deepcopy(model.config)  # the config object only, never the weights
    config.dtype = str(dtype).removeprefix("torch.")
    config.architectures = [type(distributed.unwrap(model)).__name__]
    config.save_pretrained(folder)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(folder)


# --------------------------------------------------------------------- trainer state


def _flat_tensors(master: Mapping[str, torch.Tensor], optimizer_state: Mapping[Any, Mapping[str, Any]]
                  ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``master/<name>`` and ``optimizer/<param>/<key>`` tensors; the param keys' types (int ids or names)."""
    flat = {f"master/{k}": v.detach() for k, v in master.items()}
    key_types = {}
    for pid, entry in optimizer_state.items():
        key_types[str(pid)] = type(pid).__name__
        for k, v in entry.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"optimizer state {pid}.{k} is not a tensor ({type(v).__name__})")
            flat[f"optimizer/{pid}/{k}"] = v.detach()
    return flat, key_types


def _plain(value: Any) -> Any:
    """JSON-able copy (tuples become lists; ``_restore_groups`` turns ``betas`` back)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


def save_state(folder: Path, *, meta: Mapping[str, Any], master: Mapping[str, torch.Tensor],
               optimizer: Mapping[str, Any], rng_tensors: Mapping[str, torch.Tensor],
               rng_meta: Mapping[str, Any]) -> None:
    """Write ``folder`` (created here) as described in the module docstring. Collective
    when distributed: every rank calls it with its own shards and RNG state."""
    from safetensors.torch import save_file

    rank = distributed.rank()
    if rank == 0:
        folder.mkdir(parents=True)
    distributed.barrier()
    flat, key_types = _flat_tensors(master, optimizer["state"])
    _save(flat, folder / "dcp")
    save_file({k: v.contiguous() for k, v in rng_tensors.items()}, str(folder / f"rng-rank{rank}.safetensors"))
    per_rank = distributed.gather_to_rank0(_plain(rng_meta))
    if rank == 0:
        doc = {**_plain(meta), "optimizer_keys": key_types, "param_groups": _plain(optimizer["param_groups"]),
               "rng": per_rank}
        (folder / "state.json").write_text(json.dumps(doc))
    distributed.barrier()


def _unshared(flat: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``flat`` with a private copy of every tensor whose storage an earlier one already
    uses (tied embeddings): safetensors refuses shared memory, and each name loads on its own."""
    from torch.distributed.tensor import DTensor

    seen: set[int] = set()
    out = {}
    for k, v in flat.items():
        local = v.to_local() if isinstance(v, DTensor) else v
        ptr = local.untyped_storage().data_ptr() if local.numel() else None
        out[k] = v.clone() if ptr in seen else v
        if ptr is not None:
            seen.add(ptr)
    return out


def _save(flat: Mapping[str, torch.Tensor], path: Path) -> None:
    """``dcp.save`` of ``flat`` into ``path`` through DCP's safetensors writer (each rank its
    own shards when distributed). Not ``FileSystemWriter``'s torch.save records: their zip
    writer fails its end-of-file position check ("unexpected pos 704 vs 598") on some
    states, every time the same state is saved."""
    import torch.distributed.checkpoint as dcp

    writer = dcp.HuggingFaceStorageWriter(str(path), save_distributed=distributed.is_distributed())
    _quiet(dcp.save, _unshared(flat), storage_writer=writer, no_dist=not distributed.is_distributed())


class _MetadataUnpickler(pickle.Unpickler):
    """Reads DCP's ``.metadata``: only the CLASSES of DCP's own modules (no functions),
    ``torch.Size``, dtypes, ``pathlib`` paths and the layout lookup; anything else is refused."""

    _ALLOWED = {("torch", "Size"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                ("pathlib", "WindowsPath"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith("torch.distributed.checkpoint."):
            found = super().find_class(module, name)
            if isinstance(found, type):
                return found
        raise pickle.UnpicklingError(f"refused to load {module}.{name} from checkpoint metadata")


def _quiet(fn, *args, **kwargs):
    """A DCP call without its "assuming a single process" warning (one process is intended)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return fn(*args, **kwargs)


def _reader(path: Path):
    """A DCP reader for ``path``: DCP's safetensors reader (JSON headers, no pickle), or for
    a state written by an earlier version (torch.save records and a pickled ``.metadata``)
    a ``FileSystemReader`` whose metadata is read by ``_MetadataUnpickler``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import StorageMeta

    if not (Path(path) / ".metadata").is_file():
        return dcp.HuggingFaceStorageReader(str(path))

    class SafeReader(dcp.FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            data = (Path(self.path) / ".metadata").read_bytes()
            metadata = _MetadataUnpickler(io.BytesIO(data)).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def state_keys(folder: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``name -> (shape, dtype)`` of every tensor in ``folder/dcp`` (from DCP's metadata alone)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = _reader(folder / "dcp").read_metadata()
    return {k: (tuple(m.size), m.properties.dtype) for k, m in md.state_dict_metadata.items()
            if isinstance(m, TensorStorageMetadata)}


def read_state_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``folder/dcp`` as a whole CPU tensor (one process; shapes from DCP's metadata)."""
    import torch.distributed.checkpoint as dcp

    out = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in state_keys(folder).items()}
    _quiet(dcp.load, out, storage_reader=_reader(folder / "dcp"), no_dist=True)
    return out


def load_state(folder: Path, *, master: Mapping[str, torch.Tensor], optimizer_state: Mapping[Any, Mapping[str, Any]]
               ) -> None:
    """Read ``folder/dcp`` IN PLACE into ``master`` and ``optimizer_state`` (their tensors,
    plain or DTensor, give the shapes and shards wanted; DCP reshards). Collective when distributed."""
    import torch.distributed.checkpoint as dcp

    flat, _ = _flat_tensors(master, optimizer_state)
    _quiet(dcp.load, flat, storage_reader=_reader(folder / "dcp"), no_dist=not distributed.is_distributed())


def unflatten(tensors: Mapping[str, torch.Tensor], key_types: Mapping[str, str]
              ) -> tuple[dict[str, torch.Tensor], dict[Any, dict[str, torch.Tensor]]]:
    """``(master, optimizer state)`` from ``read_state_tensors``'s flat mapping."""
    master: dict[str, torch.Tensor] = {}
    state: dict[Any, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        kind, _, rest = k.partition("/")
        if kind == "master":
            master[rest] = v
        else:
            pid, _, key = rest.rpartition("/")
            state.setdefault(int(pid) if key_types.get(pid) == "int" else pid, {})[key] = v
    return master, state


def restore_groups(groups: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Param groups from JSON: ``betas`` back to a tuple (AdamW's own type)."""
    return [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in groups]
