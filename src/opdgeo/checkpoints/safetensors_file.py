"""Reading ``.safetensors`` files tensor by tensor, with validation at open time.

Format (https://huggingface.co/docs/safetensors): 8 bytes little-endian u64 ``N``, then
``N`` bytes of UTF-8 JSON mapping each tensor name to ``{"dtype", "shape",
"data_offsets": [begin, end]}`` (offsets relative to the data section that starts at
``8 + N``), optional ``"__metadata__"``, then the raw little-endian C-order bytes.

We parse the header ourselves (cheap: no tensor data is read) so that truncation, size
mismatches and overlapping tensors are reported when the checkpoint is opened, before any
work, and so that two names stored at the *same* byte range (shared storage) are seen as
one tensor, which ``safetensors.safe_open`` refuses outright.

A whole tensor is read with ``safe_open(path, framework="pt").get_tensor(key)``, opened
per call: the tensor is a private (copy-on-write) memory map of just its bytes, zero-copy,
and the mapping goes away with the tensor, so memory is bounded by the tensors alive (a
handle kept open across loads would keep every touched page of the shard in the RSS).
A row slice of a tensor (fused projections), or a file ``safe_open`` refuses (shared byte
ranges), is read with one positioned ``readinto`` of exactly its bytes into a new buffer.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from opdgeo.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _attr in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E8M0", "float8_e8m0fnu"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
    if hasattr(torch, _attr):
        DTYPES[_code] = getattr(torch, _attr)

_MAX_HEADER = 100_000_000  # the limit safetensors itself enforces
_HASH_CHUNK = 1 << 24  # 16 MiB per read while hashing


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes lie in a safetensors file.

    ``start``/``end`` are absolute byte positions in ``path`` (header included).
    """

    path: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int
    whole: bool = True  # False for a row slice of the stored tensor ``key``

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> dict[str, StoredTensor]:
    """Parse and validate a safetensors header; return tensors in data order.

    Checks: header length within the file; valid JSON object; known dtypes; integer
    shapes; ``end - begin == numel * itemsize``; every byte range inside the data section
    actually present in the file (so a truncated file fails here); ranges either disjoint
    or identical (identical = shared storage, kept; partial overlap = corrupt).

    Raises:
        CheckpointError: naming ``path`` (and the tensor) on any problem.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", prefix)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors file (header length {n} "
                    f"does not fit in the file's {size} bytes)"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + n
    data_len = size - data_start
    tensors: list[StoredTensor] = []
    for key, spec in header.items():
        if key == "__metadata__":
            continue
        where = f"{path}: tensor {key}"
        try:
            dtype_code = spec["dtype"]
            shape = tuple(spec["shape"])
            begin, end = spec["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{where}: corrupt header entry {spec!r}") from None
        if dtype_code not in DTYPES:
            raise CheckpointError(f"{where}: unsupported dtype {dtype_code!r}")
        if not all(isinstance(d, int) and d >= 0 for d in shape) or not (
            isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end
        ):
            raise CheckpointError(f"{where}: corrupt shape {spec['shape']} or offsets {[begin, end]}")
        dtype = DTYPES[dtype_code]
        numel = 1
        for d in shape:
            numel *= d
        need = numel * torch.empty((), dtype=dtype).element_size()
        if end - begin != need:
            raise CheckpointError(
                f"{where}: header gives {end - begin} bytes but shape {list(shape)} of "
                f"{dtype_code} needs {need}"
            )
        if end > data_len:
            raise CheckpointError(
                f"{where}: file is truncated (data ends at byte {data_start + end} but the "
                f"file has {size} bytes)"
            )
        tensors.append(StoredTensor(path, key, dtype, shape, data_start + begin, data_start + end))
    tensors.sort(key=lambda t: (t.start, t.end))
    for a, b in zip(tensors, tensors[1:]):
        if b.start < a.end and (a.start, a.end) != (b.start, b.end):
            raise CheckpointError(f"{path}: corrupt header: tensors {a.key} and {b.key} overlap")
    return {t.key: t for t in tensors}


_SAFE_OPEN_REFUSED: set[Path] = set()  # files safe_open rejects; read with readinto


def read_tensor(t: StoredTensor) -> torch.Tensor:
    """Read one stored tensor as a contiguous CPU tensor of its stored dtype.

    Whole tensors: ``safe_open`` per call (zero-copy private mmap of the tensor's bytes).
    Row slices and files ``safe_open`` refuses: one positioned read of ``t.nbytes`` bytes
    straight into a new buffer.

    Raises:
        CheckpointError: the file shrank or vanished since it was opened.
    """
    if t.whole and t.path not in _SAFE_OPEN_REFUSED:
        try:
            with safe_open(t.path, framework="pt") as f:
                tensor = f.get_tensor(t.key)
            if tensor.dtype == t.dtype and tuple(tensor.shape) == t.shape:
                return tensor
        except (SafetensorError, OSError):
            pass
        _SAFE_OPEN_REFUSED.add(t.path)
    buf = torch.empty(t.nbytes, dtype=torch.uint8)  # [nbytes]
    try:
        with open(t.path, "rb", buffering=0) as f:
            f.seek(t.start)
            got = f.readinto(memoryview(buf.numpy())) if t.nbytes else 0
    except OSError as e:
        raise CheckpointError(f"{t.path}: tensor {t.key}: cannot read ({e.strerror or e})") from None
    if got != t.nbytes:
        raise CheckpointError(f"{t.path}: tensor {t.key}: file is truncated (read {got} of {t.nbytes} bytes)")
    return buf.view(t.dtype).reshape(t.shape)


def hash_stored_bytes(t: StoredTensor, h: "hashlib._Hash") -> None:
    """Feed a stored tensor's raw bytes into ``h`` in 16 MiB chunks (bounded memory)."""
    try:
        with open(t.path, "rb", buffering=0) as f:
            f.seek(t.start)
            left = t.nbytes
            while left:
                chunk = f.read(min(left, _HASH_CHUNK))
                if not chunk:
                    raise CheckpointError(f"{t.path}: tensor {t.key}: file is truncated")
                h.update(chunk)
                left -= len(chunk)
    except OSError as e:
        raise CheckpointError(f"{t.path}: tensor {t.key}: cannot read ({e.strerror or e})") from None
