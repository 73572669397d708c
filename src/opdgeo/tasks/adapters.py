"""Known math datasets: their schema, prompt format, answer format and what a split means.

Each ``DatasetAdapter`` turns one row of its dataset into a ``Problem`` and says how the
dataset is meant to be used. ``load_task`` picks one by name (``"aime-2024"``), by Hub
id (``"HuggingFaceH4/aime_2024"``), with ``:dataset=NAME`` for a local copy, or by the
columns of a local file when they are distinctive (dapo-math-17k, its Processed variant,
OpenR1-Math, GSM8K). Every other dataset goes through ``GENERIC``, the field-name rules:

- problem: ``problem``, ``Problem``, ``question``, ``Question`` or ``prompt`` (a string,
  or chat messages whose last user ``content`` is used);
- answer: ``answer``, ``Answer``, ``final_answer``, ``reward_model.ground_truth``, else
  the last ``\\boxed{}`` of ``solution``/``Solution``;
- id: ``id``, ``ID``, ``unique_id``, ``problem_id``, ``uuid``, ``extra_info.index``, else
  the row's position;
- solution (the SFT demonstration): ``solution``/``Solution`` when it is a worked
  solution.

Splits. opdgeo asks for ``train`` (training prompts) or ``test`` (held-out evaluation);
an adapter says what those mean for its dataset (``DatasetAdapter.splits_doc``). An
evaluation set (``role == "eval"``) serves ``test`` from its one split whatever the Hub
calls it (``HuggingFaceH4/aime_2024`` calls its 30 problems ``train``) and refuses
``train``; a training set without a held-out split (dapo-math-17k) refuses ``test``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from opdgeo.errors import ConfigError
from opdgeo.tasks.answers import DESCRIPTIONS, last_boxed
from opdgeo.tasks.base import Problem

_PROBLEM_KEYS = ("problem", "Problem", "question", "Question", "prompt")
_ANSWER_KEYS = ("answer", "Answer", "final_answer")
_ID_KEYS = ("id", "ID", "unique_id", "problem_id", "uuid")
_SOLUTION_KEYS = ("solution", "Solution")


class RowError(ConfigError):
    """A row lacks a field the adapter needs (the caller adds the dataset's columns)."""


# ----------------------------------------------------------------------- row parsing


def _text(value) -> str | None:
    """A problem text: a string, or the last user turn of chat messages."""
    if isinstance(value, list):
        users = [m.get("content") for m in value if isinstance(m, dict) and m.get("role", "user") == "user"]
        value = users[-1] if users else None
    return value if isinstance(value, str) and value.strip() else None


def _answer_text(value) -> str | None:
    """A reference answer as a canonical string (an integer-valued float such as AMC's
    ``27.0`` becomes ``"27"``); None when empty."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (list, tuple)):  # some eval sets store a list of accepted answers
        value = value[0] if value else None
        return _answer_text(value)
    text = str(value).strip()
    return text or None


def _nested(row: dict, key: str, sub: str):
    value = row.get(key)
    return value.get(sub) if isinstance(value, dict) else None


def _first(row: dict, keys: tuple[str, ...]):
    return next((row[k] for k in keys if row.get(k) is not None), None)


def _row_id(row: dict, where: str) -> str:
    pid = _first(row, _ID_KEYS)
    if pid is None:
        pid = _nested(row, "extra_info", "index")
    return str(pid) if pid is not None else where


def _need(value, what: str, expected: str, where: str):
    if value is None:
        raise RowError(f"{where}: no {what} (expected {expected})")
    return value


def _solution(row: dict) -> str | None:
    return next((row[k] for k in _SOLUTION_KEYS if isinstance(row.get(k), str) and row[k].strip()), None)


def text_generic(row: dict) -> str | None:
    return _text(_first(row, _PROBLEM_KEYS))


def answer_generic(row: dict) -> str | None:
    answer = _answer_text(_first(row, _ANSWER_KEYS))
    if answer is None:
        answer = _answer_text(_nested(row, "reward_model", "ground_truth"))
    if answer is None and (solution := _solution(row)) is not None:
        answer = _answer_text(last_boxed(solution))
    return answer


def parse_generic(row: dict, where: str) -> Problem:
    """The field-name rules of the module docstring."""
    text = _need(text_generic(row), "problem text", "one of " + ", ".join(_PROBLEM_KEYS), where)
    answer = _need(answer_generic(row), "answer", "answer, Answer, final_answer, reward_model.ground_truth, or a "
                   "\\boxed{} in solution", where)
    return Problem(id=_row_id(row, where), prompt=text, answer=answer, solution=_solution(row))


def text_dapo(row: dict) -> str | None:
    return _text(row.get("prompt"))


def answer_dapo(row: dict) -> str | None:
    return _answer_text(_nested(row, "reward_model", "ground_truth"))


def parse_dapo(row: dict, where: str) -> Problem:
    """dapo-math-17k: ``prompt`` chat messages (DAPO's instruction included),
    ``reward_model.ground_truth``, ``extra_info.index``; no solutions."""
    text = _need(text_dapo(row), "problem text", "prompt (chat messages)", where)
    answer = _need(answer_dapo(row), "answer", "reward_model.ground_truth", where)
    return Problem(id=_row_id(row, where), prompt=text, answer=answer, solution=None)


def text_dapo_processed(row: dict) -> str | None:
    return _text(row.get("prompt")) or _text(row.get("source_prompt"))


def answer_dapo_processed(row: dict) -> str | None:
    return _answer_text(row.get("solution")) or _answer_text(_nested(row, "reward_model", "ground_truth"))


def parse_dapo_processed(row: dict, where: str) -> Problem:
    """open-r1/DAPO-Math-17k-Processed: ``prompt`` is the user text (DAPO's instruction
    included) and ``solution`` is the reference ANSWER (``reward_model.ground_truth``
    copied), not a worked solution; no demonstrations."""
    text = _need(text_dapo_processed(row), "problem text", "prompt or source_prompt", where)
    answer = _need(answer_dapo_processed(row), "answer", "solution or reward_model.ground_truth", where)
    return Problem(id=_row_id(row, where), prompt=text, answer=answer, solution=None)


_CALCULATOR = re.compile(r"<<[^<>]*>>")
_GSM8K_FINAL = re.compile(r"####\s*([^\n]+)\s*$")


def text_gsm8k(row: dict) -> str | None:
    return _text(row.get("question"))


def answer_gsm8k(row: dict) -> str | None:
    full = row.get("answer")
    m = _GSM8K_FINAL.search(full) if isinstance(full, str) else None
    return _answer_text(m.group(1).replace(",", "")) if m else None


def parse_gsm8k(row: dict, where: str) -> Problem:
    """GSM8K: ``question``; ``answer`` is the worked solution ending in ``#### 72``. The
    reference answer is the text after ``####`` (thousands separators removed); the
    demonstration is the solution without the calculator annotations ``<<48/2=24>>``
    **(our choice)**, still ending in its ``####`` line."""
    text = _need(text_gsm8k(row), "problem text", "question", where)
    final = _need(answer_gsm8k(row), "answer", "answer ending in '#### <answer>'", where)
    return Problem(id=_row_id(row, where), prompt=text, answer=final,
                   solution=_CALCULATOR.sub("", row["answer"]).strip())


def text_openr1(row: dict) -> str | None:
    return _text(row.get("problem"))


def answer_openr1(row: dict) -> str | None:
    answer = _answer_text(row.get("answer"))
    if answer is None and isinstance(row.get("solution"), str):
        answer = _answer_text(last_boxed(row["solution"]))
    return answer


def parse_openr1(row: dict, where: str) -> Problem:
    """OpenR1-Math-220k: ``problem``, ``answer`` and DeepSeek-R1 ``generations`` with
    ``correctness_math_verify`` (and ``is_reasoning_complete``). The demonstration is the
    first generation math-verify found correct and complete; else the assistant turn of
    ``messages``; else the NuminaMath ``solution``."""
    text = _need(text_openr1(row), "problem text", "problem", where)
    answer = _need(answer_openr1(row), "answer", "answer, or a \\boxed{} in solution", where)
    gens = row.get("generations") or []
    ok = row.get("correctness_math_verify") or []
    complete = row.get("is_reasoning_complete") or [True] * len(gens)
    demo = next((g for g, c, d in zip(gens, ok, complete) if c and d and isinstance(g, str) and g.strip()), None)
    if demo is None and isinstance(row.get("messages"), list):
        demo = next((m.get("content") for m in reversed(row["messages"])
                     if isinstance(m, dict) and m.get("role") == "assistant"), None)
    if demo is None and isinstance(row.get("solution"), str) and row["solution"].strip():
        demo = row["solution"]
    return Problem(id=_row_id(row, where), prompt=text, answer=answer, solution=demo)


@dataclass(frozen=True)
class HubId:
    """A Hub copy of a dataset and the ``datasets`` config(s) to read from it."""

    id: str
    configs: tuple[str | None, ...] = (None,)


@dataclass(frozen=True)
class DatasetAdapter:
    """How to read one dataset (see the module docstring)."""

    name: str
    """Short name used in specs and plans (``"aime-2024"``)."""
    title: str
    """Display name (``"AIME 2024"``)."""
    role: str
    """``"train"`` (training prompts), ``"eval"`` (held-out evaluation only),
    ``"demonstrations"`` (problems with worked solutions for SFT) or ``"any"``."""
    parse: Callable[[dict, str], Problem]
    """Row → Problem; ``where`` (``file:row``) names the row in errors."""
    text: Callable[[dict], str | None] = text_generic
    """Row → its problem text, exactly ``parse(row).prompt`` (None when absent): with
    ``answer``, lets deduplication count an exact copy without building its Problem."""
    answer: Callable[[dict], str | None] = answer_generic
    """Row → its reference answer, exactly ``parse(row).answer`` (None when absent)."""
    hub_ids: tuple[HubId, ...] = ()
    """Known Hub copies, the preferred first (an alias resolves to the first one cached)."""
    aliases: tuple[str, ...] = ()
    """Other names accepted for ``name``."""
    default_format: str = "boxed"
    """Answer format of prompts that ask for none (``opdgeo.tasks.answers``)."""
    template: str = "{problem}"
    """How the problem text becomes the prompt (``{problem}`` replaced; no other braces
    are interpreted). The answer format is read from the result."""
    signature: frozenset[str] = frozenset()
    """Columns that identify this dataset in a local file (empty: never detected). The
    first adapter of ``ADAPTERS`` whose signature the columns contain is taken, so a more
    specific schema comes before the one it extends (the Processed dapo before dapo)."""
    splits_doc: str = ""
    """What ``train`` and ``test`` mean for this dataset."""
    prompt_doc: str = ""
    """One phrase on the prompt format (data plans)."""
    split_names: Mapping[str, str] = field(default_factory=dict)
    """opdgeo split → the dataset's split name, where they differ and the dataset has both."""

    def resolve_split(self, split: str, available: list[str], where: str) -> str:
        """The dataset's split that serves opdgeo's ``split`` (see the module docstring).

        Raises:
            ConfigError: the split does not exist, or contradicts the dataset's role.
        """
        if self.role == "eval":
            if split == "train":
                raise ConfigError(f"{where}: {self.title} is an evaluation set ({self.splits_doc}); "
                                  "it has no training split")
            if split == "test" and "test" not in available and len(available) == 1:
                return available[0]
        if self.role in ("train", "demonstrations") and split == "test" and "test" not in available:
            raise ConfigError(f"{where}: {self.title} has no held-out split ({self.splits_doc}); evaluate on an "
                              "evaluation set such as aime-2024 or math-500")
        target = self.split_names.get(split, split)
        if target not in available:
            raise ConfigError(f"{where}: no split {split!r} in {self.title}; it holds "
                              f"{', '.join(map(repr, available))} ({self.splits_doc or 'the Hub split names'})")
        return target

    def file_split(self) -> str | None:
        """The split a single local file of this dataset holds when its name says none."""
        return {"eval": "test", "train": "train", "demonstrations": "train"}.get(self.role)

    @property
    def format_doc(self) -> str:
        """The answer format in words (data plans)."""
        return DESCRIPTIONS[self.default_format]


# ------------------------------------------------------------------------- the adapters

_DAPO_PROMPT = "chat messages; DAPO's own instruction asks for a last line 'Answer: $Answer'"
_BARE = "the bare problem + opdgeo's instruction"

GENERIC = DatasetAdapter(
    name="generic", title="unknown schema", role="any", parse=parse_generic,
    splits_doc="the source's own split names", prompt_doc="the problem text (+ opdgeo's instruction if it asks "
    "for no answer format)",
)

ADAPTERS: tuple[DatasetAdapter, ...] = (
    DatasetAdapter(
        name="dapo-math-17k-processed", title="DAPO-Math-17k-Processed", role="train", parse=parse_dapo_processed,
        text=text_dapo_processed, answer=answer_dapo_processed,
        hub_ids=(HubId("open-r1/DAPO-Math-17k-Processed", ("all",)),), aliases=("dapo-processed",),
        default_format="answer_line", signature=frozenset({"prompt", "solution", "source_prompt"}),
        splits_doc="train: the 17,398 distinct prompts of dapo-math-17k (config all; en and cn split them by "
        "language); 'solution' holds the reference answer; no held-out split",
        prompt_doc="the user text of dapo-math-17k, DAPO's 'Answer:' instruction included",
    ),
    DatasetAdapter(
        name="dapo-math-17k", title="DAPO-Math-17k", role="train", parse=parse_dapo,
        text=text_dapo, answer=answer_dapo,
        hub_ids=(HubId("BytedTsinghua-SIA/DAPO-Math-17k"),), aliases=("dapo",), default_format="answer_line",
        signature=frozenset({"prompt", "reward_model"}),
        splits_doc="train: every row; the Hub copy holds about 1.79M rows, about 17.4k distinct prompts "
        "repeated ~100 times (deduplicated by default); no held-out split",
        prompt_doc=_DAPO_PROMPT,
    ),
    DatasetAdapter(
        name="math-500", title="MATH-500", role="eval", parse=parse_generic,
        hub_ids=(HubId("HuggingFaceH4/MATH-500"),), aliases=("math500",),
        splits_doc="test: the 500 MATH test problems of Lightman et al. (2023)", prompt_doc=_BARE,
    ),
    DatasetAdapter(
        name="aime-2024", title="AIME 2024", role="eval", parse=parse_generic,
        hub_ids=(HubId("HuggingFaceH4/aime_2024"), HubId("Maxwell-Jia/AIME_2024")),
        aliases=("aime24", "aime2024"),
        splits_doc="test: the 30 problems of AIME 2024 I and II (the Hub copy calls its one split 'train')",
        prompt_doc=_BARE,
    ),
    DatasetAdapter(
        name="aime-2025", title="AIME 2025", role="eval", parse=parse_generic,
        hub_ids=(HubId("math-ai/aime25"), HubId("yentinglin/aime_2025"),
                 HubId("opencompass/AIME2025", ("AIME2025-I", "AIME2025-II"))),
        aliases=("aime25", "aime2025"),
        splits_doc="test: the 30 problems of AIME 2025 I and II", prompt_doc=_BARE,
    ),
    DatasetAdapter(
        name="amc-2023", title="AMC 2023", role="eval", parse=parse_generic,
        hub_ids=(HubId("math-ai/amc23"),), aliases=("amc23", "amc2023"),
        splits_doc="test: the 40 AMC 2023 problems with numeric answers", prompt_doc=_BARE,
    ),
    DatasetAdapter(
        name="minerva-math", title="Minerva math", role="eval", parse=parse_generic,
        hub_ids=(HubId("math-ai/minervamath"),), aliases=("minerva", "minervamath"),
        splits_doc="test: the 272 OCW-courses problems of Lewkowycz et al. (2022)", prompt_doc=_BARE,
    ),
    DatasetAdapter(
        name="gsm8k", title="GSM8K", role="any", parse=parse_gsm8k,
        text=text_gsm8k, answer=answer_gsm8k,
        hub_ids=(HubId("openai/gsm8k", ("main",)),), default_format="hash",
        splits_doc="train: 7,473 problems; test: 1,319 (config main)",
        prompt_doc="the bare question + the instruction to give the answer after '####' (verl's)",
    ),
    DatasetAdapter(
        name="openr1-math", title="OpenR1-Math-220k", role="demonstrations", parse=parse_openr1,
        text=text_openr1, answer=answer_openr1,
        hub_ids=(HubId("open-r1/OpenR1-Math-220k", ("default",)),), aliases=("openr1", "openr1-math-220k"),
        template="Please reason step by step, and put your final answer within \\boxed{}.\n\n{problem}",
        signature=frozenset({"problem", "generations", "correctness_math_verify"}),
        splits_doc="train: ~94k problems (config default) with verified DeepSeek-R1 reasoning traces; "
        "no held-out split",
        prompt_doc="the instruction OpenR1 generated with, then the problem",
    ),
)


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def adapter_named(name: str) -> DatasetAdapter | None:
    """The adapter called ``name`` (or an alias; case and ``_``/``-`` ignored), else None."""
    key = _key(name)
    if key == "generic":
        return GENERIC
    return next((a for a in ADAPTERS if key == a.name or key in a.aliases), None)


def adapter_for_hub_id(hub_id: str) -> tuple[DatasetAdapter, HubId] | None:
    """The adapter that knows Hub dataset ``hub_id`` (case-insensitive), else None."""
    key = hub_id.strip().lower()
    for a in ADAPTERS:
        for h in a.hub_ids:
            if h.id.lower() == key:
                return a, h
    return None


def detect_adapter(columns: list[str], first_row: dict | None) -> DatasetAdapter:
    """The adapter a local file's columns identify, else ``GENERIC``.

    The first adapter (in ``ADAPTERS`` order) whose signature the columns contain wins;
    GSM8K is recognised by its ``question``/``answer`` columns with an answer ending in
    ``#### …``.
    """
    cols = set(columns)
    found = next((a for a in ADAPTERS if a.signature and a.signature <= cols), None)
    if found is not None:
        return found
    if {"question", "answer"} <= cols and first_row is not None:
        ans = first_row.get("answer")
        if isinstance(ans, str) and _GSM8K_FINAL.search(ans):
            return adapter_named("gsm8k")
    return GENERIC


def known_names() -> list[str]:
    """Every adapter's name (for help texts and errors)."""
    return [a.name for a in ADAPTERS]
