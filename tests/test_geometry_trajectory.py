"""Trajectory geometry (SPEC §2): randomized top-k SVD accuracy, stable rank, Hill index,
Sim_K, locking step and cross-run overlap, each against float64 numpy or a known answer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from opdgeo.geometry.lowrank import (
    EXACT_SVD_MAX_DIM,
    exact_svd,
    hill_alpha,
    randomized_top_svd,
    stable_rank,
    stable_rank_of,
    top_svd,
)
from opdgeo.geometry.overlap import jaccard, jaccard_baseline, one_sided_overlap
from opdgeo.geometry.subspace import locking_step, subspace_similarity

# The accuracy contract of randomized_top_svd, against a full float64 SVD.
SIGMA1_RTOL = 1e-4
TOP32_RTOL = 1e-3
SIM_ATOL = 1e-3




# References are float64 LAPACK (torch.linalg, one thread: numpy's OpenBLAS threads crawl
# on a loaded 2-core machine) or known by construction.


def _orth(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Haar-random orthonormal columns [rows, cols], float64."""
    q, r = torch.linalg.qr(torch.from_numpy(rng.standard_normal((rows, cols))))
    return (q * torch.sign(torch.diagonal(r))).numpy()


def _svd(a: np.ndarray):
    u, s, vh = torch.linalg.svd(torch.from_numpy(a), full_matrices=False)
    return u.numpy(), s.numpy(), vh.numpy()


def _with_spectrum(s: np.ndarray, m: int, n: int, seed: int):
    """A = U diag(s) Vᵀ with Haar-random U [m, r], V [n, r]: the exact SVD is known."""
    rng = np.random.default_rng(seed)
    u, v = _orth(m, len(s), rng), _orth(n, len(s), rng)
    return (u * s) @ v.T, s, v


M, N = 400, 240
_i = np.arange(1, N + 1, dtype=np.float64)


def _flat_top():
    s = 0.5 * (_i / 20) ** -1.0
    s[:20] = 1.0 - 1e-4 * np.arange(20) / 20  # σ1..σ20 within 1e-4, then a factor-2 drop
    return s


def _cluster_at_32():
    s = _i**-0.5
    s[27:37] = s[31] * (1 + 1e-5 * np.arange(10, 0, -1))  # σ28..σ37 within 1e-4: straddles k = 32
    return s


def _rank10():
    s = np.zeros(N)
    s[:10] = np.linspace(1.0, 0.3, 10)
    return s


SPECTRA = {
    "geometric": (lambda: 0.9**_i, 16),
    "geometric-fast": (lambda: 0.7**_i, 16),  # σ32 ≈ 1e-5 σ1: tests float64 Rayleigh-Ritz
    "power-law-0.5": (lambda: _i**-0.5, 16),
    "power-law-0.3": (lambda: _i**-0.3, 16),  # slow decay: many iterations
    "flat-top-20": (_flat_top, 20),  # Sim_16 undefined (σ16 ≈ σ17): test the span of the flat block
    "cluster-at-32": (_cluster_at_32, 16),
    "rank-10": (_rank10, None),  # fewer than 16 nonzero σ: no Sim defined
}


def _check_values(s_hat: np.ndarray, s_ref: np.ndarray):
    k = len(s_hat)
    assert abs(s_hat[0] - s_ref[0]) <= SIGMA1_RTOL * s_ref[0]
    # relative on the nonzero values; zero values must come out below 1e-6 σ1
    err = np.abs(s_hat - s_ref[:k])
    bound = TOP32_RTOL * s_ref[:k] + np.where(s_ref[:k] == 0, 1e-6 * s_ref[0], 0.0)
    assert np.all(err <= bound), f"worst {np.max(err / np.maximum(s_ref[:k], 1e-300)):.2e}"


@pytest.mark.parametrize("name", list(SPECTRA))
def test_randomized_svd_meets_accuracy_contract(name):
    make_s, sim_k = SPECTRA[name]
    a, s_ref, v_ref = _with_spectrum(make_s(), M, N, seed=1)
    # a second update sharing half of a's top subspace, so that Sim is not trivially 0 or 1
    b, _, v_b = _with_spectrum(_i**-0.7, M, N, seed=2)
    b = b + 0.5 * a
    _, s_b_ref, vh_b = _svd(b)
    u, s, v = randomized_top_svd(torch.from_numpy(a), 32)
    assert u.shape == (M, 32) and s.shape == (32,) and v.shape == (N, 32)
    assert u.dtype == s.dtype == v.dtype == torch.float64
    _check_values(s.numpy(), s_ref)
    # orthonormality of a float64 QR/SVD basis is backward stable: ~sqrt(n)*eps, whatever the spectrum
    assert np.allclose(v.numpy().T @ v.numpy(), np.eye(32), atol=1e-10)
    assert np.allclose(u.numpy().T @ u.numpy(), np.eye(32), atol=1e-10)
    if sim_k is not None:
        # the subspace tested is well defined: a relative gap σ_K / σ_{K+1} >= 1.01
        assert s_ref[sim_k - 1] >= 1.01 * s_ref[sim_k]
        vb = vh_b.T
        ref = np.sum((v_ref[:, :sim_k].T @ vb[:, :sim_k]) ** 2) / sim_k
        assert 0.05 < ref < 0.95
        got = subspace_similarity(v, torch.from_numpy(vb), K=sim_k)
        assert abs(got - ref) <= SIM_ATOL
        assert subspace_similarity(v, torch.from_numpy(v_ref), K=sim_k) >= 1 - SIM_ATOL


def test_randomized_svd_low_rank_plus_noise_bulk_in_top32():
    """Signal of rank 16 plus Gaussian noise whose bulk edge sets σ17..σ32 (adversarial)."""
    rng = np.random.default_rng(5)
    a, _, _ = _with_spectrum(_i[:16] ** -0.5, M, N, seed=3)
    a = a + 0.3 * rng.standard_normal((M, N)) / math.sqrt(M)
    _, s_ref, vh = _svd(a)
    _, s, v = randomized_top_svd(torch.from_numpy(a), 32)
    _check_values(s.numpy(), s_ref)
    assert subspace_similarity(v, torch.from_numpy(vh.T), K=16) >= 1 - SIM_ATOL


@pytest.mark.parametrize("scale", [1e-30, 1e25])
def test_randomized_svd_tiny_and_huge_norms(scale):
    a, s_ref, v_ref = _with_spectrum(_i**-0.5, M, N, seed=4)
    _, s, v = randomized_top_svd(torch.from_numpy(a * scale), 32)
    _check_values(s.numpy() / scale, s_ref)
    assert subspace_similarity(v, torch.from_numpy(v_ref), K=16) >= 1 - SIM_ATOL


def test_randomized_svd_large_shape_once():
    """6144 × 2048 (a Qwen3-1.7B MLP shape), float32 input, power-law spectrum of rank 256."""
    rng = np.random.default_rng(6)
    r = 256
    s_ref = np.zeros(2048)
    s_ref[:r] = np.arange(1, r + 1) ** -0.4
    u0 = _orth(6144, r, rng)
    v0 = _orth(2048, r, rng)
    a = torch.from_numpy((u0 * s_ref[:r]) @ v0.T).float()  # rounding to float32 moves σ by ~1e-7 relative
    _, s, v = randomized_top_svd(a, 32)
    _check_values(s.numpy(), s_ref)
    assert subspace_similarity(v, torch.from_numpy(v0), K=16) >= 1 - SIM_ATOL


def test_randomized_svd_exact_path_zero_matrix_and_seed():
    a, s_ref, _ = _with_spectrum(0.8 ** np.arange(1, 41.0), 50, 40, seed=7)
    _, s, _ = randomized_top_svd(torch.from_numpy(a), 16)  # l = 48 >= 40: exact SVD
    # the exact path is one float64 SVD of the same matrix as numpy's: singular values are perfectly
    # conditioned (Weyl: |d sigma| <= ||dA||_2 ~ eps*sigma_1), and this spectrum spans < 1e3, so rtol 1e-12 holds
    assert np.allclose(s.numpy(), s_ref[:16], rtol=1e-12, atol=0)
    u, s, v = randomized_top_svd(torch.zeros(30, 20), 4, oversample=2)
    assert torch.equal(s, torch.zeros(4, dtype=torch.float64))
    assert torch.allclose(v.T @ v, torch.eye(4, dtype=torch.float64))
    w = torch.from_numpy(_with_spectrum(_i**-0.5, M, N, seed=8)[0])
    r1 = randomized_top_svd(w, 8, seed=3)
    r2 = randomized_top_svd(w, 8, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(r1, r2))


@pytest.mark.parametrize(
    "kwargs",
    [dict(k=0), dict(k=241), dict(k=2.0), dict(k=4, oversample=-1), dict(k=4, n_iter=-1), dict(k=4, tol=0.0)],
)
def test_randomized_svd_rejects_bad_arguments(kwargs):
    w = torch.randn(300, 240)
    with pytest.raises(ValueError):
        randomized_top_svd(w, **kwargs)


def test_randomized_svd_rejects_bad_matrices():
    with pytest.raises(ValueError):
        randomized_top_svd(torch.randn(5), 1)
    with pytest.raises(TypeError):
        randomized_top_svd(torch.ones(4, 4, dtype=torch.int64), 1)
    w = torch.randn(8, 8)
    w[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        randomized_top_svd(w, 1)
    with pytest.raises(TypeError):
        randomized_top_svd(torch.randn(8, 8), 1, dtype=torch.float16)


@pytest.mark.parametrize("shape", [(EXACT_SVD_MAX_DIM, 300), (500, EXACT_SVD_MAX_DIM), (EXACT_SVD_MAX_DIM + 1, 300)])
def test_top_svd_route_by_size(shape):
    """Up to EXACT_SVD_MAX_DIM the exact thin SVD (bitwise its top k), above it the randomized one (bitwise);
    both meet the accuracy contract against numpy on a slow power-law spectrum (where the two differ)."""
    r = min(shape)
    a, s_ref, v_ref = _with_spectrum(np.arange(1, r + 1, dtype=np.float64) ** -0.3, *shape, seed=10)
    w = torch.from_numpy(a)
    got = top_svd(w, 32)
    if r <= EXACT_SVD_MAX_DIM:
        u, s, v = exact_svd(w)
        ref = (u[:, :32], s[:32], v[:, :32])
    else:
        ref = randomized_top_svd(w, 32)
        assert not torch.equal(got[1], exact_svd(w)[1][:32])  # negative control: not the exact route
    assert all(torch.equal(x, y) for x, y in zip(got, ref))
    _check_values(got[1].numpy(), s_ref)
    assert subspace_similarity(got[2], torch.from_numpy(v_ref), K=16) >= 1 - SIM_ATOL


def test_top_svd_zero_and_bad_arguments():
    u, s, v = top_svd(torch.zeros(30, 20), 4)  # the randomized route's convention for a zero matrix
    assert all(torch.equal(x, y) for x, y in zip((u, s, v), randomized_top_svd(torch.zeros(30, 20), 4)))
    with pytest.raises(ValueError, match="k must be"):
        top_svd(torch.randn(30, 20), 21)
    w = torch.randn(8, 8)
    w[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        top_svd(w, 2)


@pytest.mark.parametrize("shape", [(30, 20), (20, 30)])
def test_exact_svd_tall_and_wide_against_numpy(shape):
    a = np.random.default_rng(9).standard_normal(shape)
    u, s, v = exact_svd(torch.from_numpy(a))
    assert u.shape == (shape[0], 20) and v.shape == (shape[1], 20)
    # Weyl: float64 singular values carry ~eps*sigma_1 absolute error on any LAPACK; this Gaussian matrix
    # has sigma_min/sigma_1 > 1e-2, so 1e-12 relative is a 100x margin; reconstruction is backward stable
    assert np.allclose(s.numpy(), np.linalg.svd(a, compute_uv=False), rtol=1e-12, atol=0)
    assert np.allclose((u.numpy() * s.numpy()) @ v.numpy().T, a, atol=1e-12)
    assert np.allclose(v.numpy().T @ v.numpy(), np.eye(20), atol=1e-12)


def test_stable_rank_against_numpy():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((30, 20)) @ np.diag(np.linspace(3, 0.1, 20))
    s = np.linalg.svd(a, compute_uv=False)
    ref = np.sum(a**2) / s[0] ** 2
    # ||A||_F^2 / sigma_1^2: a float64 sum (order only) over a perfectly conditioned largest singular value
    assert stable_rank_of(torch.from_numpy(a)) == pytest.approx(ref, rel=1e-12)
    assert stable_rank(np.sum(a**2), s[0]) == pytest.approx(ref, rel=1e-12)
    assert stable_rank_of(torch.from_numpy(np.outer(np.arange(1.0, 4), np.arange(1.0, 3)))) == pytest.approx(1.0)
    assert stable_rank_of(torch.eye(7)) == pytest.approx(7.0)
    assert math.isnan(stable_rank(0.0, 0.0))
    assert math.isnan(stable_rank_of(torch.zeros(3, 4)))
    for args in [(-1.0, 1.0), (1.0, -1.0), (float("inf"), 1.0), (1.0, 2.0)]:
        with pytest.raises(ValueError):
            stable_rank(*args)


def test_hill_alpha_against_numpy_formula():
    rng = np.random.default_rng(1)
    s = np.sort(rng.uniform(0.1, 5.0, 50))[::-1].copy()
    for k in (2, 10, 32, 50):
        ref = 1.0 / np.mean(np.log(s[: k - 1] / s[k - 1]))
        # the same closed formula on the same float64 inputs: only log and mean rounding (~k*eps)
        assert hill_alpha(torch.from_numpy(s), k=k) == pytest.approx(ref, rel=1e-12)
    # order of the input does not matter; only the top k are used
    assert hill_alpha(torch.from_numpy(rng.permutation(s)), k=32) == pytest.approx(
        1.0 / np.mean(np.log(s[:31] / s[31])), rel=1e-12
    )
    # power law σ_i = i^(-1/a): log(σ_i/σ_k) = (1/a) log(k/i), so α̂ = a / mean(log(k/i))
    k = 32
    i = np.arange(1, k + 1)
    assert hill_alpha(torch.from_numpy(i**-2.0), k=k) == pytest.approx(0.5 / np.mean(np.log(k / i[:-1])), rel=1e-12)


def test_hill_alpha_recovers_pareto_index():
    alpha, n, k = 1.5, 200_000, 2001
    rng = np.random.default_rng(12345)
    x = rng.pareto(alpha, n) + 1.0  # classical Pareto, x_m = 1: P(X > x) = x^-alpha
    est = hill_alpha(torch.from_numpy(x), k=k)
    se = alpha / math.sqrt(k - 1)
    assert abs(est - alpha) <= 3 * se
    # and a different index is rejected at that precision
    assert abs(est - 1.3) > 3 * se


def test_hill_alpha_edge_cases():
    assert math.isnan(hill_alpha([3.0, 2.0, 0.0], k=3))
    assert hill_alpha([2.0, 2.0, 2.0], k=3) == math.inf
    with pytest.raises(ValueError, match="at least k = 32"):
        hill_alpha(np.ones(10), k=32)
    with pytest.raises(ValueError):
        hill_alpha([1.0, 0.5], k=1)
    with pytest.raises(ValueError):
        hill_alpha([1.0, float("nan"), 0.5], k=2)
    with pytest.raises(ValueError):
        hill_alpha([1.0, -0.5], k=2)
    with pytest.raises(ValueError):
        hill_alpha(np.ones((4, 4)), k=2)


def test_subspace_similarity_identities():
    rng = np.random.default_rng(2)
    n, K = 64, 16
    q = torch.from_numpy(_orth(n, 2 * K, rng))
    # ||A^T B||_F^2 / K of float64 orthonormal bases: exact identities up to ~K*n*eps
    assert subspace_similarity(q[:, :K], q[:, :K], K) == pytest.approx(1.0, abs=1e-12)
    # same subspace, different basis
    rot = torch.from_numpy(_orth(K, K, rng))
    assert subspace_similarity(q[:, :K], q[:, :K] @ rot, K) == pytest.approx(1.0, abs=1e-12)
    # nested: K' shared directions, the rest orthogonal -> K'/K
    for k_shared in (0, 4, 12):
        b = torch.cat([q[:, :k_shared], q[:, K : 2 * K - k_shared]], dim=1)
        assert subspace_similarity(q[:, :K], b, K) == pytest.approx(k_shared / K, abs=1e-12)
    # against float64 numpy on general bases; only the first K columns count
    a, b = _orth(n, 20, rng), _orth(n, 24, rng)
    ref = np.sum((a[:, :K].T @ b[:, :K]) ** 2) / K
    assert subspace_similarity(torch.from_numpy(a), torch.from_numpy(b), K) == pytest.approx(ref, rel=1e-12)


def test_subspace_similarity_random_subspaces_expectation():
    """E[Sim_K] = K/n for independent uniformly random K-dimensional subspaces of R^n."""
    rng = np.random.default_rng(3)
    n, K, draws = 128, 16, 200
    sims = [
        subspace_similarity(torch.from_numpy(_orth(n, K, rng)), torch.from_numpy(_orth(n, K, rng)), K)
        for _ in range(draws)
    ]
    mean, sd = np.mean(sims), np.std(sims, ddof=1)
    assert abs(mean - K / n) <= 4 * sd / math.sqrt(draws)
    # the spread: V_aᵀV_b has K² entries of variance ≈ 1/n, so K·Sim_K ≈ χ²_{K²}/n and
    # sd(Sim_K) ≈ √2/n, (n − K)/n of it after the finite-n correction
    assert sd == pytest.approx(math.sqrt(2) * (n - K) / n**2, rel=0.25)


def test_subspace_similarity_validation():
    q = torch.linalg.qr(torch.randn(20, 8, dtype=torch.float64))[0]
    with pytest.raises(ValueError, match="columns"):
        subspace_similarity(q, q, K=9)
    with pytest.raises(ValueError, match="orthonormal"):
        subspace_similarity(2 * q, q, K=4)
    with pytest.raises(ValueError, match="row counts"):
        subspace_similarity(q, torch.linalg.qr(torch.randn(21, 8, dtype=torch.float64))[0], K=4)
    with pytest.raises(ValueError):
        subspace_similarity(q, q, K=0)


def test_locking_step_constructed_sequences():
    steps = [10, 20, 30, 40]
    assert locking_step(steps, [0.2, 0.5, 0.7, 0.79]) is None  # never locks
    assert locking_step(steps, [0.85, 0.9, 0.95, 0.99]) == 10  # locks at the first
    assert locking_step(steps, [0.9, 0.7, 0.85, 0.9]) == 30  # drops back, then relocks
    assert locking_step(steps, [0.9, 0.95, 0.99, 0.5]) is None  # falls off at the end
    assert locking_step(steps, [0.5, 0.8, 0.8, 0.9]) == 20  # threshold is inclusive
    assert locking_step(steps, [0.9, float("nan"), 0.9, 0.9]) == 30  # NaN is not locked
    assert locking_step(steps, [0.5, 0.6, 0.65, 0.7], threshold=0.6) == 20
    assert locking_step([], []) is None
    with pytest.raises(ValueError):
        locking_step([10, 10], [0.9, 0.9])
    with pytest.raises(ValueError):
        locking_step([10, 20], [0.9])
    with pytest.raises(ValueError):
        locking_step([10, 20], [0.9, 0.9], threshold=float("nan"))


def test_overlap_and_jaccard_hand_computed():
    a = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)  # |A| = 3
    b = torch.tensor([[1, 0, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)  # |B| = 4, |A∩B| = 2
    assert one_sided_overlap(a, b) == pytest.approx(2 / 3)
    assert one_sided_overlap(b, a) == pytest.approx(2 / 4)
    assert jaccard(a, b) == pytest.approx(2 / 5)  # |A∪B| = 5
    assert jaccard(b, a) == pytest.approx(2 / 5)
    none = torch.zeros(2, 4, dtype=torch.bool)
    assert math.isnan(one_sided_overlap(none, b))
    assert one_sided_overlap(a, none) == 0.0
    assert math.isnan(jaccard(none, none))
    assert jaccard(a, a) == 1.0
    with pytest.raises(ValueError):
        jaccard(a, b.reshape(4, 2))
    with pytest.raises(TypeError):
        one_sided_overlap(a.float(), b)


def test_overlap_baselines_match_independent_random_masks():
    p, q = 0.3, 0.6
    assert jaccard_baseline(p, q) == pytest.approx(0.18 / 0.72)
    assert jaccard_baseline(1.0, 1.0) == 1.0
    assert jaccard_baseline(0.0, 0.5) == 0.0
    assert math.isnan(jaccard_baseline(0.0, 0.0))
    with pytest.raises(ValueError):
        jaccard_baseline(1.2, 0.5)
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(400, 500, generator=gen) < p
    b = torch.rand(400, 500, generator=gen) < q
    n = a.numel()
    # sd of a binomial proportion: ~1e-3 here; 4 sd tolerance
    assert one_sided_overlap(a, b) == pytest.approx(float(b.float().mean()), abs=4 * math.sqrt(q * (1 - q) / (p * n)))
    assert jaccard(a, b) == pytest.approx(jaccard_baseline(float(a.float().mean()), float(b.float().mean())), abs=5e-3)
