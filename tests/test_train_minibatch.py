"""PPO mini-batches (``optim.ppo_mini_batch_size``): several optimizer steps per rollout batch."""

import copy

import pytest
import torch

from opdgeo.errors import ConfigError
from opdgeo.training import checkpointing as ckpt
from opdgeo.training.config import load_config
from opdgeo.training.loop import (
    inference_model,
    load_policy,
    micro_batch_seed,
    mini_batch_order,
    mini_batch_share,
    rollout_micro_batch,
    score_micro_batch,
    step_prompts,
    train,
    with_advantages,
)

SPEC = "arithmetic:difficulty=1,ops=+"
CPU = torch.device("cpu")


def _cfg(out, teacher_dir, *extra):
    return load_config(None, ["model.student=tiny:quick", f"task.spec={SPEC}", "task.num_problems=32",
                              "run.progress=false", f"run.out_dir={out}", "objective=opd",
                              f"model.teacher={teacher_dir}", "optim.batch_size=2", "optim.micro_batch_size=1",
                              "rollout.group_size=2", "rollout.max_new_tokens=8", "optim.lr=1e-2",
                              "optim.bf16_autocast=false", "checkpoint.dtype=float32", *extra])


def test_mini_batch_size_is_validated():
    base = ["model.student=tiny:quick", f"task.spec={SPEC}", "optim.batch_size=8", "optim.micro_batch_size=2"]
    for bad in (3, 6, 1, 16, 0):  # not dividing 8, or not a multiple of 2
        with pytest.raises(ConfigError, match=r"optim.ppo_mini_batch_size: must divide optim.batch_size = 8"):
            load_config(None, [*base, f"optim.ppo_mini_batch_size={bad}"])
    assert load_config(None, [*base, "optim.ppo_mini_batch_size=4"]).optim.ppo_mini_batch_size == 4
    o = load_config(None, [*base, "optim.ppo_mini_batch_size=2"]).optim  # 4 mini-batches of 1 micro-batch
    assert mini_batch_share(4, o, 1) == 1
    with pytest.raises(ConfigError, match="1 micro-batches per mini-batch cannot be split evenly over 2 processes"):
        mini_batch_share(4, o, 2)


def test_mini_batch_order_partitions_balances_and_is_seeded():
    assert mini_batch_order(6, 1, seed=0, step=3, epoch=1) == [(0, 1, 2, 3, 4, 5)]  # the default: one step, in order
    order = mini_batch_order(8, 2, seed=0, step=0, epoch=0)
    assert sorted(p for m in order for p in m) == list(range(8)) and all(len(m) == 4 for m in order)
    for m in order:  # one micro-batch of every block of 2, so ranks {0..3} and {4..7} hold 2 each
        assert [p // 2 for p in m] == [0, 1, 2, 3]
        assert sum(p < 4 for p in m) == 2
    assert mini_batch_order(8, 2, seed=0, step=0, epoch=0) == order  # a pure function (resume)
    draws = {tuple(mini_batch_order(8, 2, seed=0, step=s, epoch=e)) for s in range(4) for e in range(2)}
    assert len(draws) > 1  # shuffled per step and pass


def _master(run):
    return ckpt.load_trainer_state(run / "step-000001").master


def test_whole_batch_mini_batch_is_the_default_step(tmp_path, teacher_dir):
    train(_cfg(tmp_path / "a", teacher_dir, "optim.steps=1"))
    train(_cfg(tmp_path / "b", teacher_dir, "optim.steps=1", "optim.ppo_mini_batch_size=2"))
    a, b = _master(tmp_path / "a"), _master(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    drop = ("train/step_time", "train/tokens_per_s")
    ra, rb = (ckpt.read_metrics(tmp_path / r / "metrics.jsonl") for r in "ab")
    assert [{k: v for k, v in r.items() if k not in drop} for r in ra] == \
        [{k: v for k, v in r.items() if k not in drop} for r in rb]


def _rollouts(cfg, teacher_dir):
    """The rollout batch of step 0, through the loop's own stages (before any update)."""
    from opdgeo.training.data import training_problems

    student, tok = load_policy("tiny:quick")
    student = student.float().eval()
    teacher = inference_model(load_policy(str(teacher_dir))[0], cfg, CPU)
    data = training_problems(cfg)
    prompts = step_prompts(len(data.problems), 2, 0, cfg.run.seed)
    batches = []
    for c in range(2):
        mb = rollout_micro_batch(student, tok, data.task, data.problems, prompts[c:c + 1], rollout=cfg.rollout,
                                 seed=micro_batch_seed(cfg.run.seed, 0, c), device=CPU, bf16=False)
        mb = score_micro_batch(mb, student=student, teacher=teacher, task=data.task, problems=data.problems,
                               objective=cfg.objective, off_policy=False, device=CPU, bf16=False)
        batches.append(with_advantages(mb, cfg.objective, group_size=cfg.rollout.group_size))
    return student, batches


def _sequential_steps(student, groups, lr=1e-2):
    """Independent reference: one AdamW step per group of micro-batches, each on the clipped
    surrogate's token mean over that group, with the rollout-time old log-probs."""
    from opdgeo.training.rollout import sequence_logprobs

    model = copy.deepcopy(student).train(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    for group in groups:
        total = sum(mb.loss_mask.sum() for mb in group).double()
        loss = 0.0
        for mb in group:
            lp = sequence_logprobs(model, mb.input_ids, mb.attention_mask, mb.response_mask)
            m = mb.loss_mask
            ratio = torch.exp(torch.where(m, lp - mb.old_logprobs, 0.0))
            a = torch.where(m, mb.advantages, 0.0)
            obj = torch.minimum(ratio * a, ratio.clamp(1 - 0.2, 1 + 0.28) * a)
            loss = loss + -(obj * m).sum() / total
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
        opt.step()
        opt.zero_grad()
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_two_mini_batches_equal_two_sequential_steps(tmp_path, teacher_dir):
    cfg = _cfg(tmp_path / "run", teacher_dir, "optim.steps=1", "optim.ppo_mini_batch_size=1")
    result = train(cfg)
    got = _master(tmp_path / "run")
    student, batches = _rollouts(cfg, teacher_dir)
    assert all(mb.loss_mask.any() for mb in batches) and all(mb.old_logprobs is not None for mb in batches)
    order = [m[0] for m in mini_batch_order(2, 2, seed=cfg.run.seed, step=0, epoch=0)]
    want = _sequential_steps(student, [[batches[c]] for c in order])
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)
    # negative controls: the other order, and one step on the whole batch, land elsewhere
    for other in ([[batches[c]] for c in reversed(order)], [batches]):
        ref = _sequential_steps(student, other)
        assert max((ref[k] - got[k]).abs().max().item() for k in got) > 1e-4
    rec = result.history[0].values
    assert rec["train/tokens"] == sum(float(mb.loss_mask.sum()) for mb in batches)


def test_mini_batch_resume_equals_uninterrupted(tmp_path, teacher_dir):
    common = ["optim.steps=2", "optim.ppo_mini_batch_size=1", "optim.ppo_epochs=2", "checkpoint.every=1"]
    train(_cfg(tmp_path / "full", teacher_dir, *common))
    train(_cfg(tmp_path / "cut", teacher_dir, *[c for c in common if c != "optim.steps=2"], "optim.steps=1"))
    train(_cfg(tmp_path / "cut", teacher_dir, *common), resume=True)
    full = ckpt.load_trainer_state(tmp_path / "full" / "step-000002")
    cut = ckpt.load_trainer_state(tmp_path / "cut" / "step-000002")
    assert all(torch.equal(cut.master[k], v) for k, v in full.master.items())


@pytest.mark.parametrize("mini", [None, 1])
def test_sft_steps_are_cross_entropy_steps(tmp_path, teacher_dir, mini):
    """SFT goes through the clipped surrogate with weight 1 on demonstration tokens; its
    steps are AdamW steps on the cross-entropy token mean (one per mini-batch)."""
    from opdgeo.training.data import training_problems
    from opdgeo.training.loop import demonstration_micro_batch
    from opdgeo.training.rollout import sequence_logprobs

    extra = [] if mini is None else [f"optim.ppo_mini_batch_size={mini}"]
    cfg = _cfg(tmp_path / "run", teacher_dir, "objective=sft", "optim.steps=1", *extra)
    result = train(cfg)
    got = _master(tmp_path / "run")
    student, tok = load_policy("tiny:quick")
    data = training_problems(cfg)
    prompts = step_prompts(len(data.problems), 2, 0, cfg.run.seed)
    batches = [demonstration_micro_batch(tok, data.task, data.problems, prompts[c:c + 1], device=CPU) for c in range(2)]
    groups = [batches] if mini is None else \
        [[batches[c] for c in m] for m in mini_batch_order(2, 2, seed=cfg.run.seed, step=0, epoch=0)]
    model = copy.deepcopy(student).float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    nll = []
    for group in groups:
        total = sum(mb.response_mask.sum() for mb in group).double()
        loss = sum(-torch.where(mb.response_mask, sequence_logprobs(model, mb.input_ids, mb.attention_mask,
                                                                    mb.response_mask), 0.0).sum() for mb in group) / total
        nll.append((float(loss.detach()), float(total)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
        opt.step()
        opt.zero_grad()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)
    moved = max((got[k] - student.state_dict()[k].float()).abs().max().item() for k in got)
    assert moved > 1e-3
    rec = result.history[0].values
    tokens = sum(t for _, t in nll)
    want = sum(v * t for v, t in nll) / tokens  # each step's token mean, weighted by its tokens
    assert rec["train/loss"] == rec["sft/nll"] == pytest.approx(want, rel=1e-5)
    assert "train/ratio_mean" not in rec and "rlvr/reward" not in rec
