"""Tensor sources: where a logical tensor's bytes come from (a safetensors byte range, a
memory-mapped pickle, or a function of another source such as one expert's slice).

``Checkpoint.load`` calls ``Source.load()``: a new contiguous CPU tensor in the stored
dtype, holding only that tensor's memory (a slice of a stored tensor reads only its
bytes).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable

import torch

from opdgeo.checkpoints.safetensors_file import StoredTensor, hash_stored_bytes, read_tensor
from opdgeo.errors import CheckpointError

__all__ = ["DerivedSource", "PickleShard", "PickledSource", "Source", "StoredSource", "first_line", "rows", "torch_load"]


class Source:
    """A loadable tensor: ``shape``, ``dtype``, ``load()``, ``hash_into(h)``, ``where``."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    where: str

    def load(self) -> torch.Tensor:
        raise NotImplementedError

    def load_view(self) -> torch.Tensor:
        """The tensor, possibly a view of storage the source keeps (a memory-mapped
        pickle): for slicing only, never to be modified or returned to a caller."""
        return self.load()

    def hash_into(self, h) -> None:
        t = self.load().contiguous().reshape(-1)  # [numel]
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")


class StoredSource(Source):
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


class PickledSource(Source):
    """One tensor of a ``torch.load(weights_only=True, mmap=True)`` state dict."""

    def __init__(self, shard: "PickleShard", key: str, tensor: torch.Tensor):
        self.shard, self.key = shard, key
        self.shape = tuple(tensor.shape)
        self.dtype = tensor.dtype
        self.where = f"{shard.path}: tensor {key}"

    def load(self) -> torch.Tensor:
        return self.shard.state()[self.key].clone(memory_format=torch.contiguous_format)

    def load_view(self) -> torch.Tensor:
        return self.shard.state()[self.key]


class DerivedSource(Source):
    """``fn`` of another source (a slice, a strided or transposed part): the parent is
    read (a memory-mapped pickle is only viewed), ``fn`` applied, the result copied into
    a new contiguous tensor, so memory is the parent's part plus the result."""

    def __init__(self, parent: Source, shape: tuple[int, ...], fn: Callable, part: str):
        self.parent, self.fn = parent, fn
        self.shape = shape
        self.dtype = parent.dtype
        self.where = f"{parent.where} ({part})"

    def load(self) -> torch.Tensor:
        return self.fn(self.parent.load_view()).clone(memory_format=torch.contiguous_format)

    def load_view(self) -> torch.Tensor:
        return self.fn(self.parent.load_view())


def rows(source: Source, start: int, stop: int, row_shape: tuple[int, ...]) -> Source:
    """Rows ``start:stop`` of ``source`` seen as ``[N, *row_shape]`` (C order): a
    safetensors source reads only those bytes, any other source slices a view."""
    shape = (stop - start,) + tuple(row_shape)
    label = f"rows {start}:{stop}"
    if isinstance(source, StoredSource):
        st = source.stored
        row_bytes = st.dtype.itemsize
        for d in row_shape:
            row_bytes *= d
        sub = StoredTensor(st.path, st.key, st.dtype, shape, st.start + start * row_bytes,
                           st.start + stop * row_bytes, whole=False)
        part = StoredSource(sub)
        part.where = f"{source.where} ({label})"
        return part
    return DerivedSource(source, shape, lambda t: t.reshape(-1, *row_shape)[start:stop], label)


class PickleShard:
    """A pickle checkpoint file, loaded lazily with ``mmap=True`` (data paged on demand)."""

    def __init__(self, path: Path):
        self.path = path
        self._state: dict[str, torch.Tensor] | None = None

    def state(self) -> dict[str, torch.Tensor]:
        if self._state is None:
            self._state = torch_load(self.path)
        return self._state


def torch_load(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    errors = (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except errors as e:
        if "mmap" not in str(e):
            raise CheckpointError(f"{path}: cannot load with torch.load(weights_only=True): {first_line(e)}") from None
        try:  # legacy (pre-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
        except errors as e2:
            raise CheckpointError(f"{path}: cannot load with torch.load(weights_only=True): {first_line(e2)}") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{path}: not a flat state dict of tensors")
    return state


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
