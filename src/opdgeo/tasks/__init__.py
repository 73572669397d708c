"""Verifiable tasks: the embedded arithmetic task and math problems from files."""

from __future__ import annotations

from pathlib import Path

from opdgeo.errors import ConfigError
from opdgeo.tasks.arithmetic import ArithmeticTask, arithmetic_pretrain_corpus, parse_final_answer, split_of
from opdgeo.tasks.base import Problem, Task
from opdgeo.tasks.math import MathTask
from opdgeo.tasks.math_verifier import MathVerifier, Verdict, last_boxed

__all__ = [
    "ArithmeticTask", "MathTask", "MathVerifier", "Problem", "Task", "Verdict", "arithmetic_pretrain_corpus",
    "last_boxed", "load_task", "parse_final_answer", "split_of",
]


def _parse_value(key: str, value: str, spec: str):
    if key in ("difficulty", "seed"):
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"task {spec!r}: {key} must be an integer; got {value!r}") from None
    if key == "timeout_s":
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"task {spec!r}: {key} must be a number; got {value!r}") from None
    return value


def load_task(spec: str) -> Task:
    """Build a task from a spec string.

    - ``"arithmetic"`` or ``"arithmetic:difficulty=3,seed=1,ops=+-"`` → ``ArithmeticTask``;
    - a ``.jsonl``/``.json``/``.parquet`` path, a folder, or a dataset name in the local
      HF cache, optionally ``"<source>:timeout_s=2"`` → ``MathTask``.

    Raises:
        ConfigError: unknown option, bad value, missing file or dataset.
    """
    spec = str(spec).strip()
    head, _, opts = spec.partition(":") if spec.startswith("arithmetic") else (spec, "", "")
    if not spec.startswith("arithmetic") and ":timeout_s=" in spec:
        head, _, opts = spec.rpartition(":")
    kwargs = {}
    for item in filter(None, (s.strip() for s in opts.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"task {spec!r}: option {item!r} must be key=value")
        kwargs[key.strip()] = _parse_value(key.strip(), value.strip(), spec)
    if head == "arithmetic":
        unknown = sorted(set(kwargs) - {"difficulty", "seed", "ops"})
        if unknown:
            raise ConfigError(f"task {spec!r}: unknown option(s) {', '.join(unknown)}; use difficulty, seed, ops")
        return ArithmeticTask(**kwargs)
    if not head:
        raise ConfigError("task: empty spec; use 'arithmetic' or a .jsonl/.parquet path")
    path = Path(head).expanduser()
    if path.suffix in (".jsonl", ".json", ".parquet") and not path.exists():
        raise ConfigError(f"{path}: no such task file")
    return MathTask(head, **kwargs)
