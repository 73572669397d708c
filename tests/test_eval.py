"""Evaluation: avg@k arithmetic, JSONL records, a trained model beats an untrained one, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from opdgeo.cli.main import main
from opdgeo.errors import ConfigError
from opdgeo.models import build_model, char_tokenizer, tiny_qwen3_config
from opdgeo.tasks import ArithmeticTask
from opdgeo.training.evaluate import avg_at_k, evaluate

TASK1 = "arithmetic:difficulty=1,seed=0,ops=+"




@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def untrained(tok):
    return build_model(tiny_qwen3_config("quick", len(tok)), seed=0)


class AlwaysRight(ArithmeticTask):
    def reward(self, response, problem):
        return 1.0


class FirstCharIsLetter(ArithmeticTask):
    """Reward depends on the sample, so per-sample bookkeeping is visible."""

    def reward(self, response, problem):
        return 1.0 if response[:1].isalpha() else 0.0


def test_avg_at_k_hand_computed():
    assert avg_at_k([[1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0]]) == pytest.approx(0.5)
    assert avg_at_k([[1.0]]) == 1.0
    assert math.isnan(avg_at_k([]))


def test_stub_task_always_right(untrained, tok, tmp_path):
    res = evaluate(untrained, tok, AlwaysRight(difficulty=1, ops="+"), n=5, k=3, temperature=1.0,
                   max_new_tokens=6, seed=0, batch_size=7, out=tmp_path / "r.jsonl")
    assert res.avg_at_k == res.pass_at_1 == 1.0 and (res.n, res.k) == (5, 3)
    lines = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(lines) == 5 and all(len(x["samples"]) == 3 and x["accuracy"] == 1.0 for x in lines)
    assert [x["id"] for x in lines] == [p.id for p in AlwaysRight(difficulty=1, ops="+").problems("test", 5)]


def test_per_sample_rewards_and_records(untrained, tok):
    task = FirstCharIsLetter(difficulty=2)
    res = evaluate(untrained, tok, task, n=6, k=4, temperature=3.0, max_new_tokens=5, seed=1, batch_size=8)
    flat = [r for rec in res.records for r in rec["rewards"]]
    assert 0 < sum(flat) < len(flat)  # mixed outcomes at T=3 over 99 tokens (52 letters)
    for rec in res.records:
        assert rec["rewards"] == [1.0 if s[:1].isalpha() else 0.0 for s in rec["samples"]]
        assert rec["accuracy"] == sum(rec["rewards"]) / 4
    assert res.avg_at_k == pytest.approx(sum(flat) / len(flat))  # equal k: avg@k is the sample mean
    assert 1 <= res.mean_response_tokens <= 5 and 0 <= res.truncated_fraction <= 1
    again = evaluate(untrained, tok, task, n=6, k=4, temperature=3.0, max_new_tokens=5, seed=1, batch_size=8)
    assert again.records == res.records


def test_eval_rejects_bad_arguments(untrained, tok):
    with pytest.raises(ConfigError, match="k must be"):
        evaluate(untrained, tok, ArithmeticTask(), n=1, k=0)
    with pytest.raises(ConfigError, match="unknown split"):
        evaluate(untrained, tok, ArithmeticTask(), split="dev", n=1)


def _sft(model, tok, task, steps, lr=3e-3, batch=32, seed=0):
    """A minimal SFT loop on the task's demonstrations (cross-entropy on all tokens)."""
    texts = [task.format_prompt(p, tok) + task.demonstration(p) + tok.eos_token for p in task.problems("train", 70)]
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(texts), (batch,), generator=g).tolist()
        enc = tok([texts[i] for i in idx], padding=True, padding_side="right", return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_trained_model_beats_untrained(tok, untrained):
    task = ArithmeticTask(difficulty=1, seed=0, ops="+")
    before = evaluate(untrained, tok, task, n=10, max_new_tokens=24)
    trained = _sft(build_model(tiny_qwen3_config("quick", len(tok)), seed=0), tok, task, steps=300)
    after = evaluate(trained, tok, task, n=10, max_new_tokens=24)
    assert before.avg_at_k == 0.0
    assert after.avg_at_k >= 0.2
    assert all(s.startswith(p["prompt"][0]) or "Answer: " in s for p in after.records for s in p["samples"])
    assert after.truncated_fraction == 0.0  # it learned to stop


@pytest.fixture(scope="module")
def saved_model(tok, untrained, tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    untrained.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_cli_eval(saved_model, tmp_path, capsys):
    folder = saved_model
    out = tmp_path / "res" / "results.jsonl"
    main(["eval", str(folder), "--task", TASK1, "--n", "4", "--k", "2", "--temperature", "1.0",
          "--max-new-tokens", "8", "--out", str(out)])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"{folder}: avg@2 (pass@1) = 0.0000 on 4 test problems of arithmetic:difficulty=1")
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(records) == 4 and all(len(r["samples"]) == 2 for r in records)
    summary = json.loads(out.with_name("results.jsonl.summary.json").read_text())
    assert summary["k"] == 2 and summary["n"] == 4 and summary["avg_at_k"] == 0.0


@pytest.mark.parametrize("args,msg", [
    (["eval", "/nonexistent/model"], "/nonexistent/model: no such file or directory"),
    (["eval", "MODEL", "--task", "arithmetic:difficulty=0"], "difficulty must be"),
    (["eval", "MODEL", "--k", "0", "--n", "1"], "k must be"),
])
def test_cli_eval_user_errors_exit_2(saved_model, capsys, args, msg):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([str(saved_model) if a == "MODEL" else a for a in args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("opdgeo: error: ") and msg in last
