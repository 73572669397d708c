"""The analyses' progress bar: rich, on stderr, transient; a no-op when disabled."""

from __future__ import annotations


class progress_bar:
    """Context manager yielding ``advance(n)`` over ``total`` units of work.

    Args:
        label: shown at the left (``"compare"``, ``"trajectory"``).
        enabled: False (or a rank other than 0) gives a no-op ``advance``.
        total: the work's total size, in the caller's units (e.g. parameters).
        unit: text after the percentage (``"of parameters"``), or empty.
    """

    def __init__(self, label: str, enabled: bool, total: float, unit: str = ""):
        self.label, self.enabled, self.total, self.unit = label, enabled, total, unit
        self._progress = None

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        percent = "{task.percentage:>5.1f}%" + (f" {self.unit}" if self.unit else "")
        self._progress = Progress(
            TextColumn(self.label),
            BarColumn(),
            TextColumn(percent),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._progress.__enter__()
        task = self._progress.add_task(self.label, total=self.total)
        return lambda n: self._progress.advance(task, n)

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
        return False
