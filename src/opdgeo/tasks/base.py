"""The task interface: problems with verifiable answers, a 0/1 reward, prompt formatting."""

from __future__ import annotations

from dataclasses import dataclass

SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """What a task's split is, in words and numbers (data plans, run logs)."""

    dataset: str
    """The dataset's name (``"DAPO-Math-17k"``) or ``"unknown schema"``."""
    source: str
    """The file or folder read."""
    split: str
    """The split asked for (``"train"``/``"test"``)."""
    dataset_split: str
    """The dataset's own name of that split (``HuggingFaceH4/aime_2024``: ``"train"``)."""
    split_meaning: str
    """What the dataset's splits are (the adapter's note)."""
    prompt_format: str
    """How prompts are built."""
    answer_format: str
    """Which answer the reward reads, for the split's prompts (several: joined by ``" | "``)."""


@dataclass(frozen=True)
class Verdict:
    """Outcome of checking one response."""

    correct: bool
    """True iff the extracted answer is equivalent to the reference."""
    reason: str
    """"correct", "wrong", "no_answer" (no answer in the expected format), "error"
    (malformed, raised) or "timeout"."""
    extracted: str | None = None
    """The answer read from the response (None when there was none)."""


@dataclass(frozen=True)
class Problem:
    """One verifiable problem."""

    id: str
    """Stable identifier (unique within a task)."""
    prompt: str
    """The question text, without any chat formatting (see ``Task.format_prompt``)."""
    answer: str
    """The reference final answer (canonical string)."""
    solution: str | None = None
    """A worked solution ending in the final answer (the SFT target), when the task has one."""


class Task:
    """Base class of verifiable tasks.

    Subclasses set ``name`` and implement ``problems``, ``reward``, ``instruction`` and
    ``plain_prompt``; ``format_prompt`` picks between the last two by tokenizer.
    """

    name: str = "task"

    def problems(self, split: str, n: int | None = None) -> list[Problem]:
        """The first ``n`` problems of ``split`` ("train" or "test"), deterministic."""
        raise NotImplementedError

    def reward(self, response: str, problem: Problem) -> float:
        """1.0 if ``response`` (the generated text after the prompt) is correct, else 0.0."""
        raise NotImplementedError

    def check(self, response: str, problem: Problem) -> Verdict:
        """The verdict on ``response``: correct or not, why, and the answer read from it.

        ``reward`` is ``1.0 if check(...).correct else 0.0``; tasks that can say which answer
        they read override this (the default knows only the reward).
        """
        ok = self.reward(response, problem) == 1.0
        return Verdict(ok, "correct" if ok else "wrong")

    def answer_format(self, problem: Problem) -> str:
        """Name of the answer format ``reward`` reads for ``problem`` (``opdgeo.tasks.answers.FORMATS``)."""
        return "boxed"

    def instruction(self, problem: Problem) -> str:
        """The user message sent to chat models (tokenizers with a chat template)."""
        return problem.prompt

    def plain_prompt(self, problem: Problem) -> str:
        """The raw text fed to models without a chat template (e.g. the char tokenizer)."""
        return problem.prompt

    def format_prompt(self, problem: Problem, tokenizer) -> str:
        """The prompt string to tokenize (without adding special tokens).

        With a chat template (e.g. SmolLM2-Instruct): one user turn holding
        ``instruction(problem)``, rendered with ``add_generation_prompt=True``. Otherwise
        ``plain_prompt(problem)``.
        """
        if getattr(tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": self.instruction(problem)}]
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.plain_prompt(problem)

    def distinct_problems(self, split: str, n: int | None = None):
        """``(problems, counts)``: the first ``n`` distinct problems of ``split`` (by
        normalized text, ``opdgeo.tasks.dedup``) and a ``DedupCounts`` of the rows read."""
        from opdgeo.tasks.dedup import deduplicate

        return deduplicate(self.problems(split, n))

    def describe(self, split: str) -> DatasetInfo:
        """The split in words (data plans); tasks that read datasets say more."""
        from opdgeo.tasks.answers import DESCRIPTIONS

        first = self.problems(split, 1)
        fmt = DESCRIPTIONS[self.answer_format(first[0])] if first else ""
        return DatasetInfo(dataset=self.name, source="generated", split=split, dataset_split=split,
                           split_meaning="", prompt_format="the task's own prompt", answer_format=fmt)

    def demonstration(self, problem: Problem) -> str:
        """The SFT target response (the trainer appends ``tokenizer.eos_token``)."""
        if problem.solution is None:
            from opdgeo.errors import ConfigError

            raise ConfigError(f"task {self.name}: problem {problem.id} has no solution to use as a demonstration")
        return problem.solution
