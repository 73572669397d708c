"""Blocked counts and norms equal their whole-tensor definitions (float64 numpy references)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from opdgeo.geometry.norms import update_norms
from opdgeo.geometry.sparsity import legacy_unchanged_count, legacy_unchanged_mask


def _pair(seed=0, shape=(37, 53)):
    g = torch.Generator().manual_seed(seed)
    a = 0.02 * torch.randn(*shape, generator=g)
    b = a + 1e-5 * torch.randn(*shape, generator=g) * (torch.rand(*shape, generator=g) < 0.5)
    return a, b


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 18])
def test_legacy_count_in_blocks_equals_the_mask_and_numpy(chunk):
    a, b = _pair()
    a[0, 0], b[0, 0] = float("nan"), float("nan")  # NaN: changed
    a[1, 1] = b[1, 1] = float("inf")  # identical infinities: unchanged
    a[2, 2], b[2, 2] = float("inf"), -float("inf")  # opposite infinities: changed
    b = b.to(torch.bfloat16)  # mixed dtypes, as a bf16 checkpoint against an fp32 one
    got = legacy_unchanged_count(a, b, atol=1e-5, chunk=chunk)
    assert got == int(legacy_unchanged_mask(a, b, atol=1e-5).sum())
    a64, b64 = a.to(torch.bfloat16).double().numpy(), b.double().numpy()
    with np.errstate(invalid="ignore"):
        ref = (np.abs(b64 - a64) <= 1e-5) | (a64 == b64)
    assert got == int(ref.sum())
    assert 0 < got < a.numel()
    with pytest.raises(ValueError, match="chunk"):
        legacy_unchanged_count(a, b, chunk=0)


@pytest.mark.parametrize("chunk", [5, 1 << 18])
def test_update_norms_equal_float64_numpy(chunk):
    a, b = _pair(1)
    b = b.to(torch.bfloat16)
    fro, base = update_norms(a, b, chunk=chunk)
    a64, b64 = a.double().numpy(), b.double().numpy()
    # Both sides sum the same float64 squares (chunked vs numpy's pairwise order): a sum of n positive
    # terms carries at most ~n*eps relative error in any order, 1e-13 holds with a wide margin for n=2^18.
    assert fro == pytest.approx(np.linalg.norm(b64 - a64), rel=1e-13)
    assert base == pytest.approx(np.linalg.norm(a64), rel=1e-13)
    assert update_norms(a, a) == (0.0, pytest.approx(np.linalg.norm(a64), rel=1e-13))
