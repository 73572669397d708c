"""The evaluation suite: tasks with their own k, the headline, the eval-equals-train
refusal, the library function and ``opdgeo eval`` with several tasks."""

from __future__ import annotations

import json

import pytest
from dataset_rows import AIME24_ROWS, AIME25_ROWS, DAPO_ROWS, MATH500_ROWS, hub_cache_dataset, readme, write_jsonl, \
    write_parquet

from opdgeo.cli.main import main
from opdgeo.errors import ConfigError
from opdgeo.tasks.suite import PAPER_SUITE, EvalSuite, EvalTask, check_eval_not_train, parse_eval_task, suite_from, \
    suite_plan_rows
from opdgeo.training.evaluate import evaluate_suite


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("suite")
    return {
        "dapo": write_parquet(d / "dapo.parquet", DAPO_ROWS),
        "dapo_copy": write_parquet(d / "copy" / "dapo_eval.parquet", DAPO_ROWS[:3]),
        "aime": write_parquet(d / "aime.parquet", AIME24_ROWS),
        "aime25": write_jsonl(d / "aime25.jsonl", AIME25_ROWS),
        "mixed": write_jsonl(d / "mixed_test.jsonl", MATH500_ROWS + [{"problem": DAPO_ROWS[0]["prompt"][0]["content"],
                                                                      "answer": "84"}]),
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from opdgeo.models import build_model, char_tokenizer, tiny_qwen3_config

    folder = tmp_path_factory.mktemp("model")
    tok = char_tokenizer()
    build_model(tiny_qwen3_config("quick", len(tok)), seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_paper_suite_and_parsing():
    assert [(t.name, t.k) for t in PAPER_SUITE.tasks] == [("aime-2024", 8), ("aime-2025", 8), ("amc-2023", 8),
                                                          ("math-500", 1), ("minerva-math", 1)]
    assert PAPER_SUITE.headline_task.name == "aime-2024"
    assert PAPER_SUITE.settings(PAPER_SUITE.tasks[0]) == (8, 1.0, 8192)
    t = parse_eval_task("aime24:k=8,n=30")
    assert (t.name, t.spec, t.k, t.n, t.split) == ("aime-2024", "aime24", 8, 30, "test")
    t = parse_eval_task("data/x.jsonl:dataset=aime-2024,k=4,name=mine", k=2)
    assert (t.name, t.spec, t.k) == ("mine", "data/x.jsonl:dataset=aime-2024", 4)
    assert parse_eval_task("HuggingFaceH4/MATH-500").name == "math-500"
    assert parse_eval_task("arithmetic:difficulty=2,k=3").spec == "arithmetic:difficulty=2"
    s = suite_from(["arithmetic:k=2"], suite="paper")
    assert len(s.tasks) == 6 and s.headline == "aime-2024" and s.tasks[-1].k == 2
    with pytest.raises(ConfigError, match="unknown suite 'nope'"):
        suite_from(suite="nope")
    with pytest.raises(ConfigError, match="headline 'x' is not one of the tasks"):
        EvalSuite(tasks=(EvalTask("a", "arithmetic"),), headline="x")
    with pytest.raises(ConfigError, match="task names must be unique"):
        EvalSuite(tasks=(EvalTask("a", "arithmetic"), EvalTask("a", "arithmetic:difficulty=2")))
    with pytest.raises(ConfigError, match="k must be an integer"):
        parse_eval_task("arithmetic:k=two")
    greedy = EvalSuite(tasks=(EvalTask("a", "arithmetic", k=8),), temperature=0.0)
    assert greedy.settings(greedy.tasks[0])[0] == 1  # greedy: all k samples coincide


def test_eval_on_training_rows_is_refused(files):
    dapo = str(files["dapo"])
    # training rows saved as an evaluation file ('dapo_eval.parquet': its one split is test): refused
    with pytest.raises(ConfigError, match=r"eval task 'copy' .* resolves to the same rows as the training task "
                                          r".*dapo.parquet \(split 'train'\): all 2 of its problems are training"):
        check_eval_not_train([(dapo, "train")], [EvalTask("copy", f"{files['dapo_copy']}:dataset=generic")])
    # several at once, one line each
    with pytest.raises(ConfigError, match="2 evaluation tasks are training data"):
        check_eval_not_train([(dapo, "train")], [EvalTask("a", f"{files['dapo_copy']}:dataset=generic"),
                                                 EvalTask("b", dapo, split="train")])
    # held-out sets pass; a partial overlap is reported, not refused
    aime = EvalTask("aime-2024", f"{files['aime']}:dataset=aime-2024")
    mixed = EvalTask("mixed", str(files["mixed"]))
    overlaps = check_eval_not_train([(dapo, "train")], [aime, mixed])
    assert [(o.eval_task, o.shared, o.eval_problems) for o in overlaps] == [("mixed", 1, 3)]


def test_dapo_split_test_is_not_aime(tmp_path, monkeypatch):
    """The paper preset's old mistake: dapo's 'test' split served its training rows."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "dscache"))
    hub_cache_dataset(tmp_path / "hub", "BytedTsinghua-SIA/DAPO-Math-17k", {
        "data/dapo-math-17k.parquet": DAPO_ROWS, "README.md": readme({"default": {"train": "data/*.parquet"}})})
    from opdgeo.tasks import load_task

    with pytest.raises(ConfigError, match="no held-out split"):
        load_task("BytedTsinghua-SIA/DAPO-Math-17k").problems("test")
    assert len(load_task("dapo-math-17k").distinct_problems("train")[0]) == 3


def test_evaluate_suite_reports_each_task_and_the_headline(tiny, files, tmp_path, monkeypatch):
    from opdgeo.models import load_model, load_tokenizer

    model, tok = load_model(tiny), load_tokenizer(tiny)
    suite = EvalSuite(tasks=(EvalTask("arith", "arithmetic:difficulty=1,ops=+", k=3, n=4),
                             EvalTask("aime-2024", f"{files['aime']}:dataset=aime-2024", k=2)),
                      headline="aime-2024", temperature=1.0, max_new_tokens=8)
    seen = []
    res = evaluate_suite(model, tok, suite, seed=0, batch_size=16, out_dir=tmp_path / "ev",
                         progress=lambda name, done, total: seen.append((name, done, total)))
    a, b = res.results["arith"], res.results["aime-2024"]
    assert (a.n, a.k, b.n, b.k) == (4, 3, 2, 2)
    assert res.headline == "aime-2024" and res.headline_value == b.avg_at_k
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["headline"] == {"task": "aime-2024", "metric": "avg@2", "value": b.avg_at_k}
    assert summary["tasks"]["aime-2024"]["rows"] == 2 and summary["tasks"]["arith"]["k"] == 3
    recs = [json.loads(x) for x in (tmp_path / "ev" / "aime-2024.jsonl").read_text().splitlines()]
    assert [r["id"] for r in recs] == ["60", "61"]
    assert all(len(r["extracted"]) == len(r["verdicts"]) == 2 for r in recs)
    assert seen[-1][0] == "aime-2024" and seen[-1][1:] == (2, 2)

    # refused before any generation
    import opdgeo.training.rollout as rollout

    monkeypatch.setattr(rollout, "generate", lambda *a, **k: pytest.fail("generated before the refusal"))
    with pytest.raises(ConfigError, match="resolves to the same rows"):
        evaluate_suite(model, tok, EvalSuite(tasks=(EvalTask("a", "arithmetic:difficulty=1,ops=+", n=4),
                                                    EvalTask("d", str(files["dapo"]), split="train"))),
                       train=[(str(files["dapo"]), "train")])


def test_cli_several_tasks(tiny, files, tmp_path, capsys):
    out = tmp_path / "evals"
    main(["eval", str(tiny), "--task", "arithmetic:difficulty=1,ops=+,k=2,n=3", "--task",
          f"{files['aime']}:dataset=aime-2024,name=aime", "--temperature", "1.0", "--max-new-tokens", "6",
          "--out-dir", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"{tiny}: avg@2 (pass@1) = ") and "on 3 test problems" in lines[0]
    assert "avg@1 (pass@1)" in lines[1] and "on 2 test problems" in lines[1]
    assert lines[2].startswith("headline: arithmetic avg@2 = ")
    assert sorted(p.name for p in out.iterdir()) == ["aime.jsonl", "arithmetic.jsonl", "summary.json"]
    with pytest.raises(SystemExit) as e:
        main(["eval", str(tiny), "--task", "arithmetic", "--task", "arithmetic:difficulty=2,name=b",
              "--out", str(tmp_path / "x.jsonl")])
    assert e.value.code == 2 and "use --out-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["eval", str(tiny), "--task", f"{files['dapo_copy']}:dataset=generic",
              "--train-task", str(files["dapo"])])
    assert e.value.code == 2 and "resolves to the same rows" in capsys.readouterr().err


def test_suite_plan_rows(files):
    suite = EvalSuite(tasks=(EvalTask("aime-2024", f"{files['aime']}:dataset=aime-2024", k=8),
                             EvalTask("aime-2025", f"{files['aime25']}:dataset=aime-2025", k=8)),
                      headline="aime-2024")
    rows = suite_plan_rows(suite)
    assert [(r.stage, r.dataset, r.used, r.k) for r in rows] == [("eval:aime-2024", "AIME 2024", 2, 8),
                                                                  ("eval:aime-2025", "AIME 2025", 2, 8)]
    assert "the headline" in rows[0].note and "the headline" not in rows[1].note
