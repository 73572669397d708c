"""The cheapest exact routes of the pairwise geometry (SPEC §1) against a thin float64
numpy reference: Gram-route singular values (NSS), the warm-started top-k subspaces of
the tuned side and their stopping rule, the relative gap, k as a fraction, and the
angles that do not apply where k spans a side.

References are ``np.linalg.svd(w, full_matrices=False)`` in float64 and the sine–cosine
angle formula in numpy (``test_compare._sine_cosine_angles_deg``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_compare import _sine_cosine_angles_deg
from test_geometry_pairwise import matrix_with_spectrum

import opdgeo
from opdgeo.analysis.compare import effective_k
from opdgeo.analysis.compare_summary import ILL_CONDITIONED_GAP
from opdgeo.errors import ConfigError
from opdgeo.geometry.angles import principal_angles
from opdgeo.geometry.spectrum import normalized_spectral_shift, relative_gap, singular_values, top_singular_subspaces
from opdgeo.geometry.warmstart import WARM_TOL, iteration_budget, update_norm_estimate, warm_top_subspaces

WELL = np.concatenate([np.linspace(10.0, 6.0, 24), np.linspace(2.0, 0.5, 176)])  # gap 4 at k = 24
ILL = np.concatenate([np.geomspace(10.0, 3.0, 24), np.geomspace(0.3, 1e-6, 176)])  # gap at 24, σ down to 1e-7·σ1


def _pair(sigma, m, n, scale, seed):
    """W0 with a known spectrum and W+ = W0 + a dense random update of spectral size ~scale."""
    w0, _, _ = matrix_with_spectrum(m, n, sigma, seed)
    rng = np.random.default_rng(seed + 1)
    return w0, w0 + scale * rng.standard_normal((m, n)) / math.sqrt(m + n)


def _angles_ref(w0, w1, k):
    U0, _, V0t = np.linalg.svd(w0, full_matrices=False)
    U1, _, V1t = np.linalg.svd(w1, full_matrices=False)
    return _sine_cosine_angles_deg(U0[:, :k], U1[:, :k]), _sine_cosine_angles_deg(V0t[:k].T, V1t[:k].T)


def _warm(w0, w1, k, **kw):
    t0, t1 = torch.from_numpy(w0), torch.from_numpy(w1)
    U0, S0, V0h = torch.linalg.svd(t0, full_matrices=False)
    fro = float(torch.linalg.matrix_norm(t1 - t0))
    res = warm_top_subspaces(t1, V0h.mT, k, sigma0=S0, delta_fro=fro, delta_norm=update_norm_estimate(t0, t1), **kw)
    return res, U0, V0h.mT


@pytest.mark.parametrize("sigma", [WELL, ILL], ids=["well", "ill"])
@pytest.mark.parametrize("shape", [(260, 200), (200, 260)])
def test_warm_start_converges_to_the_thin_float64_reference(sigma, shape):
    m, n = shape
    w0, w1 = _pair(sigma, m, n, 1e-2, seed=11)
    res, U0, V0 = _warm(w0, w1, 24)
    assert res.converged and res.reason == "converged" and 1 <= res.iterations <= iteration_budget(m, n, 24)
    assert res.bound <= WARM_TOL
    left_ref, right_ref = _angles_ref(w0, w1, 24)
    left = np.degrees(principal_angles(U0[:, :24], res.U).numpy())
    right = np.degrees(principal_angles(V0[:, :24], res.V).numpy())
    assert left_ref.max() > 1e-3  # the update really rotated the subspaces
    # Both sides agree with the reference far inside the 1e-5 degree target: the Wedin bound
    # (<= 1e-10 rad) plus the reference's own eps·σ1/gap.
    np.testing.assert_allclose(left, left_ref, rtol=0, atol=1e-8)
    np.testing.assert_allclose(right, right_ref, rtol=0, atol=1e-8)
    S1 = np.linalg.svd(w1, compute_uv=False)
    np.testing.assert_allclose(res.S.numpy(), S1[:24], rtol=0, atol=1e-12 * S1[0])
    np.testing.assert_allclose(res.U.numpy().T @ res.U.numpy(), np.eye(24), atol=1e-12)


def test_warm_start_declines_or_stops_where_the_gap_is_too_small():
    # A smooth spectrum: σ_24 − σ_25 = 0.05 against an update of spectral size ~0.5.
    sigma = np.linspace(10.0, 0.1, 200)
    w0, w1 = _pair(sigma, 260, 200, 0.5, seed=12)
    res, _, _ = _warm(w0, w1, 24)
    assert not res.converged and res.reason == "gap" and res.iterations == 0 and res.U is None
    # A small gap with a small update: predicted beyond the budget, declined before any work
    w0, w1 = _pair(sigma, 260, 200, 1e-3, seed=12)
    res, _, _ = _warm(w0, w1, 24)
    assert res.reason == "budget" and res.iterations == 0 and res.predicted > iteration_budget(260, 200, 24)
    # Told (wrongly) that the update is 0, it iterates, sees the slow contraction and stops:
    # never an unconverged result.
    t0, t1 = torch.from_numpy(w0), torch.from_numpy(w1)
    _, S0, V0h = torch.linalg.svd(t0, full_matrices=False)
    res = warm_top_subspaces(t1, V0h.mT, 24, sigma0=S0, delta_fro=float(torch.linalg.matrix_norm(t1 - t0)),
                             delta_norm=0.0, S=torch.linalg.svdvals(t1))
    assert res.reason == "stalled" and not res.converged and res.U is None and res.bound > WARM_TOL
    assert 3 <= res.iterations <= iteration_budget(260, 200, 24)
    # k = min(m, n): the subspace is the whole space; nothing to iterate
    res = warm_top_subspaces(t1, V0h.mT, 200, sigma0=S0, delta_fro=0.0)
    assert res.reason == "full" and res.iterations == 0


def test_warm_start_validation():
    w = torch.eye(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="k must be in"):
        warm_top_subspaces(w, w, 0, sigma0=torch.ones(4), delta_fro=0.0)
    with pytest.raises(ValueError, match="sigma0 must hold"):
        warm_top_subspaces(w, w, 2, sigma0=torch.ones(3), delta_fro=0.0)
    with pytest.raises(ValueError, match="delta_fro must be"):
        warm_top_subspaces(w, w, 2, sigma0=torch.ones(4), delta_fro=float("nan"))


@pytest.mark.parametrize("sigma", [WELL, ILL], ids=["well", "ill"])
def test_singular_values_routes_give_nss_to_1e6_of_the_reference(sigma, monkeypatch):
    """Gram route for every spectrum: refined values ||W v_i|| above 1e-2·σ1, one
    Rayleigh–Ritz svdvals over the near-null cluster's columns below (never an svdvals of
    the whole matrix); the NSS agrees with the thin float64 reference to 1e-6 relative."""
    w0, w1 = _pair(sigma, 260, 200, 1e-3, seed=13)
    calls = []
    real = torch.linalg.svdvals
    monkeypatch.setattr(torch.linalg, "svdvals", lambda x, **kw: calls.append(tuple(x.shape)) or real(x, **kw))
    s0, s1 = singular_values(torch.from_numpy(w0)), singular_values(torch.from_numpy(w1))
    ref0, ref1 = np.linalg.svd(w0, compute_uv=False), np.linalg.svd(w1, compute_uv=False)
    want = np.linalg.norm(ref1 - ref0) / np.linalg.norm(ref0)
    assert normalized_spectral_shift(s0, s1) == pytest.approx(want, rel=1e-6)
    cluster = [int((ref < 1e-2 * ref[0]).sum()) for ref in (ref0, ref1)]  # values below the cluster threshold
    assert cluster == [0, 0] if sigma is WELL else min(cluster) > 100
    assert calls == [(260, c) for c in cluster if c]  # one [M, c] svdvals per side with a cluster
    for s, ref in ((s0, ref0), (s1, ref1)):
        np.testing.assert_allclose(s.numpy(), ref, rtol=0, atol=1e-13 * ref[0])


@pytest.mark.parametrize("shape", [(260, 200), (200, 200), (200, 260)])
@pytest.mark.parametrize(
    "tail",
    [
        np.geomspace(1e-1, 1e-15, 60),  # graded through the cluster threshold down to 1e-16·σ1
        np.full(60, 1e-9),  # a near-null cluster of equal values
        1e-1 * (1 + 1e-9 * np.arange(60)),  # a tight cluster straddling the threshold (1e-2·σ1)
        np.zeros(60),  # exactly rank-deficient
    ],
    ids=["graded", "equal-tiny", "straddling", "rank-deficient"],
)
def test_gram_route_values_are_accurate_to_eps_sigma1_on_ill_conditioned_spectra(shape, tail):
    """Every value of the Gram route (refined values plus the cluster's Rayleigh–Ritz
    values) against the known construction, as tightly as LAPACK's own SVD (~eps·σ1)."""
    m, n = shape
    p = min(m, n)
    sigma = np.sort(np.concatenate([np.linspace(10.0, 1.0, p - 60), tail]))[::-1]
    w, qu, qv = matrix_with_spectrum(m, n, sigma, seed=21)
    got = singular_values(torch.from_numpy(w)).numpy()
    lapack = np.linalg.svd(w, compute_uv=False)
    assert np.abs(lapack - sigma).max() < 1e-14 * sigma[0]  # the reference itself
    np.testing.assert_allclose(got, sigma, rtol=0, atol=3e-14 * sigma[0])
    assert np.all(np.diff(got) <= 0)
    # the same values come with the top-k vectors, which stay those of the known SVD
    sub = top_singular_subspaces(torch.from_numpy(w), 32)
    np.testing.assert_allclose(sub.S.numpy(), got, rtol=0, atol=0)
    for ours, theirs in ((sub.U.numpy(), qu[:, :32]), (sub.V.numpy(), qv[:, :32])):
        assert np.linalg.norm(theirs - ours @ (ours.T @ theirs)) < 1e-11


def test_square_gaussian_bulk_with_spikes_takes_no_full_svdvals(monkeypatch):
    """A square bulk-plus-spikes matrix (σ_min ~ 1e-6·σ1, like the benchmark's q and o
    shapes): the values match LAPACK's to eps·σ1 and only the cluster's columns are
    passed to svdvals."""
    rng = np.random.default_rng(22)
    n = 256
    w = 0.02 * rng.standard_normal((n, n)) + (rng.standard_normal((n, 8)) * np.logspace(0, -1, 8)) @ rng.standard_normal((8, n)) / 4
    calls = []
    real = torch.linalg.svdvals
    monkeypatch.setattr(torch.linalg, "svdvals", lambda x, **kw: calls.append(tuple(x.shape)) or real(x, **kw))
    got = singular_values(torch.from_numpy(w)).numpy()
    ref = np.linalg.svd(w, compute_uv=False)
    assert ref[-1] < 1e-4 * ref[0]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-14 * ref[0])
    assert len(calls) == 1 and calls[0][0] == n and 0 < calls[0][1] < n


@pytest.mark.parametrize("k", [0, 24, 150, 170, 200])
def test_gram_eigenvectors_only_for_the_cluster_and_the_top_k(k):
    """The LAPACK route forms the eigenvectors of the near-null cluster and of the top k
    only (c + k columns, or all N where they meet), each an eigenvector of WᵀW to
    ~eps·||WᵀW|| against float64 ``scipy.linalg.eigh``, orthonormal, with every eigenvalue."""
    import scipy.linalg

    from opdgeo.geometry.spectrum import _CLUSTER_RATIO, _gram_eigen_lapack

    w, _, _ = matrix_with_spectrum(260, 200, ILL, seed=31)
    gram = w.T @ w
    ref_vals, ref_vecs = scipy.linalg.eigh(gram)
    lam, vecs, c = _gram_eigen_lapack(w, k, _CLUSTER_RATIO)
    assert c == int((ILL < _CLUSTER_RATIO * ILL[0]).sum()) and 0 < c < 200
    assert vecs.shape == (200, min(200, c + k))
    np.testing.assert_allclose(lam, ref_vals, rtol=0, atol=1e-13 * ref_vals[-1])
    wanted = np.r_[0:c, 200 - vecs.shape[1] + c:200] if c + k < 200 else np.arange(200)
    resid = gram @ vecs - vecs * ref_vals[wanted]
    assert np.abs(resid).max() < 1e-12 * ref_vals[-1]
    assert np.abs(vecs.T @ vecs - np.eye(vecs.shape[1])).max() < 1e-12
    if k == 24:  # a well-determined top-k eigenspace (relative gap 0.7 at 24): the same span
        top, ref_top = vecs[:, -k:], ref_vecs[:, -k:]
        assert np.linalg.norm(ref_top - top @ (top.T @ ref_top), 2) < 1e-12


def test_values_are_the_same_bits_with_and_without_vectors():
    """NSS alone and NSS with angles read the same singular values: no value depends on k
    (k below, at and beyond the point where the top k meet the near-null cluster)."""
    # 40 values in [10, 1], 160 in the cluster (< 1e-2·σ1) but above 1e-3·σ1 (Gram route)
    sigma = np.concatenate([np.linspace(10.0, 1.0, 40), np.geomspace(0.09, 0.011, 160)])
    for shape in ((260, 200), (200, 200), (200, 260)):
        w, _, _ = matrix_with_spectrum(*shape, sigma, seed=32)
        t = torch.from_numpy(w)
        values = singular_values(t)
        np.testing.assert_allclose(values.numpy(), sigma, rtol=0, atol=1e-14 * sigma[0])
        for k in (1, 24, 40, 100, 200):
            assert torch.equal(top_singular_subspaces(t, k).S, values), (shape, k)


def test_relative_gap_known_values():
    S = torch.tensor([10.0, 8.0, 8.0, 2.0], dtype=torch.float64)
    assert relative_gap(S, 1) == pytest.approx(0.2, abs=1e-15)
    assert relative_gap(S, 2) == 0.0
    assert relative_gap(S, 3) == pytest.approx(0.6, abs=1e-15)
    assert relative_gap(S, 4) == pytest.approx(0.2, abs=1e-15)  # σ_{p+1} = 0
    assert math.isnan(relative_gap(torch.zeros(3, dtype=torch.float64), 1))
    with pytest.raises(ValueError, match="k must be in"):
        relative_gap(S, 5)


def test_k_as_a_fraction_of_min_m_n():
    assert effective_k("1/8", 4096) == 512 and effective_k("1/8", 576) == 72 and effective_k("1/8", 192) == 24
    assert effective_k("1/3", 100) == 33 and effective_k("1/2", 5) == 3 and effective_k("1/64", 10) == 1
    assert effective_k("1/1", 7) == 7 and effective_k(512, 192) == 192
    for bad in ("0/3", "3/2", "a/b", "1/0", "1.5"):
        with pytest.raises(ConfigError, match="^k must be an integer >= 1 or a fraction"):
            opdgeo.compare("missing", "missing", k=bad)


# --------------------------------------------------------------------------- compare


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Three matrices: a tall one with a wide gap at k = 24 (warm start converges), a square
    one with a smooth spectrum (tiny gap: dense), and a 24 x 96 one whose left side k = 24
    spans."""
    root = tmp_path_factory.mktemp("routes")
    wa0, wa1 = _pair(WELL, 260, 200, 1e-2, seed=21)
    smooth = np.linspace(10.0, 0.1, 160)
    smooth[24] = smooth[23] - 5e-4  # relative gap 5e-5 at k = 24: ill-conditioned
    wb0, wb1 = _pair(smooth, 160, 160, 1e-2, seed=22)
    rng = np.random.default_rng(23)
    wc0 = rng.standard_normal((24, 96))
    wc1 = wc0 + 1e-2 * rng.standard_normal((24, 96))
    names = ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.self_attn.o_proj.weight",
             "model.layers.0.self_attn.k_proj.weight")
    base = dict(zip(names, (wa0, wb0, wc0)))
    tuned = dict(zip(names, (wa1, wb1, wc1)))
    for label, tensors in (("a", base), ("b", tuned)):
        save_file({n: torch.from_numpy(w).float() for n, w in tensors.items()}, str(root / f"{label}.safetensors"))
    as32 = lambda w: torch.from_numpy(w).float().double().numpy()  # noqa: E731  (what the files hold)
    return root / "a.safetensors", root / "b.safetensors", {n: as32(w) for n, w in base.items()}, \
        {n: as32(w) for n, w in tuned.items()}


def test_compare_routes_angles_gap_and_not_applicable_sides(files):
    a, b, base, tuned = files
    alone = opdgeo.compare(a, b, metrics="angles", k=24, keep_angles=True)
    full = opdgeo.compare(a, b, k=24, rank=8, keep_angles=True)
    assert alone.stats["tuned_warm"] == 1 and alone.stats["tuned_dense"] == 2  # gate warm; o and k dense
    assert full.stats["tuned_warm"] == 0 and full.stats["tuned_dense"] == 3  # with nss: one dense decomposition
    rows = {r["name"]: r for r in alone.matrices}
    for name in base:
        left_ref, right_ref = _angles_ref(base[name], tuned[name], 24)
        S0 = np.linalg.svd(base[name], compute_uv=False)
        gap = (S0[23] - (S0[24] if len(S0) > 24 else 0.0)) / S0[0]
        assert rows[name]["rel_gap"] == pytest.approx(gap, rel=1e-10) and rows[name]["k"] == 24
        for side, ref in (("left", left_ref), ("right", right_ref)):
            got = alone.angles[name][side]
            if side == "left" and base[name].shape[0] == 24:  # k = m: the whole space
                assert len(got) == 0 and rows[name][f"angle_{side}_max_deg"] is None
                assert rows[name][f"angle_{side}_mean_deg"] is None
                assert "angles left: k = 24 spans the whole 24-dim space (not applicable)" in rows[name]["note"]
                continue
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
            np.testing.assert_allclose(full.angles[name][side], got, rtol=0, atol=1e-6)  # warm == dense
            assert rows[name][f"angle_{side}_max_deg"] == pytest.approx(ref.max(), abs=1e-6)
    s = alone.summary
    left_maxes = [rows[n]["angle_left_max_deg"] for n in base if rows[n]["angle_left_max_deg"] is not None]
    assert len(left_maxes) == 2 and s["mean_angle_left_max_deg"] == pytest.approx(np.mean(left_maxes), rel=1e-12)
    assert s["n_angles_not_applicable"] == {"left": 1, "right": 0}
    ill = [n for n in base if rows[n]["rel_gap"] < ILL_CONDITIONED_GAP]
    assert ill == ["model.layers.0.self_attn.o_proj.weight"] and s["n_ill_conditioned"] == 1
    well = [rows[n]["angle_right_max_deg"] for n in base if n not in ill]
    assert s["mean_angle_right_max_deg_well_conditioned"] == pytest.approx(np.mean(well), rel=1e-12)
    assert s["mean_angle_left_max_deg_well_conditioned"] == pytest.approx(
        rows["model.layers.0.mlp.gate_proj.weight"]["angle_left_max_deg"], rel=1e-12)


def test_compare_k_fraction_and_square_k_spanning_both_sides(files):
    a, b, base, _ = files
    res = opdgeo.compare(a, b, metrics="angles,nss", k="1/8")
    rows = {r["name"]: r for r in res.matrices}
    assert [rows[n]["k"] for n in base] == [25, 20, 3]  # 200/8 -> 25, 160/8 -> 20, 24/8 -> 3
    assert res.summary["settings"]["k"] == "1/8"
    everything = opdgeo.compare(a, b, metrics="angles,nss", k=1000)  # capped at min(m, n)
    o = next(r for r in everything.matrices if r["name"].endswith("o_proj.weight"))
    assert o["angle_left_max_deg"] is None and o["angle_right_max_deg"] is None and o["nss"] > 0
    assert "angles left" in o["note"] and "angles right" in o["note"]
    assert everything.summary["n_angles_not_applicable"] == {"left": 2, "right": 2}
    gate = next(r for r in everything.matrices if r["name"].endswith("gate_proj.weight"))
    assert gate["angle_left_max_deg"] > 0 and gate["angle_right_max_deg"] is None  # column space vs whole R^200
