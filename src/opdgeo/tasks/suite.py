"""Evaluation suites: several held-out tasks, each with its own k, and one headline.

The paper reports AIME 2024 avg@8 as its headline, with AMC 2023, AIME 2025, Minerva math
and MATH-500 beside it (SPEC §3). ``PAPER_SUITE`` is that list; the k of the tasks the
paper does not state is **our choice** (AIME 2025 and AMC 2023 avg@8 like AIME 2024,
since they are as small; MATH-500 and Minerva avg@1: 500 and 272 problems already hold
the standard error near 2 points).

``check_eval_not_train`` refuses an evaluation task whose problems are training problems
(the same rows, by normalized problem text), before any model loads; a partial overlap
is reported, not refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from opdgeo.errors import ConfigError

_EVAL_OPTIONS = ("k", "n", "split", "name", "temperature", "max_new_tokens")


@dataclass(frozen=True)
class EvalTask:
    """One task of a suite."""

    name: str
    """Label in reports and file names (``"aime-2024"``)."""
    spec: str
    """``opdgeo.tasks.load_task`` spec (a known dataset's name, a Hub id, a file…)."""
    k: int = 1
    """Samples per problem: avg@k."""
    split: str = "test"
    """opdgeo split (``test``: the held-out problems, whatever the dataset calls them)."""
    n: int | None = None
    """First n (distinct) problems; None: all."""
    temperature: float | None = None
    """Sampling temperature; None: the suite's."""
    max_new_tokens: int | None = None
    """Response cap; None: the suite's."""


@dataclass(frozen=True)
class EvalSuite:
    """Evaluation tasks with shared defaults."""

    tasks: tuple[EvalTask, ...]
    """The tasks, in report order."""
    headline: str | None = None
    """Name of the task whose avg@k is the headline (None: the first)."""
    temperature: float = 1.0
    """Default sampling temperature (0: greedy; then k is 1)."""
    max_new_tokens: int = 8192
    """Default response cap."""
    dedup: bool = True
    """Evaluate each distinct problem once (some copies repeat problems, e.g. to average
    over samples; avg@k does that itself)."""

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise ConfigError("eval suite: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every inconsistency, one string each."""
        out = []
        if not self.tasks:
            out.append("needs at least one task")
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            out.append(f"task names must be unique; repeated: {', '.join(dup)}")
        for t in self.tasks:
            if not isinstance(t.k, int) or t.k < 1:
                out.append(f"{t.name}: k must be a positive integer; got {t.k!r}")
            if t.n is not None and (not isinstance(t.n, int) or t.n < 1):
                out.append(f"{t.name}: n must be a positive integer or None; got {t.n!r}")
            if t.temperature is not None and t.temperature < 0:
                out.append(f"{t.name}: temperature must be >= 0; got {t.temperature}")
            if not t.name or "/" in t.name:
                out.append(f"task name {t.name!r} must be non-empty without '/' (it names a file)")
        if self.headline is not None and self.headline not in names:
            out.append(f"headline {self.headline!r} is not one of the tasks ({', '.join(names)})")
        if self.temperature < 0:
            out.append(f"temperature must be >= 0; got {self.temperature}")
        if self.max_new_tokens < 1:
            out.append(f"max_new_tokens must be >= 1; got {self.max_new_tokens}")
        return out

    @property
    def headline_task(self) -> EvalTask:
        """The headline task."""
        name = self.headline or self.tasks[0].name
        return next(t for t in self.tasks if t.name == name)

    def settings(self, task: EvalTask) -> tuple[int, float, int]:
        """``(k, temperature, max_new_tokens)`` of ``task`` with the suite's defaults (k = 1 when greedy)."""
        temp = self.temperature if task.temperature is None else task.temperature
        return (1 if temp == 0 else task.k), temp, task.max_new_tokens or self.max_new_tokens


PAPER_SUITE = EvalSuite(
    tasks=(
        EvalTask("aime-2024", "aime-2024", k=8),
        EvalTask("aime-2025", "aime-2025", k=8),
        EvalTask("amc-2023", "amc-2023", k=8),
        EvalTask("math-500", "math-500", k=1),
        EvalTask("minerva-math", "minerva-math", k=1),
    ),
    headline="aime-2024", temperature=1.0, max_new_tokens=8192,
)
"""The paper's evaluation (SPEC §3): AIME 2024 avg@8 headline; AIME 2025, AMC 2023, MATH-500, Minerva."""

SUITES = {"paper": PAPER_SUITE}
"""Named suites (``opdgeo eval --suite NAME``)."""


def _default_name(head: str) -> str:
    from opdgeo.tasks.adapters import adapter_for_hub_id, adapter_named

    if head.startswith("arithmetic"):
        return "arithmetic"
    named = adapter_named(head) if "/" not in head else None
    if named is not None:
        return named.name
    known = adapter_for_hub_id(head)
    if known is not None:
        return known[0].name
    return Path(head).stem if Path(head).suffix else head.replace("/", "--")


def parse_eval_task(text: str, *, k: int = 1, split: str = "test", n: int | None = None) -> EvalTask:
    """``"aime-2024:k=8,n=30"`` → ``EvalTask``. The options ``k``, ``n``, ``split``,
    ``name``, ``temperature``, ``max_new_tokens`` are the evaluation's; the rest stay in
    the task spec (``"file.jsonl:dataset=aime-2024,k=8"``). ``k``/``split``/``n`` default
    to the arguments.

    Raises:
        ConfigError: a bad value.
    """
    from opdgeo.tasks import split_task_spec

    head, opts = split_task_spec(text)
    mine = {key: opts.pop(key) for key in list(opts) if key in _EVAL_OPTIONS}
    spec = head + (":" + ",".join(f"{a}={b}" for a, b in opts.items()) if opts else "")

    def num(key, kind):
        try:
            return kind(mine[key])
        except ValueError:
            raise ConfigError(f"eval task {text!r}: {key} must be {'an integer' if kind is int else 'a number'}; "
                              f"got {mine[key]!r}") from None

    return EvalTask(name=mine.get("name") or _default_name(head), spec=spec,
                    k=num("k", int) if "k" in mine else k, split=mine.get("split", split),
                    n=num("n", int) if "n" in mine else n,
                    temperature=num("temperature", float) if "temperature" in mine else None,
                    max_new_tokens=num("max_new_tokens", int) if "max_new_tokens" in mine else None)


def suite_from(tasks: Sequence[str] = (), *, suite: str | None = None, k: int = 1, split: str = "test",
               n: int | None = None, temperature: float = 1.0, max_new_tokens: int = 8192,
               headline: str | None = None) -> EvalSuite:
    """A suite from a named suite and/or task texts (``parse_eval_task``); task texts are
    added after the named suite's tasks. The named suite keeps its own temperature and
    token cap unless tasks are given alone."""
    if suite is not None and suite not in SUITES:
        raise ConfigError(f"eval suite: unknown suite {suite!r}; known: {', '.join(SUITES)}")
    base = SUITES[suite] if suite else None
    extra = tuple(parse_eval_task(t, k=k, split=split, n=n) for t in tasks)
    if base is None:
        return EvalSuite(tasks=extra, headline=headline, temperature=temperature, max_new_tokens=max_new_tokens)
    return replace(base, tasks=base.tasks + extra, headline=headline or base.headline)


@dataclass(frozen=True)
class Overlap:
    """Problems an evaluation task shares with a training task."""

    eval_task: str
    """The evaluation task's name."""
    train_spec: str
    """The training task's spec."""
    train_split: str
    """Its split."""
    shared: int
    """Distinct evaluation problems that are also training problems."""
    eval_problems: int
    """Distinct evaluation problems."""


def check_eval_not_train(train: Sequence[tuple[str, str]], suite: EvalSuite | Sequence[EvalTask]) -> list[Overlap]:
    """Refuse evaluation tasks that resolve to training rows; report partial overlaps.

    Rows are compared by normalized problem text (``opdgeo.tasks.dedup``) between each
    evaluation task's problems and each training ``(spec, split)``'s problems. An
    evaluation task all of whose problems are training problems (e.g. a split that a
    one-file dataset cannot serve, or the same file under two names) is an error.

    Args:
        train: the training tasks as ``(spec, split)`` pairs (e.g. ``(task.spec, task.split)``
            of every training stage, and the demonstration set of SFT).
        suite: the evaluation tasks.

    Returns:
        One ``Overlap`` per (evaluation, training) pair that shares any problem.

    Raises:
        ConfigError: every offending evaluation task, one line each.
    """
    from opdgeo.tasks.dedup import problem_keys
    from opdgeo.tasks.plan import _task

    tasks = suite.tasks if isinstance(suite, EvalSuite) else tuple(suite)
    train_keys = {}
    for spec, split in dict.fromkeys(train):
        train_keys[(spec, split)] = problem_keys(_task(spec).distinct_problems(split)[0])
    errors, out = [], []
    for t in tasks:
        keys = problem_keys(_task(t.spec).distinct_problems(t.split, t.n)[0])
        for (spec, split), tk in train_keys.items():
            shared = len(keys & tk)
            if not shared:
                continue
            out.append(Overlap(t.name, spec, split, shared, len(keys)))
            if shared == len(keys):
                errors.append(f"eval task {t.name!r} ({t.spec}, split {t.split!r}) resolves to the same rows as the "
                              f"training task {spec} (split {split!r}): all {shared} of its problems are training "
                              "problems; evaluate on held-out data")
    if errors:
        raise ConfigError(errors[0] if len(errors) == 1 else f"{len(errors)} evaluation tasks are training data:\n  "
                          + "\n  ".join(errors))
    return out


def suite_plan_rows(suite: EvalSuite, *, stage: str = "eval") -> list:
    """One ``DataPlanRow`` per evaluation task (``opdgeo.tasks.plan``), k included."""
    from opdgeo.tasks.plan import data_plan_row

    rows = []
    for t in suite.tasks:
        k, temperature, cap = suite.settings(t)
        note = f"T={temperature:g}, up to {cap} new tokens" + (", the headline" if t is suite.headline_task else "")
        rows.append(data_plan_row(t.spec, stage=f"{stage}:{t.name}", role="eval", split=t.split, dedup=suite.dedup,
                                  num_problems=t.n, k=k, note=note))
    return rows
