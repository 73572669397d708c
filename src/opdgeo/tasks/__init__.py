"""Verifiable tasks: the embedded arithmetic task and math problems from files and datasets."""

from __future__ import annotations

import re
from pathlib import Path

from opdgeo.errors import ConfigError
from opdgeo.tasks.adapters import ADAPTERS, DatasetAdapter, adapter_named
from opdgeo.tasks.answers import FORMATS, extract_answer, requested_format
from opdgeo.tasks.arithmetic import ArithmeticTask, arithmetic_pretrain_corpus, parse_final_answer, split_of
from opdgeo.tasks.base import DatasetInfo, Problem, Task, Verdict
from opdgeo.tasks.dedup import DedupCounts, deduplicate, normalize_problem_text
from opdgeo.tasks.math import MathTask
from opdgeo.tasks.math_verifier import MathVerifier, last_boxed

__all__ = [
    "ADAPTERS", "ArithmeticTask", "DatasetAdapter", "DatasetInfo", "DedupCounts", "FORMATS", "MathTask",
    "MathVerifier", "Problem", "Task", "Verdict", "adapter_named", "arithmetic_pretrain_corpus", "deduplicate",
    "extract_answer", "last_boxed", "load_task", "normalize_problem_text", "parse_final_answer",
    "requested_format", "split_of", "split_task_spec",
]

_ARITHMETIC_OPTIONS = ("difficulty", "seed", "ops")
_MATH_OPTIONS = ("timeout_s", "dataset", "config", "format")
_OPTIONS = re.compile(r"\s*[A-Za-z_]+\s*=[^,]*(,\s*[A-Za-z_]+\s*=[^,]*)*\s*")


def split_task_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"source:key=value,key=value"`` → ``(source, {key: value})``.

    The options are the text after the LAST ``:`` when it is a list of ``key=value``
    (a dataset id or a path has no such tail); ``arithmetic:...`` always splits at its
    first ``:``.

    Raises:
        ConfigError: an option without ``=``.
    """
    spec = str(spec).strip()
    if spec.startswith("arithmetic"):
        head, _, opts = spec.partition(":")
    else:
        head, sep, opts = spec.rpartition(":")
        if not sep or not _OPTIONS.fullmatch(opts):
            head, opts = spec, ""
    out: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in opts.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"task {spec!r}: option {item!r} must be key=value")
        out[key.strip()] = value.strip()
    return head.strip(), out


def _number(key: str, value: str, spec: str, kind: type):
    try:
        return kind(value)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"task {spec!r}: {key} must be {what}; got {value!r}") from None


def load_task(spec: str) -> Task:
    """Build a task from a spec string.

    - ``"arithmetic"`` or ``"arithmetic:difficulty=3,seed=1,ops=+-"`` → ``ArithmeticTask``;
    - a ``.jsonl``/``.json``/``.parquet`` path, a folder, a dataset id in the local HF
      cache, or a known dataset's name (``"aime-2024"``, ``"dapo-math-17k"``, …; see
      ``opdgeo.tasks.adapters``), optionally followed by ``:key=value,…`` with
      ``timeout_s`` (answer-check limit, s), ``dataset`` (read as this known dataset),
      ``config`` (``datasets`` config; several joined by ``+``), ``format`` (answer format
      of prompts that ask for none) → ``MathTask``.

    Raises:
        ConfigError: unknown option, bad value, missing file or dataset.
    """
    head, opts = split_task_spec(spec)
    if head == "arithmetic":
        unknown = sorted(set(opts) - set(_ARITHMETIC_OPTIONS))
        if unknown:
            raise ConfigError(f"task {spec!r}: unknown option(s) {', '.join(unknown)}; use difficulty, seed, ops")
        kwargs = {k: (_number(k, v, spec, int) if k in ("difficulty", "seed") else v) for k, v in opts.items()}
        return ArithmeticTask(**kwargs)
    if not head:
        raise ConfigError("task: empty spec; use 'arithmetic', a .jsonl/.parquet path or a dataset name")
    unknown = sorted(set(opts) - set(_MATH_OPTIONS))
    if unknown:
        raise ConfigError(f"task {spec!r}: unknown option(s) {', '.join(unknown)}; use {', '.join(_MATH_OPTIONS)}")
    path = Path(head).expanduser()
    if path.suffix in (".jsonl", ".json", ".parquet") and not path.exists():
        raise ConfigError(f"{path}: no such task file")
    config = opts.get("config")
    timeout_s = _number("timeout_s", opts["timeout_s"], spec, float) if "timeout_s" in opts else 5.0
    return MathTask(head, timeout_s=timeout_s,
                    dataset=opts.get("dataset"), config=tuple(config.split("+")) if config else None,
                    answer_format=opts.get("format"))
