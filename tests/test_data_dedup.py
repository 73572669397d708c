"""Deduplication by normalized problem text, the counts a run and a data plan report, and
epochs measured in steps of the deduplicated count."""

from __future__ import annotations

import json

import pytest
from dataset_rows import AIME24_ROWS, DAPO_ROWS, OPENR1_ROWS, write_parquet

from opdgeo.errors import ConfigError
from opdgeo.tasks import ArithmeticTask, Problem, deduplicate, load_task, normalize_problem_text
from opdgeo.tasks.plan import (
    data_plan_row,
    demonstrations_plan_row,
    format_data_plan,
    steps_for_epochs,
    steps_per_epoch,
)
from opdgeo.training.config import load_config
from opdgeo.training.data import DATA_FILE, training_problems
from opdgeo.training.loop import step_prompts


@pytest.fixture(scope="module")
def dapo(tmp_path_factory):
    return write_parquet(tmp_path_factory.mktemp("dedup") / "dapo.parquet", DAPO_ROWS)


def test_normalization_and_first_occurrence_kept():
    assert normalize_problem_text("  Find\t$x$ \n\n if  x=1. ") == "Find $x$ if x=1."
    assert normalize_problem_text("ｆｉｎｄ x") == "find x"  # NFKC folds full-width letters
    assert normalize_problem_text("Find X") != normalize_problem_text("Find x")  # case is kept
    ps = [Problem("1", "a  b", "1"), Problem("2", "c", "2"), Problem("3", "a b", "1"), Problem("4", "c", "9"),
          Problem("5", "c\n", "2")]
    kept, counts = deduplicate(ps)
    assert [p.id for p in kept] == ["1", "2"]
    assert (counts.rows, counts.distinct, counts.conflicting, counts.duplicates) == (5, 2, 1, 3)


def test_dapo_rows_before_and_after(dapo):
    task = load_task(str(dapo))
    assert len(task.problems("train")) == 7
    kept, counts = task.distinct_problems("train")
    assert (counts.rows, counts.distinct, counts.conflicting) == (7, 3, 1)
    assert [p.id for p in kept] == ["a1", "b2", "c3"] and kept[2].answer == "24"  # the first row's answer
    assert [p.id for p in task.distinct_problems("train", 2)[0]] == ["a1", "b2"]


def _cfg(tmp_path, *extra):
    return load_config(None, ["model.student=tiny:quick", "run.progress=false", f"run.out_dir={tmp_path / 'run'}",
                              *extra])


def test_training_problems_deduplicate_and_record(dapo, tmp_path):
    lines = []
    data = training_problems(_cfg(tmp_path, f"task.spec={dapo}", "objective=rlvr"), tmp_path / "run", log=lines.append)
    assert [p.id for p in data.problems] == ["a1", "b2", "c3"]
    rec = json.loads((tmp_path / "run" / DATA_FILE).read_text())["task"]
    assert (rec["rows"], rec["distinct"], rec["conflicting"], rec["used"], rec["dedup"]) == (7, 3, 1, 3, True)
    assert rec["dataset"] == "DAPO-Math-17k" and rec["answer_format"] == "'Answer: ...' line"
    assert lines and "7 rows, 3 distinct" in lines[0]
    raw = training_problems(_cfg(tmp_path, f"task.spec={dapo}", "objective=rlvr", "task.dedup=false"), None)
    assert len(raw.problems) == 7 and raw.record["task"]["distinct"] == 3
    two = training_problems(_cfg(tmp_path, f"task.spec={dapo}", "objective=rlvr", "task.num_problems=2"), None)
    assert [p.id for p in two.problems] == ["a1", "b2"] and two.record["task"]["rows"] == 7
    arith = training_problems(_cfg(tmp_path, "task.spec=arithmetic:difficulty=2", "task.num_problems=50"), None)
    assert len(arith.problems) == 50 and arith.problems == ArithmeticTask(difficulty=2).problems("train", 50)


def test_sft_without_solutions_is_refused_before_any_model(dapo, tmp_path):
    with pytest.raises(ConfigError, match=r"none of the 3 problems of .*dapo.parquet has a solution.*"
                                          r"task.demonstrations"):
        training_problems(_cfg(tmp_path, f"task.spec={dapo}", "objective=sft"), None)


def test_steps_per_epoch_from_the_distinct_count():
    assert steps_per_epoch(17_398, 256) == pytest.approx(67.9609375)
    assert steps_for_epochs(17_398, 256, 5) == 340  # the paper's 5 x 68
    assert steps_for_epochs(10, 4, 1) == 3 and steps_for_epochs(12, 4, 1) == 3 and steps_for_epochs(12, 4, 2) == 6
    assert steps_for_epochs(3, 8, 1) == 1
    with pytest.raises(ConfigError):
        steps_for_epochs(0, 4, 1)
    # the trainer's prompt stream: E epochs in ceil(E·n/B) steps draw every problem E times
    # (when E·n is a multiple of B), and one step fewer leaves some problem short
    for n, b, e in ((12, 4, 2), (10, 5, 3), (9, 6, 2)):
        steps = steps_for_epochs(n, b, e)
        drawn = [i for s in range(steps) for i in step_prompts(n, b, s, seed=1)]
        assert all(drawn.count(i) == e for i in range(n))
        short = [i for s in range(steps - 1) for i in step_prompts(n, b, s, seed=1)]
        assert any(short.count(i) < e for i in range(n))


def test_data_plan_rows(dapo, tmp_path):
    row = data_plan_row(str(dapo), stage="rlvr", split="train", batch_size=2)
    assert (row.dataset, row.rows, row.distinct, row.used, row.conflicting) == ("DAPO-Math-17k", 7, 3, 3, 1)
    assert row.steps_per_epoch == pytest.approx(1.5) and row.with_solutions == 0
    assert row.answer_format == "'Answer: ...' line" and "DAPO's own instruction" in row.prompt_format
    aime = write_parquet(tmp_path / "aime.parquet", AIME24_ROWS)
    ev = data_plan_row(f"{aime}:dataset=aime-2024", stage="eval:aime-2024", role="eval", split="test", k=8)
    assert (ev.dataset, ev.dataset_split, ev.used, ev.k, ev.answer_format) == ("AIME 2024", "test", 2, 8,
                                                                                 "last \\boxed{}")
    text = format_data_plan([row, ev])
    header, first, second = text.splitlines()[:3]
    assert header.split()[:11] == ["stage", "role", "dataset", "split", "rows", "distinct", "used", "batch",
                                   "steps/epoch", "steps", "epochs"]
    assert first.startswith("rlvr") and "DAPO-Math-17k" in first and "1.50" in first
    assert second.startswith("eval:aime-2024") and " 8" in second
    assert "1 distinct problems have duplicates with another answer" in text
    openr1 = write_parquet(tmp_path / "openr1.parquet", OPENR1_ROWS)
    cfg = _cfg(tmp_path, f"task.spec={dapo}", "objective=sft", f"task.demonstrations={openr1}")
    demo = demonstrations_plan_row(cfg.task, batch_size=1)
    assert (demo.dataset, demo.used, demo.with_solutions, demo.steps_per_epoch) == ("OpenR1-Math-220k", 2, 2, 2.0)
    assert demo.drawn == 2 and demo.with_steps(3).epochs == 3 * 1 / 2  # 3 steps of 1 over 2 demonstrations
    cfg = _cfg(tmp_path, f"task.spec={dapo}", "objective=sft", "task.demonstrations=teacher",
               "model.teacher=tiny:quick")
    demo = demonstrations_plan_row(cfg.task)
    assert demo.used == 3 and "teacher samples (4 per prompt)" in demo.note
