"""Writing the analyses' tables: CSV text, JSON without NaN, written atomically.

The stable schemas themselves (column lists, summary keys) belong to the analyses
(``opdgeo.analysis.compare.COLUMNS``, ``opdgeo.analysis.trajectory.COLUMNS``); this module
only turns rows and dicts into text and files.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from opdgeo.errors import OutputError
from opdgeo.files import atomic_write_text, staged_folder

__all__ = ["csv_text", "json_safe", "output_folder", "write_json"]


@contextlib.contextmanager
def output_folder(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging folder whose files appear in ``out_dir`` together, once all are
    written (``opdgeo.files.staged_folder``); an ``OSError`` while creating or writing
    becomes ``OutputError`` naming the folder, and leaves ``out_dir`` as it was (no
    temporary files). Writers name their files by the yielded folder; the published paths
    are ``out_dir / name``."""
    out = Path(out_dir)
    try:
        with staged_folder(out) as stage:
            yield stage
    except OSError as err:
        where = f"{Path(err.filename).name}: " if getattr(err, "filename", None) else ""
        raise OutputError(f"{out}: cannot write ({where}{err.strerror or err})") from None
    except Exception as err:  # safetensors reports a full disk as its own error type
        if type(err).__name__ != "SafetensorError":
            raise
        raise OutputError(f"{out}: cannot write ({err})") from None


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None: NaN/Inf are not JSON, and the
    tables' notes say why a value is missing."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _cell(value, nan: str) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return nan if math.isnan(value) else repr(value)  # repr: every digit, read back exactly
    return value


def csv_text(rows: Iterable[dict[str, Any]], columns: Sequence[str], *, nan: str = "") -> str:
    """CSV text of ``rows`` with a header of ``columns``: an empty cell for None (a metric
    that does not apply), ``nan`` for NaN (``""`` or ``"nan"``), floats at full ``repr``
    precision."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c), nan) for c in columns])
    return buf.getvalue()


def write_json(path: Path, obj: Any) -> Path:
    """``obj`` as indented JSON (non-finite floats as null), written atomically."""
    return atomic_write_text(path, json.dumps(json_safe(obj), indent=2) + "\n")
