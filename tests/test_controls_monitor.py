"""Live geometry monitor (SPEC §3 Controls): values against float64 numpy references, locking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from opdgeo.training.monitor import MonitorSettings, monitored_names, probe, start_monitor




NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.q_norm.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.1.self_attn.o_proj.weight",
]
SHAPES = {
    "model.embed_tokens.weight": (50, 24),
    "model.layers.0.self_attn.q_proj.weight": (24, 24),
    "model.layers.0.self_attn.k_proj.weight": (12, 24),
    "model.layers.0.self_attn.q_norm.weight": (8,),
    "model.layers.0.mlp.up_proj.weight": (40, 24),
    "model.layers.1.self_attn.o_proj.weight": (24, 24),
}


def _weights(seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(*SHAPES[n], generator=g) for n in NAMES}


def _ref(w0, w1, k, prev_v=None):
    """float64 numpy reference of one matrix on bf16-rounded weights."""
    a = w0.to(torch.bfloat16).double().numpy()
    b = w1.to(torch.bfloat16).double().numpy()
    d = b - a
    s = np.linalg.svd(d, compute_uv=False)
    _, _, vt = np.linalg.svd(d)
    kk = min(k, *d.shape)
    v = vt[:kk].T
    out = {"stable_rank": (d**2).sum() / s[0] ** 2, "fro_norm": np.sqrt((d**2).sum()), "density": (a != b).mean(), "V": v}
    if prev_v is not None:
        out["sim"] = (np.linalg.norm(prev_v.T @ v) ** 2) / kk
    return out


def test_monitored_names():
    named = [(n, SHAPES[n]) for n in NAMES]
    assert monitored_names(named, "attention") == [NAMES[1], NAMES[2], NAMES[5]]
    assert monitored_names(named, "all") == [NAMES[1], NAMES[2], NAMES[4], NAMES[5]]


def test_probe_values_match_numpy_float64():
    w0 = _weights(0)
    settings = MonitorSettings(matrices="all", k=4, per_matrix=True)
    state = start_monitor(w0, settings)
    g = torch.Generator().manual_seed(1)
    # low-rank-ish updates at two steps, large enough to be visible in bf16
    upd = {n: 0.05 * torch.randn(SHAPES[n][0], 3, generator=g) @ torch.randn(3, SHAPES[n][1], generator=g)
           for n in state.origin}
    w1 = {n: w0[n] + upd[n] if n in upd else w0[n] for n in NAMES}
    p1, state = probe(state, 5, w1)
    assert p1.sim_prev is None and p1.locked_at is None
    assert "geometry/sim_prev" not in p1.as_metrics()
    refs1 = {n: _ref(w0[n], w1[n], 4) for n in state.origin}
    for n, r in refs1.items():
        row = p1.per_matrix[n]
        assert row["stable_rank"] == pytest.approx(r["stable_rank"], rel=1e-6)
        # Frobenius norms and densities are float64 sums of the same values (order-dependent only, ~n*eps) and
        # ratios of exact counts; the stable rank goes through an SVD of a float32-rounded update, hence 1e-6.
        assert row["fro_norm"] == pytest.approx(r["fro_norm"], rel=1e-12)
        assert row["density"] == pytest.approx(r["density"], abs=1e-15)
    assert p1.stable_rank == pytest.approx(np.mean([r["stable_rank"] for r in refs1.values()]), rel=1e-6)
    assert p1.fro_norm == pytest.approx(np.mean([r["fro_norm"] for r in refs1.values()]), rel=1e-12)
    assert p1.density == pytest.approx(np.mean([r["density"] for r in refs1.values()]), abs=1e-15)
    w2 = {n: w1[n] + 0.3 * upd[n] + 0.02 * torch.randn(*SHAPES[n], generator=g) if n in upd else w1[n] for n in NAMES}
    p2, state = probe(state, 10, w2)
    refs2 = {n: _ref(w0[n], w2[n], 4, refs1[n]["V"]) for n in state.origin}
    for n, r in refs2.items():
        assert p2.per_matrix[n]["sim_prev"] == pytest.approx(r["sim"], abs=1e-6)
    assert p2.sim_prev == pytest.approx(np.mean([r["sim"] for r in refs2.values()]), abs=1e-6)
    assert 0.3 < p2.sim_prev < 0.999  # a real, non-trivial similarity
    m = p2.as_metrics()
    assert {"geometry/stable_rank", "geometry/fro_norm", "geometry/sim_prev", "geometry/density"} <= set(m)
    assert m["geometry/sim_prev/model.layers.0.mlp.up_proj.weight"] == p2.per_matrix[NAMES[4]]["sim_prev"]


def test_probe_reads_bf16_rounded_weights():
    w0 = _weights(0)
    state = start_monitor(w0, MonitorSettings(k=2))
    # an update below bf16 resolution is invisible: zero density, NaN stable rank, zero norm
    tiny = {n: w + 1e-6 * w.sign() * w.abs() for n, w in w0.items()}
    p, _ = probe(state, 1, tiny)
    assert p.density == 0.0 and p.fro_norm == 0.0 and math.isnan(p.stable_rank)


def _rotating(state, steps, drift):
    """Probes of a rank-2 update whose row space rotates by ``drift[i]`` before probe i."""
    w0 = dict(state.origin)
    out = []
    theta = 0.0
    for step, d in zip(steps, drift):
        theta += d
        rows = torch.zeros(2, 24)
        rows[0, 0], rows[0, 1] = math.cos(theta), math.sin(theta)
        rows[1, 2] = 1.0
        left = torch.zeros(24, 2)
        left[0, 0], left[1, 1] = 2.0, 1.0  # rank 2, distinct singular values
        w = {n: w0[n].float() + left @ rows for n in w0}
        p, state = probe(state, step, w)
        out.append(p)
    return out


def test_locking_reported_after_m_probes_and_latched():
    w0 = {n: torch.zeros(24, 24) for n in ["model.layers.0.self_attn.q_proj.weight"]}
    settings = MonitorSettings(k=2, lock_probes=3, dtype="float32")  # float32: exact angles
    # rotations: big (sim low) twice, then small ones (sim high), then a big one
    drift = [0.0, 1.2, 1.2, 0.05, 0.05, 0.05, 0.05, 1.3]
    steps = [10, 20, 30, 40, 50, 60, 70, 80]
    probes = _rotating(start_monitor(w0, settings), steps, drift)
    sims = [p.sim_prev for p in probes]
    assert sims[0] is None
    # Sim_2 of span(e(θ1), e3) vs span(e(θ2), e3) = (1 + cos²Δθ) / 2
    for s, d in zip(sims[1:], drift[1:]):
        assert s == pytest.approx((1 + math.cos(d) ** 2) / 2, abs=1e-6)
    locked = [p.locked_at for p in probes]
    # high sims from step 40 on; the third consecutive one is at step 60
    assert locked == [None, None, None, None, None, 40, 40, 40]
    assert probes[5].as_metrics()["geometry/locked_at"] == 40.0


def test_settings_validation():
    with pytest.raises(ValueError):
        MonitorSettings(matrices="mlp")
    with pytest.raises(ValueError):
        MonitorSettings(lock_probes=0)
    with pytest.raises(ValueError, match="no attention"):
        start_monitor({"model.embed_tokens.weight": torch.zeros(3, 3)}, MonitorSettings())


def test_origin_is_a_snapshot_not_an_alias_of_live_float32_weights():
    w = {"model.layers.0.self_attn.q_proj.weight": torch.randn(20, 20)}
    state = start_monitor(w, MonitorSettings(dtype="float32", k=2))
    with torch.no_grad():
        w["model.layers.0.self_attn.q_proj.weight"].add_(1.0)  # the live weights move in place
    p, _ = probe(state, 1, w)
    assert p.fro_norm == pytest.approx(20.0, rel=1e-6)  # ‖ΔW‖_F of an all-ones 20×20 update
