"""Policy-gradient / SFT losses and the reduction against hand computations."""

import pytest
import torch

from opdgeo.training.losses import masked_mean, policy_gradient_loss, sft_loss


def _pg(lp, old, adv, mask=None, **kw):
    lp = torch.tensor([lp], dtype=torch.float64)
    old = torch.tensor([old], dtype=torch.float64)
    adv = torch.tensor([adv], dtype=torch.float64)
    mask = torch.ones_like(lp, dtype=torch.bool) if mask is None else torch.tensor([mask])
    return policy_gradient_loss(lp, old, adv, mask, **kw)


@pytest.mark.parametrize(
    "ratio, adv, clipped_value, is_clipped",
    [
        (1.5, 2.0, 1.28 * 2.0, True),  # A > 0, above 1 + eps_high: clipped
        (0.5, 2.0, 0.5 * 2.0, False),  # A > 0, below 1 - eps_low: unclipped (min picks rho*A)
        (0.5, -2.0, 0.8 * -2.0, True),  # A < 0, below 1 - eps_low: clipped
        (1.5, -2.0, 1.5 * -2.0, False),  # A < 0, above 1 + eps_high: unclipped
        (1.1, 2.0, 1.1 * 2.0, False),  # inside the range
    ],
)
def test_ppo_clipping_branches(ratio, adv, clipped_value, is_clipped):
    # float64 elementwise arithmetic of a few operations (exp, log, min, clamp): exact to a
    # few ulp on any platform, so 1e-12 relative still leaves ~1e4 ulp of margin
    import math

    lp = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 1, dtype=torch.float64)
    out = policy_gradient_loss(lp, old, torch.tensor([[adv]], dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool))
    assert out.loss.item() == pytest.approx(-clipped_value, rel=1e-12)
    assert out.ratio.item() == pytest.approx(ratio, rel=1e-12)
    assert out.clipped.item() is is_clipped
    out.loss.sum().backward()
    # d/dlp of -rho*A = -rho*A when unclipped; 0 when clipped
    assert lp.grad.item() == pytest.approx(0.0 if is_clipped else -ratio * adv, abs=1e-12)


def test_asymmetric_range_uses_eps_high_above_and_eps_low_below():
    out = _pg([0.0], [0.0], [1.0])
    assert out.loss.tolist() == [[-1.0]]
    import math

    above = _pg([math.log(1.25)], [0.0], [1.0])  # inside [0.8, 1.28]: not clipped
    assert not above.clipped.item()
    above2 = _pg([math.log(1.25)], [0.0], [1.0], eps_high=0.2)
    assert above2.clipped.item() and above2.loss.item() == pytest.approx(-1.2)


def test_pg_gradient_equals_sft_gradient_when_adv_one_and_ratio_one():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, dtype=torch.float64)
    tokens = torch.randint(0, 11, (3, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)

    def grad(fn):
        x = logits.clone().requires_grad_(True)
        lp = torch.log_softmax(x, -1).gather(-1, tokens[..., None]).squeeze(-1)
        masked_mean(fn(lp), mask).backward()
        return x.grad

    g_sft = grad(lambda lp: sft_loss(lp, mask))
    g_pg = grad(lambda lp: policy_gradient_loss(lp, lp.detach(), torch.ones_like(lp), mask).loss)
    assert g_sft.abs().max() > 1e-3
    # the same float64 log-softmax backward either way, differing only by multiplications
    # with exact ones (ratio exp(0) = 1, advantage 1): equal to a few ulp
    torch.testing.assert_close(g_pg, g_sft, rtol=1e-12, atol=1e-14)
    # and a negative advantage flips it (a wrong sign would fail the test above)
    g_neg = grad(lambda lp: policy_gradient_loss(lp, lp.detach(), -torch.ones_like(lp), mask).loss)
    torch.testing.assert_close(g_neg, -g_sft, rtol=1e-12, atol=1e-14)


def test_sft_loss_and_masked_mean_hand_values():
    lp = torch.tensor([[-1.0, -2.0, float("-inf")], [-3.0, float("nan"), -5.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    per = sft_loss(lp, mask)
    assert per.tolist() == [[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]]
    assert masked_mean(per, mask).item() == pytest.approx(2.0)
    assert masked_mean(per, mask, denominator=6).item() == pytest.approx(1.0)


def test_fully_masked_batch_is_zero_without_nan():
    lp = torch.full((2, 4), float("-inf"), requires_grad=True)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    out = policy_gradient_loss(lp, torch.zeros(2, 4), torch.ones(2, 4), mask)
    loss = masked_mean(out.loss, mask)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(lp.grad, torch.zeros(2, 4))
    assert masked_mean(sft_loss(lp, mask), mask, denominator=0).item() == 0.0
    assert not out.clipped.any() and torch.equal(out.ratio, torch.zeros(2, 4))


def test_split_reduction_with_global_denominator_equals_full_mean():
    torch.manual_seed(1)
    v = torch.randn(6, 5, dtype=torch.float64)
    m = torch.rand(6, 5) > 0.4
    full = masked_mean(v, m)
    d = int(m.sum())
    parts = masked_mean(v[:2], m[:2], denominator=d) + masked_mean(v[2:], m[2:], denominator=d)
    # a float64 sum of 30 terms regrouped: the two orders differ by at most ~30 ulp
    assert parts.item() == pytest.approx(full.item(), rel=1e-14)
    # the per-part mean (the classic mistake) is different
    wrong = (masked_mean(v[:2], m[:2]) + masked_mean(v[2:], m[2:])) / 2
    assert abs(wrong.item() - full.item()) > 1e-6


def test_validation():
    with pytest.raises(ValueError):
        policy_gradient_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 2), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError):
        policy_gradient_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), eps_low=1.5)
    with pytest.raises(ValueError):
        masked_mean(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), denominator=-1)
