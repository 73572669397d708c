"""Report tables: one typed record per table, written as CSV and JSON, rendered as HTML and
Markdown from the same cells.

Every number shown in ``report.html``/``report.md`` is ``format_cell(value, fmt)`` of the
value stored in the table's CSV/JSON, so the documents and the files cannot disagree
(tests parse both and check it).
"""

from __future__ import annotations

import csv
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Table", "format_cell", "write_table"]


def format_cell(value, fmt: str = "") -> str:
    """The text shown for one cell.

    Args:
        value: number, string, bool or None.
        fmt: a format spec for numbers (``".3f"``, ``".2e"``, ``".1f"``...); ``""`` = ``str``.

    Returns:
        ``"—"`` for None/NaN, ``"yes"``/``"no"`` for bools, ``format(value, fmt)`` for numbers.
    """
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return "—" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return format(value, fmt) if fmt else str(value)
    return str(value)


@dataclass(frozen=True)
class Table:
    """A report table.

    Attributes:
        id: file stem (``table1_sparsity`` → ``tables/table1_sparsity.csv``/``.json``).
        title: heading in the report.
        columns: column names (CSV header, JSON keys).
        rows: one tuple per row, aligned with ``columns``; numbers stay unrounded.
        formats: display format per column (``""`` = as is).
        note: a sentence under the table (definitions, sources).
    """

    id: str
    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple, ...]
    formats: tuple[str, ...] = ()
    note: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        for r in self.rows:
            assert len(r) == len(self.columns), (self.id, r)
        if self.formats:
            assert len(self.formats) == len(self.columns), self.id

    def fmt(self, j: int) -> str:
        return self.formats[j] if self.formats else ""

    def display_rows(self) -> list[list[str]]:
        return [[format_cell(v, self.fmt(j)) for j, v in enumerate(r)] for r in self.rows]

    def records(self) -> list[dict]:
        return [{c: _json_value(v) for c, v in zip(self.columns, r)} for r in self.rows]

    def to_html(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>\n" for row in self.display_rows()
        )
        note = f'<p class="note">{html.escape(self.note)}</p>\n' if self.note else ""
        return (
            f'<table id="{html.escape(self.id)}">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>\n{note}'
        )

    def to_markdown(self) -> str:
        def esc(s: str) -> str:
            return s.replace("|", "\\|").replace("\n", " ")

        lines = ["| " + " | ".join(esc(c) for c in self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in self.display_rows()]
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines) + "\n"


def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_table(table: Table, folder: Path) -> tuple[Path, Path]:
    """Write ``<folder>/<id>.csv`` (full precision, empty cell for None/NaN) and ``<id>.json``.

    JSON schema: ``{"id", "title", "note", "columns", "rows": [{column: value}]}``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    p_csv, p_json = folder / f"{table.id}.csv", folder / f"{table.id}.json"
    with p_csv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(table.columns)
        for r in table.rows:
            w.writerow(["" if (v is None or (isinstance(v, float) and math.isnan(v))) else (repr(v) if isinstance(v, float) else v) for v in r])
    p_json.write_text(
        json.dumps({"id": table.id, "title": table.title, "note": table.note, "columns": list(table.columns),
                    "rows": table.records(), **({"meta": table.meta} if table.meta else {})}, indent=2)
        + "\n"
    )
    return p_csv, p_json
