"""The task interface: problems with verifiable answers, a 0/1 reward, prompt formatting."""

from __future__ import annotations

from dataclasses import dataclass

SPLITS = ("train", "test")


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

    def demonstration(self, problem: Problem) -> str:
        """The SFT target response (the trainer appends ``tokenizer.eos_token``)."""
        if problem.solution is None:
            from opdgeo.errors import ConfigError

            raise ConfigError(f"task {self.name}: problem {problem.id} has no solution to use as a demonstration")
        return problem.solution
