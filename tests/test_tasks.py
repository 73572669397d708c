"""Tasks: arithmetic generator and strict checker, splits, pretraining corpus, math-verify."""

from __future__ import annotations

import json
import random

import pytest

from opdgeo.errors import ConfigError
from opdgeo.models import char_tokenizer
from opdgeo.tasks import (
    ArithmeticTask,
    MathTask,
    MathVerifier,
    Problem,
    arithmetic_pretrain_corpus,
    last_boxed,
    load_task,
    parse_final_answer,
    split_of,
)
from opdgeo.tasks.arithmetic import worked_solution

P = Problem(id="x", prompt="300-312", answer="-12", solution=None)


@pytest.mark.parametrize(
    "response,expected",
    [
        ("0-2=8\n10-1-1=8\n3-3-1=-1\nAnswer: -12", 1.0),  # correct (steps are not checked)
        ("Answer: -12", 1.0),
        ("Answer: -12\n", 1.0),  # trailing whitespace is fine
        ("Answer: -12  \n\n", 1.0),
        ("Answer: 12", 0.0),  # wrong sign
        ("Answer: -13", 0.0),  # wrong
        ("2-0=2\n1-1=0", 0.0),  # missing final line
        ("", 0.0),
        ("Answer: -12\n7", 0.0),  # extra text after the answer line
        ("Answer: -12 cm", 0.0),
        ("Answer: -12.", 0.0),
        ("Answer: -012", 0.0),  # leading zero
        ("Answer:-12", 0.0),  # format is exact
        ("Answer:  -12", 0.0),
        ("answer: -12", 0.0),
        ("xAnswer: -12", 0.0),
        ("Answer: -12\nAnswer: 5", 0.0),  # only the last line counts
        ("Answer: 5\nAnswer: -12", 1.0),
    ],
)
def test_arithmetic_reward_is_strict(response, expected):
    assert ArithmeticTask().reward(response, P) == expected


def test_parse_final_answer_zero_and_leading_zeros():
    assert parse_final_answer("Answer: 0") == "0"
    assert parse_final_answer("Answer: -0") is None
    assert parse_final_answer("Answer: 007") is None
    assert parse_final_answer("Answer: 1000") == "1000"


def test_worked_solutions_hand_checked():
    assert worked_solution(347, "+", 285) == (["7+5=12", "4+8+1=13", "3+2+1=6"], 632)
    assert worked_solution(285, "-", 347) == (["-(347-285)", "7-5=2", "14-8=6", "3-2-1=0"], -62)
    assert worked_solution(47, "*", 6) == (["7*6=42", "4*6+4=28"], 282)
    assert worked_solution(999, "+", 1)[1] == 1000
    assert worked_solution(555, "-", 555) == (["5-5=0", "5-5=0", "5-5=0"], 0)


def test_worked_solutions_are_correct_and_demonstrations_score_one():
    rng = random.Random(0)
    for _ in range(2000):
        op = rng.choice("+-*")
        a = rng.randint(0, 99999)
        b = rng.randint(2, 9) if op == "*" else rng.randint(0, 99999)
        assert worked_solution(a, op, b)[1] == eval(f"{a}{op}{b}")  # noqa: S307  (integers only)
    tok = char_tokenizer()
    for d in (1, 2, 3, 4):
        task = ArithmeticTask(difficulty=d, seed=1)
        for p in task.problems("train", 100) + task.problems("test", 30):
            assert p.answer == str(eval(p.prompt))  # noqa: S307
            assert task.reward(task.demonstration(p), p) == 1.0
            assert task.format_prompt(p, tok) == p.prompt + "=\n"
            if d == 3:  # short enough for a tiny char model
                assert len(task.format_prompt(p, tok) + task.demonstration(p)) <= 64


def test_problems_deterministic_prefix_stable_and_seeded():
    a, b = ArithmeticTask(seed=3), ArithmeticTask(seed=3)
    assert a.problems("train", 50) == b.problems("train", 50)
    assert a.problems("train", 20) == a.problems("train", 50)[:20]
    assert a.problems("test", 50) != ArithmeticTask(seed=4).problems("test", 50)
    assert len(a.problems("test")) == 200 and len(a.problems("train")) == 5000
    ids = [p.id for p in a.problems("train")]
    assert len(set(ids)) == len(ids)
    assert {p.prompt[3] if len(p.prompt) > 3 else "" for p in a.problems("train", 300)} >= {"+", "-", "*"}


def test_splits_disjoint_by_construction_across_seeds():
    train = {p.prompt for s in (0, 1) for p in ArithmeticTask(difficulty=2, seed=s).problems("train", 1500)}
    test = {p.prompt for s in (0, 1, 2) for p in ArithmeticTask(difficulty=2, seed=s).problems("test", 150)}
    assert train and test and not train & test
    for text in test:
        op = next(c for c in "+-*" if c in text[1:])
        a, b = text.split(op) if not text.startswith("-") else (None, None)
        assert split_of(int(a), op, int(b)) == "test"
    # difficulty 1 has 100+100+90 problems: ~10 % test; asking for more is a clear error
    with pytest.raises(ConfigError, match="distinct test problems"):
        ArithmeticTask(difficulty=1, ops="+").problems("test", 50)


def test_pretrain_corpus_deterministic_disjoint_and_noisy():
    docs = arithmetic_pretrain_corpus(600, seed=0)
    assert docs == arithmetic_pretrain_corpus(600, seed=0)
    assert docs != arithmetic_pretrain_corpus(600, seed=1)
    assert len(docs) == 600
    full = [d for d in docs if "=\n" in d and d.rstrip().rsplit("\n", 1)[-1].startswith("Answer: ")]
    partial = [d for d in docs if "=\n" in d and d not in full]
    facts = [d for d in docs if "=\n" not in d]
    assert min(len(full), len(partial), len(facts)) > 60
    wrong = 0
    for d in full + partial:
        prompt = d.split("=\n", 1)[0]
        op = next(c for c in "+-*" if c in prompt[1:])
        a, b = prompt.split(op)
        assert split_of(int(a), op, int(b)) == "pretrain"  # never a train or test problem
        if d in full:
            wrong += parse_final_answer(d) != str(eval(prompt))  # noqa: S307
    assert 0.2 < wrong / len(full) < 0.8  # noise 0.25 per column
    clean = arithmetic_pretrain_corpus(300, seed=0, noise=0.0, p_partial=0.0, p_facts=0.0)
    assert all(parse_final_answer(d) == str(eval(d.split("=\n")[0])) for d in clean)  # noqa: S307
    for line in "\n".join(facts).splitlines():  # single-column facts are right unless noisy: check a few
        lhs, rhs = line.split("=")
        if "-" in lhs:
            x, y, *bw = lhs.split("-")
            assert int(rhs) == int(x) - int(y) - (1 if bw else 0)
        else:
            assert int(rhs) == eval(lhs)  # noqa: S307


def test_load_task_specs():
    t = load_task("arithmetic:difficulty=2,seed=5,ops=+-")
    assert (t.difficulty, t.seed, t.ops) == (2, 5, "+-")
    assert isinstance(load_task("arithmetic"), ArithmeticTask)
    for bad, msg in [("arithmetic:depth=2", "unknown option"), ("arithmetic:difficulty=two", "integer"),
                     ("arithmetic:ops=/", "ops"), ("missing.jsonl", "no such task file"),
                     ("arithmetic:difficulty", "key=value")]:
        with pytest.raises(ConfigError, match=msg):
            load_task(bad)
    with pytest.raises(ConfigError, match="unknown split"):
        ArithmeticTask().problems("validation", 3)


def test_chat_template_formatting():
    tok = char_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}" \
                        "{% if add_generation_prompt %}<assistant>{% endif %}"
    task = ArithmeticTask()
    p = task.problems("test", 1)[0]
    text = task.format_prompt(p, tok)
    assert text.startswith(f"<user>Compute {p.prompt}.") and "'Answer: <integer>'" in text
    assert text.endswith("<assistant>")


# ---------------------------------------------------------------- math-verify tasks

ROWS_MATH500 = [
    {"problem": "What is 1/2 as a decimal?", "solution": "It is \\boxed{0.5}.", "answer": "\\frac{1}{2}",
     "unique_id": "test/a.json"},
    {"problem": "Length?", "solution": "\\boxed{5}", "answer": "5", "unique_id": "test/b.json"},
]
ROWS_AIME = [{"ID": "2024-I-1", "Problem": "Find N.", "Solution": "so \\boxed{204}", "Answer": 204}]
ROWS_DAPO = [{"data_source": "math", "prompt": [{"content": "Compute 6*7.", "role": "user"}], "ability": "MATH",
              "reward_model": {"ground_truth": "42", "style": "rule"}, "extra_info": {"index": "abc-1"}}]
ROWS_SOLUTION_ONLY = [{"question": "Compute 2+2.", "solution": "We get \\boxed{4}."}]


@pytest.fixture(scope="module")
def math_files(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("math")
    (d / "math500.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS_MATH500))
    pq.write_table(pa.Table.from_pylist(ROWS_AIME), d / "aime.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS_DAPO), d / "dapo.parquet")
    (d / "solonly_test.jsonl").write_text(json.dumps(ROWS_SOLUTION_ONLY[0]) + "\n")
    ds = d / "dataset"
    (ds / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(ROWS_MATH500[:1]), ds / "data" / "train-00000.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS_MATH500[1:]), ds / "data" / "test-00000.parquet")
    (d / "bad.jsonl").write_text('{"problem": "x"}\n')
    return d


@pytest.fixture(scope="module")
def verifier():
    v = MathVerifier(timeout_s=3.0)
    yield v
    v.close()


def test_math_task_reads_field_variants(math_files, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    m = MathTask(math_files / "math500.jsonl")
    ps = m.problems("train")  # a data file without a split word in its name is the train split (the Hub's rule)
    assert [(p.id, p.answer) for p in ps] == [("test/a.json", "\\frac{1}{2}"), ("test/b.json", "5")]
    with pytest.raises(ConfigError, match="a single data file holds one split, 'train'"):
        m.problems("test")  # never silently the same rows
    (aime,) = MathTask(math_files / "aime.parquet", dataset="aime-2024").problems("test")
    assert (aime.id, aime.prompt, aime.answer) == ("2024-I-1", "Find N.", "204")
    (dapo,) = load_task(str(math_files / "dapo.parquet")).problems("train")
    assert (dapo.id, dapo.prompt, dapo.answer) == ("abc-1", "Compute 6*7.", "42")
    with pytest.raises(ConfigError, match="DAPO-Math-17k has no held-out split"):
        load_task(str(math_files / "dapo.parquet")).problems("test")
    (sol,) = MathTask(math_files / "solonly_test.jsonl").problems("test")
    assert (sol.prompt, sol.answer) == ("Compute 2+2.", "4")
    ds = MathTask(math_files / "dataset")
    assert ds.splits() == ["test", "train"]
    assert ds.problems("train")[0].answer == "\\frac{1}{2}" and ds.problems("test")[0].answer == "5"
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: no answer .*the dataset has columns: problem"):
        MathTask(math_files / "bad.jsonl").problems("train")
    with pytest.raises(ConfigError, match="not a dataset in the local Hugging Face cache"):
        load_task("opdgeo-test-org/not-a-cached-dataset")
    assert "\\boxed{}" in m.format_prompt(ps[0], char_tokenizer())


def test_last_boxed():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("\\boxed {x}") == "x"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("\\boxed{\\frac{1}{2}") is None  # unclosed
    assert last_boxed("no box") is None


@pytest.mark.parametrize(
    "gold,response,correct",
    [
        ("\\frac{1}{2}", "The answer is \\boxed{0.5}", True),
        ("0.5", "\\boxed{\\frac12}", True),
        ("\\frac{1}{2}", "\\boxed{\\frac{1}{3}}", False),
        ("5", "so it is \\boxed{5\\text{ cm}}", True),
        ("5", "\\boxed{6\\text{ cm}}", False),
        ("\\frac{\\sqrt{3}}{2}", "\\boxed{\\frac{\\sqrt 3}{2}}", True),
        ("x^2+1", "\\boxed{1+x^2}", True),
        ("204", "first \\boxed{12}, finally \\boxed{204}", True),
        ("204", "first \\boxed{204}, finally \\boxed{12}", False),  # last box wins
        ("204", "the answer is 204", False),  # no \boxed{}
    ],
)
def test_math_verify_tricky_answers(verifier, gold, response, correct):
    assert verifier.check(response, gold).correct is correct


@pytest.mark.parametrize("response", ["\\boxed{\\frac{1}{", "\\boxed{)(}", "\\boxed{\\frac{}{}}", "\\boxed{\\sqrt}",
                                      "\\boxed{}", "\\boxed{\\left( 1}", "\\boxed{" + "{" * 10 + "}" * 10 + "}"])
def test_malformed_latex_scores_zero_without_raising(verifier, response):
    verdict = verifier.check(response, "7")
    assert verdict.correct is False and verdict.reason in {"wrong", "error", "no_answer", "timeout"}


def test_pathological_answer_times_out_and_worker_recovers(caplog):
    v = MathVerifier(timeout_s=1.0)
    try:
        assert v.check("\\boxed{2}", "2").reason == "correct"  # warm worker
        with caplog.at_level("WARNING", logger="opdgeo.tasks.math"):
            verdict = v.check("\\boxed{9^{9^{9^{9}}}}", "2")  # a ~370-million-digit integer power
        assert verdict.correct is False and verdict.reason == "timeout"
        assert any("timed out" in r.message for r in caplog.records)
        assert v.check("\\boxed{3}", "3").correct  # a fresh worker takes over
        assert v.counts["timeout"] == 1 and v.counts["correct"] == 2
    finally:
        v.close()


def test_math_task_reward_from_a_thread(math_files):
    """math-verify's own timeouts need the main thread; ours work from any thread."""
    from concurrent.futures import ThreadPoolExecutor

    m = MathTask(math_files / "math500.jsonl", timeout_s=3.0)
    p = m.problems("train")[0]
    with ThreadPoolExecutor(1) as pool:
        got = pool.submit(lambda: [m.reward("\\boxed{0.5}", p), m.reward("\\boxed{2}", p)]).result()
    m.verifier.close()
    assert got == [1.0, 0.0]
