"""Independent stages side by side: each in its own forked process, at most ``jobs`` at once.

A tiny study's stages are single-threaded (their matrices are too small for a second
intra-op thread to pay), so on a machine with several cores the study's wall time falls
with the number of stages that run at once, not with threads inside one. The parent keeps
every decision and every marker (`opdgeo.study.stages`): it prepares a stage's folder,
forks a child that only calls the stage function, and writes the marker when the child has
reported back, so a killed study leaves exactly the markers of the stages that finished.

A stage starts only when every stage it depends on has finished (or was found cached), so
the outputs it reads are complete; results do not depend on ``jobs`` because every stage is
a function of its configuration and its dependencies' outputs (each child sets the same
intra-op thread count as a serial run).

Child output: every line a child writes to stderr carries its stage's name
(``  <stage> | ...``), and progress bars turn into plain lines (a prefixed stream is not a
terminal), so two trainings' progress stays readable in a terminal and in a log.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable

__all__ = ["ChildResult", "StageProcess", "default_jobs", "preload_stage_modules"]

PRELOADED = ("transformers.models.qwen3.modeling_qwen3", "transformers.models.llama.modeling_llama",
             "opdgeo.training.loop", "opdgeo.training.evaluate", "opdgeo.analysis.compare",
             "opdgeo.analysis.trajectory", "opdgeo.report.study_report")
"""Modules every stage child would otherwise import for itself (the modeling code alone takes
~1.7 s); imported once in the parent, they come with the fork."""


def preload_stage_modules() -> None:
    """Import ``PRELOADED`` in this (the parent) process; a module that is not installed is
    skipped (its stages report it themselves). Importing runs no parallel region, so forking
    afterwards stays safe for OpenMP."""
    import importlib

    for name in PRELOADED:
        try:
            importlib.import_module(name)
        except ImportError:
            continue


def default_jobs(threads_per_stage: int | None, *, launcher: str | None = None) -> int:
    """How many stages to run at once by default: the cores divided by each stage's threads.

    One when a launcher runs the training (it takes the whole machine's accelerators) or
    when the stage threads are not pinned (a stage then uses every core by itself).
    """
    if launcher or not threads_per_stage:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // threads_per_stage)


@dataclass
class ChildResult:
    """What a child reports: ``status`` ok | unavailable | error, with the stage's summary or
    the error's type, message and traceback, and the child's own wall and CPU seconds."""

    status: str
    summary: dict | None = None
    error_type: str = ""
    message: str = ""
    traceback: str = ""
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    exception: BaseException | None = None  # the error itself where it pickles, re-raised by the parent


def _picklable(err: BaseException) -> BaseException | None:
    import pickle

    try:
        pickle.loads(pickle.dumps(err))
    except Exception:
        return None
    return err


class _Prefixed(io.TextIOBase):
    """A text stream that writes each complete line to ``raw`` with ``prefix`` in front."""

    def __init__(self, raw, prefix: str):
        self.raw, self.prefix, self.buf = raw, prefix, ""

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        self.buf += text.replace("\r", "\n")
        *lines, self.buf = self.buf.split("\n")
        for line in lines:
            if line.strip():
                self.raw.write(f"{self.prefix}{line}\n")
        self.raw.flush()
        return len(text)

    def flush(self) -> None:
        if self.buf.strip():
            self.raw.write(f"{self.prefix}{self.buf}\n")
            self.buf = ""
        self.raw.flush()


def _child(conn, call: Callable[[], dict], name: str, threads: int | None, unavailable: type) -> None:
    sys.stderr = _Prefixed(sys.__stderr__, f"  {name} | ")
    sys.stdout = _Prefixed(sys.__stdout__, f"  {name} | ")
    if threads:
        import torch

        torch.set_num_threads(threads)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        res = ChildResult("ok", summary=call() or {})
    except unavailable as err:
        res = ChildResult("unavailable", message=str(err))
    except BaseException as err:  # reported to the parent, which decides (soft stage or not)
        res = ChildResult("error", error_type=type(err).__name__, message=str(err), traceback=traceback.format_exc(),
                          exception=_picklable(err))
    res.seconds, res.cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    sys.stderr.flush()
    sys.stdout.flush()
    try:
        conn.send(res)
    except Exception as err:  # a summary that does not pickle is the stage's bug: say so
        conn.send(ChildResult("error", error_type=type(err).__name__, message=f"stage {name}: result not sendable: {err}",
                              seconds=res.seconds, cpu_seconds=res.cpu_seconds))
    conn.close()


class StageProcess:
    """One stage function running in a forked child."""

    def __init__(self, name: str, call: Callable[[], dict], *, threads: int | None, unavailable: type):
        ctx = mp.get_context("fork")  # the stage function is a closure: fork, never pickle it
        self.name = name
        self.recv, send = ctx.Pipe(duplex=False)
        sys.stderr.flush()
        sys.stdout.flush()
        self.proc = ctx.Process(target=_child, args=(send, call, name, threads, unavailable), name=f"stage-{name}")
        self.proc.start()
        send.close()

    def result(self) -> ChildResult:
        """The child's report (after `ready`); a child that died without one is an error."""
        try:
            res = self.recv.recv()
        except EOFError:
            res = None
        self.proc.join()
        if res is None:
            code = self.proc.exitcode
            return ChildResult("error", error_type="ChildDied",
                               message=f"stage {self.name}: its process ended with exit code {code} without a result")
        return res

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
