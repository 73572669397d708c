"""bf16-aware update sparsity (SPEC §1).

An entry of a weight matrix is *unchanged* between two checkpoints when, after rounding
both to bf16, the update is below the bf16 resolution. This is the rule of Shen et al.
2026 ("On the Geometry of On-Policy Distillation", §3.1), which follows Zhu et al. 2025
("The Path Not Taken", §4): an update smaller than half a bf16 ULP is invisible to a bf16
checkpoint, so counting it as a change would measure rounding noise, not training.

Non-finite values get the same meaning on every path (the IEEE equality of the rounded
values decides them):

- any NaN on either side -> changed (visible);
- identical infinities (+Inf/+Inf or -Inf/-Inf) -> unchanged;
- +Inf vs -Inf, or an infinity vs a finite value -> changed.

Callers that must report non-finite matrices (``compare``) check ``isfinite`` themselves;
these functions never raise on non-finite data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "BITWISE_ETA_BOUND",
    "UnchangedCount",
    "bf16_unchanged_count",
    "bf16_unchanged_mask",
    "bf16_visible_mask",
    "legacy_unchanged_count",
    "legacy_unchanged_mask",
]

#: For ``eta`` strictly below this bound the η rule equals bitwise equality of the bf16
#: patterns (±0 folded). The SPEC's bound; the equivalence in fact holds up to 2**-8 (see
#: ``bf16_unchanged_mask``), so the bound is conservative.
BITWISE_ETA_BOUND = 2.0**-9

_ABS_MASK = 0x7FFF  # int16 bits without the sign bit
_POS_INF_BITS = 0x7F80  # bf16 +Inf; any magnitude pattern above it is a NaN
_NEG_INF_BITS_U16 = 0xFF80  # bf16 -Inf as uint16; every pattern above it is a NaN
_NEG_ZERO_I16 = -0x8000  # bf16 -0 as int16 (the int16 minimum)

#: Elements per block of ``bf16_unchanged_count``: 2 x 512 KiB of bf16 inputs plus a
#: 256 KiB bool scratch stay in a 1-2 MiB L2 cache, so every input byte is pulled from
#: memory once and the later passes over the block hit the cache (measured: 2**16 .. 2**19
#: within noise, 2**20 slower; fewer blocks also mean less per-call overhead).
DEFAULT_CHUNK = 1 << 18


def _check_pair(w0: torch.Tensor, w1: torch.Tensor) -> None:
    if not isinstance(w0, torch.Tensor) or not isinstance(w1, torch.Tensor):
        raise TypeError(f"w0 and w1 must be torch tensors; got {type(w0).__name__} and {type(w1).__name__}")
    if w0.shape != w1.shape:
        raise ValueError(f"w0 and w1 must have the same shape; got {tuple(w0.shape)} and {tuple(w1.shape)}")
    if not (w0.is_floating_point() and w1.is_floating_point()):
        raise ValueError(f"w0 and w1 must be floating-point tensors; got {w0.dtype} and {w1.dtype}")
    if w0.device != w1.device:
        raise ValueError(f"w0 and w1 must be on the same device; got {w0.device} and {w1.device}")


def _flat_pair(w0: torch.Tensor, w1: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both inputs checked (``_check_pair``, ``chunk >= 1``) and flattened (views when contiguous)."""
    _check_pair(w0, w1)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1; got {chunk!r}")
    return w0.detach().reshape(-1), w1.detach().reshape(-1)


def _check_nonneg_finite(name: str, value: float) -> float:
    value = float(value)
    if not (value >= 0.0 and value != float("inf")):
        raise ValueError(f"{name} must be a finite number >= 0; got {value}")
    return value


def _to_bf16(w: torch.Tensor) -> torch.Tensor:
    # ``.to`` rounds to nearest, ties to even; it returns ``w`` itself when already bf16.
    return w.to(torch.bfloat16)


def _flush_denormal_active() -> bool:
    """True when CPU comparisons treat subnormals as zero (``torch.set_flush_denormal``)."""
    smallest_subnormal = torch.ones(1, dtype=torch.int16).view(torch.bfloat16)  # 2**-133
    return bool(smallest_subnormal == 0)


def _bitwise_unchanged(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Bitwise equality of two bf16 tensors with ±0 folded and NaN never equal.

    That is exactly IEEE equality of the bf16 values (``a == b``: one pass, no copies),
    which is used on CPU. IEEE equality stops being bitwise when the CPU flushes
    subnormals to zero (``torch.set_flush_denormal(True)``: two distinct subnormals
    compare equal), and other devices are not relied on for it, so those cases take
    the explicit int16 route (a few more passes, still no float copies).
    """
    if a.device.type == "cpu" and not _flush_denormal_active():
        return a == b
    return _int16_unchanged(a, b)


def _int16_unchanged(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The int16-view form of ``_bitwise_unchanged``: patterns equal, ±0 folded, no NaN."""
    ia = a.contiguous().view(torch.int16)
    ib = b.contiguous().view(torch.int16)
    same = ia == ib
    # NaN: a NaN pattern equals itself bitwise, but NaN always counts as changed. When
    # ia == ib it suffices to test one side.
    same &= (ia & _ABS_MASK) <= _POS_INF_BITS
    # +0 (0x0000) vs -0 (0x8000): equal iff neither has a magnitude bit set.
    same |= ((ia | ib) & _ABS_MASK) == 0
    return same


def _formula_unchanged(a: torch.Tensor, b: torch.Tensor, eta: float) -> torch.Tensor:
    """|b - a| <= eta * max(|a|, |b|) on finite bf16 values, in float64; IEEE a == b otherwise."""
    a64 = a.to(torch.float64)
    b64 = b.to(torch.float64)
    # The difference of two bf16 values is exact in float64 unless their exponents differ
    # by more than ~45, where the ratio |Δ|/max is ~1 and the decision cannot flip.
    diff = (b64 - a64).abs_()
    bound = torch.maximum(a64.abs(), b64.abs()).mul_(eta)
    unchanged = diff <= bound
    unchanged &= torch.isfinite(a64) & torch.isfinite(b64)  # Inf - Inf and Inf <= eta*Inf
    unchanged |= a64 == b64  # identical infinities (and every exactly equal pair)
    return unchanged


def bf16_unchanged_mask(w0: torch.Tensor, w1: torch.Tensor, *, eta: float = 1e-3) -> torch.Tensor:
    """Entries whose update is invisible at bf16 resolution.

    Formula (SPEC §1), with ``a = bf16(w0)``, ``b = bf16(w1)`` rounded to nearest-even::

        unchanged = |b - a| <= eta * max(|a|, |b|)

    For ``eta < 2**-9`` this is computed as bitwise equality of the bf16 patterns (+0 and
    -0 equal, NaN never equal): one comparison pass on the bf16 tensors, no float copies,
    so it runs at memory speed (an explicit int16-view comparison where IEEE equality of
    bf16 values is not bitwise: flush-denormal CPU mode, non-CPU devices).

    Why the two agree: bf16 carries 8 significant bits, so two distinct finite bf16
    values ``a != b`` with ``M = max(|a|, |b|)`` differ by at least the bf16 spacing just
    below ``M``, which is ``>= 2**-8 * M`` (equality when ``M`` is a power of two and the
    other value its predecessor; subnormals: spacing ``2**-133``, ratio ``>= 2**-7``;
    opposite signs: ratio ``>= 1``). Hence for ``eta < 2**-8`` the formula holds exactly
    when ``a == b``. The SPEC's bound ``2**-9`` is kept as the switch point
    (``BITWISE_ETA_BOUND``); both paths give the same mask for any ``eta < 2**-8``.

    Args:
        w0: origin weights, any floating dtype (bf16, fp16, fp32, fp64), any shape.
        w1: later weights, same shape and device as ``w0``; its dtype may differ.
        eta: relative tolerance, finite and >= 0 (default 1e-3, SPEC §1). For
            ``eta >= 2**-9`` the formula is evaluated in float64 on the rounded values
            (exact difference, one rounding in ``eta * max``).

    Returns:
        Bool tensor of ``w0``'s shape, True where the entry is unchanged.

    Raises:
        TypeError: an input is not a tensor.
        ValueError: shape, device or dtype mismatch (non-floating input), or a negative
            or non-finite ``eta``.

    Non-finite values: any NaN -> changed; identical infinities -> unchanged; other
    infinities -> changed, on both paths (module docstring).

    Source: Shen et al. 2026 §3.1; Zhu et al. 2025 §4 (bf16-aware sparsity).
    """
    _check_pair(w0, w1)
    eta = _check_nonneg_finite("eta", eta)
    a = _to_bf16(w0)
    b = _to_bf16(w1)
    if eta < BITWISE_ETA_BOUND:
        return _bitwise_unchanged(a, b)
    return _formula_unchanged(a, b, eta)


def bf16_visible_mask(w0: torch.Tensor, w1: torch.Tensor, *, eta: float = 1e-3) -> torch.Tensor:
    """Entries whose update is visible at bf16 resolution: ``~bf16_unchanged_mask``.

    Formula: ``visible = |b - a| > eta * max(|a|, |b|)`` on the bf16-rounded values (plus
    the non-finite rules of ``bf16_unchanged_mask``). This is the update mask ``M_upd`` of
    the mask-overlap metric; its mean is the per-matrix update density (SPEC §1).

    Args, raises, source: as ``bf16_unchanged_mask``.

    Returns:
        Bool tensor of ``w0``'s shape, True where the entry visibly changed.
    """
    return bf16_unchanged_mask(w0, w1, eta=eta).logical_not_()


@dataclass(frozen=True)
class UnchangedCount:
    """Result of ``bf16_unchanged_count``: the count behind sparsity plus what a
    non-finite report needs, all exact.

    Attributes:
        unchanged: number of unchanged entries (exactly
            ``int(bf16_unchanged_mask(w0, w1, eta=eta).sum())``).
        numel: number of entries compared.
        nan: ``(NaN entries of w0, NaN entries of w1)``, counted on the inputs as given
            (before the bf16 rounding).
        inf: ``(±Inf entries of w0, ±Inf entries of w1)``, likewise.
    """

    unchanged: int
    numel: int
    nan: tuple[int, int]
    inf: tuple[int, int]

    @property
    def finite(self) -> bool:
        """True when neither input has a NaN or an infinity."""
        return not (any(self.nan) or any(self.inf))

    @property
    def sparsity(self) -> float:
        """``unchanged / numel`` (NaN for an empty input)."""
        return self.unchanged / self.numel if self.numel else float("nan")


def bf16_unchanged_count(
    w0: torch.Tensor, w1: torch.Tensor, *, eta: float = 1e-3, chunk: int = DEFAULT_CHUNK
) -> UnchangedCount:
    """Number of entries whose update is invisible at bf16 resolution, without a mask.

    Formula: ``unchanged = #{i : |b_i - a_i| <= eta * max(|a_i|, |b_i|)}`` with
    ``a = bf16(w0)``, ``b = bf16(w1)`` (SPEC §1), i.e. exactly the number of True entries
    of ``bf16_unchanged_mask(w0, w1, eta=eta)``, same non-finite rules (module
    docstring); plus the NaN/Inf counts of each input, which is all that a non-finite
    report needs. Sparsity is ``unchanged / numel``.

    Algorithm (CPU, ``eta < 2**-9``: the bitwise rule): one sweep over blocks of
    ``chunk`` elements, each of which stays in cache while it is used; per block, on
    the int16/uint16 views of the bf16 patterns (numpy kernels, vectorized):

    1. ``count_nonzero(pa == pb)``: bitwise-equal patterns (no full-size mask);
    2. four min/max reductions that find every pattern on which bitwise equality and
       the rule can disagree or a non-finite value hides: NaN/Inf of either side
       (``int16 max >= 0x7F80`` for +Inf/+NaN, ``uint16 max >= 0xFF80`` for -Inf/-NaN)
       and zeros of ``w0`` (``uint16 min == 0`` for +0, ``int16 min == -0x8000`` for -0;
       a ±0 mismatch needs a zero on the ``w0`` side).
    3. A block flagged by step 2 (rare: real weights have few exact zeros) is
       recomputed exactly (``pa == pb`` with NaN excluded and ±0 folded) and its NaN and
       Inf are counted on the unrounded inputs.

    So the inputs are read once from memory, and the result is exact whatever the data.
    The blocks are split into one contiguous range per ``torch.get_num_threads()`` thread
    (numpy's kernels release the GIL), the thread count any torch op on the same tensors
    would use; the result does not depend on the split.
    Inputs that are not bf16 are rounded block by block into a small buffer. The
    bit-pattern test is independent of the flush-denormal mode. Other devices, and
    ``eta >= 2**-9`` (the float64 formula), count ``bf16_unchanged_mask`` block by block
    (exact as well, just not fused).

    Args:
        w0: origin weights, any floating dtype, any shape.
        w1: later weights, same shape and device; its dtype may differ.
        eta: relative tolerance, finite and >= 0 (default 1e-3, SPEC §1).
        chunk: elements per block, >= 1 (default ``DEFAULT_CHUNK`` = 2**18, sized for a
            1 MiB L2 cache; a tuning knob only, the result does not depend on it).

    Returns:
        ``UnchangedCount(unchanged, numel, nan, inf)``.

    Raises:
        TypeError, ValueError: as ``bf16_unchanged_mask``; ValueError also for
        ``chunk < 1``.

    Source: Shen et al. 2026 §3.1; Zhu et al. 2025 §4 (bf16-aware sparsity).
    """
    f0, f1 = _flat_pair(w0, w1, chunk)  # [N] each; views when contiguous
    eta = _check_nonneg_finite("eta", eta)
    numel = f0.numel()
    fused = eta < BITWISE_ETA_BOUND and f0.device.type == "cpu"
    if f0.device.type != "cpu":
        chunk = max(chunk, numel)  # accelerators: one mask pass, no per-block syncs
    # CPU: split the blocks into one contiguous range per torch thread (numpy's kernels
    # release the GIL), so the count uses the same threads as any torch op would.
    n_blocks = -(-numel // chunk)
    n_threads = max(1, min(torch.get_num_threads(), n_blocks)) if f0.device.type == "cpu" else 1
    per = -(-n_blocks // n_threads) * chunk
    ranges = [(lo, min(lo + per, numel)) for lo in range(0, numel, per)] if numel else []
    work = lambda r: _count_range(f0, f1, r[0], r[1], chunk, eta, fused)  # noqa: E731
    parts = _run_ranges(work, ranges)
    unchanged = sum(p[0] for p in parts)
    nan = (sum(p[1] for p in parts), sum(p[2] for p in parts))
    inf = (sum(p[3] for p in parts), sum(p[4] for p in parts))
    return UnchangedCount(unchanged=unchanged, numel=numel, nan=nan, inf=inf)


def _run_ranges(work, ranges: list) -> list:
    """``[work(r) for r in ranges]``, the first range on this thread, the others on helpers."""
    if len(ranges) <= 1:
        return [work(r) for r in ranges]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(ranges) - 1) as pool:
        futures = [pool.submit(work, r) for r in ranges[1:]]
        first = work(ranges[0])
        return [first] + [f.result() for f in futures]


def _count_range(
    f0: torch.Tensor, f1: torch.Tensor, lo: int, hi: int, chunk: int, eta: float, fused: bool
) -> tuple[int, int, int, int, int]:
    """``(unchanged, nan0, nan1, inf0, inf1)`` over ``f0[lo:hi]``, ``f1[lo:hi]``, block by block."""
    unchanged = nan0 = nan1 = inf0 = inf1 = 0
    size = min(chunk, hi - lo)
    if fused:
        buffers = [torch.empty(size, dtype=torch.bfloat16) if f.dtype != torch.bfloat16 else None for f in (f0, f1)]
        same = np.empty(size, dtype=np.bool_)
    for start in range(lo, hi, chunk):
        c0 = f0[start : min(start + chunk, hi)]  # [c]
        c1 = f1[start : min(start + chunk, hi)]
        if fused:
            a = _bf16_bits(c0, buffers[0])  # [c] uint16
            b = _bf16_bits(c1, buffers[1])
            eq = same[: a.shape[0]]
            np.equal(a, b, out=eq)
            ai, bi = a.view(np.int16), b.view(np.int16)
            suspicious = (
                ai.max() >= _POS_INF_BITS
                or a.max() >= _NEG_INF_BITS_U16
                or bi.max() >= _POS_INF_BITS
                or b.max() >= _NEG_INF_BITS_U16
                or a.min() == 0
                or ai.min() == _NEG_ZERO_I16
            )
            if not suspicious:
                unchanged += int(np.count_nonzero(eq))
                continue
            unchanged += int(np.count_nonzero(_numpy_bitwise_unchanged(a, b)))
        else:
            unchanged += int(torch.count_nonzero(bf16_unchanged_mask(c0, c1, eta=eta)))
        if not bool(torch.isfinite(c0).all()):
            nan0 += int(torch.isnan(c0).sum())
            inf0 += int(torch.isinf(c0).sum())
        if not bool(torch.isfinite(c1).all()):
            nan1 += int(torch.isnan(c1).sum())
            inf1 += int(torch.isinf(c1).sum())
    return unchanged, nan0, nan1, inf0, inf1


def _bf16_bits(c: torch.Tensor, buffer: torch.Tensor | None) -> np.ndarray:
    """The bf16 bit patterns of a CPU block as a uint16 numpy view (rounded into
    ``buffer`` when the block is not bf16 already; ``copy_`` rounds to nearest-even)."""
    if buffer is not None:
        buffer = buffer[: c.numel()]
        buffer.copy_(c)
        c = buffer
    return c.view(torch.int16).numpy().view(np.uint16)


def _numpy_bitwise_unchanged(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``_int16_unchanged`` on uint16 numpy patterns: equal, ±0 folded, NaN excluded."""
    mag = a & _ABS_MASK
    same = (a == b) & (mag <= _POS_INF_BITS)
    same |= ((a | b) & _ABS_MASK) == 0
    return same


def legacy_unchanged_mask(w0: torch.Tensor, w1: torch.Tensor, *, atol: float = 1e-5) -> torch.Tensor:
    """Entries unchanged under the absolute-tolerance rule of Mukherjee et al. 2025.

    Formula (SPEC §1, legacy rule, for comparison only; never the default)::

        unchanged = |bf16(w1) - bf16(w0)| <= atol

    The delta of the bf16-rounded values is computed exactly in float64 (it is not itself
    rounded to bf16).

    Args:
        w0: origin weights, any floating dtype, any shape.
        w1: later weights, same shape and device.
        atol: absolute tolerance, finite and >= 0 (default 1e-5).

    Returns:
        Bool tensor of ``w0``'s shape, True where the entry is unchanged.

    Raises:
        TypeError, ValueError: as ``bf16_unchanged_mask`` (with ``atol`` for ``eta``).

    Non-finite values: NaN -> changed; identical infinities -> unchanged; other
    infinities -> changed (as ``bf16_unchanged_mask``).

    Source: Mukherjee et al. 2025 ("RL finetunes small subnetworks"), as cited by
    Shen et al. 2026 §3.1.
    """
    _check_pair(w0, w1)
    atol = _check_nonneg_finite("atol", atol)
    a64 = _to_bf16(w0).to(torch.float64)
    b64 = _to_bf16(w1).to(torch.float64)
    unchanged = (b64 - a64).abs_() <= atol
    unchanged &= torch.isfinite(a64) & torch.isfinite(b64)
    unchanged |= a64 == b64
    return unchanged


def legacy_unchanged_count(
    w0: torch.Tensor, w1: torch.Tensor, *, atol: float = 1e-5, chunk: int = DEFAULT_CHUNK
) -> int:
    """Number of entries unchanged under the legacy rule, block by block (no full mask).

    Exactly ``int(legacy_unchanged_mask(w0, w1, atol=atol).sum())`` (same formula, same
    non-finite rules), computed on blocks of ``chunk`` elements so that the float64 copies
    the rule needs are ``O(chunk)``, not ``O(numel)``: the memory of the bf16 count.

    Args:
        w0, w1: as ``legacy_unchanged_mask``.
        atol: absolute tolerance, finite and >= 0 (default 1e-5).
        chunk: elements per block, >= 1 (a tuning knob; the result does not depend on it).

    Raises:
        TypeError, ValueError: as ``legacy_unchanged_mask``; ValueError for ``chunk < 1``.

    Source: Mukherjee et al. 2025, as ``legacy_unchanged_mask``.
    """
    f0, f1 = _flat_pair(w0, w1, chunk)  # [N] each
    atol = _check_nonneg_finite("atol", atol)
    return sum(
        int(torch.count_nonzero(legacy_unchanged_mask(f0[lo : lo + chunk], f1[lo : lo + chunk], atol=atol)))
        for lo in range(0, f0.numel(), chunk)
    )
