"""The recipe on tiny CPU models: accumulation invariance, ratio = 1, resume, refusals."""

import dataclasses

import pytest
import torch

from opdgeo.errors import ConfigError
from opdgeo.training import checkpointing as ckpt
from opdgeo.training.config import load_config
from opdgeo.training.loop import (
    Hooks,
    MicroBatch,
    backward_micro_batches,
    demonstration_batch,
    learning_rate,
    rank_micro_batches,
    step_prompts,
    train,
)

SPEC = "arithmetic:difficulty=1,ops=+"


def _cfg(out, *extra):
    return load_config(None, ["model.student=tiny:quick", f"task.spec={SPEC}", "task.num_problems=32",
                              "run.progress=false", f"run.out_dir={out}", *extra])


def _micro_batch(seed=0):
    from opdgeo.models import char_tokenizer

    tok = char_tokenizer()
    g = torch.Generator().manual_seed(seed)
    prompts = ["1+2=\n", "13+4=\n", "7+7=\n", "0+9=\n", "5+51=\n", "8+1=\n"]
    responses = ["1+2=3\nAnswer: 3", "3+4=7\nAnswer: 17", "14", "9", "Answer: 56", "8+1=9\nAnswer: 9"]
    ids, att, resp = demonstration_batch(tok, prompts, responses)
    n, T = resp.shape
    adv = torch.randn(n, T, generator=g)
    old = -torch.rand(n, T, generator=g) * 3  # ratio far from 1: both clip branches occur
    loss_mask = resp & (torch.rand(n, T, generator=g) > 0.2)
    return MicroBatch(input_ids=ids, attention_mask=att, response_mask=resp, problem_index=torch.arange(n),
                      old_logprobs=old, advantages=adv, loss_mask=loss_mask)


def _rows(mb, rows):
    return dataclasses.replace(mb, **{f.name: getattr(mb, f.name)[rows] for f in dataclasses.fields(mb)
                                      if isinstance(getattr(mb, f.name), torch.Tensor)})


def test_demonstration_batch_layout():
    from opdgeo.models import char_tokenizer

    tok = char_tokenizer()
    ids, att, resp = demonstration_batch(tok, ["12+3=\n", "1+1=\n"], ["15", "Answer: 2"])
    assert ids.shape == (2, 6 + 10) and resp.shape == (2, 10)
    assert tok.decode(ids[1, 1:6]) == "1+1=\n" and ids[1, 0] == tok.pad_token_id and att[1, 0] == 0
    assert tok.decode(ids[0, 6:8]) == "15" and ids[0, 8] == tok.eos_token_id
    assert resp[0].tolist() == [True] * 3 + [False] * 7 and resp[1].sum() == 10


@pytest.mark.parametrize("objective", ["rlvr", "sft"])
def test_micro_batching_with_accumulation_equals_full_batch(objective):
    from opdgeo.models import build_model, char_tokenizer, tiny_qwen3_config

    model = build_model(tiny_qwen3_config("quick", len(char_tokenizer())), seed=0)
    mb = _micro_batch()
    if objective == "sft":  # demonstrations: weight 1 on the counted tokens, no log-probs recorded at rollout
        mb = dataclasses.replace(mb, advantages=mb.loss_mask.float(), old_logprobs=None)
    n_tokens = float(mb.loss_mask.sum())
    cpu = torch.device("cpu")

    def grads(batches):
        model.zero_grad(set_to_none=True)
        sums = backward_micro_batches(model, batches, clip=(0.2, 0.28), global_tokens=n_tokens, device=cpu, bf16=False)
        return {k: p.grad.clone() for k, p in model.named_parameters()}, sums

    full, s_full = grads([mb])
    split, s_split = grads([_rows(mb, slice(0, 2)), _rows(mb, slice(2, 3)), _rows(mb, slice(3, 6))])
    for k in full:
        torch.testing.assert_close(split[k], full[k], rtol=1e-5, atol=1e-7)
    key = "nll" if objective == "sft" else "loss"
    assert s_split[key] == pytest.approx(s_full[key], rel=1e-5)
    # the reference: the token-level mean over the whole batch, computed independently
    from opdgeo.training.rollout import sequence_logprobs

    model.zero_grad(set_to_none=True)
    lp = sequence_logprobs(model, mb.input_ids, mb.attention_mask, mb.response_mask)
    if objective == "sft":  # the cross-entropy: its gradient is the loop's, through the clipped surrogate
        ref = -(torch.where(mb.loss_mask, lp, 0.0)).sum() / n_tokens
        ref.backward()
        for k, p in model.named_parameters():
            torch.testing.assert_close(full[k], p.grad, rtol=1e-5, atol=1e-7)
        assert s_full["ratio"] == n_tokens and s_full["clipped"] == 0  # ratio exactly 1 on every token
    else:
        lp = lp.double()
        ratio = torch.exp(lp - mb.old_logprobs.double())
        a = mb.advantages.double()
        ref = -(torch.minimum(ratio * a, ratio.clamp(0.8, 1.28) * a) * mb.loss_mask).sum() / n_tokens
        assert 0 < s_full["clipped"] < n_tokens
    assert s_full[key] == pytest.approx(ref.item(), rel=1e-5)
    # a per-micro-batch mean (the classic mistake) would differ
    per_mb = [_rows(mb, slice(0, 2)), _rows(mb, slice(2, 6))]
    wrong = sum(backward_micro_batches(model, [b], clip=(0.2, 0.28), global_tokens=float(b.loss_mask.sum()),
                                       device=cpu, bf16=False)[key] for b in per_mb) / 2
    assert abs(wrong - s_full[key]) > 1e-4


def test_schedule_prompts_and_rank_split():
    kw = dict(lr=1.0, steps=10, warmup_steps=2, min_lr=0.1)
    assert [learning_rate(s, schedule="constant", **kw) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert learning_rate(2, schedule="cosine", **kw) == pytest.approx(1.0)
    assert learning_rate(9, schedule="cosine", **kw) == pytest.approx(0.1)
    assert learning_rate(5, schedule="cosine", **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 3 / 7)).item()))
    # epochs of permutations: every problem once per epoch, deterministic
    seen = sum((step_prompts(10, 5, s, seed=3) for s in range(2)), [])
    assert sorted(seen) == list(range(10)) and step_prompts(10, 5, 1, seed=3) == seen[5:]
    assert step_prompts(10, 5, 0, seed=4) != seen[:5]
    assert list(rank_micro_batches(4, 1, 2)) == [2, 3]
    with pytest.raises(ConfigError, match="processes"):
        rank_micro_batches(3, 0, 2)


def test_opd_ratio_is_one_at_first_inner_step_and_metrics(tmp_path, teacher_dir):
    cfg = _cfg(tmp_path / "run", "objective=opd", f"model.teacher={teacher_dir}", "optim.steps=2", "optim.batch_size=2",
               "optim.micro_batch_size=1", "rollout.group_size=2", "rollout.max_new_tokens=8", "optim.ppo_epochs=2",
               "optim.lr=1e-2")
    result = train(cfg)
    recs = ckpt.read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        assert r["train/ratio_mean"] == 1.0 and r["train/clip_frac"] == 0.0  # exactly, on CPU
        # at ratio 1 the OPD surrogate loss is the mean gap: -mean(A) = mean(s - t)
        assert r["train/loss"] == pytest.approx(r["opd/teacher_gap"], rel=1e-5, abs=1e-7)
        assert r["train/tokens"] > 0 and r["train/lr"] == 1e-2
        assert {"rlvr/reward", "rlvr/accuracy", "train/step_time", "train/tokens_per_s", "train/grad_norm"} <= set(r)
    assert [p.name for p in result.checkpoints] == ["step-000002"]
    assert (tmp_path / "run" / "config.yaml").is_file()
    # the run folder is not overwritten by accident
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg)


def test_resume_equals_uninterrupted(tmp_path, teacher_dir):
    common = ["objective=opd", f"model.teacher={teacher_dir}", "optim.steps=4", "optim.batch_size=2",
              "optim.micro_batch_size=1", "rollout.group_size=2", "rollout.max_new_tokens=6", "optim.lr=1e-2",
              "optim.schedule=cosine", "optim.warmup_steps=1", "checkpoint.every=2", "checkpoint.dtype=float32"]
    train(_cfg(tmp_path / "full", *common))

    class Killed(Exception):
        pass

    def die_at_step_3(ctx):
        if ctx.step == 3:
            raise Killed

    with pytest.raises(Killed):
        train(_cfg(tmp_path / "cut", *common), hooks=Hooks(after_backward=die_at_step_3))
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "cut")] == [2]
    resumed = train(_cfg(tmp_path / "cut", *common), resume=True)
    assert resumed.resumed_from == tmp_path / "cut" / "step-000002"
    assert [h.step for h in resumed.history] == [3, 4]
    full = ckpt.load_trainer_state(tmp_path / "full" / "step-000004")
    cut = ckpt.load_trainer_state(tmp_path / "cut" / "step-000004")
    for k, v in full.master.items():
        assert torch.equal(cut.master[k], v), k  # bit for bit on CPU
    a = ckpt.read_metrics(tmp_path / "full" / "metrics.jsonl")
    b = ckpt.read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    drop = ("train/step_time", "train/tokens_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == [{k: v for k, v in r.items() if k not in drop} for r in b]
    # resuming a finished run does nothing
    assert train(_cfg(tmp_path / "cut", *common), resume=True).history == ()


def test_teacher_with_another_tokenizer_is_refused(tmp_path, teacher_dir):
    import shutil

    from opdgeo.models import load_tokenizer

    other = tmp_path / "other"
    shutil.copytree(teacher_dir, other)
    tok = load_tokenizer(other)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    cfg = _cfg(tmp_path / "run", "objective=opd", f"model.teacher={other}", "optim.steps=1", "optim.batch_size=1",
               "optim.micro_batch_size=1", "rollout.group_size=2")
    with pytest.raises(ConfigError, match="tokenizers differ"):
        train(cfg)
    assert not ckpt.list_checkpoints(tmp_path / "run")


def test_the_loss_forward_keeps_no_autocast_weight_casts():
    """Under bf16 autocast the differentiable forward runs without autocast's cast cache
    (with activation checkpointing it would hold a bf16 copy of every weight until the
    forward ends), and its log-probs are the same bits as a cached forward's."""
    from opdgeo.models import build_model, char_tokenizer, tiny_qwen3_config
    from opdgeo.training.precision import autocast_context
    from opdgeo.training.rollout import sequence_logprobs

    model = build_model(tiny_qwen3_config("quick", len(char_tokenizer())), seed=0)
    mb = _micro_batch()
    seen = []
    hook = model.model.layers[0].register_forward_hook(
        lambda *_: seen.append((torch.is_autocast_enabled("cpu"), torch.is_autocast_cache_enabled())))
    backward_micro_batches(model, [mb], clip=(0.2, 0.28), global_tokens=float(mb.loss_mask.sum()),
                           device=torch.device("cpu"), bf16=True)
    hook.remove()
    assert seen == [(True, False)]
    with torch.no_grad():
        with autocast_context(True, "cpu"):
            cached = sequence_logprobs(model, mb.input_ids, mb.attention_mask, mb.response_mask)
        with autocast_context(True, "cpu", cache=False):
            uncached = sequence_logprobs(model, mb.input_ids, mb.attention_mask, mb.response_mask)
    assert torch.equal(cached, uncached)
