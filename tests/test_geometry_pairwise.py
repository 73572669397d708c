"""Pairwise geometry functions (SPEC §1) against independent float64 numpy/scipy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg as sl
import torch

from opdgeo.geometry import (
    BITWISE_ETA_BOUND,
    Subspaces,
    bf16_unchanged_mask,
    bf16_visible_mask,
    legacy_unchanged_mask,
    low_magnitude_mask,
    mask_overlap,
    normalized_spectral_shift,
    principal_angles,
    principal_mask,
    singular_values,
    top_singular_subspaces,
)
from opdgeo.geometry.sparsity import bf16_unchanged_count

# ----------------------------------------------------------------------------------------
# helpers: an independent bf16 decoder and the η rule in numpy float64


def bits_to_bf16(bits: np.ndarray) -> torch.Tensor:
    """bf16 tensor with the given 16-bit patterns (torch only reinterprets the bytes)."""
    return torch.from_numpy(bits.astype(np.uint16).view(np.int16).copy()).view(torch.bfloat16)


def bf16_bits_to_f64(bits: np.ndarray) -> np.ndarray:
    """Decode bf16 bit patterns in numpy: bf16 is the top half of a float32."""
    with np.errstate(invalid="ignore"):  # NaN payloads
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def f64_of(t: torch.Tensor) -> np.ndarray:
    """Decode a bf16 tensor through its bits, independently of torch's conversions."""
    return bf16_bits_to_f64(t.view(torch.int16).numpy().view(np.uint16))


def eta_rule_reference(a: np.ndarray, b: np.ndarray, eta: float) -> np.ndarray:
    """SPEC §1 η rule on float64 values, with the documented non-finite semantics."""
    with np.errstate(invalid="ignore", over="ignore"):
        fin = np.isfinite(a) & np.isfinite(b)
        rule = np.abs(b - a) <= eta * np.maximum(np.abs(a), np.abs(b))
    return (fin & rule) | (a == b)


ALL_BITS = np.arange(1 << 16, dtype=np.int64)  # every bf16 pattern


def neighbour_pairs() -> tuple[np.ndarray, np.ndarray]:
    """Every bf16 pattern paired with its ±1, ±2 neighbours, its negation, ±0 and itself."""
    left, right = [], []
    for off in (1, 2, -1, -2, 0x8000, 0):
        left.append(ALL_BITS)
        right.append((ALL_BITS + off) % (1 << 16))
    left += [ALL_BITS, ALL_BITS]
    right += [np.zeros_like(ALL_BITS), np.full_like(ALL_BITS, 0x8000)]
    return np.concatenate(left), np.concatenate(right)


# ----------------------------------------------------------------------------------------
# sparsity


def test_bitwise_path_equals_eta_rule_on_every_bf16_value_and_its_neighbours():
    # The proof that bitwise equality (±0 folded, NaN changed) is the η rule for η < 2**-8,
    # checked exhaustively over all 65536 patterns against their nearest neighbours
    # (the near-threshold pairs) and the sign/zero cases.
    lb, rb = neighbour_pairs()
    a, b = bits_to_bf16(lb), bits_to_bf16(rb)
    fa, fb = bf16_bits_to_f64(lb), bf16_bits_to_f64(rb)
    fast = bf16_unchanged_mask(a, b, eta=1e-3).numpy()  # bitwise path
    for eta in (1e-3, 0.0, BITWISE_ETA_BOUND * 0.999):
        np.testing.assert_array_equal(fast, eta_rule_reference(fa, fb, eta))
    # the formula path (eta >= 2**-9) agrees with the bitwise path up to 2**-8 ...
    for eta in (BITWISE_ETA_BOUND, 2.0**-8 * (1 - 2.0**-30)):
        formula = bf16_unchanged_mask(a, b, eta=eta).numpy()
        np.testing.assert_array_equal(formula, fast)
        np.testing.assert_array_equal(formula, eta_rule_reference(fa, fb, eta))
    # ... and the bound is tight: at 2**-8 a power of two and its predecessor are "unchanged"
    at_bound = bf16_unchanged_mask(a, b, eta=2.0**-8).numpy()
    np.testing.assert_array_equal(at_bound, eta_rule_reference(fa, fb, 2.0**-8))
    assert (at_bound & ~fast).sum() > 0
    one, pred = bits_to_bf16(np.array([0x3F80])), bits_to_bf16(np.array([0x3F7F]))  # 1.0, 1 - 2**-8
    assert not bf16_unchanged_mask(one, pred, eta=1e-3).item()
    assert bf16_unchanged_mask(one, pred, eta=2.0**-8).item()


def test_bitwise_path_matches_ieee_equality_of_rounded_values():
    lb, rb = neighbour_pairs()
    a, b = bits_to_bf16(lb), bits_to_bf16(rb)
    expected = (a.float() == b.float()).numpy()  # IEEE: ±0 equal, NaN unequal
    np.testing.assert_array_equal(bf16_unchanged_mask(a, b).numpy(), expected)
    np.testing.assert_array_equal(bf16_visible_mask(a, b).numpy(), ~expected)


def test_int16_route_and_flush_denormal_mode_keep_the_bitwise_rule():
    from opdgeo.geometry.sparsity import _int16_unchanged

    lb, rb = neighbour_pairs()
    a, b = bits_to_bf16(lb), bits_to_bf16(rb)
    expected = eta_rule_reference(bf16_bits_to_f64(lb), bf16_bits_to_f64(rb), 1e-3)
    np.testing.assert_array_equal(_int16_unchanged(a, b).numpy(), expected)
    # with subnormals flushed, IEEE == says 2**-133 == 2**-132; the mask must not
    if not torch.set_flush_denormal(True):
        pytest.skip("flush-denormal mode not supported on this CPU")
    try:
        sub1, sub2 = bits_to_bf16(np.array([1, 0x0001, 0x8001])), bits_to_bf16(np.array([2, 0x8000, 0x0001]))
        assert bf16_unchanged_mask(sub1, sub2).tolist() == [False, False, False]
        np.testing.assert_array_equal(bf16_unchanged_mask(a, b).numpy(), expected)
    finally:
        torch.set_flush_denormal(False)


def test_random_fp32_pairs_near_threshold_both_paths():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(200_000, generator=g) * torch.exp(torch.randn(200_000, generator=g) * 4)
    rel = torch.exp(torch.empty(200_000).uniform_(math.log(2**-12), math.log(2**-5), generator=g))
    sign = torch.where(torch.rand(200_000, generator=g) < 0.5, -1.0, 1.0)
    w1 = w0 * (1 + sign * rel)  # relative changes straddling the bf16 resolution
    w1[::7] = w0[::7]  # exactly equal
    fa, fb = f64_of(w0.to(torch.bfloat16)), f64_of(w1.to(torch.bfloat16))
    fast = bf16_unchanged_mask(w0, w1).numpy()
    np.testing.assert_array_equal(fast, eta_rule_reference(fa, fb, 1e-3))
    assert 0.2 < fast.mean() < 0.8  # the set really straddles the threshold
    for eta in (2.0**-9, 3e-3, 0.01, 0.1):
        np.testing.assert_array_equal(bf16_unchanged_mask(w0, w1, eta=eta).numpy(), eta_rule_reference(fa, fb, eta))
    # crafted exactly-at-threshold pairs for the formula path: |b - a| == eta * max
    a = np.array([1.0, 2.0, 0.5, -4.0])
    b = a * (1 - 2.0**-4)  # exact in bf16
    ta, tb = torch.tensor(a, dtype=torch.bfloat16), torch.tensor(b, dtype=torch.bfloat16)
    assert bf16_unchanged_mask(ta, tb, eta=2.0**-4).all()
    assert not bf16_unchanged_mask(ta, tb, eta=2.0**-4 * (1 - 2.0**-40)).any()


def test_round_to_nearest_even_half_ulp_ties():
    # bf16 ULP at 1.0 is 2**-7: 1 + 2**-8 is a tie and rounds to the even pattern (1.0);
    # 1 + 2**-7 + 2**-8 is a tie between an odd and an even pattern and rounds up.
    w0 = torch.tensor([1.0, 1.0, 1.0 + 2**-7, 1.0 + 2**-7], dtype=torch.float32)
    w1 = torch.tensor([1.0 + 2**-8, 1.0 + 2**-8 + 2**-20, 1.0 + 2**-7 + 2**-8, 1.0 + 2**-7 + 2**-8 - 2**-20])
    assert bf16_unchanged_mask(w0, w1).tolist() == [True, False, False, True]
    assert bf16_unchanged_mask(w0, w1, eta=0.003).tolist() == [True, False, False, True]
    # values one half-ULP apart straddling a rounding boundary are rounded apart
    assert not bf16_unchanged_mask(torch.tensor([1.0 + 2**-9]), torch.tensor([1.0 + 2**-9 + 2**-8])).item()


def test_signed_zero_subnormals_nan_inf_on_both_paths_and_legacy():
    f = float
    tiny = 2.0**-133  # smallest bf16 subnormal
    cases = [  # (w0, w1, unchanged)
        (0.0, -0.0, True),
        (-0.0, 0.0, True),
        (0.0, 2.0**-140, True),  # an fp32 subnormal that rounds to bf16 zero
        (0.0, tiny, False),
        (tiny, 2 * tiny, False),
        (5 * tiny, 5 * tiny, True),
        (-tiny, tiny, False),
        (2.0**-126, 2.0**-126 - tiny, False),  # smallest normal vs largest subnormal
        (f("nan"), f("nan"), False),
        (f("nan"), 1.0, False),
        (1.0, f("nan"), False),
        (f("inf"), f("inf"), True),
        (f("-inf"), f("-inf"), True),
        (f("inf"), f("-inf"), False),
        (f("inf"), 3.3895e38, False),  # vs the largest finite bf16
        (3.3895e38, -3.3895e38, False),
        (1.5, 1.5, True),
    ]
    w0 = torch.tensor([c[0] for c in cases], dtype=torch.float32)
    w1 = torch.tensor([c[1] for c in cases], dtype=torch.float32)
    expected = [c[2] for c in cases]
    for eta in (1e-3, 2.0**-9, 0.0039):  # bitwise path, then the formula path below 2**-8
        assert bf16_unchanged_mask(w0, w1, eta=eta).tolist() == expected, eta
    # a coarse eta absorbs the subnormal steps (ratio 2**-7) but never the non-finite cases
    coarse = bf16_unchanged_mask(w0, w1, eta=0.4).tolist()
    assert coarse[4] is False and coarse[7] is True  # |Δ|/max = 1/2 > 0.4 kept; 2**-7 absorbed
    assert coarse[:2] == [True, True] and coarse[8:14] == expected[8:14] and coarse[14] is False
    assert legacy_unchanged_mask(w0, w1, atol=0.0).tolist() == expected
    # the subnormal cases are within a huge atol; the non-finite ones never are
    legacy = legacy_unchanged_mask(w0, w1, atol=1e-5).tolist()
    assert legacy[3] and legacy[4] and legacy[7]
    assert legacy[8:11] == [False, False, False] and legacy[11:14] == [True, True, False]
    assert bf16_visible_mask(w0, w1).tolist() == [not e for e in expected]


@pytest.mark.parametrize("dt0,dt1", [(torch.float16, torch.float32), (torch.float32, torch.bfloat16), (torch.float64, torch.float16)])
def test_mixed_input_dtypes_round_through_bf16(dt0, dt1):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(64, 48, generator=g, dtype=torch.float64)
    w0 = base.to(dt0)
    w1 = (base + 1e-3 * torch.randn(64, 48, generator=g, dtype=torch.float64) * (torch.rand(64, 48, generator=g) < 0.5)).to(dt1)
    expected = eta_rule_reference(f64_of(w0.to(torch.bfloat16)), f64_of(w1.to(torch.bfloat16)), 1e-3)
    got = bf16_unchanged_mask(w0, w1)
    assert got.shape == (64, 48) and got.dtype == torch.bool
    np.testing.assert_array_equal(got.numpy(), expected)
    assert 0.05 < got.float().mean() < 0.95


def test_legacy_rule_against_numpy_including_ties():
    g = torch.Generator().manual_seed(2)
    w0 = (torch.randn(5000, generator=g) * 1e-3).to(torch.bfloat16)
    w1 = (w0.double() + torch.randn(5000, generator=g, dtype=torch.float64) * 2e-5).to(torch.bfloat16)
    fa, fb = f64_of(w0), f64_of(w1)
    np.testing.assert_array_equal(legacy_unchanged_mask(w0, w1).numpy(), np.abs(fb - fa) <= 1e-5)
    # a delta of exactly atol is unchanged, one just above is changed
    a = torch.tensor([1.0, 1.0], dtype=torch.bfloat16)
    b = torch.tensor([1.0 + 2**-7, 1.0 + 2**-6], dtype=torch.bfloat16)
    assert legacy_unchanged_mask(a, b, atol=2**-7).tolist() == [True, False]


def _reference_counts(w0: torch.Tensor, w1: torch.Tensor, eta: float) -> tuple[int, tuple, tuple]:
    """Unchanged count from the numpy η rule on independently decoded bf16 values, plus
    NaN/Inf counts of the unrounded inputs in float64 numpy."""
    a = f64_of(w0.to(torch.bfloat16).reshape(-1))
    b = f64_of(w1.to(torch.bfloat16).reshape(-1))
    r0, r1 = w0.double().reshape(-1).numpy(), w1.double().reshape(-1).numpy()
    nan = (int(np.isnan(r0).sum()), int(np.isnan(r1).sum()))
    inf = (int(np.isinf(r0).sum()), int(np.isinf(r1).sum()))
    return int(eta_rule_reference(a, b, eta).sum()), nan, inf


@pytest.mark.parametrize("chunk", [1, 7, 1000, 1 << 18])
def test_unchanged_count_equals_eta_rule_on_every_bf16_pattern_pair(chunk):
    """All 2**16 patterns against their neighbours, negation and ±0 (NaN, Inf, ±0 and
    subnormals included), in blocks that split every kind of pattern differently."""
    left, right = neighbour_pairs()
    if chunk < 100:  # keep the tiny-block cases small
        left, right = left[::97], right[::97]
    w0, w1 = bits_to_bf16(left), bits_to_bf16(right)
    n_ref, nan, inf = _reference_counts(w0, w1, 1e-3)
    got = bf16_unchanged_count(w0, w1, chunk=chunk)
    assert (got.unchanged, got.numel, got.nan, got.inf) == (n_ref, w0.numel(), nan, inf)
    assert got.unchanged == int(bf16_unchanged_mask(w0, w1).sum())
    assert not got.finite and nan[0] > 0 and nan[1] > 0
    if chunk >= 100:
        assert inf[0] > 0 and inf[1] > 0


def test_unchanged_count_clean_blocks_and_flagged_blocks_are_both_exact():
    """A finite random matrix (fast path in every block), then the same with one ±0 pair,
    one shared NaN, one Inf and one fp32 overflow to bf16 Inf placed in different blocks."""
    g = torch.Generator().manual_seed(5)
    w0 = (0.02 * torch.randn(300, 211, generator=g)).to(torch.bfloat16)
    step = 0.01 * torch.randn(300, 211, generator=g) * (torch.rand(300, 211, generator=g) < 0.4)
    w1 = (w0.float() * (1 + step)).to(torch.bfloat16)
    n_ref, _, _ = _reference_counts(w0, w1, 1e-3)
    got = bf16_unchanged_count(w0, w1, chunk=4096)
    assert got.finite and got.unchanged == n_ref and got.numel == 300 * 211
    assert got.sparsity == pytest.approx(n_ref / (300 * 211), abs=0) and 0.5 < got.sparsity < 0.7
    a, b = w0.float().clone().reshape(-1), w1.float().clone().reshape(-1)
    a[10], b[10] = 0.0, -0.0  # block 0: ±0 counts as unchanged
    a[5000] = b[5000] = float("nan")  # block 1: equal NaN patterns count as changed
    b[9000] = float("inf")  # block 2
    a[20000] = b[20000] = 3.4e38  # block 4: finite fp32, bf16 Inf on both sides -> unchanged
    a[30000] = float("-inf")  # block 7
    a, b = a.reshape(300, 211), b.reshape(300, 211)
    n_ref, nan, inf = _reference_counts(a, b, 1e-3)
    for chunk in (4096, 1 << 18):
        got = bf16_unchanged_count(a, b, chunk=chunk)
        assert (got.unchanged, got.nan, got.inf) == (n_ref, (1, 1), (1, 1)), chunk
        assert got.unchanged == int(bf16_unchanged_mask(a, b).sum())
    # the mask agrees on the planted entries: ±0 and the bf16-overflowed pair unchanged, NaN not
    mask = bf16_unchanged_mask(a, b).reshape(-1)
    assert mask[10] and mask[20000] and not mask[5000] and not mask[9000] and not mask[30000]


@pytest.mark.parametrize("dt0,dt1", [(torch.float32, torch.float32), (torch.float16, torch.bfloat16), (torch.float64, torch.float32)])
@pytest.mark.parametrize("eta", [1e-3, 0.004, 0.05])
def test_unchanged_count_mixed_dtypes_formula_path_and_non_contiguous(dt0, dt1, eta):
    g = torch.Generator().manual_seed(6)
    base = torch.randn(97, 64, generator=g, dtype=torch.float64)
    w0 = base.to(dt0)
    w1 = (base * (1 + 0.03 * torch.randn(97, 64, generator=g, dtype=torch.float64))).to(dt1)
    w0[3, 3] = 0.0
    for x0, x1 in ((w0, w1), (w0.T, w1.T)):  # the transposes are non-contiguous
        n_ref, nan, inf = _reference_counts(x0, x1, eta)
        got = bf16_unchanged_count(x0, x1, eta=eta, chunk=1000)
        assert (got.unchanged, got.nan, got.inf) == (n_ref, (0, 0), (0, 0))
        assert got.unchanged == int(bf16_unchanged_mask(x0, x1, eta=eta).sum())
    assert 0.02 < got.sparsity < 0.98


def test_unchanged_count_is_independent_of_the_thread_split():
    """Blocks are split into one range per torch thread: 1, 2 and 3 threads (ranges that
    cut through flagged blocks) give the same exact counts."""
    g = torch.Generator().manual_seed(7)
    w0 = (0.02 * torch.randn(5003, generator=g)).to(torch.bfloat16)
    w1 = torch.where(torch.rand(5003, generator=g) < 0.3, w0 * 1.01, w0)
    w0[[17, 2600, 4999]] = torch.tensor([0.0, float("nan"), float("-inf")], dtype=torch.bfloat16)
    w1[[17, 2600, 4000]] = torch.tensor([-0.0, float("nan"), float("inf")], dtype=torch.bfloat16)
    n_ref, nan, inf = _reference_counts(w0, w1, 1e-3)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            got = bf16_unchanged_count(w0, w1, chunk=301)
            assert (got.unchanged, got.nan, got.inf) == (n_ref, (1, 1), (1, 1)) == (n_ref, nan, inf), threads
    finally:
        torch.set_num_threads(before)


def test_unchanged_count_flush_denormal_mode_and_empty_and_validation():
    tiny = torch.tensor([2.0**-133, 3 * 2.0**-133, 1.0], dtype=torch.float32)
    other = torch.tensor([2 * 2.0**-133, 3 * 2.0**-133, 1.0], dtype=torch.float32)
    if torch.set_flush_denormal(True):
        try:
            assert bf16_unchanged_count(tiny, other).unchanged == 2  # distinct subnormals stay distinct
        finally:
            torch.set_flush_denormal(False)
    assert bf16_unchanged_count(tiny, other).unchanged == 2
    empty = bf16_unchanged_count(torch.zeros(0, 3), torch.zeros(0, 3))
    assert empty.unchanged == 0 and empty.numel == 0 and math.isnan(empty.sparsity) and empty.finite
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"same shape"):
        bf16_unchanged_count(x, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="eta"):
        bf16_unchanged_count(x, x, eta=-1.0)
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="chunk"):
            bf16_unchanged_count(x, x, chunk=bad)


def test_sparsity_validation_errors():
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"same shape.*\(3, 4\).*\(4, 3\)"):
        bf16_unchanged_mask(x, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="floating"):
        bf16_unchanged_mask(x, torch.zeros(3, 4, dtype=torch.int32))
    for bad in (-1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eta"):
            bf16_unchanged_mask(x, x, eta=bad)
    with pytest.raises(ValueError, match="atol"):
        legacy_unchanged_mask(x, x, atol=-1.0)
    with pytest.raises(TypeError):
        bf16_visible_mask(np.zeros(3), x)


# ----------------------------------------------------------------------------------------
# spectrum




def matrix_with_spectrum(m: int, n: int, sigma: np.ndarray, seed: int):
    """``W = Q_U diag(sigma) Q_Vᵀ`` with random orthonormal factors: its exact SVD is known."""
    rng = np.random.default_rng(seed)
    p = min(m, n)
    qu, _ = np.linalg.qr(rng.standard_normal((m, p)))
    qv, _ = np.linalg.qr(rng.standard_normal((n, p)))
    return (qu * sigma) @ qv.T, qu, qv


def check_subspaces(w, sub: Subspaces, k: int, ref, *, s_atol: float, angle_tol: float) -> None:
    """Compare with a reference SVD ``ref = (U, S, V)`` (known construction or LAPACK)."""
    m, n = w.shape
    U, S, V = ref
    assert sub.U.shape == (m, k) and sub.V.shape == (n, k) and sub.S.shape == (min(m, n),)
    assert sub.S.dtype == torch.float64 and sub.k == k
    np.testing.assert_allclose(sub.S.numpy(), S, rtol=0, atol=s_atol)
    assert np.all(np.diff(sub.S.numpy()) <= 0)
    Uk, Vk = sub.U.numpy(), sub.V.numpy()
    # orthonormality and W v_i = sigma_i u_i are backward-stable identities of a float64 SVD: ~sqrt(n)*eps
    # and ~eps*sigma_1 on any LAPACK, independent of the spectrum's gaps
    np.testing.assert_allclose(Uk.T @ Uk, np.eye(k), atol=1e-12)
    np.testing.assert_allclose(Vk.T @ Vk, np.eye(k), atol=1e-12)
    np.testing.assert_allclose(w @ Vk, Uk * sub.S.numpy()[:k], atol=1e-11 * S[0])  # W v_i = σ_i u_i
    # same subspaces: the part of the reference basis outside span(ours) bounds max sin θ
    for ours, theirs in ((Uk, U[:, :k]), (Vk, V[:, :k])):
        outside = theirs - ours @ (ours.T @ theirs)
        assert np.linalg.norm(outside) < angle_tol


@pytest.mark.parametrize("shape", [(260, 140), (140, 260), (160, 160)])
def test_top_singular_subspaces_gram_path_matches_known_svd(shape):
    m, n = shape
    p = min(m, n)
    sigma = np.sort(np.random.default_rng(3).uniform(0.1, 5.0, p))[::-1]  # distinct, well separated
    w, qu, qv = matrix_with_spectrum(m, n, sigma, seed=3)
    sub = top_singular_subspaces(torch.from_numpy(w), 64)
    check_subspaces(w, sub, 64, (qu, sigma, qv), s_atol=1e-13 * sigma[0], angle_tol=1e-11)


def test_top_singular_subspaces_small_singular_values_accurate_to_eps_sigma1():
    # Spectrum down to 1e-5 σ1: eigenvalues of WᵀW alone would carry ~eps σ1²/σ_i ~ 1e-10
    # here; the refined values ||W v_i|| must match to ~eps σ1.
    sigma = np.concatenate([np.linspace(10.0, 1.0, 100), np.geomspace(1e-1, 1e-4, 100)])
    w, qu, qv = matrix_with_spectrum(260, 200, sigma, seed=4)
    sub = top_singular_subspaces(torch.from_numpy(w), 32)
    check_subspaces(w, sub, 32, (qu, sigma, qv), s_atol=1e-13, angle_tol=1e-11)
    # down to 1e-12 σ1 (not resolvable through WᵀW): values recomputed exactly
    sigma = np.concatenate([np.linspace(10.0, 1.0, 100), np.geomspace(1e-2, 1e-12, 100)])
    w, qu, qv = matrix_with_spectrum(260, 200, sigma, seed=4)
    sub = top_singular_subspaces(torch.from_numpy(w), 32)
    check_subspaces(w, sub, 32, (qu, sigma, qv), s_atol=1e-13, angle_tol=1e-11)
    vals = singular_values(torch.from_numpy(w))
    np.testing.assert_allclose(vals.numpy(), sigma, rtol=0, atol=1e-13)


def test_top_singular_subspaces_fallbacks_rank_deficient_small_and_float32():
    # rank-deficient with k beyond the rank: the Gram route declines, the SVD route is used
    sigma = np.concatenate([np.linspace(5, 1, 150), np.zeros(50)])
    w, qu, qv = matrix_with_spectrum(220, 200, sigma, seed=5)
    sub = top_singular_subspaces(torch.from_numpy(w), 160)
    np.testing.assert_allclose(sub.S.numpy(), sigma, atol=1e-13)
    np.testing.assert_allclose(sub.U.numpy().T @ sub.U.numpy(), np.eye(160), atol=1e-12)
    # sine of the largest principal angle = ‖(I − Q Qᵀ) U‖₂ (exact in float64 to ~eps; not
    # scipy's subspace_angles, which misreports angles this small)
    u = sub.U.numpy()[:, :150]
    assert np.linalg.norm(u - qu[:, :150] @ (qu[:, :150].T @ u), 2) < 1e-11
    # a small matrix, k capped at min(m, n), bf16 input
    x = torch.randn(20, 7, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    sub = top_singular_subspaces(x, 50)
    xd = x.double().numpy()
    U, S, Vt = np.linalg.svd(xd, full_matrices=False)
    check_subspaces(xd, sub, 7, (U, S, Vt.T), s_atol=1e-13, angle_tol=1e-10)
    # float32 computation
    sigma = np.linspace(3.0, 0.5, 140)
    w32, qu, _ = matrix_with_spectrum(150, 140, sigma, seed=7)
    sub32 = top_singular_subspaces(torch.from_numpy(w32).float(), 10, dtype=torch.float32)
    assert sub32.U.dtype == torch.float32 and sub32.S.dtype == torch.float32
    np.testing.assert_allclose(sub32.S.numpy(), sigma, rtol=0, atol=1e-5)
    assert np.linalg.norm(qu[:, :10] - sub32.U.double().numpy() @ (sub32.U.double().numpy().T @ qu[:, :10])) < 1e-4


@pytest.mark.parametrize("shape", [(40, 30), (30, 40)])
def test_singular_values_against_scipy(shape):
    w = np.random.default_rng(8).standard_normal(shape)
    got = singular_values(torch.from_numpy(w).float())
    assert got.dtype == torch.float64 and got.shape == (30,)
    # both are float64 SVDs of the same matrix; a 40x30 Gaussian has sigma_min/sigma_1 ~ 0.07, so Weyl's
    # ~eps*sigma_1 absolute error is < 1e-14 relative for every value
    np.testing.assert_allclose(got.numpy(), sl.svdvals(w.astype(np.float32).astype(np.float64)), rtol=1e-13)


def test_spectrum_validation_errors():
    with pytest.raises(ValueError, match="2-D"):
        singular_values(torch.zeros(3))
    with pytest.raises(ValueError, match="k must be >= 1"):
        top_singular_subspaces(torch.eye(3), 0)
    with pytest.raises(TypeError, match="k must be an int"):
        top_singular_subspaces(torch.eye(3), 2.0)
    with pytest.raises(ValueError, match="non-finite"):
        top_singular_subspaces(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 1)
    with pytest.raises(ValueError, match="dtype"):
        singular_values(torch.eye(3), dtype=torch.float16)


def test_normalized_spectral_shift_known_values():
    s0 = torch.tensor([4.0, 3.0])  # norm 5
    s1 = torch.tensor([4.0, 3.0 + 0.5])  # spectrum [4, 3.5]
    # hand-computed: ||(0, 0.5)|| / ||(4, 3)|| = 0.5/5, one float64 rounding
    assert normalized_spectral_shift(s0, s1) == pytest.approx(0.1, rel=1e-15)
    # inputs are sorted descending first: [3.5, 4] is the spectrum [4, 3.5]
    assert normalized_spectral_shift(s0, torch.tensor([3.5, 4.0])) == pytest.approx(0.1, rel=1e-15)
    # not symmetric: the normalizer is the origin's spectrum
    assert normalized_spectral_shift(torch.tensor([2.0]), torch.tensor([3.0])) == pytest.approx(0.5)
    assert normalized_spectral_shift(torch.tensor([3.0]), torch.tensor([2.0])) == pytest.approx(1 / 3)
    rng = np.random.default_rng(9)
    a, b = np.sort(rng.random(100))[::-1], np.sort(rng.random(100))[::-1]
    ref = np.linalg.norm(b - a) / np.linalg.norm(a)
    # the same float64 norms of the same 100 values: summation order only (~100*eps)
    assert normalized_spectral_shift(torch.tensor(a.copy()).float(), torch.tensor(b.copy())) == pytest.approx(
        np.linalg.norm(b - a.astype(np.float32).astype(np.float64)) / np.linalg.norm(a.astype(np.float32).astype(np.float64)), rel=1e-14
    )
    assert normalized_spectral_shift(torch.tensor(a.copy()), torch.tensor(b.copy())) == pytest.approx(ref, rel=1e-14)
    assert normalized_spectral_shift(torch.zeros(3), torch.zeros(3)) == 0.0
    assert normalized_spectral_shift(torch.zeros(3), torch.ones(3)) == math.inf
    assert math.isnan(normalized_spectral_shift(torch.tensor([1.0, float("nan")]), torch.ones(2)))
    with pytest.raises(ValueError, match="same length.*3 and 2"):
        normalized_spectral_shift(torch.ones(3), torch.ones(2))


# ----------------------------------------------------------------------------------------
# angles


def orthonormal(m: int, k: int, seed: int) -> np.ndarray:
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((m, k)))[0]


def basis_pair_with_angles(m: int, theta: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal A, B [m, k] whose principal angles are exactly ``theta`` (up to rounding of Q)."""
    k = len(theta)
    a = np.zeros((m, k))
    b = np.zeros((m, k))
    a[:k, :k] = np.eye(k)
    b[:k, :k] = np.diag(np.cos(theta))
    b[k : 2 * k, :k] = np.diag(np.sin(theta))
    q = orthonormal(m, m, seed)
    return q @ a, q @ b


@pytest.mark.parametrize("shape", [(50, 5, 5), (80, 12, 7), (80, 7, 12), (30, 1, 1), (60, 20, 20)])
def test_principal_angles_match_scipy_on_random_subspaces(shape):
    m, ka, kb = shape
    A, B = orthonormal(m, ka, 10), orthonormal(m, kb, 11)
    got = principal_angles(torch.from_numpy(A), torch.from_numpy(B))
    assert got.dtype == torch.float64 and got.shape == (min(ka, kb),)
    assert torch.all(got[1:] >= got[:-1])
    # Random subspaces of R^m have no angle near 0 or π/2, where scipy's cosine/sine pairing
    # is accurate and the angles' condition number is O(1): 1e-13 rad is ~500 eps.
    np.testing.assert_allclose(got.numpy(), np.sort(sl.subspace_angles(A, B)), rtol=0, atol=1e-13)


def test_principal_angles_tiny_and_near_right_angles_are_accurate():
    theta = np.array([1e-12, 1e-8, 3e-7, 1e-4, 0.3, 0.7, 1.1, math.pi / 2 - 1e-9, math.pi / 2])
    A, B = basis_pair_with_angles(40, theta, seed=12)
    got = principal_angles(torch.from_numpy(A), torch.from_numpy(B)).numpy()
    np.testing.assert_allclose(got, theta, rtol=1e-6, atol=1e-15)
    # (scipy 1.17's subspace_angles returns ~1.5e-8 for the 1e-12 and 1e-8 angles of this
    # mixed set, so the reference here is the construction itself.)
    # arccos of the cosines could not do this: cos(1e-8) == 1.0 in float64
    assert np.arccos(np.clip(np.linalg.svd(A.T @ B, compute_uv=False), -1, 1)).min() == 0.0


def test_pipeline_recovers_a_known_tiny_rotation_of_the_top_subspace():
    # W+ = R W0 with R a rotation by phi in the plane (u_1, u_perp), u_perp outside span(W0):
    # the left top-k subspace turns by exactly phi, the right one not at all, σ unchanged.
    m, n, k, phi = 200, 150, 20, 1e-7
    sigma = np.linspace(10.0, 1.0, n)
    w0, qu, qv = matrix_with_spectrum(m, n, sigma, seed=20)
    u1 = qu[:, 0]
    u_perp = np.linalg.qr(np.column_stack([qu, np.random.default_rng(21).standard_normal(m)]))[0][:, -1]
    rot = np.eye(m) + (math.cos(phi) - 1) * (np.outer(u1, u1) + np.outer(u_perp, u_perp))
    rot += math.sin(phi) * (np.outer(u_perp, u1) - np.outer(u1, u_perp))
    w1 = rot @ w0
    a = top_singular_subspaces(torch.from_numpy(w0), k)
    b = top_singular_subspaces(torch.from_numpy(w1), k)
    left = principal_angles(a.U, b.U).numpy()
    right = principal_angles(a.V, b.V).numpy()
    np.testing.assert_allclose(left[:-1], 0.0, atol=1e-13)
    assert left[-1] == pytest.approx(phi, rel=1e-5)
    np.testing.assert_allclose(right, 0.0, atol=1e-13)
    assert normalized_spectral_shift(a.S, b.S) < 1e-14


@pytest.mark.parametrize("theta_max", [0.05, 0.7797, 0.7860, 1.3])
def test_principal_angles_small_angle_shortcut_gives_the_full_rule_result(theta_max, monkeypatch):
    """Below 44.97° the cosines' SVD is skipped; just below and just above 45° (and far
    from it) the result equals the full arcsin/arccos rule bit for bit, and the known angles."""
    import opdgeo.geometry.angles as angles_mod

    theta = np.concatenate([[1e-9, 1e-5], np.linspace(0.01, theta_max, 10)])
    A, B = basis_pair_with_angles(60, theta, seed=31)
    calls = []
    real = torch.linalg.svdvals
    monkeypatch.setattr(torch.linalg, "svdvals", lambda x: calls.append(x.shape) or real(x))
    got = principal_angles(torch.from_numpy(A), torch.from_numpy(B))
    assert len(calls) == (1 if theta_max < math.radians(44.97) else 2)  # the shortcut ran iff all < 44.97°
    monkeypatch.setattr(angles_mod, "_ALL_SMALL_SIN2", -1.0)  # force the full rule
    full = principal_angles(torch.from_numpy(A), torch.from_numpy(B))
    assert torch.equal(got, full)
    np.testing.assert_allclose(got.numpy(), theta, rtol=1e-6, atol=1e-15)


def test_principal_angles_identical_orthogonal_and_rotated_copy():
    A = orthonormal(30, 6, 13)
    assert torch.equal(principal_angles(torch.from_numpy(A), torch.from_numpy(A.copy())), torch.zeros(6, dtype=torch.float64))
    # a basis of the same subspace (rotated columns, reflected signs): zero up to rounding
    R = orthonormal(6, 6, 14)
    np.testing.assert_allclose(principal_angles(torch.from_numpy(A), torch.from_numpy(A @ R)).numpy(), 0.0, atol=1e-14)
    E = np.eye(30)
    got = principal_angles(torch.from_numpy(E[:, :4]), torch.from_numpy(E[:, 10:14]))
    np.testing.assert_allclose(got.numpy(), np.full(4, math.pi / 2), rtol=0, atol=1e-15)


def test_principal_angles_float32_dtype_and_validation():
    A, B = orthonormal(20, 3, 15), orthonormal(20, 3, 16)
    got = principal_angles(torch.from_numpy(A).float(), torch.from_numpy(B).float())
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), np.sort(sl.subspace_angles(A, B)), atol=1e-5)
    assert principal_angles(torch.zeros(5, 0, dtype=torch.float64), torch.from_numpy(A[:5, :2])).shape == (0,)
    with pytest.raises(ValueError, match="same number of rows; got 20 and 19"):
        principal_angles(torch.from_numpy(A), torch.from_numpy(B[:19]))
    with pytest.raises(ValueError, match="2-D"):
        principal_angles(torch.zeros(3), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="columns but only"):
        principal_angles(torch.zeros(3, 4), torch.zeros(3, 1))


# ----------------------------------------------------------------------------------------
# masks


def top_reference(score: np.ndarray, n_sel: int) -> np.ndarray:
    """Largest ``n_sel`` entries, ties to the lower flat index (stable sort of -score)."""
    order = np.argsort(-score.ravel(), kind="stable")
    mask = np.zeros(score.size, dtype=bool)
    mask[order[:n_sel]] = True
    return mask.reshape(score.shape)


@pytest.mark.parametrize("rank,alpha", [(8, 0.3), (1, 0.5), (30, 0.05)])
def test_principal_mask_against_numpy_reconstruction(rank, alpha):
    w = np.random.default_rng(17).standard_normal((40, 30))
    U, S, Vt = np.linalg.svd(w, full_matrices=False)
    recon = (U[:, :rank] * S[:rank]) @ Vt[:rank]
    n_sel = math.floor(alpha * w.size + 0.5)
    got = principal_mask(torch.from_numpy(U), torch.from_numpy(S), torch.from_numpy(Vt.T.copy()), rank=rank, alpha=alpha)
    assert got.dtype == torch.bool and got.shape == (40, 30) and int(got.sum()) == n_sel
    np.testing.assert_array_equal(got.numpy(), top_reference(np.abs(recon), n_sel))
    # the same through top_singular_subspaces (signs of vectors do not matter)
    sub = top_singular_subspaces(torch.from_numpy(w), 30)
    np.testing.assert_array_equal(principal_mask(sub.U, sub.S, sub.V, rank=rank, alpha=alpha).numpy(), got.numpy())


def test_low_magnitude_mask_ties_counts_and_rounding():
    # many ties: integers in bf16; exactly floor(alpha*N + 1/2) selected, lower index first
    w = torch.tensor(np.random.default_rng(18).integers(-3, 4, size=(17, 13)).astype(np.float32)).to(torch.bfloat16)
    for alpha in (0.0, 0.1, 0.3, 0.5, 0.999, 1.0):
        n_sel = math.floor(alpha * w.numel() + 0.5)
        got = low_magnitude_mask(w, alpha=alpha)
        assert int(got.sum()) == n_sel
        np.testing.assert_array_equal(got.numpy(), top_reference(-np.abs(w.float().numpy()), n_sel))
    # round half up: 10 entries at alpha 0.25 -> 3; at 0.35 -> 4 (3.5 rounds up)
    x = torch.arange(10.0)
    assert low_magnitude_mask(x, alpha=0.25).tolist() == [True] * 3 + [False] * 7
    assert low_magnitude_mask(x, alpha=0.35).tolist() == [True] * 4 + [False] * 6
    assert low_magnitude_mask(-x.flip(0), alpha=0.2).nonzero().squeeze(1).tolist() == [8, 9]


def test_mask_overlap_values_and_empty_update():
    m = torch.tensor([True, True, False, False, True])
    u = torch.tensor([True, False, True, False, True])
    # ratio of exact integer counts
    assert mask_overlap(m, u) == pytest.approx(2 / 3, rel=1e-15)
    assert mask_overlap(u, m) == pytest.approx(2 / 3, rel=1e-15)
    assert mask_overlap(m, torch.tensor([False, False, True, True, False])) == 0.0
    assert math.isnan(mask_overlap(m, torch.zeros(5, dtype=torch.bool)))
    # random masks sit at the baseline alpha
    g = torch.Generator().manual_seed(19)
    w0 = torch.randn(300, 300, generator=g)
    upd = torch.rand(300, 300, generator=g) < 0.4
    assert abs(mask_overlap(low_magnitude_mask(w0, alpha=0.3), upd) - 0.3) < 0.01
    with pytest.raises(ValueError, match="bool"):
        mask_overlap(m.float(), u)
    with pytest.raises(ValueError, match="same shape"):
        mask_overlap(m, u[:4])


def test_mask_validation_errors():
    U, S, V = torch.zeros(6, 4, dtype=torch.float64), torch.ones(4, dtype=torch.float64), torch.zeros(5, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"min\(m, n\)\] = \[1, 5\] for a 6x5 matrix; got 8"):
        principal_mask(U, S, V, rank=8)
    with pytest.raises(ValueError, match="exceeds the factors given: U has 4 columns"):
        principal_mask(U, S, V, rank=5)
    with pytest.raises(ValueError, match="alpha"):
        principal_mask(U, S, V, rank=2, alpha=1.5)
    with pytest.raises(ValueError, match="non-finite"):
        low_magnitude_mask(torch.tensor([1.0, float("inf")]))
