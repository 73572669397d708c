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
* a model id ``org/name``, resolved from the local Hugging Face cache only, never a
  download, and ``smollm2`` (the exported SmolLM2 folder): sources are parsed and resolved
  by ``opdgeo.sources.ModelSource``.

Logical tensor names (``Checkpoint.names``):

* natural order (digit runs compared as numbers, so ``layers.2`` precedes ``layers.10``),
  identical for single-file and sharded layouts of the same model;
* tied tensors listed once: when ``config.json`` has ``tie_word_embeddings: true`` and
  both the embedding and ``lm_head`` are stored with the same shape, only the embedding
  is listed; names stored at the same bytes (identical safetensors byte range, or the same
  storage in a pickle) are listed once, preferring a non-``lm_head`` name. Dropped names
  are kept in ``Checkpoint.aliases`` (dropped -> kept);
* fused tensors (Phi-3 ``qkv_proj``/``gate_up_proj``, GPT-NeoX ``query_key_value``,
  GPT-2 ``c_attn``, and the 3-D expert tensors ``mlp.experts.gate_up_proj``/``down_proj`` of
  mixture-of-experts models) are split by the model's config into logical tensors whose
  ``load`` returns the part, reading only its bytes where the layout allows
  (``opdgeo.checkpoints.fused`` has the table); a fused tensor whose split the config cannot
  determine raises ``CheckpointError``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from opdgeo.checkpoints.fused import split_fused
from opdgeo.checkpoints.names import parse_tensor_name
from opdgeo.checkpoints.safetensors_file import StoredTensor, read_header
from opdgeo.checkpoints.tensors import PickledSource, PickleShard, Source, StoredSource
from opdgeo.errors import CheckpointError
from opdgeo.sources import ModelSource
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

    def __init__(self, path: Path, config: dict, sources: dict[str, Source], aliases: dict[str, str]):
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

    def _source(self, name: str) -> Source:
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


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (a config); CheckpointError naming the file otherwise."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot parse ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return config


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    return read_json_object(path) if path.is_file() else {}


def _read_index(path: Path) -> dict[str, str]:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a valid index file ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{path}: 'weight_map' must map tensor names to shard file names")
    for name, shard in weight_map.items():
        if not _inside_folder(shard):
            raise CheckpointError(f"{path}: shard {shard!r} (holding {name}) is not a file name inside the "
                                  "checkpoint folder (absolute paths and '..' are refused)")
    return weight_map


def _inside_folder(shard: str) -> bool:
    """A shard name of an index must stay in the index's folder: relative, no ``..``, no
    drive or backslash tricks (as huggingface_hub requires of the files it fetches)."""
    from pathlib import PurePosixPath, PureWindowsPath

    if not shard or "\\" in shard or "\x00" in shard or PureWindowsPath(shard).drive:
        return False
    p = PurePosixPath(shard)
    return not p.is_absolute() and ".." not in p.parts


def _safetensors_sources(files: list[Path], weight_map: dict[str, str] | None, index: Path | None) -> dict[str, Source]:
    sources: dict[str, Source] = {}
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
            sources[name] = StoredSource(headers[shard][name])
        return sources
    for file in files:
        for name, stored in read_header(file).items():
            if name in sources:
                raise CheckpointError(f"{file}: tensor {name} is also stored in {sources[name].stored.path}")
            sources[name] = StoredSource(stored)
    return sources


def _pickle_sources(files: list[Path], weight_map: dict[str, str] | None, index: Path | None) -> dict[str, Source]:
    if weight_map is not None:
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
        sources: dict[str, Source] = {}
        for shard, wanted in shards.items():
            path = index.parent / shard
            if not path.is_file():
                raise CheckpointError(f"{index}: shard {shard} (holding {wanted[0]}) is missing")
            ps = PickleShard(path)
            state = ps.state()
            for name in wanted:
                if name not in state:
                    raise CheckpointError(f"{index}: tensor {name} is not in shard {shard}")
                sources[name] = PickledSource(ps, name, state[name])
        return sources
    sources = {}
    for file in files:
        ps = PickleShard(file)
        for name, tensor in ps.state().items():
            if name in sources:
                raise CheckpointError(f"{file}: tensor {name} is also stored in {sources[name].shard.path}")
            sources[name] = PickledSource(ps, name, tensor)
    return sources


def _storage_key(source: Source):
    """Identity of the stored bytes, or None when the source is not stored whole."""
    if isinstance(source, StoredSource) and source.stored.nbytes:
        st = source.stored
        return ("st", str(st.path), st.start, st.end, st.dtype, st.shape)
    if isinstance(source, PickledSource):
        t = source.shard.state()[source.key]
        if t.numel():
            return ("pt", str(source.shard.path), t.untyped_storage().data_ptr(), t.storage_offset(),
                    tuple(t.shape), tuple(t.stride()), t.dtype)
    return None


def _dedupe(sources: dict[str, Source], config: dict) -> tuple[dict[str, Source], dict[str, str]]:
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


def _split_all(sources: dict[str, Source], config: dict) -> dict[str, Source]:
    out: dict[str, Source] = {}
    for name, source in sources.items():
        parts = split_fused(name, source, config)
        for logical, part in (parts or {name: source}).items():
            if logical in out or (parts and logical in sources):
                raise CheckpointError(f"{source.where}: split name {logical} is also stored separately")
            out[logical] = part
    return out


def open_checkpoint(source: str | Path, *, allow_pickle: bool = False, base=None) -> Checkpoint:
    """Open a checkpoint for streaming reads (headers only; no tensor data is read).

    Args:
        source: a Hugging Face folder, a ``.safetensors`` file, a pickle file (with
            ``allow_pickle``), a model id ``org/name`` present in the local HF cache, or
            ``smollm2`` (see ``opdgeo.sources``); or a PEFT LoRA adapter folder
            (``adapter_config.json``), opened as the merged model over ``base``
            (``opdgeo.checkpoints.adapters``).
        allow_pickle: permit ``pytorch_model*.bin``/``.pt``/``.pth``, loaded with
            ``torch.load(weights_only=True, mmap=True, map_location="cpu")``.
        base: the base of an adapter (a ``Checkpoint`` or a source; default the adapter's
            ``base_model_name_or_path``); ignored for other checkpoints.

    Returns:
        A ``Checkpoint``.

    Raises:
        CheckpointError: missing path, no weights in a folder, corrupt or truncated files,
            an index naming a missing shard, pickle without ``allow_pickle``, a fused
            tensor the config cannot split, a model id absent from the local cache
            (``SourceError``, a ``CheckpointError``).
    """
    path = ModelSource.parse(source).resolve()
    from opdgeo.checkpoints.adapters import is_adapter, open_adapter

    if path.is_dir() and is_adapter(path):
        return open_adapter(path, base)

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
