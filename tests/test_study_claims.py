"""Claim logic on synthetic results: a true, a false and an inconclusive case of every
claim, the same rule in both directions."""

from __future__ import annotations

import math

import pytest

from opdgeo.report.study_claims import CLAIMS, evaluate_claims
from opdgeo.report.study_results import StudyResults
from opdgeo.study.pipeline import study_info
from opdgeo.study.presets import get_preset

SEEDS = (0, 1, 2)
JITTER = (-1.0, 0.0, 1.0)  # seed s gets base + jitter[s] * spread
ORDER = {"sparsity_order": "global_sparsity", "update_density_order": "mean_density",
         "low_magnitude_overlap_order": "mean_low_magnitude_overlap", "nss_order": "mean_nss",
         "angle_order": "mean_angle_right_max_deg"}
UP = {"global_sparsity", "mean_low_magnitude_overlap"}  # claimed to increase SFT -> OPD -> RLVR


def _inst(run, s):
    return run if s == 0 else f"{run}_seed{s}"


def _srank(kind, j):
    """Stable-rank trajectories over 5 checkpoints: flat (OPD-like), rising, falling."""
    p = [0.2, 0.4, 0.6, 0.8, 1.0]
    if kind == "flat":
        return [25 + 0.5 * j + 0.2 * i for i in range(5)]
    if kind == "up":
        return [10 * math.exp((1.8 + 0.05 * j) * x) for x in p]
    if kind == "down":
        return [30 * math.exp(-(0.7 + 0.05 * j) * x) for x in p]
    if kind == "flat_high":  # flat but far above OPD
        return [45 + 0.5 * j + 0.2 * i for i in range(5)]
    raise ValueError(kind)


def synthetic(compare=None, srank=None, sim=None, acc=None, noise=None, start=None) -> StudyResults:
    """Every run of the tiny preset with 3 seeds. ``compare``: {run: {key: base}} overrides;
    ``srank``: {run: kind}; ``noise``: {run: spread of every compare value}."""
    info = study_info(get_preset("tiny"))
    base_cmp = {"sft": 0.1, "opd": 0.5, "rlvr": 0.8, "sft_matched": 0.2}
    srank = {"sft": "up", "opd": "flat", "rlvr": "down", **(srank or {})}
    sim = {"opd": 0.9, **(sim or {})}
    acc = {"sft": 0.6, "sft_proj16": 0.3, "opd": 0.5, "opd_proj16": 0.49, **(acc or {})}
    res = StudyResults(info=info)
    for r in info["runs"]:
        run, s = r.get("seed_of") or r["name"], r["seed"]
        j = JITTER[s]
        x = base_cmp.get(run, 0.5)
        vals = {k: (x if k in UP else 1 - x) for k in ORDER.values()}
        vals.update((compare or {}).get(run, {}))
        spread = (noise or {}).get(run, 0.01)
        res.compare[r["name"]] = {k: v + j * spread for k, v in vals.items()}
        kind = srank.get(run, "flat" if run.startswith(("opd_", "mix_0p75", "mix_0p5")) else "down")
        series = _srank(kind, j)
        res.traj_means[r["name"]] = [
            {"step": i + 1, "progress": 20.0 * (i + 1), "stable_rank": v, "sim_to_final": (sim.get(run, 0.7) + 0.01 * j) if i == 0 else 1.0}
            for i, v in enumerate(series)]
        res.evals[r["name"]] = {"accuracy": acc.get(run, 0.5) + 0.005 * j, "n_samples": 100}
    for proj, a in {"opd_proj16": 0.1, "sft_proj16": 0.1, **(start or {})}.items():  # the restart checkpoints
        res.evals[f"{proj}_start"] = {"accuracy": a, "n_samples": 100}
    return res


def holds(res):
    return {c["id"]: c["holds"] for c in evaluate_claims(res)}


def test_schema_keys_only_added():
    for c in evaluate_claims(synthetic()):
        assert list(c)[:4] == ["id", "claim", "holds", "evidence"]
        assert {"statistic", "estimate", "ci", "n", "method"} <= set(c)
        assert c["holds"] in (True, False, None) and c["statistic"] and c["method"]
        if c["ci"] is not None:
            assert c["ci"][0] <= c["estimate"] <= c["ci"][1] and c["n"] == 3


def test_default_synthetic_study_all_true():
    h = holds(synthetic())
    assert h == {c.id: True for c in CLAIMS}, {k: v for k, v in h.items() if v is not True}


@pytest.mark.parametrize("cid,key", list(ORDER.items()))
def test_orderings_true_false_null(cid, key):
    # reversed: SFT takes RLVR's value and RLVR SFT's: false (both comparisons excluded on the other side)
    up = key in UP
    rev = {"sft": {key: 0.8 if up else 0.2}, "rlvr": {key: 0.1 if up else 0.9}}
    assert holds(synthetic(compare=rev))[cid] is False
    # RLVR equal to OPD within large seed noise: inconclusive
    tie = {"rlvr": {key: 0.5}}
    assert holds(synthetic(compare=tie, noise={"rlvr": 0.2, "opd": 0.2}))[cid] is None
    # the matched control: reversed for sft_matched only
    m = holds(synthetic(compare={"sft_matched": {key: 0.9 if up else 0.1}}))
    assert m[cid] is True and m[cid + "_matched"] is False


def test_narrow_band_false_and_null():
    assert holds(synthetic(srank={"sft": "flat", "rlvr": "flat", "opd": "up"}))["opd_narrow_band"] is False
    # SFT as flat as OPD: one comparison has no interval away from 0 -> inconclusive
    assert holds(synthetic(srank={"sft": "flat"}))["opd_narrow_band"] is None


def test_expand_contract_both_directions():
    h = holds(synthetic(srank={"sft": "down", "rlvr": "up"}))
    assert h["sft_srank_expands"] is False and h["rlvr_srank_contracts"] is False
    h = holds(synthetic(srank={"sft": "flat", "rlvr": "flat"}))  # rising by 0.2 per checkpoint: not a contraction
    assert h["rlvr_srank_contracts"] is False


def test_sim16_first_true_false_null():
    assert holds(synthetic(sim={"opd": 0.6}))["opd_sim16_first"] is False
    assert holds(synthetic(sim={"opd": 0.8}))["opd_sim16_first"] is None


def test_keeps_band_and_small_alpha():
    h = holds(synthetic(srank={"opd_offpolicy": "down"}))
    assert h["offpolicy_keeps_band"] is False
    h = holds(synthetic(srank={"opd_rand25": "down"}))
    assert h["sparsification_keeps_band"] is False
    h = holds(synthetic(srank={"mix_0p01": "flat"}))
    assert h["small_alpha_departs"] is False
    # equally far from OPD and RLVR at every seed: the difference is zero, never excluded
    eq = synthetic()
    for s in SEEDS:
        eq.traj_means[_inst("opd_offpolicy", s)] = eq.traj_means[_inst("opd", s)]
        eq.traj_means[_inst("rlvr", s)] = eq.traj_means[_inst("opd", s)]
    assert holds(eq)["offpolicy_keeps_band"] is None


def test_projection_claims():
    """f = (P̄ − s)/(Ō − s) with its delta-method interval, by hand, and each verdict both ways."""
    from opdgeo.report.study_claims import recovered_fraction

    res = synthetic()
    iv = recovered_fraction(res, "opd", "opd_proj16")
    se_mean = 0.005 / math.sqrt(3)  # seed sd of 0.5 ± 0.005 jitter, over 3 seeds
    se_s = math.sqrt(0.1 * 0.9 / 100)
    f = (0.49 - 0.1) / (0.5 - 0.1)
    se_f = math.sqrt(se_mean**2 + f**2 * se_mean**2 + (1 - f) ** 2 * se_s**2) / 0.4
    assert iv.estimate == pytest.approx(f) and iv.n == 3
    assert (iv.low, iv.high) == (pytest.approx(f - 1.96 * se_f), pytest.approx(f + 1.96 * se_f))
    h = holds(res)
    assert h["projection_keeps_opd"] is True and h["projection_hurts_sft"] is True  # f 0.975 and 0.4
    h = holds(synthetic(acc={"sft_proj16": 0.7, "opd_proj16": 0.1}))  # f 1.2 for SFT, 0 for OPD
    assert h["projection_hurts_sft"] is False and h["projection_keeps_opd"] is False
    h = holds(synthetic(acc={"sft_proj16": 0.35, "opd_proj16": 0.3}))  # f = 0.5 exactly: inside both intervals
    assert h["projection_hurts_sft"] is None and h["projection_keeps_opd"] is None
    h = holds(synthetic(start={"opd_proj16": 0.5}))  # no gain of OPD over the start: f undefined
    assert h["projection_keeps_opd"] is None


def test_missing_inputs_and_one_seed_are_inconclusive():
    res = synthetic()
    for s in SEEDS:
        res.traj_means.pop(_inst("opd_offpolicy", s))
        res.evals.pop(_inst("opd_proj16", s))
    h = holds(res)
    assert h["offpolicy_keeps_band"] is None and h["projection_keeps_opd"] is None and h["sparsity_order"] is True
    one = synthetic()
    one.info = {**one.info, "runs": [r for r in one.info["runs"] if not r.get("seed_of")]}
    assert set(holds(one).values()) == {None}


def _set_slopes(res, run, slopes):
    """Seed s of ``run`` gets the trajectory 20·exp(slope_s · p)."""
    for s, k in zip(SEEDS, slopes):
        res.traj_means[_inst(run, s)] = [{"step": i + 1, "progress": 20.0 * (i + 1), "stable_rank": 20 * math.exp(k * 0.2 * (i + 1)),
                                          "sim_to_final": 0.9 if i == 0 else 1.0} for i in range(5)]


def test_expand_contract_inconclusive_when_seeds_disagree():
    res = synthetic()
    _set_slopes(res, "sft", (1.0, -1.0, 0.3))
    _set_slopes(res, "rlvr", (-1.0, 1.0, -0.3))
    h = holds(res)
    assert h["sft_srank_expands"] is None and h["rlvr_srank_contracts"] is None


def test_control_claims_inconclusive_when_seeds_disagree():
    # seed 0 of the run follows OPD, seed 1 follows RLVR, seed 2 between: the distance difference changes sign
    res = synthetic()
    for run in ("opd_rand25", "mix_0p01"):
        for s, ref in zip(SEEDS, ("opd", "rlvr", "opd")):
            res.traj_means[_inst(run, s)] = res.traj_means[_inst(ref, s)]
        res.traj_means[_inst(run, 2)] = [dict(m, stable_rank=m["stable_rank"] * 0.85)
                                         for m in res.traj_means[_inst("opd", 2)]]
    h = holds(res)
    assert h["sparsification_keeps_band"] is None and h["small_alpha_departs"] is None


def test_statistic_text_states_the_claimed_side():
    c = {c["id"]: c for c in evaluate_claims(synthetic())}
    assert c["sparsity_order"]["statistic"].endswith("each claimed > 0")
    assert c["update_density_order"]["statistic"].endswith("each claimed < 0")
    assert c["sparsity_order"]["comparisons"][0]["direction"] == ">"
    assert c["nss_order_matched"]["comparisons"][1]["direction"] == "<"


def test_claims_follow_the_plans_roles_not_run_names():
    """Renaming every run (in study.json without its ``roles``, so they are derived from the
    runs) changes no verdict or estimate: the claims find their runs through the plan."""
    res = synthetic()

    def f(name):
        return None if name is None else f"my_{name}"

    info = {k: v for k, v in res.info.items() if k != "roles"}
    runs = []
    for r in info["runs"]:
        init = r["init"]
        if "@" in init:
            src, _, frac = init.partition("@")
            init = f"{f(src)}@{frac}"
        runs.append({**r, "name": f(r["name"]), "seed_of": f(r.get("seed_of")), "init": init})
    info["runs"] = runs
    info["mixing_panel"] = [{**p, "run": f(p["run"])} for p in info["mixing_panel"]]
    renamed = StudyResults(info=info)
    renamed.compare = {f(k): v for k, v in res.compare.items()}
    renamed.traj_means = {f(k): v for k, v in res.traj_means.items()}
    renamed.evals = {(f(k[:-len("_start")]) + "_start" if k.endswith("_start") else f(k)): v for k, v in res.evals.items()}
    assert renamed.role("opd") == "my_opd" and renamed.projection_of("my_sft")["start"] == "my_sft_proj16_start"
    a, b = evaluate_claims(res), evaluate_claims(renamed)
    assert [(c["id"], c["holds"], c["estimate"], c["ci"]) for c in a] == [(c["id"], c["holds"], c["estimate"], c["ci"]) for c in b]
    assert sum(c["holds"] is not None for c in a) >= 10  # the comparison is not vacuous
