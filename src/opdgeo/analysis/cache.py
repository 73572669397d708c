"""On-disk cache of what the pairwise metrics need from a base matrix W0.

Comparing several fine-tunes (or all of a run's checkpoints) against one base pays the
base's work once. One folder, two kinds of entries, both functions of W0 alone:

- **decompositions** (``get``/``put``): all singular values ``S`` (NSS) and the top
  ``n_vectors`` left/right singular vectors ``U``, ``V`` (principal angles use the top k,
  the principal mask the top r, so ``n_vectors = min(max(k, r), min(m, n))`` for the
  metrics requested), in ``<root>/<2 hex>/<key>.safetensors``;
- **masks** (``get_masks``/``put_masks``): the principal and low-magnitude masks of W0
  as packed bits (1/8 byte per entry), in ``<root>/masks/<2 hex>/<key>.bits``
  (safetensors content under another suffix, so ``*.safetensors`` stay decompositions).

Keys: SHA-256 of the tensor's ``content_key`` (a hash of its bytes, from the checkpoint
reader) together with every setting that changes the numbers — ``n_vectors`` and the SVD
precision (and, for masks, ``rank`` and ``alpha``), the cache format and the opdgeo
version. The matrix's name is deliberately *not* part of the key: the same bytes give the
same result wherever they sit.

Files are safetensors (never pickle), written with ``opdgeo.files.atomic_write``, so a
crash or a concurrent writer (another rank, another run) never leaves a half-written
entry. An unreadable or mismatched entry counts as a miss and is rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from opdgeo._version import __version__
from opdgeo.errors import FieldError
from opdgeo.files import atomic_write

__all__ = ["CachedDecomposition", "SvdCache", "CACHE_FORMAT", "MASK_CACHE_FORMAT"]

CACHE_FORMAT = 1
MASK_CACHE_FORMAT = 1
PRECISIONS = {"fp64": torch.float64, "fp32": torch.float32}


@dataclass(frozen=True)
class CachedDecomposition:
    """A base matrix's decomposition as stored in the cache.

    Attributes:
        S: all singular values, descending, ``[min(m, n)]``.
        U: top left singular vectors ``[m, n_vectors]`` (``n_vectors`` may be 0).
        V: top right singular vectors ``[n, n_vectors]``.
    """

    S: torch.Tensor
    U: torch.Tensor
    V: torch.Tensor


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class SvdCache:
    """A folder of cached base-matrix decompositions and masks (see the module docstring).

    Args:
        root: the cache folder; created if absent.

    Attributes:
        hits, misses, writes: decomposition counters since construction (thread-safe), so
            callers and tests can see that a warm run skipped the base SVDs.
        write_errors: entries that could not be stored (the first is reported on stderr;
            the computation goes on without them).

    Raises:
        FieldError: (field ``cache``) ``root`` exists and is not a folder, or cannot be
            created.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise FieldError([("cache", f"{self.root}: cannot create the cache folder ({err.strerror})")]) from None
        if not self.root.is_dir():
            raise FieldError([("cache", f"{self.root}: not a folder")])
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.writes = 0
        self.write_errors = 0

    # ------------------------------------------------------------------ decompositions

    @staticmethod
    def key(content_key: str, *, n_vectors: int, precision: str) -> str:
        """The entry's hex key for a tensor's ``content_key`` and the SVD settings."""
        if precision not in PRECISIONS:
            raise FieldError([("precision", f"must be one of {sorted(PRECISIONS)}; got {precision!r}")])
        return _digest({"content": content_key, "n_vectors": int(n_vectors), "precision": precision,
                        "format": CACHE_FORMAT, "opdgeo": __version__})

    def path(self, content_key: str, *, n_vectors: int, precision: str) -> Path:
        """Where the entry for these settings lives (it may not exist)."""
        key = self.key(content_key, n_vectors=n_vectors, precision=precision)
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, content_key: str, *, n_vectors: int, precision: str) -> CachedDecomposition | None:
        """The cached decomposition, or ``None`` on a miss (absent, unreadable or stale)."""
        tensors = _read(self.path(content_key, n_vectors=n_vectors, precision=precision))
        entry = None
        if tensors is not None and {"S", "U", "V"} <= set(tensors):
            entry = CachedDecomposition(S=tensors["S"], U=tensors["U"], V=tensors["V"])
            if entry.U.shape[1] != n_vectors or entry.V.shape[1] != n_vectors or entry.S.dtype != PRECISIONS[precision]:
                entry = None
        with self._lock:
            if entry is None:
                self.misses += 1
            else:
                self.hits += 1
        return entry

    def put(self, content_key: str, *, n_vectors: int, precision: str, S: torch.Tensor, U: torch.Tensor,
            V: torch.Tensor) -> Path:
        """Store a decomposition atomically; return its path (None: not stored, see ``_store``)."""
        assert U.shape[1] == n_vectors and V.shape[1] == n_vectors, "cache entry with the wrong number of vectors"
        dtype = PRECISIONS[precision]
        tensors = {name: t.detach().to("cpu", dtype).contiguous() for name, t in (("S", S), ("U", U), ("V", V))}
        metadata = {"content_key": content_key, "n_vectors": str(n_vectors), "precision": precision}
        path = self._store(self.path(content_key, n_vectors=n_vectors, precision=precision), tensors, metadata)
        if path is not None:
            with self._lock:
                self.writes += 1
        return path

    # ------------------------------------------------------------------ masks

    def mask_path(self, content_key: str, *, rank: int, alpha: float, n_vectors: int, precision: str) -> Path:
        """Where the masks of W0 for these settings live (they may not exist)."""
        key = _digest({"content": content_key, "rank": int(rank), "alpha": float(alpha), "n_vectors": int(n_vectors),
                       "precision": precision, "format": MASK_CACHE_FORMAT, "opdgeo": __version__})
        return self.root / "masks" / key[:2] / f"{key}.bits"

    def get_masks(self, content_key: str, *, shape: tuple[int, ...], rank: int, alpha: float, n_vectors: int,
                  precision: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(principal_mask, low_magnitude_mask)`` of W0 (bool, ``shape``), or None on a
        miss (absent, unreadable, or not this matrix's entry)."""
        import numpy as np

        numel = 1
        for d in shape:
            numel *= d
        tensors = _read(self.mask_path(content_key, rank=rank, alpha=alpha, n_vectors=n_vectors, precision=precision))
        if tensors is None:
            return None
        masks = []
        for name in ("principal", "low_magnitude"):
            packed = tensors.get(name)
            if packed is None or packed.dtype != torch.uint8 or packed.numel() != -(-numel // 8):
                return None  # not this matrix's entry (unpackbits would zero-pad silently)
            bits = np.unpackbits(packed.numpy(), count=numel)  # [m*n] uint8
            masks.append(torch.from_numpy(bits.view(np.bool_)).reshape(shape))
        return masks[0], masks[1]

    def put_masks(self, content_key: str, *, rank: int, alpha: float, n_vectors: int, precision: str,
                  principal: torch.Tensor, low_magnitude: torch.Tensor) -> Path:
        """Store both masks of W0 atomically as packed bits; return the path (None: not stored)."""
        import numpy as np

        tensors = {name: torch.from_numpy(np.packbits(m.detach().to("cpu").reshape(-1).numpy()))
                   for name, m in (("principal", principal), ("low_magnitude", low_magnitude))}
        metadata = {"content_key": content_key, "shape": "x".join(map(str, principal.shape))}
        path = self.mask_path(content_key, rank=rank, alpha=alpha, n_vectors=n_vectors, precision=precision)
        return self._store(path, tensors, metadata)

    def _store(self, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path | None:
        """Write one entry; a failure (disk full, folder made read-only during the run) is
        not the computation's: it is reported once on stderr, counted in
        ``write_errors``, and the run continues uncached (None)."""
        try:
            return _write(path, tensors, metadata)
        except Exception as err:  # OSError, or safetensors' own error for a full disk
            if not isinstance(err, OSError) and type(err).__name__ != "SafetensorError":
                raise
            with self._lock:
                self.write_errors += 1
                first = self.write_errors == 1
            if first:
                import sys

                reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
                print(f"opdgeo: warning: cannot write to the cache {self.root} ({reason}); continuing without "
                      "caching", file=sys.stderr, flush=True)
            return None


def _read(path: Path) -> dict[str, torch.Tensor] | None:
    """The tensors of a cache file, or None when it is absent or damaged (a miss)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
