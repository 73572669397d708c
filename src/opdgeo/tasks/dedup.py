"""Deduplication of problems by normalized problem text.

The Hugging Face copy of dapo-math-17k holds about 1.79M rows: about 17.4k distinct
prompts, each repeated about 100 times. Sampling epochs over the raw rows would count
every prompt a hundred times, so training prompts are deduplicated by default
(``task.dedup``), keeping the first occurrence of each normalized problem text.

Normalization (``normalize_problem_text``): Unicode NFKC, then every run of whitespace
(spaces, tabs, newlines) collapsed to one space, and the ends stripped. Case and LaTeX
are kept as they are: ``x`` and ``X`` are different variables **(our choice)**.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

from opdgeo.tasks.base import Problem, Task



def normalize_problem_text(text: str) -> str:
    """The dedup key of a problem text: NFKC, whitespace runs → one space, stripped.

    ``str.split()`` splits on runs of Unicode whitespace and drops the ends, so joining
    its parts is the regex ``\\s+`` → ``" "`` plus ``strip`` (several times faster).
    """
    return " ".join(unicodedata.normalize("NFKC", text).split())


@dataclass(frozen=True)
class DedupCounts:
    """How many rows a split holds and how many distinct problems they are."""

    rows: int
    """Rows read (every duplicate counted)."""
    distinct: int
    """Distinct problems (by normalized text) among them."""
    conflicting: int
    """Distinct problems whose duplicates disagree on the reference answer (the first
    row's answer is kept; a dataset with many of these deserves a look)."""

    @property
    def duplicates(self) -> int:
        """Rows dropped: ``rows - distinct``."""
        return self.rows - self.distinct


class Deduplicator:
    """Streaming deduplication: feed problems in order, keep the first of each text.

    Memory holds one entry per distinct problem (its key and first answer), never the
    duplicates, so a 1.79M-row split costs what its 17k distinct prompts cost.
    """

    def __init__(self):
        self._first: dict[str, str] = {}
        self._conflicts: set[str] = set()
        self._key_of: dict[str, str] = {}  # raw text -> key: exact copies are normalized once
        self.rows = 0
        self.kept: list[Problem] = []

    def add(self, problem: Problem) -> bool:
        """Count ``problem``; keep it (and return True) iff its text is new."""
        self.rows += 1
        key = self._key_of.get(problem.prompt)
        if key is None:
            key = self._key_of[problem.prompt] = normalize_problem_text(problem.prompt)
        first = self._first.get(key)
        if first is None:
            self._first[key] = problem.answer
            self.kept.append(problem)
            return True
        if first != problem.answer:
            self._conflicts.add(key)
        return False

    def seen_text(self, text: str) -> bool:
        """Whether this exact text was added before (``add_copy`` may then count a row)."""
        return text in self._key_of

    def add_copy(self, text: str, answer: str) -> None:
        """Count a row whose text is exactly that of an earlier ``add``, with its answer,
        without building its Problem (the row is a duplicate by construction)."""
        self.rows += 1
        key = self._key_of[text]
        if self._first[key] != answer:
            self._conflicts.add(key)

    def counts(self) -> DedupCounts:
        """Counts of what was fed so far."""
        return DedupCounts(rows=self.rows, distinct=len(self._first), conflicting=len(self._conflicts))


def deduplicate(problems: Iterable[Problem]) -> tuple[list[Problem], DedupCounts]:
    """The first problem of each normalized text, in order, and the counts.

    Args:
        problems: problems in their dataset order.

    Returns:
        ``(kept, counts)``: ``kept`` preserves the order of first occurrences.
    """
    d = Deduplicator()
    for p in problems:
        d.add(p)
    return d.kept, d.counts()


def problem_keys(problems: Iterable[Problem]) -> frozenset[str]:
    """The set of normalized problem texts (what "the same rows" means between two tasks)."""
    return frozenset(normalize_problem_text(p.prompt) for p in problems)


def select_problems(task: Task, split: str, *, num_problems: int | None = None,
                    dedup: bool = True) -> tuple[list[Problem], DedupCounts]:
    """The first ``num_problems`` problems of ``split`` (distinct ones when ``dedup``) and
    the split's counts (``rows`` before, ``distinct`` after deduplication).

    Without ``dedup`` the counts still report the distinct problems; only the selection
    keeps the duplicates. A dataset's counts are those of its whole split; a generated
    task's (arithmetic) those of the problems it drew.
    """
    if dedup:
        return task.distinct_problems(split, num_problems)
    return task.problems(split, num_problems), task.distinct_problems(split, num_problems)[1]
