"""Token sparsification, the off-policy clip range and objective mixing (SPEC §3 Controls)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from opdgeo.training.advantages import combine_advantages
from opdgeo.training.controls import (
    keep_counts,
    mixed_keep_mask,
    random_keep_mask,
    rescale_kept,
    sparsify_stats,
    sparsify_sums,
    topkl_keep_mask,
)
from opdgeo.training.config import config_from_dict
from opdgeo.training.loop import clip_range
from opdgeo.training.losses import policy_gradient_loss

# Two samples: row 0 has 6 response tokens, row 1 has 3 (then padding with junk gaps).
GAPS = torch.tensor(
    [
        [0.5, -1.0, 2.0, 0.5, 3.0, -0.2],
        [-0.3, -0.1, -0.2, float("nan"), 99.0, float("inf")],
    ]
)
RESP = torch.tensor(
    [
        [True, True, True, True, True, True],
        [True, True, True, False, False, False],
    ]
)




def _kept(mask):
    return [torch.nonzero(row).flatten().tolist() for row in mask]


def test_keep_counts_ceil_and_float_safety():
    resp = torch.zeros(6, 100, dtype=torch.bool)
    for i, t in enumerate([0, 1, 3, 8, 10, 100]):
        resp[i, :t] = True
    assert keep_counts(resp, 0.5).tolist() == [0, 1, 2, 4, 5, 50]
    assert keep_counts(resp, 0.25).tolist() == [0, 1, 1, 2, 3, 25]
    assert keep_counts(resp, 1.0).tolist() == [0, 1, 3, 8, 10, 100]
    # 0.55 * 100 == 55.00000000000001 in binary floating point; must keep 55, not 56.
    assert 0.55 * 100 > 55
    assert keep_counts(resp, 0.55).tolist() == [0, 1, 2, 5, 6, 55]
    with pytest.raises(ValueError):
        keep_counts(resp, 0.0)
    with pytest.raises(ValueError):
        keep_counts(resp, 1.5)


def test_topkl_keeps_largest_signed_gaps_hand_example():
    m = topkl_keep_mask(GAPS, RESP, 0.5)
    # row 0: k = 3 of [0.5, -1, 2, 0.5, 3, -0.2] -> 3.0 (4), 2.0 (2), then the tie 0.5 at
    # positions 0 and 3 -> the earlier one (0). Row 1: k = ceil(1.5) = 2 of
    # [-0.3, -0.1, -0.2] -> signed largest are -0.1 (1) and -0.2 (2), not |r| largest;
    # padding junk (nan, 99, inf) is ignored.
    assert _kept(m) == [[0, 2, 4], [1, 2]]
    m25 = topkl_keep_mask(GAPS, RESP, 0.25)
    assert _kept(m25) == [[2, 4], [1]]
    assert torch.equal(topkl_keep_mask(GAPS, RESP, 1.0), RESP)


def test_topkl_all_ties_keep_earliest_and_rejects_nonfinite():
    gaps = torch.zeros(1, 5)
    resp = torch.tensor([[True, True, True, True, False]])
    assert _kept(topkl_keep_mask(gaps, resp, 0.5)) == [[0, 1]]
    bad = gaps.clone()
    bad[0, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        topkl_keep_mask(bad, resp, 0.5)
    bad[0, 2] = 0.0
    bad[0, 4] = float("nan")  # on padding: ignored
    assert _kept(topkl_keep_mask(bad, resp, 0.5)) == [[0, 1]]


def test_topkl_non_contiguous_response_and_empty_row():
    gaps = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    resp = torch.tensor([[False, True, False, True, True], [False] * 5])
    m = topkl_keep_mask(gaps, resp, 0.5)
    assert _kept(m) == [[1, 3], []]


def test_topkl_matches_numpy_reference_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n, t = 4, 13
        gaps = np.round(rng.normal(size=(n, t)), 1)  # rounding creates ties
        lengths = rng.integers(0, t + 1, size=n)
        resp = np.arange(t)[None, :] < lengths[:, None]
        rho = float(rng.choice([0.25, 0.5, 0.3, 1.0]))
        got = topkl_keep_mask(torch.tensor(gaps), torch.tensor(resp), rho).numpy()
        for i in range(n):
            k = math.ceil(round(rho * lengths[i], 9))
            idx = sorted(range(lengths[i]), key=lambda j: (-gaps[i, j], j))[:k]
            want = np.zeros(t, bool)
            want[idx] = True
            assert (got[i] == want).all()


def test_random_mask_size_seeding_and_uniformity():
    resp = torch.zeros(3, 20, dtype=torch.bool)
    resp[0, :20] = True
    resp[1, :7] = True
    resp[2, 5:9] = True  # non-contiguous start
    a = random_keep_mask(resp, 0.25, generator=torch.Generator().manual_seed(7))
    b = random_keep_mask(resp, 0.25, generator=torch.Generator().manual_seed(7))
    c = random_keep_mask(resp, 0.25, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.sum(1).tolist() == [5, 2, 1]
    assert not (a & ~resp).any()
    # the global RNG is untouched
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    random_keep_mask(resp, 0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.rand(3), before)
    # uniform over positions: each of 8 tokens is kept with probability 1/2
    resp8 = torch.ones(1, 8, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(8)
    trials = 4000
    for _ in range(trials):
        counts += random_keep_mask(resp8, 0.5, generator=g)[0].float()
    freq = counts / trials
    assert torch.all((freq - 0.5).abs() < 0.04), freq  # ~5 standard errors


def test_rescale_sums_and_values():
    m = topkl_keep_mask(GAPS, RESP, 0.5)
    r = rescale_kept(GAPS, m, RESP)
    # row 0: T = 6, kept 3 -> scale 2; row 1: T = 3, kept 2 -> scale 1.5
    want = torch.tensor([[1.0, 0, 4.0, 0, 6.0, 0], [0, -0.15, -0.3, 0, 0, 0]])
    # float32 products of the inputs with scales 2 and 1.5: within 1 ulp of values <= 6
    torch.testing.assert_close(r, want, rtol=0, atol=1e-7)
    assert torch.isfinite(r).all()
    # sum of rescaled signal = T * mean over kept tokens
    for i in range(2):
        t = int(RESP[i].sum())
        assert float(r[i].sum()) == pytest.approx(t * float(GAPS[i][m[i]].mean()), rel=1e-6)
    # rho = 1 is the identity on the response
    full = rescale_kept(GAPS, RESP, RESP)
    assert torch.equal(full[RESP], GAPS[RESP])
    # empty row: zeros, no division by zero
    z = rescale_kept(torch.ones(1, 3), torch.zeros(1, 3, dtype=torch.bool), torch.zeros(1, 3, dtype=torch.bool))
    assert torch.equal(z, torch.zeros(1, 3))
    with pytest.raises(ValueError, match="outside"):
        rescale_kept(GAPS, ~RESP, RESP)


def test_sparsify_stats_pooled_over_micro_batches():
    m = topkl_keep_mask(GAPS, RESP, 0.5)
    sums = sparsify_sums(GAPS, m, RESP)
    assert sums == {"kept_tokens": 5.0, "response_tokens": 9.0, "kept_abs": pytest.approx(5.8, rel=1e-6),
                    "total_abs": pytest.approx(7.8, rel=1e-6)}
    s = sparsify_stats(sums)
    assert s.kept_fraction == pytest.approx(5 / 9, abs=1e-15)  # a ratio of exact counts
    assert s.kept_abs_share == pytest.approx(5.8 / 7.8, rel=1e-6)
    assert set(s.as_metrics()) == {"sparsify/kept_fraction", "sparsify/kept_abs_share"}
    # split into two micro-batches, summed: the same pooled numbers
    parts = [sparsify_sums(GAPS[i:i + 1], m[i:i + 1], RESP[i:i + 1]) for i in range(2)]
    pooled = {k: parts[0][k] + parts[1][k] for k in parts[0]}
    assert sparsify_stats(pooled).kept_fraction == s.kept_fraction
    # sums of a few float32 values accumulated in float64, regrouped: a few ulp apart
    assert sparsify_stats(pooled).kept_abs_share == pytest.approx(s.kept_abs_share, rel=1e-12)
    ones = torch.ones(1, 2, dtype=torch.bool)
    z = sparsify_stats(sparsify_sums(torch.zeros(1, 2), ones, ones))
    assert z.kept_fraction == 1.0 and math.isnan(z.kept_abs_share)


def test_offpolicy_ratio_and_clipping_exact():
    # behaviour log-probs known exactly: ratios 2, 1, 3, 0.25 (row 0) and 0.25 (row 1)
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.9, 0.1], [0.2, 0.3, 0.3, 0.3]], dtype=torch.float64))
    blogp = torch.log(torch.tensor([[0.25, 0.5, 0.3, 0.4], [0.8, 0.3, 0.3, 0.3]], dtype=torch.float64))
    resp = torch.tensor([[True, True, True, True], [True, False, False, False]])
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0], [-1.0, 0, 0, 0]], dtype=torch.float64)
    cfg = config_from_dict({"objective": "opd", "model": {"student": "tiny:quick", "teacher": "tiny:quick"},
                            "rollout": {"policy": "teacher"}}, check_paths=False)
    eps_low, eps_high = clip_range(cfg.objective, cfg.rollout)
    assert (eps_low, eps_high) == (1.0, 1.0)  # symmetric [0, 2]
    out = policy_gradient_loss(logp, blogp, adv, resp, eps_low=eps_low, eps_high=eps_high)
    # exp of a float64 difference of two logs: ~2 ulp from the exact ratio
    torch.testing.assert_close(out.ratio[resp], torch.tensor([2.0, 1.0, 3.0, 0.25, 0.25], dtype=torch.float64),
                               rtol=1e-15, atol=0)
    # only 3.0 (A > 0, above 1 + 1) is clipped; 0.25 with A < 0 is not (lower bound 0)
    assert out.clipped[resp].tolist() == [False, False, True, False, False]
    # the surrogate: -min(ρA, clip(ρ, 0, 2)A) = -[2, 1, 2, -0.25, -0.25]
    torch.testing.assert_close(out.loss[resp], torch.tensor([-2.0, -1.0, -2.0, 0.25, 0.25], dtype=torch.float64))
    on = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, policy="student"))
    assert clip_range(on.objective, on.rollout) == (0.2, 0.28)


def test_combine_advantages_limits_are_bit_exact():
    # the mixing itself is advantages.combine_advantages; check the limits the loop relies on
    opd = torch.tensor([[0.3, -0.0, float("inf")], [1e-30, 2.0, -1.5]])
    grpo = torch.tensor([[1.0, 1.0, 1.0], [-0.5, -0.5, -0.5]])
    one = combine_advantages({"opd": opd, "rlvr": grpo}, {"opd": 1.0, "rlvr": 0.0})
    assert torch.equal(one, opd) and torch.equal(torch.signbit(one), torch.signbit(opd))
    zero = combine_advantages({"opd": opd, "rlvr": grpo}, {"opd": 0.0, "rlvr": 1.0})
    assert torch.equal(zero, grpo)


def test_mixed_keep_mask_filters_only_pure_rlvr():
    keep = torch.tensor([True, True, False, False])
    assert mixed_keep_mask(keep, 0.0) is keep
    assert mixed_keep_mask(keep, 0.01).all() and mixed_keep_mask(keep, 0.01).shape == (4,)
    assert mixed_keep_mask(keep, 1.0).all()


def test_control_config_keys_validated_all_at_once(tmp_path):
    import yaml

    from opdgeo.errors import ConfigError
    from opdgeo.training.config import config_to_dict, load_config

    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.student=tiny:quick", "objective=rlvr", "token_keep.mode=topkl",
                           "token_keep.fraction=0", "project.from=/no/such/step-000001", "project.rank=0",
                           "rollout.policy=teacher", "rollout.offpolicy_eps=2", "run.monitor_matrices=mlp",
                           "run.monitor_lock_probes=0"])
    msg = str(err.value)
    for key in ("token_keep.mode", "token_keep.fraction", "project.from", "project.rank", "rollout.policy",
                "rollout.offpolicy_eps", "run.monitor_matrices", "run.monitor_lock_probes"):
        assert key in msg, key
    assert "8 problems" in msg
    # YAML `project.from` (a Python keyword) round-trips through the resolved config
    c = load_config(None, ["model.student=tiny:quick", "model.teacher=tiny:quick", "objective=opd",
                           "project.from=3", "optim.steps=10", "token_keep.mode=random", "token_keep.fraction=0.25",
                           "rollout.policy=teacher"])
    assert c.project.start == 3 and c.rollout.off_policy and c.token_keep.fraction == 0.25
    d = config_to_dict(c)
    assert d["project"] == {"from": 3, "rank": 16, "origin": None, "mode": "project"}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(d))
    assert load_config(p) == c
    with pytest.raises(ConfigError, match=r"project.from: a step must be in \[1, optim.steps = 10\)"):
        load_config(None, ["model.student=tiny:quick", "project.from=10", "optim.steps=10"])


@pytest.mark.parametrize("name", ["tiny-opd-topkl50", "tiny-opd-offpolicy", "tiny-mix-0.5", "tiny-opd-projected"])
def test_control_recipes_load(name):
    from pathlib import Path

    from opdgeo.training.config import load_config

    c = load_config(Path(__file__).parent.parent / "recipes" / f"{name}.yaml", check_paths=False)
    assert {
        "tiny-opd-topkl50": c.token_keep.mode == "topkl" and c.token_keep.fraction == 0.5,
        "tiny-opd-offpolicy": c.rollout.policy == "teacher" and c.rollout.offpolicy_eps == 1.0,
        "tiny-mix-0.5": c.objective.weights() == {"opd": 0.5, "rlvr": 0.5},
        "tiny-opd-projected": c.project.start == "runs/tiny-opd/step-000012" and c.project.rank == 16,
    }[name]
