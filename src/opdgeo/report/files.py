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

from opdgeo.errors import FieldError
from opdgeo.files import atomic_write_text

__all__ = ["csv_text", "json_safe", "output_folder", "write_json"]


@contextlib.contextmanager
def output_folder(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield ``out_dir`` as a created folder; an ``OSError`` while creating or writing
    into it becomes ``FieldError`` (field ``out``) naming the folder."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        yield out
    except OSError as err:
        raise FieldError([("out", f"{out}: cannot write ({err.strerror or err})")]) from None


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
