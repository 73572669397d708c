"""The embedded verifiable task: multi-digit arithmetic with worked column solutions.

A problem is ``a+b``, ``a-b`` (both ``difficulty``-digit numbers; negative results
allowed) or ``a*b`` (a ``difficulty``-digit number times one digit 2..9). Its worked
solution goes column by column from the right, one line per column, and ends in the
final-answer line ``Answer: <integer>``::

    347+285=          <- plain prompt          285-347=           47*6=
    7+5=12            <- solution lines        -(347-285)         7*6=42
    4+8+1=13                                   7-5=2              4*6+4=28
    3+2+1=6                                    14-8=6             Answer: 282
    Answer: 632                                3-2-1=0
                                               Answer: -62

Each line writes the column's operands, the carry (``+c``) or borrow (``-1``) coming
in, and the column result; a borrow going out shows as ``1x`` (x + 10). At difficulty 3,
prompt + solution is at most ~55 characters, learnable by a ~0.5M-parameter char model.

Splits are disjoint by construction: a problem's split is fixed by a hash of its content
(``split_of``), independent of the seed: 10 % ``test``, 10 % ``pretrain`` (only used by
``arithmetic_pretrain_corpus``), 80 % ``train``. The seed only chooses which problems
are drawn and in what order.
"""

from __future__ import annotations

import hashlib
import random
import re

from opdgeo.errors import ConfigError
from opdgeo.tasks.base import SPLITS, Problem, Task, Verdict

OPS = "+-*"
DEFAULT_SIZES = {"train": 5000, "test": 200}
"""Problems returned by ``problems(split)`` when ``n`` is None."""

_ANSWER_LINE = re.compile(r"Answer: (-?(?:0|[1-9][0-9]*))")


def split_of(a: int, op: str, b: int) -> str:
    """The split a problem belongs to: "test" (10 %), "pretrain" (10 %) or "train" (80 %).

    Decided by the first 8 bytes of sha256("a op b") mod 10, so it never depends on a seed.
    """
    h = int.from_bytes(hashlib.sha256(f"{a}{op}{b}".encode()).digest()[:8], "big") % 10
    return "test" if h == 0 else "pretrain" if h == 1 else "train"


def _digits(x: int, width: int) -> list[int]:
    """Decimal digits of x >= 0, least significant first, zero-padded to width."""
    return [(x // 10**i) % 10 for i in range(width)]


def worked_solution(a: int, op: str, b: int, *, rng: random.Random | None = None,
                    noise: float = 0.0) -> tuple[list[str], int]:
    """Column-by-column solution lines and the final answer they lead to.

    With ``noise > 0`` each column's result is perturbed with probability ``noise``
    (drawn from ``rng``); the following columns and the answer are computed from the
    perturbed value, so a noisy solution is well formed but (usually) wrong. Used by the
    pretraining corpus only.

    Returns:
        (lines without the ``Answer:`` line, the answer those lines imply).
    """
    if op not in OPS:
        raise ConfigError(f"arithmetic: unknown operator {op!r}; use one of {OPS!r}")

    def perturb(value: int, lo: int, hi: int) -> int:
        if noise <= 0 or rng is None or rng.random() >= noise:
            return value
        choices = [v for v in range(max(lo, value - 2), min(hi, value + 2) + 1) if v != value]
        return rng.choice(choices)

    lines: list[str] = []
    sign = 1
    if op == "-" and a < b:
        lines.append(f"-({b}-{a})")
        a, b, sign = b, a, -1
    width = max(len(str(a)), len(str(b)))
    xs = _digits(a, width)
    out: list[int] = []
    if op == "+":
        ys, carry = _digits(b, width), 0
        for x, y in zip(xs, ys):
            s = perturb(x + y + carry, 0, 19)
            lines.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={s}")
            out.append(s % 10)
            carry = s // 10
        value = int("".join(map(str, reversed(out)))) + carry * 10**width
    elif op == "-":
        ys, borrow = _digits(b, width), 0
        for x, y in zip(xs, ys):
            d = x - y - borrow
            borrow_out = 1 if d < 0 else 0
            d = perturb(d + 10 * borrow_out, 0, 9)
            lines.append((f"1{x}" if borrow_out else f"{x}") + f"-{y}" + ("-1" if borrow else "") + f"={d}")
            out.append(d)
            borrow = borrow_out
        value = int("".join(map(str, reversed(out))))
    else:  # "*": b is a single digit
        carry = 0
        for x in xs:
            p = perturb(x * b + carry, 0, 89)
            lines.append(f"{x}*{b}" + (f"+{carry}" if carry else "") + f"={p}")
            out.append(p % 10)
            carry = p // 10
        value = int("".join(map(str, reversed(out)))) + carry * 10**width
    return lines, sign * value


def parse_final_answer(response: str) -> str | None:
    """The integer on the response's final ``Answer:`` line, or None.

    Strict: after stripping trailing whitespace, the last line must be exactly
    ``Answer: <integer>`` with a canonical integer (optional ``-``, no leading zeros, no
    ``-0``). Text after the answer line, a missing line, ``Answer:  12``, ``Answer: 012``
    or ``Answer: 12.`` all give None.
    """
    last = response.rstrip().rsplit("\n", 1)[-1]
    m = _ANSWER_LINE.fullmatch(last)
    if m is None or m.group(1) == "-0":
        return None
    return m.group(1)


class ArithmeticTask(Task):
    """Multi-digit arithmetic with worked column solutions (see the module docstring).

    Args:
        difficulty: digits per operand (1..9; the multiplier of ``*`` is always one digit).
        seed: chooses which problems are drawn and their order (splits do not depend on it).
        ops: operators to draw from, a non-empty subset of "+-*" (uniformly).
    """

    def __init__(self, difficulty: int = 3, seed: int = 0, ops: str = OPS):
        if not isinstance(difficulty, int) or not 1 <= difficulty <= 9:
            raise ConfigError(f"arithmetic: difficulty must be an integer in 1..9; got {difficulty!r}")
        if not isinstance(seed, int):
            raise ConfigError(f"arithmetic: seed must be an integer; got {seed!r}")
        if not ops or any(o not in OPS for o in ops) or len(set(ops)) != len(ops):
            raise ConfigError(f"arithmetic: ops must be distinct characters of {OPS!r}; got {ops!r}")
        self.difficulty, self.seed, self.ops = difficulty, seed, ops
        self.name = f"arithmetic:difficulty={difficulty},seed={seed},ops={ops}"

    def _draw(self, rng: random.Random) -> tuple[int, str, int]:
        d = self.difficulty
        lo, hi = (0 if d == 1 else 10 ** (d - 1)), 10**d - 1
        op = rng.choice(self.ops)
        a = rng.randint(lo, hi)
        b = rng.randint(2, 9) if op == "*" else rng.randint(lo, hi)
        return a, op, b

    def make_problem(self, a: int, op: str, b: int) -> Problem:
        """The Problem for ``a op b`` (id like ``add-347-285``)."""
        lines, answer = worked_solution(a, op, b)
        name = {"+": "add", "-": "sub", "*": "mul"}[op]
        return Problem(id=f"{name}-{a}-{b}", prompt=f"{a}{op}{b}", answer=str(answer),
                       solution="\n".join(lines + [f"Answer: {answer}"]))

    def _sample(self, split: str, n: int, stream: str) -> list[tuple[int, str, int]]:
        rng = random.Random(f"arithmetic|{self.difficulty}|{self.ops}|{self.seed}|{stream}")
        seen: set[tuple[int, str, int]] = set()
        out: list[tuple[int, str, int]] = []
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts > 200 * n + 10_000:
                raise ConfigError(f"{self.name}: only {len(out)} distinct {split} problems exist; asked for {n}")
            key = self._draw(rng)
            if key in seen or split_of(*key) != split:
                continue
            seen.add(key)
            out.append(key)
        return out

    def problems(self, split: str, n: int | None = None) -> list[Problem]:
        """The first ``n`` problems of ``split`` (default ``DEFAULT_SIZES[split]``).

        Deterministic in (difficulty, ops, seed, split); a shorter list is a prefix of a
        longer one. Raises ConfigError for an unknown split or an ``n`` larger than the
        split holds (possible at difficulty 1).
        """
        if split not in SPLITS:
            raise ConfigError(f"{self.name}: unknown split {split!r}; use one of {', '.join(SPLITS)}")
        n = DEFAULT_SIZES[split] if n is None else n
        if not isinstance(n, int) or n < 0:
            raise ConfigError(f"{self.name}: n must be a non-negative integer; got {n!r}")
        return [self.make_problem(*key) for key in self._sample(split, n, split)]

    def reward(self, response: str, problem: Problem) -> float:
        """1.0 iff ``parse_final_answer(response) == problem.answer`` (strict; see there)."""
        return 1.0 if parse_final_answer(response) == problem.answer else 0.0

    def check(self, response: str, problem: Problem) -> Verdict:
        """``reward``'s verdict with the integer read from the final ``Answer:`` line (the
        verdict follows ``reward``, so a subclass that redefines the reward stays consistent)."""
        got = parse_final_answer(response)
        ok = self.reward(response, problem) == 1.0
        return Verdict(ok, "correct" if ok else "no_answer" if got is None else "wrong", extracted=got)

    def answer_format(self, problem: Problem) -> str:
        """``"answer_line"``: a strict final ``Answer: <integer>`` line (``parse_final_answer``)."""
        return "answer_line"

    def plain_prompt(self, problem: Problem) -> str:
        """``"347+285=\\n"``: the question, ``=`` and a newline; the solution follows."""
        return f"{problem.prompt}=\n"

    def instruction(self, problem: Problem) -> str:
        return (f"Compute {problem.prompt}. Work column by column from the right, one line per column, "
                "and end with a last line of the form 'Answer: <integer>'.")


def arithmetic_pretrain_corpus(n: int, seed: int, *, difficulty: int = 3, ops: str = OPS,
                               noise: float = 0.25, p_partial: float = 0.2, p_facts: float = 0.3) -> list[str]:
    """A "pretraining" corpus of ``n`` short documents for building a weak base model.

    Documents (plain text, no EOS; the caller appends ``eos_token`` to each) are drawn as:
    - with probability ``p_facts``: 4–8 single-column facts, one per line (``7+5=12``,
      ``14-8=6``, ``4*6+4=28``): the digit arithmetic the columns need;
    - with probability ``p_partial``: a worked solution cut after a random column line,
      without its ``Answer:`` line (teaches the steps, not the ending);
    - otherwise: a complete worked solution ``prompt=\\n...\\nAnswer: N``.
    Solutions come from the "pretrain" split only (never train or test problems), at a
    difficulty drawn uniformly from 1..``difficulty``, and every column result is
    corrupted with probability ``noise`` (the answer follows the corrupted columns). A
    model that imitates this corpus writes the format but is often wrong: with 3–4
    columns per problem and noise 0.25 about 0.75^3.5 ≈ 37 % of its solutions are clean,
    an upper bound a small model stays well below. This leaves room for SFT (clean
    demonstrations) and RL/OPD to improve it. **(our choice; the knobs are parameters)**

    Args:
        n: number of documents.
        seed: RNG seed (the corpus is a pure function of all arguments).
        difficulty, ops: as in ``ArithmeticTask``.
        noise: per-column corruption probability in [0, 1].
        p_partial, p_facts: document-kind probabilities (sum ≤ 1).

    Returns:
        list of ``n`` strings.
    """
    if not isinstance(n, int) or n < 0:
        raise ConfigError(f"pretrain corpus: n must be a non-negative integer; got {n!r}")
    if not 0.0 <= noise <= 1.0:
        raise ConfigError(f"pretrain corpus: noise must be in [0, 1]; got {noise!r}")
    if p_partial < 0 or p_facts < 0 or p_partial + p_facts > 1:
        raise ConfigError(f"pretrain corpus: p_partial, p_facts must be >= 0 with sum <= 1; got {p_partial}, {p_facts}")
    tasks = [ArithmeticTask(difficulty=d, seed=seed, ops=ops) for d in range(1, difficulty + 1)]
    rng = random.Random(f"arithmetic-pretrain|{seed}|{difficulty}|{ops}|{noise}|{p_partial}|{p_facts}")
    docs: list[str] = []
    while len(docs) < n:
        kind = rng.random()
        if kind < p_facts:
            facts = []
            for _ in range(rng.randint(4, 8)):
                op = rng.choice(ops)
                x = rng.randint(0, 9)
                if op == "+":
                    c = rng.choice((0, 0, 1))
                    y = rng.randint(0, 9)
                    facts.append(f"{x}+{y}" + (f"+{c}" if c else "") + f"={x + y + c}")
                elif op == "-":
                    y, bin_ = rng.randint(0, 9), rng.choice((0, 0, 1))
                    d = x - y - bin_
                    facts.append((f"1{x}" if d < 0 else f"{x}") + f"-{y}" + ("-1" if bin_ else "") + f"={d % 10}")
                else:
                    y, c = rng.randint(2, 9), rng.randint(0, 8)
                    facts.append(f"{x}*{y}" + (f"+{c}" if c else "") + f"={x * y + c}")
            docs.append("\n".join(facts))
            continue
        task = rng.choice(tasks)
        while True:
            a, op, b = task._draw(rng)
            if split_of(a, op, b) == "pretrain":
                break
        lines, answer = worked_solution(a, op, b, rng=rng, noise=noise)
        if kind < p_facts + p_partial:
            cut = rng.randint(1, len(lines))
            docs.append(f"{a}{op}{b}=\n" + "\n".join(lines[:cut]))
        else:
            docs.append(f"{a}{op}{b}=\n" + "\n".join(lines + [f"Answer: {answer}"]))
    return docs
