"""Evaluation on a verifiable task: pass@1 estimated as avg@k.

avg@k = (1/|P|) Σ_p (1/k) Σ_j r_{p,j}, with r ∈ {0, 1} the task reward of sample j of
problem p: the mean over problems of the fraction of k samples that are correct (the
paper's "AIME 2024 avg@8"). With temperature 0 (greedy) all k samples coincide, so use
k = 1 there.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from opdgeo.errors import ConfigError


@dataclass(frozen=True)
class EvalResult:
    """Outcome of ``evaluate``. ``records`` holds one dict per problem (see ``evaluate``)."""

    task: str
    """Task name."""
    split: str
    """Split evaluated."""
    n: int
    """Number of problems."""
    k: int
    """Samples per problem."""
    temperature: float
    """Sampling temperature (0 = greedy)."""
    avg_at_k: float
    """pass@1 estimated as avg@k (NaN when n = 0)."""
    mean_response_tokens: float
    """Mean response length in tokens (EOS included) over all n·k samples."""
    truncated_fraction: float
    """Fraction of samples that hit max_new_tokens without EOS."""
    records: list[dict] = field(repr=False, default_factory=list)
    """Per problem: id, prompt, answer, accuracy (fraction of k correct), rewards, samples,
    extracted (the answer read from each sample), verdicts (each sample's reason)."""

    @property
    def pass_at_1(self) -> float:
        """Alias of ``avg_at_k``."""
        return self.avg_at_k

    def summary(self) -> dict:
        """All fields but ``records`` (JSON-ready)."""
        d = asdict(self)
        d.pop("records")
        return d

    def write(self, path: str | Path) -> Path:
        """Write one JSON line per problem (``records``), then nothing else; return the path.

        The summary is not mixed into the per-problem lines; callers that want it store
        ``summary()`` separately (the CLI writes ``<out>.summary.json``).
        """
        from opdgeo.files import atomic_write_text

        return atomic_write_text(path, "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in self.records))


def avg_at_k(rewards: list[list[float]]) -> float:
    """Mean over problems of the mean reward of their samples; NaN for no problems.

    Args:
        rewards: per problem, its k rewards (k ≥ 1, the same for every problem).
    """
    if not rewards:
        return math.nan
    return sum(sum(r) / len(r) for r in rewards) / len(rewards)


def evaluate(model, tokenizer, task, *, split: str = "test", n: int | None = None, k: int = 1,
             temperature: float = 0.0, max_new_tokens: int = 96, seed: int = 0, batch_size: int = 64,
             out: str | Path | None = None, progress: Callable[[int, int], None] | None = None,
             problems: Sequence | None = None) -> EvalResult:
    """Evaluate ``model`` on ``task.problems(split, n)`` with k samples per problem.

    Prompts are ``task.format_prompt(problem, tokenizer)``; responses come from
    ``opdgeo.training.rollout.generate`` (KV cache, stop at EOS) and are scored by
    ``task.reward``. Problems are processed in groups of ``max(1, batch_size // k)`` so
    that each ``generate`` call holds about ``batch_size`` sequences; group g uses seed
    ``seed + 1000·g``.

    Args:
        model, tokenizer: the causal LM and its tokenizer.
        task: an ``opdgeo.tasks.Task``.
        split: "test" (held out) by default.
        n: number of problems (task default when None).
        k: samples per problem (≥ 1).
        temperature: 0 → greedy.
        max_new_tokens: response length cap.
        seed: sampling seed.
        batch_size: sequences per ``generate`` call.
        out: if given, per-problem records are written there as JSONL.
        progress: called as ``progress(done, total)`` problems after each group.
        problems: evaluate these problems of ``task`` instead of ``task.problems(split, n)``
            (e.g. its distinct ones; ``split`` is then only recorded).

    Returns:
        ``EvalResult``; each record is ``{"id", "prompt", "answer", "accuracy", "rewards",
        "samples", "extracted", "verdicts"}`` with ``samples`` the k response texts,
        ``extracted`` the answer ``task.check`` read from each (None: none in the
        expected format) and ``verdicts`` its reason (``"correct"``, ``"wrong"``,
        ``"no_answer"``, ``"error"``, ``"timeout"``).

    Raises:
        ConfigError: k < 1, temperature < 0, or bad split/n (from the task).
    """
    from opdgeo.training.rollout import generate

    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"eval: k must be a positive integer; got {k!r}")
    if not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise ConfigError(f"eval: temperature must be >= 0; got {temperature!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"eval: batch_size must be a positive integer; got {batch_size!r}")
    problems = list(task.problems(split, n) if problems is None else problems)
    group = max(1, batch_size // k)
    records, all_rewards = [], []
    tokens = truncated = 0
    for g, start in enumerate(range(0, len(problems), group)):
        chunk = problems[start:start + group]
        prompts = [task.format_prompt(p, tokenizer) for p in chunk]
        ro = generate(model, tokenizer, prompts, num_samples=k, temperature=temperature,
                      max_new_tokens=max_new_tokens, seed=seed + 1000 * g, batch_size=batch_size,
                      score=False)
        tokens += int(ro.response_mask.sum())
        truncated += int((~ro.finished).sum())
        for i, p in enumerate(chunk):
            texts = ro.texts[i * k:(i + 1) * k]
            verdicts = [task.check(t, p) for t in texts]
            rewards = [1.0 if v.correct else 0.0 for v in verdicts]
            all_rewards.append(rewards)
            records.append({"id": p.id, "prompt": p.prompt, "answer": p.answer,
                            "accuracy": sum(rewards) / k, "rewards": rewards, "samples": texts,
                            "extracted": [v.extracted for v in verdicts], "verdicts": [v.reason for v in verdicts]})
        if progress is not None:
            progress(min(start + group, len(problems)), len(problems))
    total = len(problems) * k
    result = EvalResult(task=task.name, split=split, n=len(problems), k=k, temperature=float(temperature),
                        avg_at_k=avg_at_k(all_rewards),
                        mean_response_tokens=tokens / total if total else math.nan,
                        truncated_fraction=truncated / total if total else math.nan, records=records)
    if out is not None:
        result.write(out)
    return result


# ------------------------------------------------------------------------ suites


@dataclass(frozen=True)
class SuiteResult:
    """Outcome of ``evaluate_suite``: one ``EvalResult`` per task, and the headline."""

    results: dict
    """Task name → ``EvalResult``, in the suite's order."""
    headline: str
    """Name of the headline task."""
    counts: dict = field(default_factory=dict)
    """Task name → ``{"rows", "distinct"}`` of its split (before and after deduplication)."""

    @property
    def headline_value(self) -> float:
        """avg@k of the headline task."""
        return self.results[self.headline].avg_at_k

    def summary(self) -> dict:
        """``{"headline": {"task", "metric", "value"}, "tasks": {name: summary + counts}}`` (JSON-ready)."""
        head = self.results[self.headline]
        return {"headline": {"task": self.headline, "metric": f"avg@{head.k}", "value": head.avg_at_k},
                "tasks": {name: {**r.summary(), **self.counts.get(name, {})} for name, r in self.results.items()}}

    def write(self, out_dir: str | Path) -> Path:
        """``<out_dir>/<task>.jsonl`` per task (``EvalResult.write``) and ``summary.json``; the folder."""
        out_dir = Path(out_dir)
        for name, r in self.results.items():
            r.write(out_dir / f"{name}.jsonl")
        from opdgeo.files import atomic_write_text

        atomic_write_text(out_dir / "summary.json", json.dumps(self.summary(), indent=2) + "\n")
        return out_dir


def evaluate_suite(model, tokenizer, suite, *, seed: int = 0, batch_size: int = 64, out_dir: str | Path | None = None,
                   train: Sequence[tuple[str, str]] = (),
                   progress: Callable[[str, int, int], None] | None = None) -> SuiteResult:
    """Evaluate ``model`` on every task of an ``opdgeo.tasks.suite.EvalSuite``.

    Each task's problems are its split's distinct problems (``suite.dedup``; else every
    row), the first ``n``; k, temperature and the token cap come from
    ``suite.settings(task)``. Tasks that resolve to training rows are refused before any
    generation (``check_eval_not_train`` against ``train``).

    Args:
        model, tokenizer: the causal LM and its tokenizer.
        suite: the ``EvalSuite``.
        seed: sampling seed (the same for every task).
        batch_size: sequences per ``generate`` call.
        out_dir: if given, ``SuiteResult.write(out_dir)``.
        train: ``(spec, split)`` of the training tasks to refuse.
        progress: called as ``progress(task_name, done, total)``.

    Returns:
        ``SuiteResult``.

    Raises:
        ConfigError: an evaluation task that is training data, or any task/split error,
            all before the first generation.
    """
    from opdgeo.tasks import load_task
    from opdgeo.tasks.dedup import select_problems
    from opdgeo.tasks.suite import check_eval_not_train

    if train:
        check_eval_not_train(train, suite)
    chosen = {}
    for t in suite.tasks:  # every task resolves (and every split exists) before generating
        task = load_task(t.spec)
        problems, counts = select_problems(task, t.split, num_problems=t.n, dedup=suite.dedup)
        chosen[t.name] = (task, problems, {"rows": counts.rows, "distinct": counts.distinct})
    results = {}
    for t in suite.tasks:
        task, problems, _ = chosen[t.name]
        k, temperature, cap = suite.settings(t)
        cb = None if progress is None else (lambda done, total, name=t.name: progress(name, done, total))
        results[t.name] = evaluate(model, tokenizer, task, split=t.split, k=k, temperature=temperature,
                                   max_new_tokens=cap, seed=seed, batch_size=batch_size, problems=problems,
                                   progress=cb)
    out = SuiteResult(results=results, headline=suite.headline_task.name,
                      counts={name: c for name, (_, _, c) in chosen.items()})
    if out_dir is not None:
        out.write(out_dir)
    return out
