"""opdgeo.compare (SPEC §1) against independent float64 numpy computations, plus the
building blocks it owns: work splitting (analysis/parallel.py) and the base-SVD cache
(analysis/cache.py).

The references below read the saved files with ``safetensors`` directly (not the opdgeo
reader) and compute every metric with numpy in float64 (angles by the sine–cosine formula only).
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import opdgeo
from opdgeo.analysis.cache import SvdCache
from opdgeo.analysis.compare import COLUMNS, EXTRA_COLUMNS
from opdgeo.analysis.parallel import dist_context, gather_to_rank0, map_ordered, shard_for_rank
from opdgeo.errors import ConfigError, OpdgeoError

K, RANK, ALPHA = 16, 8, 0.3


GEOMETRY_SUFFIXES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                     "gate_proj.weight", "up_proj.weight", "down_proj.weight")


# --------------------------------------------------------------------------- parallel


def test_shard_for_rank_lpt_partition():
    items = ["a", "b", "c", "d", "e"]
    costs = [5, 4, 3, 3, 3]
    # LPT by hand: a(5)->r0, b(4)->r1, c(3)->r1 (4<5), d(3)->r0 (5<7), e(3)->r1 (7<8)... loads r0=8, r1=10
    assert shard_for_rank(items, 0, 2, cost=costs) == ["a", "d"]
    assert shard_for_rank(items, 1, 2, cost=costs) == ["b", "c", "e"]
    # callable cost, many items: disjoint, complete, deterministic, balanced within max cost
    rng = np.random.default_rng(0)
    many = [f"t{i}" for i in range(57)]
    cost = {name: float(rng.integers(1, 100)) for name in many}
    shards = [shard_for_rank(many, r, 3, cost=cost.__getitem__) for r in range(3)]
    assert sorted(sum(shards, [])) == sorted(many)
    assert all(s == sorted(s, key=many.index) for s in shards)  # original order kept
    loads = [sum(cost[n] for n in s) for s in shards]
    assert max(loads) - min(loads) <= max(cost.values())
    assert shards == [shard_for_rank(many, r, 3, cost=cost.__getitem__) for r in range(3)]
    assert shard_for_rank(many, 0, 1) == many
    # unit cost: sizes differ by at most one
    sizes = [len(shard_for_rank(many, r, 4)) for r in range(4)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 57


@pytest.mark.parametrize("args", [(0, 0), (2, 2), (-1, 2)])
def test_shard_for_rank_rejects_bad_rank(args):
    with pytest.raises(ConfigError):
        shard_for_rank(["a"], *args)
    with pytest.raises(ConfigError, match="cost has 1 entries for 2 items"):
        shard_for_rank(["a", "b"], 0, 2, cost=[1.0])


def test_map_ordered_keeps_order_bounds_in_flight_and_raises():
    lock = threading.Lock()
    state = {"running": 0, "peak": 0, "pulled": 0}

    def items():
        for i in range(20):
            state["pulled"] += 1
            yield i

    def fn(i):
        with lock:
            state["running"] += 1
            state["peak"] = max(state["peak"], state["running"])
        time.sleep(0.002 * ((7 * i) % 5))  # finish out of order
        with lock:
            state["running"] -= 1
        return i * i

    out = []
    for value in map_ordered(fn, items(), workers=3):
        out.append(value)
        assert state["pulled"] <= len(out) + 3  # lazily consumed: bounded in-flight items
    assert out == [i * i for i in range(20)]
    assert 1 <= state["peak"] <= 3
    assert list(map_ordered(fn, range(5), workers=1)) == [0, 1, 4, 9, 16]

    def boom(i):
        if i == 3:
            raise OpdgeoError("bad tensor 3")
        return i

    got = []
    with pytest.raises(OpdgeoError, match="bad tensor 3"):
        for value in map_ordered(boom, range(10), workers=2):
            got.append(value)
    assert got == [0, 1, 2]
    with pytest.raises(ConfigError, match="^workers must be >= 1"):
        map_ordered(boom, range(3), workers=0)


def test_dist_context_without_torchrun_is_a_noop(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with dist_context() as (rank, world):
        assert (rank, world) == (0, 1)
        assert not torch.distributed.is_initialized()
    assert gather_to_rank0({"x": 1}) == [{"x": 1}]
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="RANK=3"):
        with dist_context():
            pass


# --------------------------------------------------------------------------- cache


def test_svd_cache_roundtrip_keys_and_damage(tmp_path):
    cache = SvdCache(tmp_path / "c")
    g = torch.Generator().manual_seed(0)
    S, U, V = torch.rand(6, generator=g, dtype=torch.float64), torch.rand(8, 3, generator=g, dtype=torch.float64), torch.rand(6, 3, generator=g, dtype=torch.float64)
    assert cache.get("abc", n_vectors=3, precision="fp64") is None
    path = cache.put("abc", n_vectors=3, precision="fp64", S=S, U=U, V=V)
    hit = cache.get("abc", n_vectors=3, precision="fp64")
    assert torch.equal(hit.S, S) and torch.equal(hit.U, U) and torch.equal(hit.V, V)
    # every setting is part of the key
    assert cache.get("abd", n_vectors=3, precision="fp64") is None
    assert cache.get("abc", n_vectors=2, precision="fp64") is None
    assert cache.get("abc", n_vectors=3, precision="fp32") is None
    assert (cache.hits, cache.misses, cache.writes) == (1, 4, 1)
    # no temporary files left; the file is safetensors, not pickle
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert set(load_file(str(path))) == {"S", "U", "V"}
    # a damaged entry is a miss, and put() replaces it
    path.write_bytes(path.read_bytes()[:40])
    assert cache.get("abc", n_vectors=3, precision="fp64") is None
    cache.put("abc", n_vectors=3, precision="fp64", S=S, U=U, V=V)
    assert torch.equal(cache.get("abc", n_vectors=3, precision="fp64").U, U)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="^cache .*file"):
        SvdCache(tmp_path / "file")


# --------------------------------------------------------------------------- fixtures


def _visible_perturbation():
    """Known entries changed by 0.1 (weights ~ N(0, 0.02): always visible in bf16); the
    number of changed entries per parameter is known exactly."""
    p = {}
    q = torch.zeros(64, 64)
    q[0, :5] = 0.1
    q[10:20, 3] = -0.1
    p["model.layers.0.self_attn.q_proj.weight"] = q
    k = torch.zeros(32, 64)
    k[::4, ::8] = 0.1  # 8 x 8 = 64 entries
    p["model.layers.1.self_attn.k_proj.weight"] = k
    down = torch.zeros(64, 128)
    down[5, :] = 0.1  # a whole row: 128 entries
    p["model.layers.1.mlp.down_proj.weight"] = down
    norm = torch.zeros(64)
    norm[:7] = 0.5
    p["model.layers.0.input_layernorm.weight"] = norm
    emb = torch.zeros(64, 64)
    emb[3, :10] = 0.1  # tied with lm_head: counted once
    p["model.embed_tokens.weight"] = emb
    counts = {
        "model.layers.0.self_attn.q_proj.weight": 15,
        "model.layers.1.self_attn.k_proj.weight": 64,
        "model.layers.1.mlp.down_proj.weight": 128,
        "model.layers.0.input_layernorm.weight": 7,
        "model.embed_tokens.weight": 10,
    }
    return p, counts


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_qwen3_factory):
    root = tmp_path_factory.mktemp("compare")
    perturb, counts = _visible_perturbation()
    base = tiny_qwen3_factory(root / "base")
    tuned = tiny_qwen3_factory(root / "tuned", perturb=perturb)
    sharded = tiny_qwen3_factory(root / "tuned_sharded", perturb=perturb, max_shard_size="40KB")
    return base, tuned, sharded, counts


def _reference_tensors(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({k: v.double().numpy() for k, v in load_file(str(f)).items()})
    return out


def _stable_top(score: np.ndarray, n: int) -> np.ndarray:
    """Mask of the n largest scores, ties to the lower flat index (the SPEC'd rule)."""
    order = np.argsort(-score.reshape(-1), kind="stable")[:n]
    mask = np.zeros(score.size, dtype=bool)
    mask[order] = True
    return mask.reshape(score.shape)


def _sine_cosine_angles_deg(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Principal angles (ascending, degrees), numpy float64: arcsin of the singular values
    of B - A AᵀB where cos² >= 1/2, else arccos of those of AᵀB (Knyazev & Argentati 2002).

    The reference's only angle method. Not ``scipy.linalg.subspace_angles``: it pairs the
    sines of the small angles with the wrong cosines when small and large angles mix, and
    on some BLAS builds returns 1.5e-7° where the true angle is 2.7e-8°.
    """
    cos = np.clip(np.linalg.svd(A.T @ B, compute_uv=False), 0, 1)  # descending
    sin = np.clip(np.sort(np.linalg.svd(B - A @ (A.T @ B), compute_uv=False)), 0, 1)  # ascending
    return np.degrees(np.sort(np.where(cos**2 >= 0.5, np.arcsin(sin), np.arccos(cos))))


def angle_tolerance_deg(S0: np.ndarray, S1: np.ndarray, k: int) -> float:
    """How far two correct float64 codes may disagree on principal angles (degrees).

    A backward-stable SVD perturbs the top-k singular subspace of W by about
    eps·σ₁/(σ_k − σ_{k+1}) radians (Wedin's sin θ theorem), so two implementations (LAPACK
    builds, Gram route vs direct SVD) may differ by that much on each side; a factor of 100
    covers the dimension factors. Where k reaches min(m, n) the subspace is the whole space
    and its angles are exact zeros up to rounding of eps.
    """
    def subspace_error(S):
        if k >= len(S):
            return np.finfo(np.float64).eps
        gap = S[k - 1] - S[k]
        return np.finfo(np.float64).eps * S[0] / gap if gap > 0 else math.inf

    return float(np.degrees(100 * (subspace_error(S0) + subspace_error(S1))))


def _reference_row(w0: np.ndarray, w1: np.ndarray, k: int, rank: int, alpha: float) -> dict:
    """Every SPEC §1 metric of one matrix from full float64 numpy SVDs."""
    U0, S0, V0t = np.linalg.svd(w0, full_matrices=False)
    U1, S1, V1t = np.linalg.svd(w1, full_matrices=False)
    k = min(k, *w0.shape)
    left = _sine_cosine_angles_deg(U0[:, :k], U1[:, :k])
    right = _sine_cosine_angles_deg(V0t[:k].T, V1t[:k].T)
    tol = 1e-3 * np.maximum(np.abs(w0), np.abs(w1))
    update = np.abs(w1 - w0) > tol
    n_sel = math.floor(alpha * w0.size + 0.5)
    recon = (U0[:, :rank] * S0[:rank]) @ V0t[:rank]
    principal = _stable_top(np.abs(recon), n_sel)
    low = _stable_top(-np.abs(w0), n_sel)
    n_upd = update.sum()
    return {
        "sparsity": 1.0 - n_upd / w0.size,
        "angle_left_max_deg": left.max(),
        "angle_left_mean_deg": left.mean(),
        "angle_right_max_deg": right.max(),
        "angle_right_mean_deg": right.mean(),
        "left": left,
        "right": right,
        "angle_tol_deg": angle_tolerance_deg(S0, S1, k),
        "nss": np.linalg.norm(S1 - S0) / np.linalg.norm(S0),
        "principal_overlap": (principal & update).sum() / n_upd if n_upd else math.nan,
        "low_magnitude_overlap": (low & update).sum() / n_upd if n_upd else math.nan,
    }


# Default for values computed from float64 SVDs of the same matrices on both sides: singular values
# are accurate to ~eps*sigma_1 (Weyl) and these test spectra span < 1e4, so 1e-9 is a wide margin;
# angles get their own tolerance from the subspaces' gaps (angle_tolerance_deg).
def _assert_close(got, want, what, rtol=1e-9, atol=1e-9):
    if want is None or (isinstance(want, float) and math.isnan(want)):
        assert got is None or math.isnan(got), f"{what}: {got} != {want}"
        return
    assert got == pytest.approx(want, rel=rtol, abs=atol), f"{what}: {got} != {want}"


# --------------------------------------------------------------------------- compare


@pytest.fixture(scope="module")
def result(pair):
    base, tuned, _, _ = pair
    return opdgeo.compare(base, tuned, k=K, rank=RANK, alpha=ALPHA, keep_angles=True)


def test_sparsity_is_known_exactly(pair, result):
    base, _, _, counts = pair
    ref = _reference_tensors(base)
    assert "lm_head.weight" not in {r["name"] for r in result.matrices}  # tied: listed once
    floating = {name for name in ref}
    assert {r["name"] for r in result.matrices} == floating - {"lm_head.weight"}
    total = sum(r["numel"] for r in result.matrices)
    assert total == sum(v.size for n, v in ref.items() if n != "lm_head.weight")
    for row in result.matrices:
        changed = counts.get(row["name"], 0)
        assert row["sparsity"] == 1.0 - changed / row["numel"], row["name"]
        # a ratio of exact counts
        assert row["density"] == pytest.approx(changed / row["numel"], abs=1e-15)
    assert result.summary["global_sparsity"] == 1.0 - sum(counts.values()) / total
    assert result.summary["by_type"]["norm"]["sparsity"] == 1.0 - 7 / result.summary["by_type"]["norm"]["n_params"]
    layer1 = [r for r in result.matrices if r["layer"] == 1]
    assert result.summary["by_layer"]["1"]["sparsity"] == 1.0 - (64 + 128) / sum(r["numel"] for r in layer1)
    geometry = [r for r in result.matrices if r["name"].endswith(GEOMETRY_SUFFIXES)]
    assert result.summary["n_matrices"] == len(geometry) == 14
    expected_density = sum(counts.get(r["name"], 0) / r["numel"] for r in geometry) / 14
    assert result.summary["mean_density"] == pytest.approx(expected_density, rel=1e-12)


def test_every_metric_matches_float64_numpy(pair, result):
    base, tuned, _, _ = pair
    r0, r1 = _reference_tensors(base), _reference_tensors(tuned)
    rows = {r["name"]: r for r in result.matrices}
    refs = {}
    for name, row in rows.items():
        if not name.endswith(GEOMETRY_SUFFIXES):
            for column in COLUMNS[7:]:
                assert row[column] is None, (name, column)
            continue
        ref = refs[name] = _reference_row(r0[name], r1[name], K, RANK, ALPHA)
        assert row["type"] == name.split(".")[-2].removesuffix("_proj")
        assert row["layer"] == int(name.split(".")[2])
        assert row["shape"] == "x".join(map(str, r0[name].shape))
        assert row["sparsity"] == pytest.approx(ref["sparsity"], abs=1e-15), name
        tol = ref["angle_tol_deg"]  # from the subspaces' conditioning (angle_tolerance_deg)
        for column in ("angle_left_max_deg", "angle_left_mean_deg", "angle_right_max_deg", "angle_right_mean_deg"):
            _assert_close(row[column], ref[column], f"{name} {column}", rtol=0, atol=tol)
        # NSS: singular values are perfectly conditioned (|δσ| <= eps·σ₁, Weyl), so two float64
        # codes agree to ~1e-15·‖σ‖ on the numerator; 1e-8 absolute leaves 1e6x of margin.
        # Overlaps are ratios of exact integer counts: equal up to the division's rounding.
        for column in ("nss", "principal_overlap", "low_magnitude_overlap"):
            _assert_close(row[column], ref[column], f"{name} {column}", atol=1e-8)
        np.testing.assert_allclose(result.angles[name]["left"], ref["left"], rtol=0, atol=tol)
        np.testing.assert_allclose(result.angles[name]["right"], ref["right"], rtol=0, atol=tol)
        assert tol < 1e-6, (name, tol)  # the fixture's spectra are well separated at k
    # the perturbed q matrix really rotated and changed spectrum; untouched ones did not
    q0 = rows["model.layers.0.self_attn.q_proj.weight"]
    assert q0["angle_left_max_deg"] > 1.0 and q0["nss"] > 1e-3
    assert rows["model.layers.0.self_attn.v_proj.weight"]["nss"] == 0.0
    # summary means: unweighted over the geometry matrices with a value
    for column, key in (("nss", "mean_nss"), ("angle_left_max_deg", "mean_angle_left_max_deg"),
                        ("angle_right_max_deg", "mean_angle_right_max_deg"),
                        ("principal_overlap", "mean_principal_overlap"),
                        ("low_magnitude_overlap", "mean_low_magnitude_overlap")):
        values = [ref[column] for ref in refs.values() if not math.isnan(ref[column])]
        # a mean of values already checked above to 1e-9: the mean can only carry that error
        assert result.summary[key] == pytest.approx(sum(values) / len(values), rel=1e-9, abs=1e-12), key
        by_q = [refs[n][column] for n in refs if ".q_proj" in n and not math.isnan(refs[n][column])]
        assert result.summary["by_type"]["q"][key] == pytest.approx(sum(by_q) / len(by_q), rel=1e-9, abs=1e-12)
    assert result.summary["by_type"]["embed"]["mean_nss"] is None
    assert result.summary["settings"]["k"] == K and result.summary["settings"]["rank"] == RANK


def test_write_schema(result, tmp_path):
    paths = result.write(tmp_path / "out")
    assert [p.name for p in paths] == ["matrices.csv", "summary.json", "summary.md", "angles.safetensors"]
    lines = (tmp_path / "out" / "matrices.csv").read_text().splitlines()
    assert lines[0].split(",") == list(COLUMNS + EXTRA_COLUMNS)
    assert len(lines) == 1 + len(result.matrices)
    embed = next(line for line in lines if line.startswith("model.embed_tokens.weight,"))
    assert embed.split(",")[7:14] == [""] * 7  # not applicable: empty cells
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    for key in ("global_sparsity", "mean_density", "mean_nss", "mean_angle_left_max_deg", "mean_angle_right_max_deg",
                "mean_principal_overlap", "mean_low_magnitude_overlap", "by_type", "by_layer", "settings",
                "n_matrices", "non_finite"):
        assert key in summary
    assert summary["global_sparsity"] == result.summary["global_sparsity"]
    angles = load_file(str(tmp_path / "out" / "angles.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_array_equal(angles[f"{name}.left"].numpy(), result.angles[name]["left"])
    assert "global sparsity" in (tmp_path / "out" / "summary.md").read_text()


def _numbers(res):
    return [[row[c] for c in COLUMNS + EXTRA_COLUMNS] for row in res.matrices]


def _same(a, b):
    """Equal rows: exact for names, counts and sparsity; SVD-based numbers to 1e-10 (BLAS
    results may differ in the last bits when threads run with other thread counts)."""
    assert len(a) == len(b)
    columns = COLUMNS + EXTRA_COLUMNS
    for ra, rb in zip(a, b):
        for column, x, y in zip(columns, ra, rb):
            if isinstance(x, float) and math.isnan(x):
                assert isinstance(y, float) and math.isnan(y), (ra[0], column, x, y)
            elif column in COLUMNS[7:] and x is not None:
                assert x == pytest.approx(y, rel=1e-10, abs=1e-10), (ra[0], column, x, y)
            else:
                assert x == y, (ra[0], column, x, y)


def test_sharded_threads_and_cache_give_identical_numbers(pair, result, tmp_path, monkeypatch):
    base, _, sharded, _ = pair
    assert len(list(sharded.glob("*.safetensors"))) > 1
    cold = opdgeo.compare(base, sharded, k=K, rank=RANK, alpha=ALPHA, workers=2, cache=tmp_path / "cache")
    _same(_numbers(cold), _numbers(result))
    assert cold.stats["base_svds"] == 14 and cold.stats["cache_misses"] == 14

    import opdgeo.geometry.spectrum as spectrum

    calls = []
    real = spectrum.top_singular_subspaces
    monkeypatch.setattr(spectrum, "top_singular_subspaces", lambda w, k, **kw: calls.append(k) or real(w, k, **kw))
    warm = opdgeo.compare(base, sharded, k=K, rank=RANK, alpha=ALPHA, cache=tmp_path / "cache")
    _same(_numbers(warm), _numbers(result))
    assert warm.stats["base_svds"] == 0 and warm.stats["cache_hits"] == 14
    assert len(calls) == 14  # the tuned side only
    for key in ("global_sparsity", "mean_density", "by_layer", "n_matrices", "non_finite"):
        assert warm.summary[key] == result.summary[key]
    assert warm.summary["mean_nss"] == pytest.approx(result.summary["mean_nss"], rel=1e-10)


def test_warm_cache_reuses_base_masks_keyed_by_alpha_and_rank(pair, result, tmp_path, monkeypatch):
    """The principal and low-magnitude masks depend on W0 only: a warm run reads them from
    the cache (no selection is run), gives the cold numbers exactly, and a different
    alpha or rank (a different key) or a damaged entry recomputes them."""
    import opdgeo.geometry.masks as masks

    base, tuned, _, _ = pair
    cache = tmp_path / "cache"
    cold = opdgeo.compare(base, tuned, k=K, rank=RANK, alpha=ALPHA, cache=cache)
    _same(_numbers(cold), _numbers(result))
    entries = sorted((cache / "masks").rglob("*.bits"))
    assert len(entries) == 14

    def counting(fn, log):
        return lambda *a, **kw: log.append(1) or fn(*a, **kw)

    calls = []
    monkeypatch.setattr(masks, "principal_mask", counting(masks.principal_mask, calls))
    monkeypatch.setattr(masks, "low_magnitude_mask", counting(masks.low_magnitude_mask, calls))
    warm = opdgeo.compare(base, tuned, k=K, rank=RANK, alpha=ALPHA, cache=cache)
    exact = lambda res: [[repr(x) for x in row] for row in _numbers(res)]  # NaN-safe equality
    assert calls == [] and exact(warm) == exact(cold)  # bit-identical rows

    entries[0].write_bytes(b"\x00garbage")  # damaged: a miss, recomputed and rewritten
    again = opdgeo.compare(base, tuned, k=K, rank=RANK, alpha=ALPHA, cache=cache)
    assert len(calls) == 2 and exact(again) == exact(cold)

    calls.clear()
    other = opdgeo.compare(base, tuned, k=K, rank=RANK, alpha=0.1, cache=cache)
    assert len(calls) == 28  # new key: every matrix recomputes both masks
    r0, r1 = _reference_tensors(base), _reference_tensors(tuned)
    for row in other.matrices:
        if row["name"].endswith(GEOMETRY_SUFFIXES):
            ref = _reference_row(r0[row["name"]], r1[row["name"]], K, RANK, 0.1)
            # overlaps are ratios of exact integer counts of the same masks
            _assert_close(row["principal_overlap"], ref["principal_overlap"], row["name"], atol=1e-12)
            _assert_close(row["low_magnitude_overlap"], ref["low_magnitude_overlap"], row["name"], atol=1e-12)
    calls.clear()
    opdgeo.compare(base, tuned, k=K, rank=RANK // 2, alpha=ALPHA, cache=cache)
    assert len(calls) == 28


def test_sparsity_only_does_no_svd(pair, result, monkeypatch):
    import opdgeo.geometry.spectrum as spectrum

    def no_svd(*args, **kwargs):
        raise AssertionError("an SVD was computed for --metrics sparsity")

    monkeypatch.setattr(spectrum, "top_singular_subspaces", no_svd)
    monkeypatch.setattr(spectrum, "singular_values", no_svd)
    base, tuned, _, _ = pair
    res = opdgeo.compare(base, tuned, metrics="sparsity", rank=4096)  # rank unused: no error
    assert [r["sparsity"] for r in res.matrices] == [r["sparsity"] for r in result.matrices]
    assert all(r["nss"] is None and r["angle_left_max_deg"] is None for r in res.matrices)
    assert res.summary["mean_density"] == result.summary["mean_density"]
    assert res.summary["mean_nss"] is None and res.stats["base_svds"] == 0
    assert res.summary["settings"]["metrics"] == ["sparsity"]


def test_nss_only_uses_singular_values(pair, result, monkeypatch):
    import opdgeo.geometry.spectrum as spectrum

    monkeypatch.setattr(spectrum, "top_singular_subspaces", lambda *a, **k: pytest.fail("vectors computed for nss"))
    base, tuned, _, _ = pair
    res = opdgeo.compare(base, tuned, metrics=["nss"])
    assert [r["nss"] for r in res.matrices] == [
        None if r["nss"] is None else pytest.approx(r["nss"], rel=1e-12, abs=1e-13) for r in result.matrices
    ]  # singular values without vectors: each within ~eps*sigma_1 (Weyl), so NSS within ~sqrt(n)*eps absolute
    assert all(r["principal_overlap"] is None for r in res.matrices)


def test_legacy_sparsity_and_fp32(pair, result):
    base, tuned, _, _ = pair
    r0, r1 = _reference_tensors(base), _reference_tensors(tuned)
    res = opdgeo.compare(base, tuned, k=K, rank=RANK, legacy_atol=1e-5, precision="fp32")
    for row in res.matrices:
        d = np.abs(r1[row["name"]] - r0[row["name"]])
        assert row["legacy_sparsity"] == (d <= 1e-5).mean()
    total = sum(r["numel"] for r in res.matrices)
    # a count-weighted mean of exact ratios: only float64 summation order differs
    assert res.summary["global_legacy_sparsity"] == pytest.approx(
        sum(r["legacy_sparsity"] * r["numel"] for r in res.matrices) / total, rel=1e-12)
    q = "model.layers.0.self_attn.q_proj.weight"
    fp64 = next(r for r in result.matrices if r["name"] == q)
    fp32 = next(r for r in res.matrices if r["name"] == q)
    assert fp32["nss"] == pytest.approx(fp64["nss"], rel=1e-4)
    assert fp32["angle_left_max_deg"] == pytest.approx(fp64["angle_left_max_deg"], rel=1e-3)
    assert res.summary["settings"]["precision"] == "fp32"


def test_gram_sized_single_files_and_non_finite(tmp_path):
    """A single-.safetensors input with matrices large enough for the Gram path (p >= 128),
    fp32 on one side and bf16 on the other, and a matrix with NaN/Inf."""
    g = torch.Generator().manual_seed(1)
    w0 = {
        "model.layers.0.mlp.gate_proj.weight": torch.randn(160, 128, generator=g) * 0.02,
        "model.layers.0.mlp.down_proj.weight": torch.randn(128, 144, generator=g) * 0.02,
        "model.layers.0.self_attn.q_proj.weight": torch.randn(32, 32, generator=g) * 0.02,
    }
    w1 = {n: w.clone() for n, w in w0.items()}
    sel = torch.rand(160, 128, generator=g) < 0.2
    w1["model.layers.0.mlp.gate_proj.weight"][sel] += 0.01 * torch.randn(int(sel.sum()), generator=g)
    w1["model.layers.0.mlp.down_proj.weight"] += 1e-3 * torch.randn(128, 144, generator=g)
    w1["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")
    w1["model.layers.0.self_attn.q_proj.weight"][1, 1] = float("inf")
    save_file({n: w.to(torch.bfloat16) for n, w in w0.items()}, str(tmp_path / "a.safetensors"))
    save_file(w1, str(tmp_path / "b.safetensors"))  # fp32 tuned vs bf16 base
    res = opdgeo.compare(tmp_path / "a.safetensors", tmp_path / "b.safetensors", k=40, rank=16)
    rows = {r["name"]: r for r in res.matrices}
    for name in ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        a = w0[name].to(torch.bfloat16).double().numpy()
        b = w1[name].to(torch.bfloat16).double().numpy()  # the SPEC rounds both sides to bf16 for sparsity
        ref = _reference_row(a, w1[name].double().numpy(), 40, 16, 0.3)
        tol = 1e-3 * np.maximum(np.abs(a), np.abs(b))
        update = np.abs(b - a) > tol
        assert rows[name]["sparsity"] * update.size == pytest.approx((~update).sum(), abs=1e-9), name
        for column in ("angle_left_max_deg", "angle_left_mean_deg", "angle_right_max_deg", "angle_right_mean_deg"):
            _assert_close(rows[name][column], ref[column], f"{name} {column}", rtol=0, atol=ref["angle_tol_deg"])
        _assert_close(rows[name]["nss"], ref["nss"], f"{name} nss", atol=1e-8)  # Weyl: see above
    bad = rows["model.layers.0.self_attn.q_proj.weight"]
    assert "1 NaN" in bad["note"] and "1 Inf" in bad["note"] and bad["note"].startswith("non-finite weights: tuned")
    assert math.isnan(bad["nss"]) and math.isnan(bad["angle_left_max_deg"]) and math.isnan(bad["principal_overlap"])
    assert bad["sparsity"] == 1.0 - 2 / 1024  # NaN and Inf entries count as changed
    assert res.summary["non_finite"] == [{"name": bad["name"], "note": bad["note"]}]
    good = [rows[n]["nss"] for n in rows if n != bad["name"]]
    assert res.summary["mean_nss"] == pytest.approx(sum(good) / 2, rel=1e-12)


def test_rank_is_capped_per_matrix_and_reported(pair):
    """``rank`` above min(m, n) is capped for that matrix (the ``rank`` column says so),
    like ``k``: a capped matrix's row is exactly the row of a run asking for min(m, n), and
    an uncapped one equals the float64 reference. (At a full rank the reconstruction is W0
    itself, whose bf16 values tie: the mask is then decided by rounding, so the reference
    is compared below full rank only.)"""
    base, tuned, _, _ = pair
    res = opdgeo.compare(base, tuned, k=K, rank=40)
    at_32 = {r["name"]: r for r in opdgeo.compare(base, tuned, k=K, rank=32).matrices}
    r0, r1 = _reference_tensors(base), _reference_tensors(tuned)
    capped = 0
    for row in res.matrices:
        if not row["name"].endswith(GEOMETRY_SUFFIXES):
            assert row["rank"] is None
            continue
        p = min(r0[row["name"]].shape)
        assert row["rank"] == min(40, p), row["name"]
        if p < 40:
            capped += 1
            assert [repr(row[c]) for c in COLUMNS] == [repr(at_32[row["name"]][c]) for c in COLUMNS]  # NaN-safe
        else:
            ref = _reference_row(r0[row["name"]], r1[row["name"]], K, 40, ALPHA)
            _assert_close(row["principal_overlap"], ref["principal_overlap"], row["name"], atol=1e-12)
    assert capped == 4 and res.summary["n_rank_capped"] == 4  # the k and v projections (32 x 64)


def test_options_are_validated_before_reading(pair):
    base, tuned, _, _ = pair
    with pytest.raises(ConfigError) as err:
        opdgeo.compare(base, tuned, metrics="sparsity,curvature", alpha=2.0, precision="fp16", k=0)
    message = str(err.value)
    assert "\n" not in message
    for part in ("metrics unknown 'curvature'", "alpha must", "precision must", "k must"):  # fields, not flags
        assert part in message
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="^device cuda: CUDA is not available"):
            opdgeo.compare(base, tuned, device="cuda")
    with pytest.raises(ConfigError, match="^device must be"):
        opdgeo.compare(base, tuned, device="tpu")
