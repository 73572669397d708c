"""The problems a training run draws from, and a log of the answers its verifier read.

``training_problems(config, run_dir)`` is the one place a run's data is chosen:

1. the task's ``task.split``, deduplicated by normalized problem text unless
   ``task.dedup`` is false (``opdgeo.tasks.dedup``), then its first ``task.num_problems``;
2. for SFT, the demonstrations: the task's own solutions (``task.demonstrations`` null),
   another dataset with solutions (a task spec, e.g. ``openr1-math``; deduplicated and cut
   the same way), or the teacher's verified samples of the training prompts
   (``"teacher"``, ``opdgeo.training.demonstrations``), written once to the run folder;
3. ``data.json`` in the run folder: the dataset, split, row counts before and after
   deduplication, the prompts used, the answer format, and the demonstrations (``kind``:
   ``"task solutions"``, ``"dataset"`` or ``"teacher"``, with their counts).

Everything is checked before a model is loaded for training (a set without solutions is
refused up front, not at the first SFT step).

``answer_log_records`` picks a seeded sample of a step's rollouts and records the answer
the verifier read and its verdict; ``append_answer_log`` appends them to
``answers.jsonl`` in the run folder; ``log_answers`` is the trainer's call (every
``run.answer_log_every`` steps, ``run.answer_log_samples`` rollouts, main process).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from opdgeo.errors import ConfigError
from opdgeo.tasks.base import Problem, Task
from opdgeo.tasks.dedup import DedupCounts, select_problems
from opdgeo.files import atomic_write_text

DATA_FILE = "data.json"
"""The run's data record, in the run folder."""
ANSWERS_FILE = "answers.jsonl"
"""Sampled rollouts' extracted answers and verdicts, in the run folder."""


@dataclass(frozen=True)
class TrainingData:
    """What ``training_problems`` chose."""

    task: Task
    """The task whose ``format_prompt`` builds the prompts (and ``demonstration`` the SFT targets)."""
    problems: list[Problem]
    """The problems the run draws its batches from."""
    record: dict
    """What ``data.json`` holds."""


def _stage_record(task: Task, split: str, counts: DedupCounts, used: int, dedup: bool) -> dict:
    info = task.describe(split)
    return {"spec": getattr(task, "source", task.name), "dataset": info.dataset, "source": info.source,
            "split": split, "dataset_split": info.dataset_split, "rows": counts.rows, "distinct": counts.distinct,
            "conflicting": counts.conflicting, "dedup": dedup, "used": used, "prompt_format": info.prompt_format,
            "answer_format": info.answer_format}


def _with_solutions(problems: list[Problem], where: str, what: str) -> list[Problem]:
    kept = [p for p in problems if p.solution is not None and p.solution.strip()]
    if not kept:
        raise ConfigError(f"{where}: none of the {len(problems)} problems of {what} has a solution to use as an SFT "
                          "demonstration; set task.demonstrations to a dataset with solutions (e.g. openr1-math) "
                          "or to 'teacher' (rejection-sampled from model.teacher)")
    return kept


def training_problems(config, run_dir: str | Path | None = None, *, device=None, is_main: bool = True,
                      barrier: Callable[[], None] | None = None,
                      log: Callable[[str], None] | None = None) -> TrainingData:
    """The task and problems a run trains on (see the module docstring).

    Args:
        config: a validated ``TrainConfig``.
        run_dir: the run folder (``data.json``, teacher demonstrations); None: write nothing.
        device: where a teacher generating demonstrations runs.
        is_main: this process writes the files (the others wait at ``barrier``, then read).
        barrier: synchronizes the processes of a distributed run (None: one process).
        log: called with one line per stage of the selection.

    Raises:
        ConfigError: an empty split, a set without demonstrations, or the task errors
            (missing split, unreadable rows).
    """
    from opdgeo.tasks import load_task

    t = config.task
    task = load_task(t.spec)
    problems, counts = select_problems(task, t.split, num_problems=t.num_problems, dedup=t.dedup)
    if not problems:
        raise ConfigError(f"task.spec: {t.spec!r} has no {t.split!r} problems")
    record = {"task": _stage_record(task, t.split, counts, len(problems), t.dedup)}
    say = log or (lambda line: None)
    say(f"task {t.spec} [{t.split}]: {counts.rows} rows, {counts.distinct} distinct"
        f"{'' if t.dedup else ' (dedup off)'}; using {len(problems)}")
    if config.objective.demonstrations:
        if t.demonstrations is None:
            with_solutions = _with_solutions(problems, "task.spec", t.spec)
            if len(with_solutions) < len(problems):
                say(f"demonstrations: {len(problems) - len(with_solutions)} of {len(problems)} problems have no "
                    "solution and are left out")
            problems = with_solutions
            record["demonstrations"] = {"kind": "task solutions", "kept": len(problems)}
        elif t.demonstrations == "teacher":
            from opdgeo.training.demonstrations import read_demonstrations, teacher_demonstrations

            if run_dir is None:
                raise ConfigError("task.demonstrations: 'teacher' needs a run folder to write them to")
            if is_main:
                teacher_demonstrations(config, run_dir, task, problems, device=device, log=say)
            if barrier is not None:
                barrier()
            problems, meta = read_demonstrations(run_dir)
            record["demonstrations"] = {"kind": "teacher", **{k: v for k, v in meta.items() if k != "settings"}}
        else:
            demo_task = load_task(t.demonstrations)
            demos, dcounts = select_problems(demo_task, t.demonstration_split, num_problems=t.num_problems,
                                             dedup=t.dedup)
            kept = _with_solutions(demos, "task.demonstrations", t.demonstrations)
            record["demonstrations"] = {"kind": "dataset", **_stage_record(demo_task, t.demonstration_split,
                                                                              dcounts, len(demos), t.dedup),
                                        "kept": len(kept)}
            say(f"demonstrations {t.demonstrations} [{t.demonstration_split}]: {dcounts.rows} rows, "
                f"{dcounts.distinct} distinct; {len(kept)} with solutions")
            task, problems = demo_task, kept
    if run_dir is not None and is_main:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / DATA_FILE, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return TrainingData(task=task, problems=problems, record=record)


# ------------------------------------------------------------------------ answer log


@dataclass(frozen=True)
class AnswerRecord:
    """One sampled rollout: what the verifier read and what it decided."""

    step: int
    """Optimizer step (1-based) of the rollout."""
    problem_id: str
    """The problem answered."""
    answer_format: str
    """The format the answer was read in (``opdgeo.tasks.answers``)."""
    reference: str
    """The reference answer."""
    extracted: str | None
    """The answer read from the response (None: none in that format)."""
    correct: bool
    """The verdict."""
    reason: str
    """``"correct"``, ``"wrong"``, ``"no_answer"``, ``"error"`` or ``"timeout"``."""
    response_tail: str
    """The last 200 characters of the response (where the answer should be)."""


def answer_log_records(task: Task, problems: Sequence[Problem], texts: Sequence[str],
                       problem_index: Sequence[int], *, step: int, n: int = 4, seed: int = 0) -> list[AnswerRecord]:
    """Re-check ``n`` rollouts drawn uniformly without replacement (seeded by ``(seed, step)``)
    and record the extracted answer and verdict of each.

    Args:
        task: the run's task (``check``, ``answer_format``).
        problems: the run's problem list.
        texts: the step's response texts.
        problem_index: for each text, its index in ``problems``.
        step: the step (recorded; part of the seed).
        n: rollouts to record (all when fewer).
        seed: the run's seed.
    """
    picked = sorted(random.Random(f"answers|{seed}|{step}").sample(range(len(texts)), min(n, len(texts))))
    out = []
    for i in picked:
        p = problems[int(problem_index[i])]
        v = task.check(texts[i], p)
        out.append(AnswerRecord(step=step, problem_id=p.id, answer_format=task.answer_format(p), reference=p.answer,
                                extracted=v.extracted, correct=v.correct, reason=v.reason,
                                response_tail=texts[i][-200:]))
    return out


def append_answer_log(run_dir: str | Path, records: Sequence[AnswerRecord]) -> Path:
    """Append records to ``answers.jsonl`` in the run folder (one JSON object per line).

    Lines of the records' step or later are dropped first (a resumed run repeats the
    steps after its checkpoint: the log then holds each step once, as the metrics do).
    """

    path = Path(run_dir) / ANSWERS_FILE
    if not records:
        return path
    first = min(r.step for r in records)
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [ln for ln in lines if ln.strip() and _step_of(ln) < first]
        if len(kept) != len(lines):
            atomic_write_text(path, "".join(kept))
    with path.open("a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(asdict(r), ensure_ascii=False) + "\n")
    return path


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1  # an unreadable line is kept (dropping it would hide it)


def log_answers(config, run_dir: str | Path, task: Task, problems: Sequence[Problem], batches, *,
                step: int) -> list[AnswerRecord]:
    """The trainer's answer log: on every ``run.answer_log_every``-th step (1-based) with
    rollouts, ``answer_log_records`` of ``run.answer_log_samples`` of the step's rollouts
    (seeded by ``run.seed`` and the step) appended to ``answers.jsonl``. Call it on the main
    process only; returns the records written (empty on other steps and for SFT).

    Args:
        config: the run's ``TrainConfig``.
        run_dir: the run folder.
        task, problems: the run's task and problem list.
        batches: the step's micro-batches (``texts`` and ``problem_index`` of each).
        step: the step just taken (1-based).
    """
    every = config.run.answer_log_every
    if not every or step % every:
        return []
    texts = [t for mb in batches for t in mb.texts]
    if not texts:
        return []
    index = [int(i) for mb in batches if mb.texts for i in mb.problem_index]
    records = answer_log_records(task, problems, texts, index, step=step, n=config.run.answer_log_samples,
                                 seed=config.run.seed)
    append_answer_log(run_dir, records)
    return records
