"""Answer formats: where a response's final answer is, and what a prompt asks for.

Three formats, each with the extraction its dataset's own reward uses:

- ``"boxed"``: the content of the response's last ``\\boxed{}`` (MATH, AIME, AMC,
  Minerva, OpenR1; braces balanced);
- ``"answer_line"``: the text after the last ``Answer:`` (case-insensitive) in the final
  300 characters of the response, up to the end of its line: DAPO's own reward
  (verl ``reward_score/math_dapo.py``: ``re.findall(r"(?i)Answer\\s*:\\s*([^\\n]+)",
  response[-300:])[-1]``), which dapo-math-17k's prompts ask for ("The last line of your
  response should be of the form Answer: $Answer");
- ``"hash"``: the text after the last ``####`` (GSM8K's solutions end in ``#### 72``).

The format that applies to a problem is the one its prompt asks for
(``requested_format``); only a prompt that asks for none gets opdgeo's instruction
(``INSTRUCTIONS``), so the instruction never contradicts the dataset's. The extracted
text is then checked against the reference by math-verify (``MathVerifier``), which is
more lenient than DAPO's exact string match after normalization (``0.5`` equals
``\\frac12``) but reads the same answer.
"""

from __future__ import annotations

import re

from opdgeo.errors import ConfigError

FORMATS = ("boxed", "answer_line", "hash")
"""Known answer formats."""

DESCRIPTIONS = {
    "boxed": "last \\boxed{}",
    "answer_line": "'Answer: ...' line",
    "hash": "'#### ...' line (GSM8K)",
}
"""One-phrase description of each format (data plans, logs)."""

INSTRUCTIONS = {
    "boxed": "Put your final answer within \\boxed{}.",
    "answer_line": ("The last line of your response should be of the form Answer: $Answer (without quotes) "
                    "where $Answer is the answer to the problem."),
    "hash": 'Let\'s think step by step and output the final answer after "####".',
}
"""The instruction opdgeo appends to a prompt that asks for no format (chat models). The
``answer_line`` text is DAPO's own; the ``hash`` text is verl's GSM8K preprocessing."""

ANSWER_LINE_WINDOW = 300
"""DAPO's reward reads only the final 300 characters of a response (verl ``math_dapo``)."""

_ASKS = {
    # "of the form Answer: $Answer", 'after "Answer:"', "Answer: $Answer"
    "answer_line": re.compile(r"""(?:of\s+the\s+form|after|with)\s*["'`]?\s*Answer\s*:|Answer\s*:\s*\$Answer""",
                              re.IGNORECASE),
    "boxed": re.compile(r"\\boxed"),
    "hash": re.compile(r"""after\s*["'`]?\s*####"""),
}
_ANSWER_LINE = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")
_HASH_LINE = re.compile(r"####\s*([^\n]+)")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def check_format(name: str, *, key: str = "answer format") -> str:
    """``name`` if it is a known format; ConfigError naming ``key`` otherwise."""
    if name not in FORMATS:
        raise ConfigError(f"{key}: must be one of {', '.join(FORMATS)}; got {name!r}")
    return name


def requested_format(prompt: str) -> str | None:
    """The answer format ``prompt`` asks for, or None when it asks for none.

    An explicit ``Answer:``-line request (DAPO's "of the form Answer: $Answer", "on its own
    line after \\"Answer:\\"") wins over a mention of ``\\boxed``, which wins over
    "after ####".
    """
    for name in ("answer_line", "boxed", "hash"):
        if _ASKS[name].search(prompt):
            return name
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in text, braces balanced; None if absent/unclosed."""
    best = None
    for key in ("\\boxed", "\\fbox"):
        i = text.rfind(key)
        if i >= 0 and (best is None or i > best[0]):
            best = (i, key)
    if best is None:
        return None
    j = best[0] + len(best[1])
    while j < len(text) and text[j] == " ":
        j += 1
    if j >= len(text) or text[j] != "{":
        return None
    depth, start = 0, j + 1
    for k in range(j, len(text)):
        if text[k] == "{":
            depth += 1
        elif text[k] == "}":
            depth -= 1
            if depth == 0:
                return text[start:k]
    return None


def clean_answer(text: str) -> str:
    """Strip what surrounds an answer on a line: whitespace, a trailing period, ``$…$`` /
    ``\\(…\\)`` / ``\\[…\\]`` delimiters, a whole-answer ``\\boxed{}``, and thousands
    separators between digits (``1,000`` → ``1000``; math-verify would read a tuple)."""
    s = text.strip()
    for _ in range(3):  # nested wrappers such as "$\\boxed{34}$."
        before = s
        s = s.rstrip(".").strip()
        for lo, hi in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if len(s) >= len(lo) + len(hi) and s.startswith(lo) and s.endswith(hi):
                s = s[len(lo):len(s) - len(hi)].strip()
        if s.startswith(("\\boxed", "\\fbox")):
            inner = last_boxed(s)
            if inner is not None and s.rstrip().endswith("}") and s.count("\\boxed") + s.count("\\fbox") == 1:
                s = inner.strip()
        if s == before:
            break
    return _THOUSANDS.sub("", s)


def extract_answer(response: str, fmt: str) -> str | None:
    """The final answer of ``response`` in format ``fmt`` (see the module docstring), cleaned
    by ``clean_answer``; None when the response holds none (or it is empty)."""
    if fmt == "boxed":
        raw = last_boxed(response)
    elif fmt == "answer_line":
        found = _ANSWER_LINE.findall(response[-ANSWER_LINE_WINDOW:])
        raw = found[-1] if found else None
    elif fmt == "hash":
        found = _HASH_LINE.findall(response)
        raw = found[-1] if found else None
    else:
        raise ConfigError(f"answer format: must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if raw is None:
        return None
    out = clean_answer(raw)
    return out or None
