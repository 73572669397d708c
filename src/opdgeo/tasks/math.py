"""Math problems from JSONL / parquet files, folders, or datasets in the local HF cache.

``MathTask(source)`` reads its rows through ``opdgeo.tasks.sources`` (files directly,
folders and cached datasets with the ``datasets`` library, offline) and turns them into
``Problem`` records with a ``DatasetAdapter`` (``opdgeo.tasks.adapters``): a known
dataset's own schema, prompt format and split meaning, or the generic field-name rules.

Rewards: the answer is read in the format the prompt asks for (``opdgeo.tasks.answers``:
DAPO's ``Answer:`` line, the last ``\\boxed{}``, GSM8K's ``####``), then checked against
the reference by ``math-verify`` in a worker process with a hard per-answer time limit
(``MathVerifier``). A prompt that asks for no format gets opdgeo's instruction for the
dataset's default format, so the instruction and the reward always agree.
"""

from __future__ import annotations

from pathlib import Path

from opdgeo.errors import ConfigError
from opdgeo.tasks.adapters import GENERIC, DatasetAdapter, RowError, adapter_for_hub_id, adapter_named, detect_adapter
from opdgeo.tasks.answers import DESCRIPTIONS, INSTRUCTIONS, check_format, requested_format
from opdgeo.tasks.base import DatasetInfo, Problem, Task, Verdict
from opdgeo.tasks.dedup import DedupCounts, Deduplicator
from opdgeo.tasks.math_verifier import MathVerifier
from opdgeo.tasks.sources import Source, open_source, split_of_file_name


def _resolve(source: str, dataset: str | None, configs: tuple[str | None, ...] | None) -> tuple[Source, DatasetAdapter]:
    """The source and adapter of a spec (see ``MathTask``)."""
    forced = None
    if dataset is not None:
        forced = adapter_named(dataset)
        if forced is None:
            from opdgeo.tasks.adapters import known_names

            raise ConfigError(f"task {source!r}: unknown dataset {dataset!r}; known: {', '.join(known_names())}, "
                              "generic")
    path = Path(source).expanduser()
    named = adapter_named(source) if not path.exists() and "/" not in source else None
    if named is not None and named is not GENERIC:
        for hub in named.hub_ids:
            found = open_source(hub.id, configs=configs or hub.configs, must_exist=False)
            if found is not None:
                return found, forced or named
        ids = ", ".join(h.id for h in named.hub_ids)
        raise ConfigError(f"{source}: {named.title} is not in the local Hugging Face cache (none of {ids}; opdgeo "
                          f"never downloads: `hf download --repo-type dataset {named.hub_ids[0].id}`, or pass a "
                          f"local file with ':dataset={named.name}')")
    known = adapter_for_hub_id(source) if not path.exists() else None
    default_configs = known[1].configs if known else (None,)
    src = open_source(source, configs=configs or default_configs)
    if forced is not None:
        adapter = forced
    elif known is not None:
        adapter = known[0]
    elif src.kind in ("file", "folder"):
        first_split = src.splits()[0]
        first_row = next(src.iter_rows(first_split), None)
        adapter = detect_adapter(src.columns(first_split), first_row)
    else:
        adapter = GENERIC
    if src.kind == "file" and split_of_file_name(src.location) is None and adapter.file_split():
        src._file_split = adapter.file_split()
    return src, adapter


class MathTask(Task):
    """Math problems checked by math-verify, read the way their dataset is meant to be read.

    Args:
        source: a ``.jsonl``/``.json``/``.parquet`` file, a folder, a dataset id in the
            local HF cache, or a known dataset's name (``"aime-2024"``, ``"dapo-math-17k"``,
            …: its first Hub copy found in the cache). See ``opdgeo.tasks.sources`` for
            what split a file or folder holds and ``opdgeo.tasks.adapters`` for what
            ``train``/``test`` mean per dataset.
        timeout_s: hard time limit per answer check, seconds.
        dataset: read the source as this known dataset (``"aime-2024"``; ``"generic"``:
            the field-name rules), instead of recognising it by name or columns.
        config: ``datasets`` config name(s) to read (several are concatenated), instead
            of the known dataset's default.
        answer_format: answer format of prompts that ask for none, instead of the
            dataset's default (``"boxed"``, ``"answer_line"``, ``"hash"``). A prompt's own
            request always wins.
    """

    def __init__(self, source: str | Path, *, timeout_s: float = 5.0, dataset: str | None = None,
                 config: str | tuple[str, ...] | None = None, answer_format: str | None = None):
        self.source = str(source)
        self.name = f"math:{self.source}"
        configs = (config,) if isinstance(config, str) else tuple(config) if config else None
        self._source, self.adapter = _resolve(self.source, dataset, configs)
        self.default_format = check_format(answer_format, key=f"task {self.source!r}: format") if answer_format \
            else self.adapter.default_format
        self._all: dict[str, list[Problem]] = {}
        self._distinct: dict[str, tuple[list[Problem], DedupCounts]] = {}
        self.verifier = MathVerifier(timeout_s)

    # ------------------------------------------------------------------ splits and rows

    @property
    def location(self) -> str:
        """The file or folder the rows come from."""
        return self._source.location

    def splits(self) -> list[str]:
        """The split names the source holds (the dataset's own names)."""
        return self._source.splits()

    def dataset_split(self, split: str) -> str:
        """The source's split that serves ``split`` (the adapter's rules; ConfigError if none)."""
        available = self.splits()
        if self._source.kind == "file" and self.adapter is GENERIC and split not in available:
            raise ConfigError(f"{self.source}: a single data file holds one split, {available[0]!r}, named by its "
                              "file name (a name with 'test'/'eval' is test, 'validation'/'dev' validation, "
                              "anything else train); rename it, or read it as a known dataset with "
                              "':dataset=NAME'")
        return self.adapter.resolve_split(split, available, self.source)

    def _rows(self, split: str, dedup: Deduplicator | None = None):
        """The split's problems, in order; a row the adapter cannot read raises one line
        that names the row and the columns the split has. With ``dedup``, every row is
        fed to it and only the kept problems are yielded; a row whose text is exactly an
        earlier row's is counted from its text and answer alone (no Problem is built:
        the Hub's dapo-math-17k is ~99 % such copies)."""
        target = self.dataset_split(split)
        prefix = self._source.where_prefix(target)
        parse, text_of, answer_of = self.adapter.parse, self.adapter.text, self.adapter.answer
        for i, row in enumerate(self._source.iter_rows(target), 1):
            if dedup is not None:
                text = text_of(row)
                if text is not None and dedup.seen_text(text) and (answer := answer_of(row)) is not None:
                    dedup.add_copy(text, answer)
                    continue
            try:
                problem = parse(row, f"{prefix}{i}")
            except RowError as err:
                cols = ", ".join(self._source.columns(target))
                raise ConfigError(f"{err} [{self.adapter.title}; the dataset has columns: {cols}]") from None
            if dedup is None or dedup.add(problem):
                yield problem

    def problems(self, split: str, n: int | None = None) -> list[Problem]:
        """The first ``n`` rows of ``split`` as problems, duplicates included (all when None)."""
        _check_n(n, self.name)
        if split not in self._all:
            self._all[split] = list(self._rows(split))
        out = self._all[split]
        return out if n is None else out[:n]

    def distinct_problems(self, split: str, n: int | None = None) -> tuple[list[Problem], DedupCounts]:
        """The first ``n`` distinct problems of ``split`` (by normalized text, first row of
        each kept; ``opdgeo.tasks.dedup``) and the split's counts. Streams the rows: the
        duplicates are never held in memory."""
        _check_n(n, self.name)
        if split not in self._distinct:
            d = Deduplicator()
            for _ in self._rows(split, d):
                pass
            self._distinct[split] = (d.kept, d.counts())
        kept, counts = self._distinct[split]
        return (kept if n is None else kept[:n]), counts

    def describe(self, split: str) -> DatasetInfo:
        """The split in words: dataset, source, split names, prompt and answer formats."""
        target = self.dataset_split(split)
        kept, _ = self.distinct_problems(split)
        formats = sorted({self.answer_format(p) for p in kept})
        return DatasetInfo(dataset=self.adapter.title, source=self.location, split=split, dataset_split=target,
                           split_meaning=self.adapter.splits_doc, prompt_format=self.adapter.prompt_doc,
                           answer_format=" | ".join(DESCRIPTIONS[f] for f in formats) or
                           DESCRIPTIONS[self.default_format])

    # ------------------------------------------------------------------ prompts and rewards

    def _text(self, problem: Problem) -> str:
        return self.adapter.template.replace("{problem}", problem.prompt)

    def answer_format(self, problem: Problem) -> str:
        """The format the prompt asks for, else the dataset's default."""
        return requested_format(self._text(problem)) or self.default_format

    def instruction(self, problem: Problem) -> str:
        """The prompt text; opdgeo's instruction is appended only when it asks for no answer format."""
        text = self._text(problem)
        if requested_format(text) is not None:
            return text
        return f"{text}\n\n{INSTRUCTIONS[self.default_format]}"

    def plain_prompt(self, problem: Problem) -> str:
        return f"Problem: {self.instruction(problem)}\nSolution:"

    def check(self, response: str, problem: Problem) -> Verdict:
        """math-verify's verdict on the answer read in ``answer_format(problem)``."""
        return self.verifier.check(response, problem.answer, answer_format=self.answer_format(problem))

    def reward(self, response: str, problem: Problem) -> float:
        """1.0 iff the answer read in the prompt's format is equivalent to ``problem.answer``
        per math-verify, within the time limit; otherwise 0.0 (no answer, malformed, timeout)."""
        return 1.0 if self.check(response, problem).correct else 0.0

    def demonstration(self, problem: Problem) -> str:
        if problem.solution is None:
            raise ConfigError(f"task {self.source}: problem {problem.id} of {self.adapter.title} has no solution to "
                              "use as a demonstration (set task.demonstrations to a dataset with solutions, e.g. "
                              "openr1-math, or to 'teacher')")
        return problem.solution


def _check_n(n, name: str) -> None:
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
        raise ConfigError(f"{name}: n must be a non-negative integer; got {n!r}")
