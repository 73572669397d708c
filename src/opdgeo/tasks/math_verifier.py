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
        self._lock = threading.Lock()
        self.counts = {"correct": 0, "wrong": 0, "no_answer": 0, "error": 0, "timeout": 0}

    def _start(self) -> None:
        # A plain subprocess (not multiprocessing): nothing of the caller's __main__ is
        # re-imported, so it works from scripts, notebooks and threads alike.
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from opdgeo.tasks.math_verifier import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
        )

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=10)
            for f in (self._proc.stdin, self._proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
        self._proc = None

    def _ask(self, gold: str, predicted: str, timeout: float):
        """Send one request; the reply, or None if none came within timeout seconds."""
        self._proc.stdin.write(json.dumps([gold, predicted, max(1, int(self.timeout_s))]) + "\n")
        self._proc.stdin.flush()
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self._proc.stdout.readline()
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
        # Worker startup (interpreter + sympy import) is not charged to the per-answer limit.
        with self._lock:
            try:
                if self._proc is None or self._proc.poll() is not None:
                    self._kill()
                    self._start()
                    if self._ask("1", "1", 120) is None:
                        raise EOFError("worker did not start within 120 s")
                reply = self._ask(gold, predicted, self.timeout_s)
            except (BrokenPipeError, EOFError, OSError, ValueError) as err:
                self._kill()
                log.warning("math-verify worker failed on answer %r (%s); scored wrong", predicted[:80], err)
                return Verdict(False, "error")
            if reply is None:
                self._kill()
                log.warning("math-verify timed out after %.1f s on answer %r; scored wrong", self.timeout_s,
                            predicted[:80])
                return Verdict(False, "timeout")
        status, value = reply
        if status == "error":
            log.warning("math-verify failed on answer %r (%s); scored wrong", predicted[:80], value)
            return Verdict(False, "error")
        return Verdict(bool(value), "correct" if value else "wrong")
