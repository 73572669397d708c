"""On-disk cache of a base checkpoint's per-matrix SVD.

Comparing several fine-tunes (or all of a run's checkpoints) against one base pays the
base's SVDs once. An entry holds what the pairwise metrics need from W0: all singular
values ``S`` (NSS) and the top ``n_vectors`` left/right singular vectors ``U``, ``V``
(principal angles use the top k, the principal mask the top r, so
``n_vectors = min(max(k, r), min(m, n))`` for the metrics requested).

Key: SHA-256 of the tensor's ``content_key`` (a hash of its bytes, from the checkpoint
reader) together with every setting that changes the numbers — ``n_vectors``, the SVD
precision, the cache format and the opdgeo version. The matrix's name is deliberately
*not* part of the key: the same bytes give the same decomposition wherever they sit.

Files are safetensors (never pickle), written to a temporary file in the same folder
and renamed into place (``os.replace`` is atomic), so a crash or a concurrent writer
(another rank, another run) never leaves a half-written entry. An unreadable or
mismatched entry counts as a miss and is rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from opdgeo.errors import ConfigError

__all__ = ["CachedDecomposition", "SvdCache", "CACHE_FORMAT"]

CACHE_FORMAT = 1
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


class SvdCache:
    """A folder of cached base-matrix decompositions (see the module docstring).

    Args:
        root: the cache folder; created if absent.

    Attributes:
        hits, misses, writes: counters since construction (thread-safe), so callers and
            tests can see that a warm run skipped the base SVDs.

    Raises:
        ConfigError: ``root`` exists and is not a folder, or cannot be created.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"--cache {self.root}: cannot create the cache folder ({err.strerror})") from None
        if not self.root.is_dir():
            raise ConfigError(f"--cache {self.root}: not a folder")
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.writes = 0

    @staticmethod
    def key(content_key: str, *, n_vectors: int, precision: str) -> str:
        """The entry's hex key for a tensor's ``content_key`` and the SVD settings."""
        from opdgeo import __version__

        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {sorted(PRECISIONS)}; got {precision!r}")
        payload = json.dumps(
            {
                "content": content_key,
                "n_vectors": int(n_vectors),
                "precision": precision,
                "format": CACHE_FORMAT,
                "opdgeo": __version__,
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def path(self, content_key: str, *, n_vectors: int, precision: str) -> Path:
        """Where the entry for these settings lives (it may not exist)."""
        key = self.key(content_key, n_vectors=n_vectors, precision=precision)
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, content_key: str, *, n_vectors: int, precision: str) -> CachedDecomposition | None:
        """The cached decomposition, or ``None`` on a miss (absent, unreadable or stale)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.path(content_key, n_vectors=n_vectors, precision=precision)
        entry = None
        if path.is_file():
            try:
                tensors = load_file(str(path))
                entry = CachedDecomposition(S=tensors["S"], U=tensors["U"], V=tensors["V"])
            except (SafetensorError, OSError, KeyError):
                entry = None  # a damaged entry is a miss; put() will replace it
            if entry is not None and (
                entry.U.shape[1] != n_vectors or entry.V.shape[1] != n_vectors or entry.S.dtype != PRECISIONS[precision]
            ):
                entry = None
        with self._lock:
            if entry is None:
                self.misses += 1
            else:
                self.hits += 1
        return entry

    def put(
        self,
        content_key: str,
        *,
        n_vectors: int,
        precision: str,
        S: torch.Tensor,
        U: torch.Tensor,
        V: torch.Tensor,
    ) -> Path:
        """Store a decomposition atomically (temporary file + rename); return its path."""
        from safetensors.torch import save_file

        assert U.shape[1] == n_vectors and V.shape[1] == n_vectors, "cache entry with the wrong number of vectors"
        path = self.path(content_key, n_vectors=n_vectors, precision=precision)
        path.parent.mkdir(parents=True, exist_ok=True)
        dtype = PRECISIONS[precision]
        tensors = {
            "S": S.detach().to("cpu", dtype).contiguous(),
            "U": U.detach().to("cpu", dtype).contiguous(),
            "V": V.detach().to("cpu", dtype).contiguous(),
        }
        metadata = {"content_key": content_key, "n_vectors": str(n_vectors), "precision": precision}
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        with self._lock:
            self.writes += 1
        return path
