"""The streaming checkpoint reader: ``open_checkpoint`` -> ``Checkpoint``.

Every diagnostic reads weights through this module, one tensor at a time, so a real
multi-shard checkpoint and a tiny local one take the same path and memory stays bounded
by the tensors in flight.

Supported sources (``open_checkpoint``):

* a folder in Hugging Face layout, looked up in this order: ``model.safetensors.index.json``
  (sharded), ``model.safetensors``, any other ``*.safetensors`` (several = shards, a name
  may appear in only one), then — only with ``allow_pickle=True`` —
  ``pytorch_model.bin.index.json`` or ``pytorch_model*.bin``;
* a single ``.safetensors`` file (``config.json`` next to it is used when present);
* a single ``.bin``/``.pt``/``.pth`` file (``allow_pickle=True`` only);
* a model id ``org/name``, resolved from the local Hugging Face cache only
  (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``); never a
  download.

Logical tensor names (``Checkpoint.names``):

* natural order (digit runs compared as numbers, so ``layers.2`` precedes ``layers.10``),
  identical for single-file and sharded layouts of the same model;
* tied tensors listed once: when ``config.json`` has ``tie_word_embeddings: true`` and
  both the embedding and ``lm_head`` are stored with the same shape, only the embedding
  is listed; names stored at the same bytes (identical safetensors byte range, or the same
  storage in a pickle) are listed once, preferring a non-``lm_head`` name. Dropped names
  are kept in ``Checkpoint.aliases`` (dropped -> kept);
* fused projections are split into logical tensors whose ``load`` returns the slice:

  ==========================================  =======================================
  stored (weight and bias)                    split into
  ==========================================  =======================================
  Phi-3 ``self_attn.qkv_proj``                ``q_proj``, ``k_proj``, ``v_proj``: rows
                                              [q; k; v] with q = heads*head_dim,
                                              k = v = kv_heads*head_dim (from config)
  Phi-3 ``mlp.gate_up_proj``                  ``gate_proj``, ``up_proj``: rows halves
                                              [gate; up] (as ``chunk(2)`` in the model)
  GPT-NeoX ``attention.query_key_value``      ``q_proj``, ``k_proj``, ``v_proj``: rows
                                              interleaved per head [h, (q,k,v), head_dim]
  GPT-2 ``attn.c_attn`` (Conv1D, [in, 3n])    ``q_proj``, ``k_proj``, ``v_proj``: column
                                              thirds, kept in Conv1D orientation [in, n]
  ==========================================  =======================================

  A fused tensor whose split the config cannot determine raises ``CheckpointError``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from opdgeo.checkpoints.names import parse_tensor_name
from opdgeo.checkpoints.safetensors_file import StoredTensor, hash_stored_bytes, read_header, read_tensor
from opdgeo.errors import CheckpointError

_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*$")
_LOOKED_FOR = (
    "model.safetensors.index.json, model.safetensors, *.safetensors, "
    "pytorch_model.bin.index.json, pytorch_model*.bin"
)


@dataclass(frozen=True)
class TensorInfo:
    """Header facts about one logical tensor (no data read).

    Attributes:
        name: logical tensor name.
        shape: tensor shape.
        dtype: stored dtype (may be non-floating, e.g. ``torch.int64`` buffers).
        numel: number of entries.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    numel: int


def _natural_key(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


# --------------------------------------------------------------------------------------
# Tensor sources: where a logical tensor's bytes come from.


class _Source:
    """A loadable tensor: ``shape``, ``dtype``, ``load()``, ``hash_into(h)``, ``where``."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    where: str

    def load(self) -> torch.Tensor:
        raise NotImplementedError

    def hash_into(self, h) -> None:
        t = self.load().contiguous().reshape(-1)  # [numel]
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")


class _StoredSource(_Source):
    """Bytes at a known range of a safetensors file (also a contiguous row slice)."""

    def __init__(self, stored: StoredTensor):
        self.stored = stored
        self.shape = stored.shape
        self.dtype = stored.dtype
        self.where = f"{stored.path}: tensor {stored.key}"

    def load(self) -> torch.Tensor:
        return read_tensor(self.stored)

    def hash_into(self, h) -> None:
        hash_stored_bytes(self.stored, h)


class _PickledSource(_Source):
    """One tensor of a ``torch.load(weights_only=True, mmap=True)`` state dict."""

    def __init__(self, shard: "_PickleShard", key: str, tensor: torch.Tensor):
        self.shard, self.key = shard, key
        self.shape = tuple(tensor.shape)
        self.dtype = tensor.dtype
        self.where = f"{shard.path}: tensor {key}"

    def load(self) -> torch.Tensor:
        return self.shard.state()[self.key].clone(memory_format=torch.contiguous_format)


class _DerivedSource(_Source):
    """A slice of another source computed after loading it whole (interleaved layouts)."""

    def __init__(self, parent: _Source, shape: tuple[int, ...], fn: Callable, part: str):
        self.parent, self.fn = parent, fn
        self.shape = shape
        self.dtype = parent.dtype
        self.where = f"{parent.where} ({part} part)"

    def load(self) -> torch.Tensor:
        return self.fn(self.parent.load()).contiguous()


class _PickleShard:
    """A pickle checkpoint file, loaded lazily with ``mmap=True`` (data paged on demand)."""

    def __init__(self, path: Path):
        self.path = path
        self._state: dict[str, torch.Tensor] | None = None

    def state(self) -> dict[str, torch.Tensor]:
        if self._state is None:
            self._state = _torch_load(self.path)
        return self._state


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    errors = (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except errors as e:
        if "mmap" not in str(e):
            raise CheckpointError(f"{path}: cannot load with torch.load(weights_only=True): {_first_line(e)}") from None
        try:  # legacy (pre-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
        except errors as e2:
            raise CheckpointError(f"{path}: cannot load with torch.load(weights_only=True): {_first_line(e2)}") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{path}: not a flat state dict of tensors")
    return state


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# --------------------------------------------------------------------------------------
# Fused projections.


def _config_int(config: dict, key: str, name: str, where: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or value <= 0:
        raise CheckpointError(
            f"{where}: cannot split fused tensor {name}: config.json has no valid {key!r} (got {value!r})"
        )
    return value


def _row_parts(source: _Source, sizes: list[int]) -> list[_Source]:
    """Contiguous dim-0 slices; a safetensors source slices its byte range (no copy)."""
    parts: list[_Source] = []
    start = 0
    for rows in sizes:
        shape = (rows,) + source.shape[1:]
        if isinstance(source, _StoredSource):
            st = source.stored
            row_bytes = st.nbytes // source.shape[0] if source.shape[0] else 0
            sub = StoredTensor(st.path, st.key, st.dtype, shape, st.start + start * row_bytes,
                               st.start + (start + rows) * row_bytes, whole=False)
            part = _StoredSource(sub)
            part.where = f"{source.where} (rows {start}:{start + rows})"
        else:
            part = _DerivedSource(source, shape, lambda t, a=start, b=start + rows: t[a:b], f"rows {start}:{start + rows}")
        parts.append(part)
        start += rows
    return parts


def _split_fused(name: str, source: _Source, config: dict) -> dict[str, _Source] | None:
    """Return ``{logical name: source}`` if ``name`` is a supported fused tensor, else None."""
    parts = name.split(".")
    if len(parts) < 3 or parts[-1] not in ("weight", "bias"):
        return None
    module, parent, param = parts[-2], parts[-3], parts[-1]
    prefix = ".".join(parts[:-2])
    shape = source.shape

    def names(*mods: str) -> list[str]:
        return [f"{prefix}.{m}.{param}" for m in mods]

    if module == "qkv_proj":  # Phi-3: [q; k; v] on dim 0
        heads = _config_int(config, "num_attention_heads", name, source.where)
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or _config_int(config, "hidden_size", name, source.where) // heads
        sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
        if sum(sizes) != shape[0]:
            raise CheckpointError(
                f"{source.where}: cannot split fused tensor {name}: config gives q/k/v rows "
                f"{sizes} (sum {sum(sizes)}) but the tensor has {shape[0]} rows"
            )
        return dict(zip(names("q_proj", "k_proj", "v_proj"), _row_parts(source, sizes)))
    if module == "gate_up_proj":  # Phi-3: [gate; up] on dim 0, chunk(2)
        inter = config.get("intermediate_size")
        if shape[0] % 2 or (inter is not None and 2 * inter != shape[0]):
            raise CheckpointError(
                f"{source.where}: cannot split fused tensor {name}: {shape[0]} rows are not "
                f"2 x intermediate_size ({inter})"
            )
        half = shape[0] // 2
        return dict(zip(names("gate_proj", "up_proj"), _row_parts(source, [half, half])))
    if module == "query_key_value":  # GPT-NeoX: [heads, (q, k, v), head_dim] on dim 0
        heads = _config_int(config, "num_attention_heads", name, source.where)
        if shape[0] % (3 * heads):
            raise CheckpointError(
                f"{source.where}: cannot split fused tensor {name}: {shape[0]} rows are not "
                f"3 x num_attention_heads ({heads}) x head_dim"
            )
        head_dim = shape[0] // (3 * heads)
        out = {}
        for j, logical in enumerate(names("q_proj", "k_proj", "v_proj")):
            fn = lambda t, j=j: t.reshape(heads, 3, head_dim, *t.shape[1:])[:, j].reshape(heads * head_dim, *t.shape[1:])
            out[logical] = _DerivedSource(source, (heads * head_dim,) + shape[1:], fn, "qkv"[j])
        return out
    if module == "c_attn" and parent == "attn":  # GPT-2 Conv1D: [in, 3n], split(n, dim=-1)
        if shape[-1] % 3:
            raise CheckpointError(
                f"{source.where}: cannot split fused tensor {name}: last dim {shape[-1]} is not 3 x n_embd"
            )
        n = shape[-1] // 3
        out = {}
        for j, logical in enumerate(names("q_proj", "k_proj", "v_proj")):
            fn = lambda t, j=j: t[..., j * n:(j + 1) * n]
            out[logical] = _DerivedSource(source, shape[:-1] + (n,), fn, "qkv"[j])
        return out
    return None


# --------------------------------------------------------------------------------------
# The checkpoint.


class Checkpoint:
    """An opened checkpoint: tensor names and shapes from headers, data read on demand.

    Attributes:
        path: the folder or file opened (for a model id, its snapshot folder).
        config: parsed ``config.json`` (``{}`` when absent).
        aliases: names not listed because they share storage with (or are tied to) a
            listed tensor, mapped to the listed name.

    Thread-safe for concurrent ``load``/``content_key`` of safetensors checkpoints (each
    read opens its own file handle).
    """

    def __init__(self, path: Path, config: dict, sources: dict[str, _Source], aliases: dict[str, str]):
        self.path = path
        self.config = config
        self.aliases = dict(aliases)
        self._sources = {n: sources[n] for n in sorted(sources, key=_natural_key)}
        self._keys: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self._sources)} tensors)"

    def names(self) -> list[str]:
        """Logical tensor names in natural order (see the module docstring)."""
        return list(self._sources)

    def __contains__(self, name: object) -> bool:
        return name in self._sources

    def __len__(self) -> int:
        return len(self._sources)

    def _source(self, name: str) -> _Source:
        try:
            return self._sources[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def info(self, name: str) -> TensorInfo:
        """Shape, dtype and numel of ``name`` from the header (no data read)."""
        s = self._source(name)
        numel = 1
        for d in s.shape:
            numel *= d
        return TensorInfo(name, tuple(s.shape), s.dtype, numel)

    def load(self, name: str) -> torch.Tensor:
        """Read one tensor: a new contiguous CPU tensor in its stored dtype.

        Memory: that tensor only (a fused part reads only its rows when contiguous; an
        interleaved part reads the fused tensor once, then slices).
        """
        return self._source(name).load()

    def content_key(self, name: str) -> str:
        """Stable hash of the tensor's content: blake2b-128 of dtype, shape and raw bytes.

        The bytes are the little-endian C-order values (exactly the safetensors payload),
        so one tensor has the same key in any file or format. Cost: one sequential read of
        the tensor's bytes in 16 MiB chunks (I/O bound, ~1 GB/s for blake2b), memoised per
        ``Checkpoint`` object.
        """
        if name not in self._keys:
            s = self._source(name)
            h = hashlib.blake2b(digest_size=16)
            h.update(f"{str(s.dtype).removeprefix('torch.')}|{list(s.shape)}|".encode())
            s.hash_into(h)
            self._keys[name] = h.hexdigest()
        return self._keys[name]


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot parse ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return config


def _read_index(path: Path) -> dict[str, str]:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a valid index file ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{path}: 'weight_map' must map tensor names to shard file names")
    return weight_map


def _safetensors_sources(files: list[Path], weight_map: dict[str, str] | None, index: Path | None) -> dict[str, _Source]:
    sources: dict[str, _Source] = {}
    if weight_map is not None:
        headers: dict[str, dict[str, StoredTensor]] = {}
        for name, shard in weight_map.items():
            if shard not in headers:
                shard_path = index.parent / shard
                if not shard_path.is_file():
                    raise CheckpointError(f"{index}: shard {shard} (holding {name}) is missing")
                headers[shard] = read_header(shard_path)
            if name not in headers[shard]:
                raise CheckpointError(f"{index}: tensor {name} is not in shard {shard}")
            sources[name] = _StoredSource(headers[shard][name])
        return sources
    for file in files:
        for name, stored in read_header(file).items():
            if name in sources:
                raise CheckpointError(f"{file}: tensor {name} is also stored in {sources[name].stored.path}")
            sources[name] = _StoredSource(stored)
    return sources


def _pickle_sources(files: list[Path], weight_map: dict[str, str] | None, index: Path | None) -> dict[str, _Source]:
    if weight_map is not None:
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
        sources: dict[str, _Source] = {}
        for shard, wanted in shards.items():
            path = index.parent / shard
            if not path.is_file():
                raise CheckpointError(f"{index}: shard {shard} (holding {wanted[0]}) is missing")
            ps = _PickleShard(path)
            state = ps.state()
            for name in wanted:
                if name not in state:
                    raise CheckpointError(f"{index}: tensor {name} is not in shard {shard}")
                sources[name] = _PickledSource(ps, name, state[name])
        return sources
    sources = {}
    for file in files:
        ps = _PickleShard(file)
        for name, tensor in ps.state().items():
            if name in sources:
                raise CheckpointError(f"{file}: tensor {name} is also stored in {sources[name].shard.path}")
            sources[name] = _PickledSource(ps, name, tensor)
    return sources


def _storage_key(source: _Source):
    """Identity of the stored bytes, or None when the source is not stored whole."""
    if isinstance(source, _StoredSource) and source.stored.nbytes:
        st = source.stored
        return ("st", str(st.path), st.start, st.end, st.dtype, st.shape)
    if isinstance(source, _PickledSource):
        t = source.shard.state()[source.key]
        if t.numel():
            return ("pt", str(source.shard.path), t.untyped_storage().data_ptr(), t.storage_offset(),
                    tuple(t.shape), tuple(t.stride()), t.dtype)
    return None


def _dedupe(sources: dict[str, _Source], config: dict) -> tuple[dict[str, _Source], dict[str, str]]:
    """Drop names sharing storage with another, and a tied lm_head (see module doc)."""
    aliases: dict[str, str] = {}
    by_storage: dict[tuple, list[str]] = {}
    for name, source in sources.items():
        key = _storage_key(source)
        if key is not None:
            by_storage.setdefault(key, []).append(name)
    for group in by_storage.values():
        if len(group) > 1:
            group.sort(key=lambda n: (parse_tensor_name(n).type == "lm_head", _natural_key(n)))
            for dropped in group[1:]:
                aliases[dropped] = group[0]
    if config.get("tie_word_embeddings") is True:
        embeds = [n for n in sources if parse_tensor_name(n).type == "embed" and n not in aliases]
        for name in sources:
            if parse_tensor_name(name).type == "lm_head" and name not in aliases:
                same = [e for e in embeds if sources[e].shape == sources[name].shape]
                if same:
                    aliases[name] = sorted(same, key=_natural_key)[0]
    return {n: s for n, s in sources.items() if n not in aliases}, aliases


def _split_all(sources: dict[str, _Source], config: dict) -> dict[str, _Source]:
    out: dict[str, _Source] = {}
    for name, source in sources.items():
        parts = _split_fused(name, source, config)
        for logical, part in (parts or {name: source}).items():
            if logical in out or (parts and logical in sources):
                raise CheckpointError(f"{source.where}: split name {logical} is also stored separately")
            out[logical] = part
    return out


def hf_hub_cache() -> Path:
    """The local Hugging Face hub cache folder, read from the environment at call time."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def _resolve_model_id(model_id: str) -> Path:
    """Snapshot folder of ``model_id`` in the local HF cache; never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hf_hub_cache()
    try:
        folder = snapshot_download(model_id, cache_dir=cache, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{model_id}: no such path, and not found in the local Hugging Face cache {cache} "
            f"(opdgeo never downloads; fetch it first, e.g. `hf download {model_id}`) [{type(e).__name__}]"
        ) from None
    return Path(folder)


def open_checkpoint(source: str | Path, *, allow_pickle: bool = False) -> Checkpoint:
    """Open a checkpoint for streaming reads (headers only; no tensor data is read).

    Args:
        source: a Hugging Face folder, a ``.safetensors`` file, a pickle file (with
            ``allow_pickle``), or a model id ``org/name`` present in the local HF cache.
        allow_pickle: permit ``pytorch_model*.bin``/``.pt``/``.pth``, loaded with
            ``torch.load(weights_only=True, mmap=True, map_location="cpu")``.

    Returns:
        A ``Checkpoint``.

    Raises:
        CheckpointError: missing path, no weights in a folder, corrupt or truncated files,
            an index naming a missing shard, pickle without ``allow_pickle``, a fused
            tensor the config cannot split, a model id absent from the local cache.
    """
    if isinstance(source, str):
        path = Path(source).expanduser()
        if not path.exists() and _ID_RE.match(source):
            path = _resolve_model_id(source)
    else:
        path = Path(source)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")

    folder = path if path.is_dir() else path.parent
    config = _read_config(folder)
    pickle_files: list[Path] = []
    pickle_index: Path | None = None
    st_files: list[Path] = []
    st_index: Path | None = None
    if path.is_file():
        if path.name.endswith(".safetensors.index.json"):
            st_index = path
        elif path.suffix == ".safetensors":
            st_files = [path]
        elif path.name.endswith(".bin.index.json"):
            pickle_index = path
        elif path.suffix in (".bin", ".pt", ".pth"):
            pickle_files = [path]
        else:
            raise CheckpointError(f"{path}: not a checkpoint file (expected .safetensors, or .bin/.pt with --allow-pickle)")
    elif (path / "model.safetensors.index.json").is_file():
        st_index = path / "model.safetensors.index.json"
    elif (path / "model.safetensors").is_file():
        st_files = [path / "model.safetensors"]
    elif sorted(path.glob("*.safetensors")):
        st_files = sorted(path.glob("*.safetensors"))
    elif (path / "pytorch_model.bin.index.json").is_file():
        pickle_index = path / "pytorch_model.bin.index.json"
    elif sorted(path.glob("pytorch_model*.bin")):
        pickle_files = sorted(path.glob("pytorch_model*.bin"))
    else:
        raise CheckpointError(f"{path}: not a checkpoint folder (no weights found; looked for {_LOOKED_FOR})")

    if st_index is not None or st_files:
        weight_map = _read_index(st_index) if st_index is not None else None
        sources = _safetensors_sources(st_files, weight_map, st_index)
    else:
        what = pickle_index or pickle_files[0]
        if not allow_pickle:
            raise CheckpointError(
                f"{what}: pickle checkpoint refused (it can run code when loaded); pass "
                f"--allow-pickle (allow_pickle=True) to load it with torch.load(weights_only=True)"
            )
        weight_map = _read_index(pickle_index) if pickle_index is not None else None
        sources = _pickle_sources(pickle_files, weight_map, pickle_index)
    sources, aliases = _dedupe(sources, config)
    sources = _split_all(sources, config)
    return Checkpoint(path, config, sources, aliases)


def pair_names(base: Checkpoint, tuned: Checkpoint, *, ignore_missing: bool = False) -> list[str]:
    """Names present in both checkpoints, in ``base`` order, with equal shapes.

    Args:
        base, tuned: opened checkpoints.
        ignore_missing: skip names present on one side only instead of raising.

    Raises:
        CheckpointError: one-sided names (the first few listed, unless
            ``ignore_missing``), or a shape mismatch (naming the tensor and both shapes).
    """
    base_names, tuned_names = base.names(), tuned.names()
    only_base = [n for n in base_names if n not in tuned]
    only_tuned = [n for n in tuned_names if n not in base]
    if (only_base or only_tuned) and not ignore_missing:
        def listing(names: list[str], path: Path) -> str:
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            return f"{len(names)} tensor{'s' if len(names) != 1 else ''} only in {path} ({shown})"
        sides = [listing(n, c.path) for n, c in ((only_base, base), (only_tuned, tuned)) if n]
        raise CheckpointError("; ".join(sides) + "; pass --ignore-missing to skip them")
    common = [n for n in base_names if n in tuned]
    mismatched = [n for n in common if base.info(n).shape != tuned.info(n).shape]
    if mismatched:
        n = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise CheckpointError(
            f"shape mismatch for {n}: {list(base.info(n).shape)} in {base.path} vs "
            f"{list(tuned.info(n).shape)} in {tuned.path}{more}"
        )
    return common
