"""math-verify under a hard per-answer time limit, safe from any thread.

``math_verify`` enforces its own time limits with ``signal.alarm``, which only works in
the main thread and cannot interrupt long C-level work (a huge integer power inside
sympy). So every check runs in one persistent worker subprocess (JSON lines over pipes): the
caller waits at most ``timeout_s`` for the answer, and on timeout kills the worker, logs
the case, scores it wrong and starts a fresh worker for the next check. Inside the
worker, math-verify's own signal-based timeouts are active too (it is the worker's main
thread).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import select
import subprocess
import sys
import threading
import time

from opdgeo.tasks.answers import extract_answer, last_boxed
from opdgeo.tasks.base import Verdict

__all__ = ["MathVerifier", "Verdict", "last_boxed"]

log = logging.getLogger("opdgeo.tasks.math")


def _check(gold: str, predicted: str, inner_timeout: int) -> bool:
    """Runs in the worker: parse both as LaTeX (boxed) and compare with math-verify."""
    from math_verify import parse, verify

    g = parse(f"\\boxed{{{gold}}}", parsing_timeout=inner_timeout)
    p = parse(f"\\boxed{{{predicted}}}", parsing_timeout=inner_timeout)
    if not g or not p:
        return False
    return bool(verify(g, p, timeout_seconds=inner_timeout))


def _worker_main() -> None:
    """The worker loop: one JSON request per stdin line, one JSON reply per stdout line."""
    import json
    import logging as _logging
    import sys

    _logging.getLogger("math_verify").setLevel(_logging.CRITICAL)
    out = sys.stdout
    sys.stdout = sys.stderr  # anything printed by libraries must not corrupt the channel
    for line in sys.stdin:
        gold, predicted, inner_timeout = json.loads(line)
        try:
            reply = ["ok", _check(gold, predicted, inner_timeout)]
        except Exception as err:  # malformed input inside sympy/latex2sympy: reported, scored wrong
            reply = ["error", f"{type(err).__name__}: {err}"[:200]]
        out.write(json.dumps(reply) + "\n")
        out.flush()


class MathVerifier:
    """Checks final answers with math-verify in a worker process.

    Args:
        timeout_s: hard wall-clock limit per check (seconds, > 0); a check that takes
            longer is killed and scored wrong ("timeout").
    """

    def __init__(self, timeout_s: float = 5.0):
        if not timeout_s > 0:
            from opdgeo.errors import ConfigError

            raise ConfigError(f"math verifier: timeout_s must be > 0; got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self._proc: subprocess.Popen | None = None
        self._standby: subprocess.Popen | None = None  # warm spare: takes over when a check hangs
        self.restarts = 0
        self._lock = threading.Lock()
        self.counts = {"correct": 0, "wrong": 0, "no_answer": 0, "error": 0, "timeout": 0}

    def _spawn(self) -> subprocess.Popen:
        """Start a worker and send it a warm-up check (its reply is read by ``_ready``)."""
        # A plain subprocess (not multiprocessing): nothing of the caller's __main__ is
        # re-imported, so it works from scripts, notebooks and threads alike.
        proc = subprocess.Popen(
            [sys.executable, "-c", "from opdgeo.tasks.math_verifier import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
        )
        proc.stdin.write(json.dumps(["1", "1", 1]) + "\n")
        proc.stdin.flush()
        proc.warm = False
        return proc

    @staticmethod
    def _ready(proc: subprocess.Popen, timeout: float) -> bool:
        """True once the worker has answered its warm-up check (waiting up to ``timeout`` s)."""
        if not proc.warm:
            ready, _, _ = select.select([proc.stdout], [], [], timeout)
            proc.warm = bool(ready) and bool(proc.stdout.readline())
        return proc.warm

    @staticmethod
    def _stop(proc: subprocess.Popen | None) -> None:
        if proc is None:
            return
        proc.kill()
        proc.wait(timeout=10)
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except OSError:
                pass

    def _kill(self) -> None:
        """Stop the worker and its standby."""
        self._stop(self._proc)
        self._stop(self._standby)
        self._proc = self._standby = None

    def _replace(self) -> None:
        """Drop the active worker (hung or dead); the warm standby takes over at once and
        a new standby starts warming, so the next check does not wait for a cold start."""
        self._stop(self._proc)
        self._proc, self._standby = self._standby, None

    def _active(self) -> subprocess.Popen:
        """The worker to ask, started (the first time: waited for up to 120 s) and warm."""
        if self._proc is not None and self._proc.poll() is not None:
            self._replace()
        if self._proc is None:
            self._proc = self._spawn()
        if not self._ready(self._proc, 0):
            t0 = time.perf_counter()
            if not self._ready(self._proc, 120):
                raise EOFError("worker did not start within 120 s")
            if self.restarts:
                log.warning("math-verify: waited %.1f s for a restarted worker (two hung checks in a row)",
                            time.perf_counter() - t0)
        if self._standby is None or self._standby.poll() is not None:
            self._stop(self._standby)
            self._standby = self._spawn()
        return self._proc

    def _ask(self, proc: subprocess.Popen, gold: str, predicted: str, timeout: float):
        """Send one request; the reply, or None if none came within timeout seconds."""
        proc.stdin.write(json.dumps([gold, predicted, max(1, int(self.timeout_s))]) + "\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = proc.stdout.readline()
        if not line:
            raise EOFError("worker exited")
        return json.loads(line)

    def close(self) -> None:
        """Stop the worker process (a later check starts a new one)."""
        with self._lock:
            self._kill()

    def __del__(self):
        try:
            self._kill()
        except Exception:  # interpreter shutdown: nothing left to clean
            pass

    def check(self, response: str, gold: str, *, answer_format: str = "boxed") -> Verdict:
        """Score ``response`` against the reference answer ``gold``.

        The answer is extracted in ``answer_format`` (``opdgeo.tasks.answers``: the last
        ``\\boxed{}`` by default, or DAPO's ``Answer:`` line, or GSM8K's ``####``); none →
        wrong ("no_answer"). Never raises for any string input; a hang or an exception is
        logged and scored wrong. The verdict carries the extracted answer.
        """
        predicted = extract_answer(response, answer_format)
        if predicted is None:
            verdict = Verdict(False, "no_answer")
        else:
            verdict = dataclasses.replace(self._check_remote(gold, predicted), extracted=predicted)
        self.counts[verdict.reason] += 1
        return verdict

    def _check_remote(self, gold: str, predicted: str) -> Verdict:
        # Only the first worker's cold start (interpreter + sympy import) is not charged to an
        # answer: a hung check's worker is replaced by the warm standby, so the next check
        # gets its whole timeout_s.
        with self._lock:
            try:
                proc = self._active()
                reply = self._ask(proc, gold, predicted, self.timeout_s)
            except (BrokenPipeError, EOFError, OSError, ValueError) as err:
                self._replace()
                self.restarts += 1
                log.warning("math-verify worker failed on answer %r (%s); scored wrong", predicted[:80], err)
                return Verdict(False, "error")
            if reply is None:
                self._replace()
                self.restarts += 1
                log.warning("math-verify timed out after %.1f s on answer %r; scored wrong", self.timeout_s,
                            predicted[:80])
                return Verdict(False, "timeout")
        status, value = reply
        if status == "error":
            log.warning("math-verify failed on answer %r (%s); scored wrong", predicted[:80], value)
            return Verdict(False, "error")
        return Verdict(bool(value), "correct" if value else "wrong")
