"""The study's data: matched mixing ends, epochs from the data, the --dry-run data plan, the
eval-on-train refusal, and the ``paper`` preset validated on local copies of its datasets in
their real schemas (laid out as the Hugging Face hub cache; nothing downloaded)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import huggingface_hub.constants  # noqa: F401  (its default cache is read at import: before any test sets one)
import pytest
from dataset_rows import (
    AIME24_ROWS,
    AIME25_ROWS,
    AMC23_ROWS,
    DAPO_ROWS,
    MATH500_ROWS,
    MINERVA_ROWS,
    OPENR1_ROWS,
    hub_cache_dataset,
    readme,
    write_jsonl,
)

from opdgeo.cli.main import main
from opdgeo.errors import ConfigError
from opdgeo.study.data import check_study_eval, resolve_steps, study_data_plan, task_section
from opdgeo.study.pipeline import study_info, train_config_dict
from opdgeo.study.presets import PRESETS, get_preset

@pytest.fixture(autouse=True)
def _fresh_reads():
    """Each test lays out its own datasets under the same names: forget earlier reads."""
    from opdgeo.tasks.plan import clear_cache

    clear_cache()
    yield
    clear_cache()


N_OPENR1 = 300  # distinct OpenR1 problems in the fixture (+ 20 duplicate rows)


def _openr1_rows() -> list[dict]:
    """OpenR1-Math rows in its schema: 300 distinct problems, then 20 copies of the first ones."""
    base = OPENR1_ROWS[1]
    rows = []
    for i in range(N_OPENR1):
        gen = f"<think>\n7*{i}={7 * i}\n</think>\n$\\boxed{{{7 * i}}}$"
        rows.append({**base, "problem": f"Compute $7 \\cdot {i}$.", "answer": str(7 * i),
                     "solution": f"$7 \\cdot {i} = \\boxed{{{7 * i}}}$.", "uuid": f"u-{i}",
                     "generations": [gen, gen], "messages": [{"content": f"Compute $7 \\cdot {i}$.", "role": "user"},
                                                            {"content": gen, "role": "assistant"}]})
    return rows + rows[:20]


def _hub(tmp_path, monkeypatch, *, aime_rows=AIME24_ROWS):
    """Every dataset of the paper preset in a hub cache of this test (and no network)."""
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    one = {"default": {"train": "data/train-*"}}
    for repo, rows, split in (("BytedTsinghua-SIA/DAPO-Math-17k", DAPO_ROWS, "train"),
                              ("HuggingFaceH4/aime_2024", aime_rows, "train"),
                              ("math-ai/aime25", AIME25_ROWS, "test"),
                              ("math-ai/amc23", AMC23_ROWS, "test"),
                              ("HuggingFaceH4/MATH-500", MATH500_ROWS, "test"),
                              ("math-ai/minervamath", MINERVA_ROWS, "test"),
                              ("open-r1/OpenR1-Math-220k", _openr1_rows(), "train")):
        revision = hashlib.sha1(repo.encode()).hexdigest()  # each snapshot its own commit, as on the Hub
        hub_cache_dataset(hub, repo, {f"data/{split}-00000-of-00001.parquet": rows,
                                      "README.md": readme({"default": {split: f"data/{split}-*"}} if split != "train"
                                                          else one)}, revision=revision)
    return hub


# ------------------------------------------------------------------------ mixing ends


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_mixing_point_has_the_mixtures_steps_batch_and_group(name):
    p = get_preset(name)
    panel = p.mixing_panel()
    assert [a for a, _ in panel] == [1.0, 0.75, 0.5, 0.25, 0.05, 0.01, 0.0]
    mix = p.run("mix_0p5")
    for _, run in panel:
        r = p.run(run)
        assert (r.steps, r.batch_size, r.samples_per_prompt) == (mix.steps, mix.batch_size, mix.samples_per_prompt)
        assert (r.init, r.optim, r.max_new_tokens, r.seed) == (mix.init, mix.optim, mix.max_new_tokens, mix.seed)


def test_paper_adds_an_rlvr_end_at_the_mixtures_numbers():
    p = get_preset("paper")
    assert (p.run("rlvr").steps, p.run("rlvr").batch_size) == (1023, 512)  # the main RLVR run stays the paper's
    end = p.run("mix_0")
    assert (end.objective, end.steps, end.batch_size, end.samples_per_prompt, end.group) == ("rlvr", 299, 64, 8, "mixing")
    assert dict(p.mixing_panel())[1.0] == "opd" and dict(p.mixing_panel())[0.0] == "mix_0"
    assert not p.has_run("mix_1")  # the OPD run already has the mixtures' numbers
    cfg = train_config_dict(end, p, student="a", teacher="b", out_dir="runs/mix_0")
    assert cfg["objective"] == {"name": "rlvr"} and cfg["optim"]["steps"] == 299 and cfg["optim"]["batch_size"] == 64
    info = study_info(p)
    assert info["mixing_panel"][-1] == {"alpha": 0.0, "run": "mix_0"} and info["mixing_panel"][0]["run"] == "opd"
    for small in ("tiny", "quick", "smollm2"):  # their RLVR run already matches: no extra run
        assert not get_preset(small).has_run("mix_0") and dict(get_preset(small).mixing_panel())[0.0] == "rlvr"


def test_a_mismatched_end_is_refused():
    p = get_preset("tiny")
    runs = tuple(dataclasses.replace(r, steps=80) if r.name == "rlvr" else r for r in p.runs)
    with pytest.raises(ConfigError, match=r"mixing panel: the alpha=0 point 'rlvr' runs 80 steps x batch 8 x 4 "
                                          r"samples, the mixtures 40 x 8 x 4"):
        dataclasses.replace(p, runs=runs)


# ------------------------------------------------------------------------ data plan


def test_paper_dry_run_on_local_copies(tmp_path, monkeypatch, capsys):
    _hub(tmp_path, monkeypatch)
    p = get_preset("paper")
    resolved = resolve_steps(p)
    # SFT: 5 epochs of the 300 distinct OpenR1 problems (all with a solution) at batch 256
    assert resolved.run("sft").steps == math.ceil(5 * 300 / 256) == 6
    assert resolved.run("sft_proj16").steps == 6 and resolved.run("opd").steps == 299
    sft = task_section(p, p.run("sft"))
    assert sft == {"spec": "dapo-math-17k", "split": "train", "num_problems": None, "dedup": True,
                   "demonstrations": "openr1-math"}
    assert "demonstrations" not in task_section(p, p.run("opd"))
    rows = {r.stage: r for r in study_data_plan(resolved)}
    opd = rows["opd"]
    assert (opd.dataset, opd.rows, opd.distinct, opd.used, opd.batch_size) == ("DAPO-Math-17k", 7, 3, 3, 64)
    assert opd.steps_per_epoch == 3 / 64 and opd.epochs == pytest.approx(299 * 64 / 3)
    assert rows["rlvr"].epochs == pytest.approx(1023 * 512 / 3) and rows["mix_0"].steps == 299
    s = rows["sft"]
    assert (s.dataset, s.role, s.rows, s.distinct, s.drawn, s.steps) == ("OpenR1-Math-220k", "demonstrations", 320,
                                                                         300, 300, 6)
    assert s.epochs == pytest.approx(6 * 256 / 300)
    aime = rows["eval:aime-2024"]
    assert (aime.dataset, aime.split, aime.dataset_split, aime.used, aime.k) == ("AIME 2024", "test", "train", 2, 8)
    assert rows["eval:math-500"].k == 1 and rows["eval:amc-2023"].k == 8
    assert check_study_eval(resolved) == []

    main(["study", "--preset", "paper", "--dry-run", "--out", str(tmp_path / "none")])
    text = capsys.readouterr().out
    assert "sft, from base, 6 steps (5 epochs), batch 256" in text
    assert "SFT demonstrations: openr1-math; evaluation: suite paper" in text
    assert "data plan (deduplicated" in text and "OpenR1-Math-220k" in text and "DAPO-Math-17k" in text
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("opd (+"))
    assert " 7 " in line and " 3 " in line and " 64 " in line and "6378.67" in line  # rows, distinct, batch, epochs
    # sft_proj16 and its freeze-only control read the same demonstrations as sft
    sft_line = next(ln for ln in text.splitlines() if ln.strip().startswith("sft (+2)"))
    assert "320" in sft_line and "300" in sft_line and "5.12" in sft_line
    assert "eval:aime-2024" in text and "mixing sweep (alpha: run): 1: opd" in text and "0: mix_0" in text
    assert not (tmp_path / "none").exists()


def test_paper_dry_run_refuses_evaluation_on_training_rows(tmp_path, monkeypatch, capsys):
    # the 'AIME 2024' copy holds the dapo training problems: every one of its problems is training data
    dapo_as_aime = [{"problem": r["prompt"][0]["content"], "answer": r["reward_model"]["ground_truth"], "id": i}
                    for i, r in enumerate(DAPO_ROWS)]
    _hub(tmp_path, monkeypatch, aime_rows=dapo_as_aime)
    with pytest.raises(SystemExit) as e:
        main(["study", "--preset", "paper", "--dry-run"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "opdgeo: error: eval task 'aime-2024'" in err and "resolves to the same rows as the training task " \
           "dapo-math-17k (split 'train'): all 3 of its problems" in err and "Traceback" not in err


def test_paper_dry_run_without_the_data_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-ds"))
    main(["study", "--preset", "paper", "--dry-run"])
    text = capsys.readouterr().out
    assert "data plan: not available here (" in text and "hf download --repo-type dataset" in text
    assert "sft, from base, 1831 steps (5 epochs)" in text  # the estimate
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache"):
        resolve_steps(get_preset("paper"))


def test_tiny_plan_counts_by_hand():
    p = get_preset("tiny")
    rows = {r.stage: r for r in study_data_plan(p)}
    # arithmetic difficulty 2, '+': 5,000 distinct training problems, 200 test
    assert (rows["sft"].used, rows["sft"].drawn, rows["sft"].steps) == (5000, 5000, 120)
    assert rows["sft"].epochs == 120 * 32 / 5000 and rows["opd"].steps_per_epoch == 5000 / 8
    assert rows["teacher"].steps == 500 and rows["teacher"].epochs == 500 * 32 / 5000
    assert (rows["eval"].used, rows["eval"].k, rows["eval"].split) == (512, 2, "test")
    assert resolve_steps(p) is p  # no run in epochs
    assert check_study_eval(p) == []  # the arithmetic splits are disjoint


def test_teacher_demonstrations_cannot_set_epochs(tmp_path):
    p = get_preset("paper")
    with pytest.raises(ConfigError, match="runs.sft.epochs: teacher demonstrations are counted only after"):
        resolve_steps(dataclasses.replace(p, demonstrations="teacher"))


def test_a_preset_of_local_files_gets_epoch_steps(tmp_path):
    """A preset over plain files: duplicates removed before the epoch count."""
    rows = [{"problem": f"What is {i}+{i}?", "answer": str(2 * i), "solution": f"\\boxed{{{2 * i}}}"}
            for i in range(10)]
    folder = tmp_path / "mine"
    write_jsonl(folder / "train.jsonl", rows + rows[:4] + [{"problem": "No solution here?", "answer": "1"}])
    write_jsonl(folder / "test.jsonl", [{"problem": f"What is {i}*3?", "answer": str(3 * i)} for i in range(8)])
    p = get_preset("quick")
    runs = tuple(dataclasses.replace(r, epochs=3) if r.name in ("sft", "sft_proj16") else r for r in p.runs)
    q = dataclasses.replace(p, task=str(folder), runs=runs)
    r = resolve_steps(q)
    # 11 distinct problems, 10 with a solution: ceil(3 * 10 / 8) = 4 steps
    assert r.run("sft").steps == 4 and r.run("opd").steps == p.run("opd").steps
    row = next(x for x in study_data_plan(r) if x.stage == "sft")
    assert (row.rows, row.distinct, row.used, row.with_solutions, row.drawn) == (15, 11, 11, 10, 10)
    assert row.steps_per_epoch == 10 / 8 and row.epochs == 4 * 8 / 10
    ev = next(x for x in study_data_plan(r) if x.stage == "eval")
    assert (ev.split, ev.rows, ev.used, ev.k) == ("test", 8, 6, 1)  # quick: the first 6 of 8 test problems, avg@1
    assert json.loads(json.dumps(study_info(r)))["runs"][0]["steps"] == 4


# ------------------------------------------------------------------------ evaluation stage


def test_eval_stage_on_a_suite_writes_the_headline(tmp_path, monkeypatch):
    """A preset with ``eval.suite`` evaluates every checkpoint with ``evaluate_suite``:
    ``eval.json``'s ``accuracy`` is the headline task's avg@k, ``suite`` the summary."""
    from opdgeo.models import build_model, char_tokenizer, tiny_qwen3_config
    from opdgeo.study.pipeline import _eval_fn
    from opdgeo.study.presets import EvalSpec
    from opdgeo.study.stages import StageContext
    from opdgeo.tasks.suite import SUITES, EvalSuite, EvalTask

    tok = char_tokenizer()
    model_dir = tmp_path / "model"
    build_model(tiny_qwen3_config("quick", len(tok)), seed=0).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    aime = write_jsonl(tmp_path / "aime.jsonl", AIME24_ROWS)
    suite = EvalSuite(tasks=(EvalTask("sums", "arithmetic:difficulty=1,ops=+", k=2, n=3),
                             EvalTask("aime", f"{aime}:dataset=aime-2024", k=1)),
                      headline="sums", temperature=1.0, max_new_tokens=6)
    monkeypatch.setitem(SUITES, "mini", suite)
    p = dataclasses.replace(get_preset("quick"), eval=EvalSpec(suite="mini"))
    out = tmp_path / "eval"
    out.mkdir()
    ctx = StageContext(out=tmp_path, dir=out, resume=False, deps={"base": {"path": str(model_dir)}}, log=lambda m: None)
    summary = _eval_fn(p, "base", "base student", "base", "path")(ctx)
    rec = json.loads((out / "eval.json").read_text())
    per_problem = [json.loads(line)["accuracy"] for line in (out / "sums.jsonl").read_text().splitlines()]
    assert len(per_problem) == 3 and rec["k"] == 2 and rec["n_problems"] == 3 and rec["headline"] == "sums"
    assert rec["accuracy"] == summary["accuracy"] == pytest.approx(sum(per_problem) / 3)
    assert rec["suite"]["headline"] == {"task": "sums", "metric": "avg@2", "value": rec["accuracy"]}
    assert set(rec["suite"]["tasks"]) == {"sums", "aime"} and rec["suite"]["tasks"]["aime"]["n"] == 2
    assert sorted(x.name for x in out.iterdir()) == ["aime.jsonl", "eval.json", "summary.json", "sums.jsonl"]
    # the suite is refused when one of its tasks is the training data (quick trains on arithmetic difficulty 2)
    bad = EvalSuite(tasks=(EvalTask("train-rows", "arithmetic:difficulty=2,ops=+", split="train", n=4),))
    monkeypatch.setitem(SUITES, "mini", bad)
    with pytest.raises(ConfigError, match="eval task 'train-rows'.*resolves to the same rows as the training task"):
        check_study_eval(p)
    from opdgeo.study.run import run_study

    with pytest.raises(ConfigError, match="eval task 'train-rows'"):
        run_study(p, tmp_path / "study")
    assert not (tmp_path / "study").exists()  # refused before any stage
