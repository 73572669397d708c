"""Math word problems from JSONL / parquet files or a locally cached HF dataset.

Rows need a problem text and a reference answer. Accepted field names (first found):
- problem: ``problem``, ``Problem``, ``question``, ``Question``, or ``prompt`` (a string,
  or a chat list whose last user ``content`` is used, as in dapo-math-17k);
- answer: ``answer``, ``Answer``, ``reward_model.ground_truth`` (dapo-math-17k),
  ``final_answer``, else the last ``\\boxed{}`` of ``solution``/``Solution`` (MATH);
- id: ``id``, ``ID``, ``unique_id``, ``extra_info.index``, else ``<file>:<row>``.
This covers MATH-500 (problem/solution/answer), AIME 2024 (id/problem/solution/answer,
or ID/Problem/Solution/Answer) and dapo-math-17k (prompt/reward_model.ground_truth).

Rewards: the response's last ``\\boxed{}`` checked against the answer by ``math-verify``
in a worker process with a hard per-answer time limit (``MathVerifier``).
"""

from __future__ import annotations

import json
from pathlib import Path

from opdgeo.errors import ConfigError
from opdgeo.tasks.base import Problem, Task
from opdgeo.tasks.math_verifier import MathVerifier, last_boxed

_PROBLEM_KEYS = ("problem", "Problem", "question", "Question", "prompt")
_ANSWER_KEYS = ("answer", "Answer", "final_answer")
_ID_KEYS = ("id", "ID", "unique_id")
_SOLUTION_KEYS = ("solution", "Solution")
_SUFFIXES = (".jsonl", ".json", ".parquet")


def _read_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as err:  # pyarrow raises many types for corrupt files
            raise ConfigError(f"{path}: cannot read parquet: {err}") from None
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            return list(json.loads(text))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: invalid JSON: {err.msg} (line {err.lineno})") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{lineno}: invalid JSON line: {err.msg}") from None
    return rows


def _row_to_problem(row: dict, path: Path, index: int) -> Problem:
    where = f"{path.name}:{index + 1}"
    text = next((row[k] for k in _PROBLEM_KEYS if row.get(k) is not None), None)
    if isinstance(text, list):  # chat messages (dapo-math-17k)
        users = [m.get("content") for m in text if isinstance(m, dict) and m.get("role", "user") == "user"]
        text = users[-1] if users else None
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{where}: no problem text (expected one of {', '.join(_PROBLEM_KEYS)})")
    answer = next((row[k] for k in _ANSWER_KEYS if row.get(k) is not None), None)
    if answer is None and isinstance(row.get("reward_model"), dict):
        answer = row["reward_model"].get("ground_truth")
    solution = next((row[k] for k in _SOLUTION_KEYS if isinstance(row.get(k), str)), None)
    if answer is None and solution is not None:
        answer = last_boxed(solution)
    if answer is None or not str(answer).strip():
        raise ConfigError(f"{where}: no answer (expected answer, Answer, reward_model.ground_truth, "
                          "or a \\boxed{} in solution)")
    pid = next((row[k] for k in _ID_KEYS if row.get(k) is not None), None)
    if pid is None and isinstance(row.get("extra_info"), dict):
        pid = row["extra_info"].get("index")
    return Problem(id=str(pid) if pid is not None else where, prompt=text, answer=str(answer).strip(),
                   solution=solution)


def _cached_dataset_folder(name: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, repo_type="dataset", local_files_only=True))
    except HFValidationError:
        raise ConfigError(f"{name}: neither a .jsonl/.parquet file nor a valid dataset name") from None
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        raise ConfigError(f"{name}: no such file, and not a dataset in the local Hugging Face cache "
                          "(opdgeo never downloads)") from None


class MathTask(Task):
    """Math problems with ``\\boxed{}`` answers checked by math-verify.

    Args:
        source: a ``.jsonl``/``.json``/``.parquet`` file (serves every split), a folder or a
            dataset name in the local HF cache (``repo_type="dataset"``, read with pyarrow /
            json, not ``datasets``), whose data files are assigned to splits by name: a
            file whose path contains "test" (or "validation"/"eval") is test, one with
            "train" is train; a dataset with a single split serves every split.
        timeout_s: hard time limit per answer check, seconds.
    """

    def __init__(self, source: str | Path, *, timeout_s: float = 5.0):
        self.source = str(source)
        self.name = f"math:{self.source}"
        path = Path(source).expanduser()
        if path.is_file():
            if path.suffix not in _SUFFIXES:
                raise ConfigError(f"{path}: expected a .jsonl, .json or .parquet file")
            files = {"*": [path]}
        else:
            folder = path if path.is_dir() else _cached_dataset_folder(str(source))
            data = sorted(p for p in folder.rglob("*") if p.suffix in _SUFFIXES and p.is_file())
            if not data:
                raise ConfigError(f"{folder}: no .jsonl/.json/.parquet data files")
            files: dict[str, list[Path]] = {}
            for p in data:
                rel = str(p.relative_to(folder)).lower()
                split = ("test" if any(k in rel for k in ("test", "validation", "eval")) else
                         "train" if "train" in rel else "*")
                files.setdefault(split, []).append(p)
            if len(files) == 1:
                files = {"*": next(iter(files.values()))}
        self._files = files
        self._cache: dict[str, list[Problem]] = {}
        self.verifier = MathVerifier(timeout_s)

    def splits(self) -> list[str]:
        """Split names available ("*" means one set of problems serving every split)."""
        return sorted(self._files)

    def problems(self, split: str, n: int | None = None) -> list[Problem]:
        """The first ``n`` problems of ``split`` in file order (all when n is None)."""
        key = split if split in self._files else "*" if "*" in self._files else None
        if key is None:
            raise ConfigError(f"{self.name}: no {split!r} split; available: {', '.join(self.splits())}")
        if key not in self._cache:
            problems = []
            for f in self._files[key]:
                problems += [_row_to_problem(r, f, i) for i, r in enumerate(_read_rows(f))]
            self._cache[key] = problems
        out = self._cache[key]
        if n is not None and (not isinstance(n, int) or n < 0):
            raise ConfigError(f"{self.name}: n must be a non-negative integer; got {n!r}")
        return out if n is None else out[:n]

    def reward(self, response: str, problem: Problem) -> float:
        """1.0 iff the last ``\\boxed{}`` of ``response`` is equivalent to ``problem.answer``
        per math-verify, within the time limit; otherwise 0.0 (missing box, malformed, timeout)."""
        return 1.0 if self.verifier.check(response, problem.answer).correct else 0.0

    def instruction(self, problem: Problem) -> str:
        text = problem.prompt
        return text if "\\boxed" in text else text + "\n\nPut your final answer within \\boxed{}."

    def plain_prompt(self, problem: Problem) -> str:
        return f"Problem: {self.instruction(problem)}\nSolution:"
