"""Where a math dataset's rows come from: a file, a folder, or the local Hugging Face caches.

``open_source(spec)`` resolves, in this order and without any network access:

1. a ``.jsonl`` / ``.json`` / ``.parquet`` file: one split, named by the file name as
   the Hugging Face Hub names data files (a name with the word ``test``/``testing``/
   ``eval``/``evaluation`` is ``test``, ``validation``/``valid``/``val``/``dev`` is
   ``validation``, anything else ``train``) unless the caller gives the split's name
   (a known dataset's own, see ``opdgeo.tasks.adapters``). A single file never serves
   a split it does not hold;
2. a folder (e.g. a ``git clone`` of a dataset repository), read with the ``datasets``
   library, which assigns data files to splits exactly as the Hub does (the dataset
   card's ``configs:``, else the file-name rules above);
3. a dataset id ``org/name``: its snapshot in the local hub cache (``HF_HUB_CACHE``, else
   ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``; ``hf download --repo-type dataset
   org/name`` puts it there), read as a folder; else the ``datasets`` library's own cache
   of an earlier ``load_dataset("org/name")`` (``HF_DATASETS_CACHE``, else
   ``HF_HOME/datasets``), read in offline mode.

``datasets`` runs with offline mode forced on during every call here, so nothing is ever
downloaded and a missing dataset is an immediate error, never a hanging request. Reading
a folder converts its files once into the ``datasets`` Arrow cache (``HF_DATASETS_CACHE``),
as ``load_dataset`` always does; later reads memory-map it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opdgeo.errors import ConfigError

SUFFIXES = (".jsonl", ".json", ".parquet")
"""Data file types read directly (folders and caches: whatever ``datasets`` reads)."""

BATCH_ROWS = 8_192
"""Rows converted to Python at a time when streaming a split (small batches keep the
peak memory of a 1.79M-row split near that of its distinct problems, and run faster than
large ones: measured in ``bench/data.py``)."""

# The Hub's split keywords (``datasets.data_files``): a data file whose name contains one
# of these words, delimited, belongs to that split.
_SPLIT_WORDS = {
    "train": ("train", "training"),
    "test": ("test", "testing", "eval", "evaluation"),
    "validation": ("validation", "valid", "val", "dev"),
}


def split_of_file_name(path: str | Path) -> str | None:
    """The split a data file's name assigns it to by the Hub's rules, or None (no keyword)."""
    words = set(re.split(r"[\W_]+", Path(path).name.lower()))
    for split, keys in _SPLIT_WORDS.items():
        if words & set(keys):
            return split
    return None


def datasets_cache() -> Path:
    """The ``datasets`` library's cache folder, read from the environment at call time."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "datasets"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "datasets"


@contextlib.contextmanager
def _offline_datasets():
    """``datasets`` and ``huggingface_hub`` in offline mode, quiet, for the duration."""
    import datasets
    import huggingface_hub.constants as hub_constants
    from datasets.utils import logging as ds_logging

    saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE, ds_logging.get_verbosity(),
             ds_logging.is_progress_bar_enabled(), datasets.config.HF_DATASETS_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    ds_logging.set_verbosity_error()
    ds_logging.disable_progress_bar()
    try:
        yield datasets
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved[0], saved[1]
        datasets.config.HF_DATASETS_OFFLINE = saved[4]
        ds_logging.set_verbosity(saved[2])
        if saved[3]:
            ds_logging.enable_progress_bar()


def _first_line(err: BaseException) -> str:
    """The first line of an error, and of its cause when it has one (``datasets`` wraps
    the informative error, e.g. a schema mismatch between splits, in a generic one)."""
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    cause = err.__cause__ or err.__context__
    if cause is not None and str(cause).strip():
        line += f" ({type(cause).__name__}: {str(cause).strip().splitlines()[0]})"
    return line


def _load_dataset_dict(target: str, configs: tuple[str | None, ...], where: str) -> dict[str, Any]:
    """``load_dataset(target, name=c)`` for each config, splits concatenated across configs."""
    with _offline_datasets() as datasets:
        parts: dict[str, list] = {}
        for config in configs:
            try:
                dd = datasets.load_dataset(target, name=config, cache_dir=str(datasets_cache()))
            except ValueError as err:
                msg = _first_line(err)
                if "Config name is missing" in msg or "BuilderConfig" in msg:
                    raise ConfigError(f"{where}: {msg} (choose one with ':config=NAME')") from None
                raise ConfigError(f"{where}: cannot read dataset: {msg}") from None
            except Exception as err:  # datasets raises many types for unreadable data; one line for the user
                raise ConfigError(f"{where}: cannot read dataset: {_first_line(err)}") from None
            for split, ds in dd.items():
                parts.setdefault(split, []).append(ds)
        return {s: (v[0] if len(v) == 1 else datasets.concatenate_datasets(v)) for s, v in parts.items()}


def _read_json_rows(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: invalid JSON: {err.msg} (line {err.lineno})") from None
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{path}:{lineno}: invalid JSON line: {err.msg}") from None
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise ConfigError(f"{path}:{bad + 1}: expected a JSON object per row; got {type(rows[bad]).__name__}")
    return rows


@dataclass
class Source:
    """The rows of a dataset, by split, resolved once. Built by ``open_source``."""

    spec: str
    """What was asked for (path or dataset id)."""
    location: str
    """The file or folder read (or ``datasets cache: org/name``)."""
    kind: str
    """``"file"``, ``"folder"``, ``"hub-cache"`` or ``"datasets-cache"``."""
    hub_id: str | None = None
    """The dataset id, when it came from a cache."""
    configs: tuple[str | None, ...] = (None,)
    """``datasets`` config names read (concatenated), None: the default."""
    _file_split: str | None = None
    _datasets: dict[str, Any] | None = field(default=None, repr=False)
    _json_rows: list[dict] | None = field(default=None, repr=False)

    # -- splits
    def splits(self) -> list[str]:
        """The split names this source holds."""
        if self.kind == "file":
            return [self._file_split]
        return sorted(self._dataset_dict())

    def _dataset_dict(self) -> dict[str, Any]:
        if self._datasets is None:
            target = self.hub_id if self.kind == "datasets-cache" else self.location
            self._datasets = _load_dataset_dict(target, self.configs, self.spec)
        return self._datasets

    def _check_split(self, split: str) -> None:
        if split not in self.splits():
            raise ConfigError(f"{self.spec}: no split {split!r}; it holds {', '.join(map(repr, self.splits()))}")

    # -- rows
    def columns(self, split: str) -> list[str]:
        """Column names of ``split``."""
        self._check_split(split)
        if self.kind != "file":
            return list(self._dataset_dict()[split].column_names)
        path = Path(self.location)
        if path.suffix == ".parquet":
            return list(self._parquet().schema_arrow.names)
        names: dict[str, None] = {}
        for row in self._rows_json():
            names.update(dict.fromkeys(row))
        return list(names)

    def num_rows(self, split: str) -> int:
        """Rows in ``split`` (duplicates included)."""
        self._check_split(split)
        if self.kind != "file":
            return int(self._dataset_dict()[split].num_rows)
        if Path(self.location).suffix == ".parquet":
            return int(self._parquet().metadata.num_rows)
        return len(self._rows_json())

    def iter_rows(self, split: str) -> Iterator[dict]:
        """The rows of ``split`` in order, as plain dicts, converted ``BATCH_ROWS`` at a time."""
        self._check_split(split)
        if self.kind != "file":
            ds = self._dataset_dict()[split].with_format("arrow")
            for table in ds.iter(batch_size=BATCH_ROWS):
                yield from table.to_pylist()
            return
        if Path(self.location).suffix == ".parquet":
            try:
                for batch in self._parquet().iter_batches(batch_size=BATCH_ROWS):
                    yield from batch.to_pylist()
            except Exception as err:  # pyarrow raises many types for corrupt files
                raise ConfigError(f"{self.location}: cannot read parquet: {_first_line(err)}") from None
            return
        yield from self._rows_json()

    def where_prefix(self, split: str) -> str:
        """``where(split, i)`` is this prefix followed by ``i + 1``."""
        name = Path(self.location).name if self.kind in ("file", "folder") else (self.hub_id or self.location)
        return f"{name}:" if self.kind == "file" else f"{name}[{split}]:"

    def where(self, split: str, index: int) -> str:
        """``file:row`` (1-based) for messages."""
        return f"{self.where_prefix(split)}{index + 1}"

    def _parquet(self):
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(self.location, pre_buffer=False)  # no read-ahead: row groups one at a time
        except Exception as err:  # pyarrow raises many types for corrupt files
            raise ConfigError(f"{self.location}: cannot read parquet: {_first_line(err)}") from None

    def _rows_json(self) -> list[dict]:
        if self._json_rows is None:
            self._json_rows = _read_json_rows(Path(self.location))
        return self._json_rows


def cached_dataset_folder(hub_id: str) -> Path | None:
    """The snapshot folder of dataset ``hub_id`` in the local hub cache, or None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    from opdgeo.sources import hf_hub_cache

    try:
        return Path(snapshot_download(hub_id, repo_type="dataset", cache_dir=hf_hub_cache(), local_files_only=True))
    except HFValidationError:
        raise ConfigError(f"{hub_id}: neither a .jsonl/.parquet file nor a valid dataset name") from None
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        return None


def _in_datasets_cache(hub_id: str) -> bool:
    """Whether ``datasets`` has prepared ``hub_id`` before (its cache folder ``org___name``)."""
    return (datasets_cache() / hub_id.replace("/", "___")).is_dir()


def open_source(spec: str | Path, *, configs: tuple[str | None, ...] = (None,), file_split: str | None = None,
                must_exist: bool = True) -> Source | None:
    """Resolve ``spec`` to a ``Source`` (see the module docstring); nothing is read yet.

    Args:
        spec: a data file, a folder, or a dataset id ``org/name``.
        configs: ``datasets`` config name(s) to read (concatenated); None: the default.
        file_split: the split name of a single data file whose name has no split keyword
            (default ``"train"``, the Hub's rule).
        must_exist: raise when a dataset id is in neither cache (else return None).

    Raises:
        ConfigError: a missing file, an unknown file type, or (with ``must_exist``) a
            dataset id found in neither local cache.
    """
    text = str(spec).strip()
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise ConfigError(f"{path}: expected a .jsonl, .json or .parquet file")
        split = split_of_file_name(path) or file_split or "train"
        return Source(spec=text, location=str(path), kind="file", _file_split=split)
    if path.suffix in SUFFIXES:
        raise ConfigError(f"{path}: no such task file")
    if path.is_dir():
        return Source(spec=text, location=str(path), kind="folder", configs=configs)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ConfigError(f"{text}: no such file or folder, and not a dataset id (org/name)")
    folder = cached_dataset_folder(text)
    if folder is not None:
        return Source(spec=text, location=str(folder), kind="hub-cache", hub_id=text, configs=configs)
    if _in_datasets_cache(text):
        return Source(spec=text, location=f"datasets cache: {text}", kind="datasets-cache", hub_id=text,
                      configs=configs)
    if not must_exist:
        return None
    raise ConfigError(f"{text}: no such file, and not a dataset in the local Hugging Face cache (opdgeo never "
                      f"downloads; fetch it first with `hf download --repo-type dataset {text}`)")
