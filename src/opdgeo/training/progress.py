"""Progress of a training loop: a live bar on a terminal, plain lines in a log.

On a terminal (``stream.isatty()``) a rich bar on stderr is updated after every step. In a
log that is not a terminal (a file, a pipe, a CI job) the bar would print nothing until
the end, so ``StepProgress`` writes a plain line instead, at least every ``every_s``
seconds (30 by default) while the loop runs::

    train step 12/40 loss 0.4113 reward 0.250 elapsed 0:01:03

A line is written after a step when ``every_s`` has passed since the last line (and after
the first and the last step); a step that itself lasts longer is covered by a heartbeat
thread that repeats the last values with the current elapsed time. The clock is injectable
(``clock``), so the schedule is tested without waiting. How progress is shown never
changes what is computed: it is not part of any configuration hash.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import TextIO

__all__ = ["StepProgress", "format_elapsed", "step_summary"]


def format_elapsed(seconds: float) -> str:
    """``H:MM:SS`` of a non-negative number of seconds."""
    s = int(max(seconds, 0.0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def step_summary(values: Mapping[str, float]) -> str:
    """``loss 0.4113 reward 0.250 acc 0.250`` from a step's metrics (keys that are present)."""
    parts = []
    for key, label, fmt in (("train/loss", "loss", ".4f"), ("rlvr/reward", "reward", ".3f"),
                            ("rlvr/accuracy", "acc", ".3f"), ("opd/teacher_gap", "gap", ".4f")):
        if key in values:
            parts.append(f"{label} {values[key]:{fmt}}")
    return " ".join(parts)


class StepProgress:
    """Context manager: ``update(step, values, text)`` after every optimizer step.

    Args:
        label: first word of each line / the bar's label (``"train"``, ``"pretrain"``).
        total: the last step number.
        start: steps already done (a resumed run).
        enabled: False gives a no-op (e.g. ranks other than 0, ``run.progress: false``).
        stream: where lines go (default ``sys.stderr``); its ``isatty()`` picks bar or lines.
        every_s: longest silence in a non-terminal log, in seconds.
        clock: monotonic seconds (injectable for tests).
        heartbeat: start the heartbeat thread in line mode (tests drive ``tick`` themselves).
    """

    def __init__(self, label: str, total: int, *, start: int = 0, enabled: bool = True, stream: TextIO | None = None,
                 every_s: float = 30.0, clock: Callable[[], float] = time.monotonic, heartbeat: bool = True):
        self.label, self.total, self.start, self.enabled = label, total, start, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.every_s, self.clock, self.heartbeat = every_s, clock, heartbeat
        isatty = getattr(self.stream, "isatty", None)
        self.live = bool(enabled and isatty is not None and isatty())
        self._bar = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = self._last = 0.0
        self._step, self._text = start, ""

    def __enter__(self) -> StepProgress:
        self._t0 = self._last = self.clock()
        if not self.enabled:
            return self
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn(f"[bold]{self.label}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.description}"),
                                 console=Console(file=self.stream), transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task("", total=self.total, completed=self.start)
        elif self.heartbeat:
            self._thread = threading.Thread(target=self._beat, name=f"{self.label}-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        if self._bar is not None:
            self._bar.__exit__(*exc)
        return False

    def update(self, step: int, values: Mapping[str, float], text: str = "") -> None:
        """Record step ``step`` (1-based) with its metrics; draw or print as due."""
        if not self.enabled:
            return
        summary = " ".join(p for p in (step_summary(values), text) if p)
        with self._lock:
            self._step, self._text = step, summary
            if self._bar is not None:
                self._bar.update(self._task, completed=step, description=summary)
                return
            now = self.clock()
            if step == self.start + 1 or step >= self.total or now - self._last >= self.every_s:
                self._write(now)

    def tick(self) -> None:
        """Heartbeat: in line mode, repeat the last line if ``every_s`` passed without one."""
        if not self.enabled or self._bar is not None:
            return
        with self._lock:
            now = self.clock()
            if now - self._last >= self.every_s:
                self._write(now, running=True)

    def _write(self, now: float, *, running: bool = False) -> None:
        state = f"step {self._step}/{self.total}" + (" (running)" if running else "")
        line = " ".join(p for p in (self.label, state, self._text, f"elapsed {format_elapsed(now - self._t0)}") if p)
        self.stream.write(line + "\n")
        self.stream.flush()
        self._last = now

    def _beat(self) -> None:
        wait = min(5.0, self.every_s / 2)
        while not self._stop.wait(wait):
            self.tick()
