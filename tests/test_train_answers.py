"""The trainer's answer log (sampled rollouts, the answer the verifier read, its verdict) and
``--resume`` of runs whose ``config.yaml`` predates fields added since."""

from __future__ import annotations

import json

import pytest
import yaml

from opdgeo.errors import ConfigError
from opdgeo.tasks import load_task
from opdgeo.training import checkpointing as ckpt
from opdgeo.training.config import RESUME_FREE, TrainConfig, config_to_dict, load_config, resume_differences
from opdgeo.training.data import ANSWERS_FILE
from opdgeo.training.loop import Hooks, train

SPEC = "arithmetic:difficulty=1,ops=+"
RL = ["objective=rlvr", "optim.steps=4", "optim.batch_size=2", "optim.micro_batch_size=1", "rollout.group_size=2",
      "rollout.max_new_tokens=8", "optim.lr=1e-2", "checkpoint.every=2", "checkpoint.dtype=float32"]


def _cfg(out, *extra):
    return load_config(None, ["model.student=tiny:quick", f"task.spec={SPEC}", "task.num_problems=16",
                              "run.progress=false", f"run.out_dir={out}", *extra])


def _log(run_dir):
    return [json.loads(line) for line in (run_dir / ANSWERS_FILE).read_text().splitlines()]


def test_answer_log_every_n_steps_rechecks_like_the_reward(tmp_path):
    run = tmp_path / "run"
    train(_cfg(run, *RL, "run.answer_log_every=2", "run.answer_log_samples=3"))
    log = _log(run)
    # steps 2 and 4; 3 of the step's 2 prompts x 2 samples = 4 rollouts each
    assert [r["step"] for r in log] == [2, 2, 2, 4, 4, 4]
    task = load_task(SPEC)
    by_id = {p.id: p for p in task.distinct_problems("train", 16)[0]}
    for r in log:
        p = by_id[r["problem_id"]]
        v = task.check(r["response_tail"], p)  # responses are <= 8 tokens: the tail is the whole text
        assert (r["extracted"], r["correct"], r["reason"]) == (v.extracted, v.correct, v.reason)
        assert r["reference"] == p.answer and r["answer_format"] == task.answer_format(p)
    # the verdicts agree with the rewards the run logged: a step's logged accuracy bounds its sample
    rewards = {m["step"]: m["rlvr/accuracy"] for m in ckpt.read_metrics(run / "metrics.jsonl")}
    for step in (2, 4):
        correct = sum(r["correct"] for r in log if r["step"] == step)
        assert correct <= round(rewards[step] * 4) and 3 - correct <= round((1 - rewards[step]) * 4)


def test_answer_log_off_and_sft_write_none(tmp_path):
    train(_cfg(tmp_path / "off", *RL, "run.answer_log_every=0"))
    assert not (tmp_path / "off" / ANSWERS_FILE).exists()
    train(_cfg(tmp_path / "sft", "objective=sft", "optim.steps=2", "optim.batch_size=2", "optim.micro_batch_size=1",
               "run.answer_log_every=1"))
    assert not (tmp_path / "sft" / ANSWERS_FILE).exists()


def test_resumed_answer_log_equals_uninterrupted(tmp_path):
    extra = [*RL, "run.answer_log_every=1", "run.answer_log_samples=2", "run.monitor_every=1"]
    train(_cfg(tmp_path / "full", *extra))

    class Killed(Exception):
        pass

    def die_after_logging_step_3(ctx):  # after step 3's answers are logged, before its checkpoint
        if ctx.step == 3:
            raise Killed

    with pytest.raises(Killed):
        train(_cfg(tmp_path / "cut", *extra), hooks=Hooks(every_n=die_after_logging_step_3))
    assert [r["step"] for r in _log(tmp_path / "cut")] == [1, 1, 2, 2, 3, 3]
    train(_cfg(tmp_path / "cut", *extra), resume=True)  # from step 2: step 3 again, then 4
    assert _log(tmp_path / "cut") == _log(tmp_path / "full")
    assert [r["step"] for r in _log(tmp_path / "full")] == [1, 1, 2, 2, 3, 3, 4, 4]


# --------------------------------------------------------------------- resume of older runs


def test_absent_keys_count_as_their_defaults():
    config = _cfg("runs/x", *RL)
    saved = config_to_dict(config)
    assert resume_differences(saved, config) == []
    old = {s: dict(v) for s, v in saved.items()}
    for key in ("dedup", "demonstrations", "demonstration_split", "demonstration_samples", "demonstration_temperature"):
        del old["task"][key]  # a run written before these fields existed
    del old["run"]["answer_log_every"]
    assert resume_differences(old, config) == []
    # an absent key whose default is not the config's value is a difference
    assert resume_differences(old, _cfg("runs/x", *RL, "task.dedup=false")) == ["task.dedup"]
    # a saved value that differs is one too; the free keys never are
    old["task"]["num_problems"] = 8
    old["optim"]["steps"] = 2
    assert resume_differences(old, config) == ["task.num_problems"]
    assert ("run", "answer_log_every") in RESUME_FREE and ("optim", "steps") in RESUME_FREE
    assert resume_differences({}, TrainConfig()) == []  # an empty file: every key its default


def test_resume_of_a_run_written_before_the_task_fields(tmp_path):
    run = tmp_path / "run"
    steps2 = [a if a != "optim.steps=4" else "optim.steps=2" for a in RL]
    train(_cfg(run, *steps2))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["task"] = {k: saved["task"][k] for k in ("spec", "split", "num_problems")}  # the older layout
    del saved["run"]["answer_log_every"], saved["run"]["answer_log_samples"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    result = train(_cfg(run, *RL), resume=True)
    assert result.resumed_from == run / "step-000002" and [h.step for h in result.history] == [3, 4]
    # a real change is still refused, named
    with pytest.raises(ConfigError, match=r"--resume with a different config \(task.num_problems\)"):
        train(_cfg(run, *RL, "task.num_problems=8"), resume=True)
