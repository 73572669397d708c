"""GRPO / OPD advantages against hand computations and float64 numpy."""

import math

import numpy as np
import pytest
import torch

from opdgeo.training.advantages import (
    broadcast_to_tokens,
    combine_advantages,
    grpo_advantages,
    opd_advantages,
)


def test_grpo_hand_computed_sample_std():
    # group 1: rewards 1,0,0,1 -> mean .5, sample std sqrt(1/3); group 2 all 1 -> dropped
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv, keep = grpo_advantages(rewards, 4, eps=0.0)
    s = math.sqrt((4 * 0.25) / 3)
    expected = [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0, 0, 0, 0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    assert keep.tolist() == [True] * 4 + [False] * 4


def test_grpo_population_std_and_eps_match_numpy():
    rng = np.random.default_rng(0)
    r = rng.integers(0, 2, size=(5, 6)).astype(np.float64)
    r[0] = [0, 0, 0, 0, 0, 1]
    for std, ddof in (("population", 0), ("sample", 1)):
        adv, keep = grpo_advantages(torch.tensor(r.reshape(-1)), 6, eps=1e-2, std=std)
        ref = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=ddof, keepdims=True) + 1e-2)
        varying = r.max(1) != r.min(1)
        ref[~varying] = 0.0
        np.testing.assert_allclose(adv.numpy(), ref.reshape(-1), rtol=1e-6, atol=1e-7)
        assert keep.numpy().tolist() == np.repeat(varying, 6).tolist()
    # population vs sample really differ (a wrong normalizer is caught)
    a_pop, _ = grpo_advantages(torch.tensor(r[0]), 6, eps=0.0, std="population")
    a_smp, _ = grpo_advantages(torch.tensor(r[0]), 6, eps=0.0, std="sample")
    assert a_pop[5].item() == pytest.approx(math.sqrt(6 / 5) * a_smp[5].item(), rel=1e-6)


def test_grpo_no_filtering_keeps_zero_variance_groups_with_zero_advantage():
    adv, keep = grpo_advantages(torch.tensor([0.0, 0.0, 1.0, 0.0]), 2, filter_zero_variance=False)
    assert keep.all()
    assert adv[:2].tolist() == [0.0, 0.0]
    assert adv[2].item() > 0 > adv[3].item()


def test_grpo_group_size_one_and_validation():
    adv, keep = grpo_advantages(torch.tensor([1.0, 0.0]), 1)
    assert adv.tolist() == [0.0, 0.0] and not keep.any()
    with pytest.raises(ValueError):
        grpo_advantages(torch.ones(5), 2)
    with pytest.raises(ValueError):
        grpo_advantages(torch.ones(2, 2), 2)
    with pytest.raises(ValueError):
        grpo_advantages(torch.tensor([1.0, float("nan")]), 2)


def test_opd_advantage_sign_and_teacher_equals_student():
    s = torch.tensor([[-1.0, -2.0, -0.5]])
    t = torch.tensor([[-0.5, -3.0, float("-inf")]])
    mask = torch.tensor([[True, True, False]])
    a = opd_advantages(s, t, mask)
    # A = -(s - t) = t - s: teacher likes token 0 more -> positive
    assert a.tolist() == [[0.5, -1.0, 0.0]]
    x = torch.randn(4, 7, requires_grad=True)
    z = opd_advantages(x, x.detach().clone())
    assert torch.equal(z, torch.zeros(4, 7)) and not z.requires_grad


def test_broadcast_and_combine():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    b = broadcast_to_tokens(torch.tensor([2.0, -1.0]), mask)
    assert b.tolist() == [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]
    opd = torch.randn(2, 3)
    rl = torch.randn(2, 3)
    assert torch.equal(combine_advantages({"opd": opd, "rlvr": rl}, {"opd": 1.0, "rlvr": 0.0}), opd)
    assert torch.equal(combine_advantages({"opd": opd, "rlvr": rl}, {"opd": 0.0, "rlvr": 1.0}), rl)
    mix = combine_advantages({"opd": opd, "rlvr": rl}, {"opd": 0.25, "rlvr": 0.75})
    torch.testing.assert_close(mix, 0.25 * opd + 0.75 * rl)
    with pytest.raises(ValueError):
        combine_advantages({"opd": opd}, {"rlvr": 1.0})
    with pytest.raises(ValueError):
        combine_advantages({"opd": opd}, {"opd": 0.0})
