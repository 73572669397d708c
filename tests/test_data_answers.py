"""Answer formats that match the prompt: DAPO's 'Answer:' line, the last \\boxed{}, GSM8K's
'####'; opdgeo's instruction never contradicts the dataset's; the answer log."""

from __future__ import annotations

import json

import pytest
from dataset_rows import (
    AIME24_ROWS,
    DAPO_PROCESSED_ROWS,
    DAPO_ROWS,
    GSM8K_ROWS,
    MATH500_ROWS,
    OPENR1_ROWS,
    write_jsonl,
    write_parquet,
)

from opdgeo.models import char_tokenizer
from opdgeo.tasks import ArithmeticTask, extract_answer, load_task, requested_format
from opdgeo.tasks.answers import INSTRUCTIONS, clean_answer
from opdgeo.training.data import append_answer_log, answer_log_records


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("answers")
    return {
        "dapo": write_parquet(d / "dapo.parquet", DAPO_ROWS),
        "processed": write_parquet(d / "processed.parquet", DAPO_PROCESSED_ROWS),
        "math500": write_jsonl(d / "math500_test.jsonl", MATH500_ROWS),
        "aime": write_parquet(d / "aime.parquet", AIME24_ROWS),
        "gsm8k": write_jsonl(d / "gsm8k_train.jsonl", GSM8K_ROWS["train"]),
        "openr1": write_parquet(d / "openr1.parquet", OPENR1_ROWS),
    }


@pytest.fixture(scope="module")
def tasks(files):
    out = {"dapo": load_task(str(files["dapo"])), "processed": load_task(str(files["processed"])),
           "math500": load_task(str(files["math500"]) + ":dataset=math-500"),
           "aime": load_task(str(files["aime"]) + ":dataset=aime-2024"),
           "gsm8k": load_task(str(files["gsm8k"])), "openr1": load_task(str(files["openr1"]))}
    yield out
    for t in out.values():
        t.verifier.close()


def test_the_prompt_says_which_answer_is_read(tasks):
    dapo = tasks["dapo"].problems("train")[1]  # "... Find $x$." answer 34
    assert requested_format(dapo.prompt) == "answer_line"
    assert tasks["dapo"].answer_format(dapo) == "answer_line"
    # the case: DAPO's prompt asks for an Answer: line, so that line is checked
    assert tasks["dapo"].reward("x^2 = 1156, so x = 34.\nAnswer: 34", dapo) == 1.0
    assert tasks["dapo"].reward("so x = \\boxed{34}", dapo) == 0.0
    assert tasks["dapo"].check("so x = \\boxed{34}", dapo).reason == "no_answer"
    assert tasks["dapo"].reward("Answer: 35", dapo) == 0.0
    assert tasks["dapo"].reward("Answer: $34$.", dapo) == 1.0
    assert tasks["dapo"].reward("Answer: 12 at first\nbut then\nAnswer: 34", dapo) == 1.0  # the last one
    # DAPO's reward reads the final 300 characters only
    assert tasks["dapo"].check("Answer: 34\n" + "and more words. " * 25, dapo).reason == "no_answer"
    processed = tasks["processed"].problems("train")[1]
    assert tasks["processed"].reward("...\nAnswer: 34", processed) == 1.0

    m = tasks["math500"].problems("test")[0]
    assert tasks["math500"].answer_format(m) == "boxed"
    right = "first \\boxed{(1, 0)}, finally $\\boxed{\\left(3,\\frac{\\pi}{2}\\right)}$"
    assert tasks["math500"].reward(right, m) == 1.0
    assert tasks["math500"].reward("Answer: (3, \\pi/2)", m) == 0.0  # no box
    g = tasks["gsm8k"].problems("train")[0]
    assert tasks["gsm8k"].answer_format(g) == "hash"
    assert tasks["gsm8k"].reward("48/2 = 24, 48 + 24 = 72\n#### 72", g) == 1.0
    assert tasks["gsm8k"].reward("\\boxed{72}", g) == 0.0


def test_the_instruction_never_contradicts_the_dataset(tasks):
    tok = char_tokenizer()  # no chat template: "Problem: ...\nSolution:"
    for name in ("dapo", "processed"):
        p = tasks[name].problems("train")[0]
        text = tasks[name].instruction(p)
        assert text == p.prompt and "boxed" not in text  # DAPO's own instruction, nothing added
    m = tasks["math500"].problems("test")[0]
    assert tasks["math500"].instruction(m) == m.prompt + "\n\n" + INSTRUCTIONS["boxed"]
    assert tasks["math500"].format_prompt(m, tok).endswith("\\boxed{}.\nSolution:")
    g = tasks["gsm8k"].problems("train")[0]
    assert tasks["gsm8k"].instruction(g).endswith('output the final answer after "####".')
    r1 = tasks["openr1"].problems("train")[0]
    text = tasks["openr1"].instruction(r1)  # the instruction OpenR1's traces were generated with
    assert text.startswith("Please reason step by step, and put your final answer within \\boxed{}.")
    assert text.count("\\boxed{}") == 1 and requested_format(text) == "boxed"
    a = ArithmeticTask(difficulty=1)  # its own strict format, unchanged
    assert "Answer: <integer>" in a.instruction(a.problems("test", 1)[0])


def test_demonstrations_answer_in_their_own_format(tasks):
    """Every dataset's demonstrations carry the answer where its reward reads it."""
    for name, split in (("math500", "test"), ("aime", "test"), ("gsm8k", "train"), ("openr1", "train")):
        for p in tasks[name].problems(split):
            v = tasks[name].check(p.solution, p)
            assert v.correct, (name, p.id, v)


def test_extraction_and_cleaning_hand_cases():
    assert extract_answer("so\nAnswer: $\\frac{1}{2}$.", "answer_line") == "\\frac{1}{2}"
    assert extract_answer("answer:  x = 3", "answer_line") == "x = 3"  # case-insensitive, like DAPO's regex
    assert extract_answer("Final Answer: \\boxed{12}", "answer_line") == "12"
    assert extract_answer("no line here", "answer_line") is None
    assert extract_answer("a \\boxed{1} b \\boxed{\\frac{1}{2}}", "boxed") == "\\frac{1}{2}"
    assert extract_answer("#### 1,000", "hash") == "1000"
    assert extract_answer("#### 5\n#### 7", "hash") == "7"
    assert extract_answer("\\boxed{}", "boxed") is None
    assert clean_answer("  $$42$$. ") == "42" and clean_answer("\\(x+1\\)") == "x+1"
    assert clean_answer("(1,000, 2)") == "(1000, 2)" and clean_answer("1,2") == "1,2"
    assert requested_format("Find x.") is None
    assert requested_format("Output the final answer after \"####\".") == "hash"
    assert requested_format("Write your answer in \\boxed{}.") == "boxed"


def test_answer_log_records_a_seeded_sample(tasks, tmp_path):
    task = tasks["dapo"]
    problems, _ = task.distinct_problems("train")
    texts = ["Answer: 84", "I think \\boxed{84}", "Answer: 33", "Answer: 34", "no idea", "Answer: 24"]
    index = [0, 0, 1, 1, 2, 2]
    recs = answer_log_records(task, problems, texts, index, step=3, n=4, seed=0)
    again = answer_log_records(task, problems, texts, index, step=3, n=4, seed=0)
    assert recs == again and len(recs) == 4 and len({r.response_tail for r in recs}) == 4
    expected = {"Answer: 84": ("84", True, "correct"), "I think \\boxed{84}": (None, False, "no_answer"),
                "Answer: 33": ("33", False, "wrong"), "Answer: 34": ("34", True, "correct"),
                "no idea": (None, False, "no_answer"), "Answer: 24": ("24", True, "correct")}
    for r in recs:
        assert (r.extracted, r.correct, r.reason) == expected[r.response_tail]
        assert r.step == 3 and r.answer_format == "answer_line"
        assert r.reference == problems[index[texts.index(r.response_tail)]].answer
    assert answer_log_records(task, problems, texts, index, step=4, n=10, seed=0)[5].response_tail == "Answer: 24"
    path = append_answer_log(tmp_path, recs)
    later = answer_log_records(task, problems, texts, index, step=5, n=2, seed=0)
    append_answer_log(tmp_path, later)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 6 and set(lines[0]) == {"step", "problem_id", "answer_format", "reference", "extracted",
                                                 "correct", "reason", "response_tail"}
    assert [x["step"] for x in lines] == [3, 3, 3, 3, 5, 5]
    # a resumed run logs step 5 again (and later steps): the log keeps each step once
    append_answer_log(tmp_path, recs[:1])  # step 3 again: steps 3 and 5 are dropped first
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [3]
    append_answer_log(tmp_path, later)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [3, 5, 5]
