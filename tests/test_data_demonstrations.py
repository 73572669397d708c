"""SFT data of its own: demonstrations rejection-sampled from a tiny teacher (kept only when
verified correct, written once to the run folder and reused), or a dataset with solutions."""

from __future__ import annotations

import json
import re

import pytest
from dataset_rows import DAPO_ROWS, OPENR1_ROWS, write_parquet

from opdgeo.errors import ConfigError
from opdgeo.tasks import load_task
from opdgeo.training.config import load_config
from opdgeo.training.data import DATA_FILE, training_problems
from opdgeo.training.demonstrations import DEMONSTRATIONS_FILE, DEMONSTRATIONS_META, rejection_sample
from opdgeo.training.loop import train

SPEC = "arithmetic:difficulty=1,ops=+"


def _true_answer(prompt: str) -> str:
    a, b = prompt.split("+")
    return str(int(a) + int(b))


def _independently_correct(response: str, prompt: str) -> bool:
    """The final line is exactly 'Answer: <a+b>' (checked with Python arithmetic, not the task)."""
    return re.fullmatch(r"Answer: (-?\d+)", response.rstrip().rsplit("\n", 1)[-1] or "") is not None and \
        response.rstrip().rsplit("\n", 1)[-1] == f"Answer: {_true_answer(prompt)}"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny:student SFT-trained briefly on 16 one-digit additions: right on some samples, not all."""
    out = tmp_path_factory.mktemp("teacher")
    cfg = load_config(None, [f"task.spec={SPEC}", "run.progress=false", f"run.out_dir={out}",
                             "model.student=tiny:student", "checkpoint.dtype=float32",
                             "checkpoint.save_trainer_state=false", "objective=sft", "task.num_problems=16",
                             "optim.batch_size=16", "optim.micro_batch_size=16", "optim.lr=3e-3", "optim.steps=20"])
    return train(cfg).checkpoints[-1]


@pytest.mark.slow
def test_rejection_sampling_keeps_exactly_the_first_verified_sample(teacher):
    from opdgeo.models import load_model, load_tokenizer
    from opdgeo.training.rollout import generate

    model, tok = load_model(teacher), load_tokenizer(teacher)
    task = load_task(SPEC)
    problems = task.problems("train", 32)
    res = rejection_sample(model, tok, task, problems, samples=2, temperature=1.0, max_new_tokens=24, seed=3,
                           batch_size=16)
    # reference: the same generate calls, judged by Python arithmetic instead of the task's verifier
    expected, correct = [], 0
    for g, start in enumerate(range(0, 32, 8)):
        chunk = problems[start:start + 8]
        ro = generate(model, tok, [task.format_prompt(p, tok) for p in chunk], num_samples=2, temperature=1.0,
                      max_new_tokens=24, seed=3 + 1000 * g, batch_size=16)
        for i, p in enumerate(chunk):
            ok = [bool(ro.finished[2 * i + j]) and _independently_correct(ro.texts[2 * i + j], p.prompt)
                  for j in range(2)]
            correct += sum(ok)
            if any(ok):
                expected.append((p.id, ro.texts[2 * i + ok.index(True)], ok.index(True)))
    assert [(d.id, d.solution) for d in res.demonstrations] == [(i, s) for i, s, _ in expected]
    assert res.kept_sample == [j for _, _, j in expected] and res.correct == correct
    assert 0 < res.kept < res.prompts == 32  # some prompts rejected, some kept: the filter did something
    assert all(d.answer == _true_answer(d.prompt) for d in res.demonstrations)


def _sft_cfg(out, teacher, *extra):
    return load_config(None, [f"task.spec={SPEC}", "run.progress=false", f"run.out_dir={out}",
                              "model.student=tiny:quick", f"model.teacher={teacher}", "objective=sft",
                              "task.demonstrations=teacher", "task.num_problems=24", "task.demonstration_samples=2",
                              "rollout.max_new_tokens=24", "optim.steps=2", "optim.batch_size=4",
                              "optim.micro_batch_size=4", "checkpoint.dtype=float32",
                              "checkpoint.save_trainer_state=false", *extra])


@pytest.mark.slow
def test_sft_on_teacher_demonstrations_written_once_and_reused(teacher, tmp_path, monkeypatch):
    out = tmp_path / "sft"
    result = train(_sft_cfg(out, teacher))
    assert result.checkpoints[-1].name == "step-000002"
    rows = [json.loads(x) for x in (out / DEMONSTRATIONS_FILE).read_text().splitlines()]
    meta = json.loads((out / DEMONSTRATIONS_META).read_text())
    assert len(rows) == meta["kept"] and 0 < meta["kept"] <= meta["prompts"] == 24
    assert meta["settings"]["samples"] == 2 and meta["settings"]["teacher"] == str(teacher)
    assert all(_independently_correct(r["solution"], r["prompt"]) for r in rows)  # verified correct only
    data = json.loads((out / DATA_FILE).read_text())
    assert data["demonstrations"]["kind"] == "teacher" and data["demonstrations"]["kept"] == len(rows)
    assert data["task"]["used"] == 24

    # reused, never regenerated
    import opdgeo.training.demonstrations as demos

    monkeypatch.setattr(demos, "rejection_sample", lambda *a, **k: pytest.fail("demonstrations regenerated"))
    again = training_problems(_sft_cfg(out, teacher), out)
    assert [(p.id, p.solution) for p in again.problems] == [(r["id"], r["solution"]) for r in rows]
    with pytest.raises(ConfigError, match=r"generated with other settings \(samples\)"):
        training_problems(_sft_cfg(out, teacher, "task.demonstration_samples=3"), out)


def test_a_teacher_that_is_never_right_gives_no_demonstrations(tmp_path):
    cfg = _sft_cfg(tmp_path / "run", "tiny:quick", "task.num_problems=4", "rollout.max_new_tokens=4")
    with pytest.raises(ConfigError, match="the teacher tiny:quick got none of 4 prompts right in 2 samples"):
        training_problems(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / DEMONSTRATIONS_META).exists()


def test_demonstrations_from_a_dataset_with_solutions(tmp_path):
    dapo = write_parquet(tmp_path / "dapo.parquet", DAPO_ROWS)
    openr1 = write_parquet(tmp_path / "openr1.parquet", OPENR1_ROWS)
    cfg = load_config(None, [f"task.spec={dapo}", "objective=sft", f"task.demonstrations={openr1}",
                             "model.student=tiny:quick", f"run.out_dir={tmp_path / 'run'}"])
    data = training_problems(cfg, tmp_path / "run")
    assert data.task.adapter.name == "openr1-math"  # its prompts, its answer format
    assert [p.solution.endswith("\\boxed{3}$.") or p.solution.endswith("\\boxed{56}$") for p in data.problems] == \
        [True, True]
    rec = json.loads((tmp_path / "run" / DATA_FILE).read_text())
    assert rec["task"]["distinct"] == 3 and rec["demonstrations"]["kind"] == "dataset"
    assert rec["demonstrations"]["dataset"] == "OpenR1-Math-220k" and rec["demonstrations"]["kept"] == 2


def test_config_rules_for_demonstrations(tmp_path):
    base = ["model.student=tiny:quick", f"run.out_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="task.demonstrations: SFT demonstrations apply to objective sft"):
        load_config(None, [*base, "objective=rlvr", "task.demonstrations=openr1-math"])
    with pytest.raises(ConfigError, match="'teacher' needs model.teacher"):
        load_config(None, [*base, "objective=sft", "task.demonstrations=teacher"])
    with pytest.raises(ConfigError, match="no such file"):
        load_config(None, [*base, "objective=sft", f"task.demonstrations={tmp_path / 'missing.jsonl'}"])
    with pytest.raises(ConfigError, match="demonstration_samples: must be >= 1"):
        load_config(None, [*base, "objective=sft", "task.demonstration_samples=0"])
