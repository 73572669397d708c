"""`opdgeo trajectory` end to end on tiny Qwen3 runs with designed updates.

Two runs from one origin, three checkpoints each (step-000010/20/30), float32 weights so
that ΔW_t is the designed update up to float32 rounding:

- ``lock``: ΔW_t = (t/30)·(B + D) — the subspace never moves: Sim_16 = 1, locks at step 10;
- ``drift``: ΔW_10 = D + 0.02 B, ΔW_20 = D + 0.8 B, ΔW_30 = D + 3 B with D, B on
  orthogonal singular directions, D's values above B's at step 10 and below from step 20:
  Sim_16 = 0, 1, 1 → locks at 20.

The CSV is checked against a float64 numpy reference computed from the saved files,
and the designed values (stable rank, ‖ΔW‖_F, Sim, locking step) analytically.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file

from conftest import save_tiny_qwen3
from opdgeo.analysis.trajectory import COLUMNS, OVERLAP_COLUMNS, resolve_run, trajectory
from opdgeo.errors import CheckpointError, ConfigError

LAYERS = 2
SCALE = 2e-4  # update entries ~1e-5..1e-4 next to init weights ~0.02: partly bf16-visible
H16 = sum(1 / i for i in range(1, 17))




def _shapes():
    # tiny Qwen3 of conftest: hidden 64, 4 heads x 16, 2 kv heads
    return {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64)}


def _designed(seed: int):
    """Per attention matrix: B (16 values 10·i^-1/2 on directions 0..15) and D (i^-1/2 on 16..31)."""
    rng = np.random.default_rng(seed)
    out = {}
    for layer in range(LAYERS):
        for mod, (m, n) in _shapes().items():
            u = np.linalg.qr(rng.standard_normal((m, 32)))[0]
            v = np.linalg.qr(rng.standard_normal((n, 32)))[0]
            s = np.arange(1, 17) ** -0.5
            b = (u[:, :16] * (10 * s)) @ v[:, :16].T
            d = (u[:, 16:] * s) @ v[:, 16:].T
            out[f"model.layers.{layer}.self_attn.{mod}.weight"] = (b * SCALE, d * SCALE, v[:, :16], v[:, 16:])
    return out


def _save(path, deltas, **kw):
    return save_tiny_qwen3(path, seed=0, dtype=torch.float32, num_hidden_layers=LAYERS,
                           perturb={k: torch.from_numpy(v) for k, v in deltas.items()} if deltas else None, **kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("traj")
    design = _designed(0)
    _save(root / "origin", None)
    for t in (10, 20, 30):
        _save(root / "lock" / f"step-{t:06d}", {k: (t / 30) * (b + d) for k, (b, d, _, _) in design.items()})
    coef = {10: 0.02, 20: 0.8, 30: 3.0}
    for t in (10, 20, 30):
        _save(root / "drift" / f"step-{t:06d}", {k: d + coef[t] * b for k, (b, d, _, _) in design.items()})
    return root, design


def _weights(folder):
    return {k: v.astype(np.float64) for k, v in load_file(str(folder / "model.safetensors")).items()}


def _reference(root, run, names, k_hill=32, sim_k=16):
    """float64 numpy: every metric of every checkpoint and matrix from the saved files."""
    w0 = _weights(root / "origin")
    ckpts = {t: _weights(root / run / f"step-{t:06d}") for t in (10, 20, 30)}
    ref = {}
    v_final = {}
    for t in (30, 10, 20):
        for name in names:
            d = ckpts[t][name] - w0[name]
            _, s, vh = np.linalg.svd(d)
            if t == 30:
                v_final[name] = vh[:sim_k].T
            top = s[:k_hill]
            ref[(t, name)] = {
                "stable_rank": np.sum(d**2) / s[0] ** 2,
                "fro_norm": np.linalg.norm(d),
                "rel_fro_norm": np.linalg.norm(d) / np.linalg.norm(w0[name]),
                "hill_alpha": 1.0 / np.mean(np.log(top[:-1] / top[-1])),
                "sim_to_final": np.sum((vh[:sim_k] @ v_final[name]) ** 2) / sim_k,
            }
    return ref


@pytest.fixture(scope="module")
def result(runs):
    root, _ = runs
    # oversample=8: l = 40 < 64 takes the randomized path on q/o; k/v (32 x 64) the exact one
    return trajectory({"lock": root / "lock", "drift": root / "drift"}, root / "origin", oversample=8)


def test_rows_match_float64_numpy_reference(runs, result):
    root, design = runs
    names = list(design)
    assert [r["run"] for r in result.rows[:1]] == ["lock"]
    assert len(result.rows) == 2 * 3 * len(names)
    for run in ("lock", "drift"):
        ref = _reference(root, run, names)
        mine = [r for r in result.rows if r["run"] == run]
        assert [r["step"] for r in mine] == [10] * 8 + [20] * 8 + [30] * 8
        for r in mine:
            assert r["type"] == r["name"].split(".")[-2][0]
            assert r["progress"] == pytest.approx(100 * r["step"] / 30)
            want = ref[(r["step"], r["name"])]
            # Both sides are float64 sums of squares of the same bf16-exact differences; only the summation order
            # differs (relative error ~n*eps, n <= 4096), so 1e-12 holds on any BLAS.
            assert r["fro_norm"] == pytest.approx(want["fro_norm"], rel=1e-12)
            assert r["rel_fro_norm"] == pytest.approx(want["rel_fro_norm"], rel=1e-12)
            assert r["stable_rank"] == pytest.approx(want["stable_rank"], rel=1e-6)
            assert r["hill_alpha"] == pytest.approx(want["hill_alpha"], rel=1e-3)
            assert r["sim_to_final"] == pytest.approx(want["sim_to_final"], abs=1e-3)


def test_designed_values_and_locking(result):
    # D + cB has the 32 singular values {i^-1/2} ∪ {10c·i^-1/2} (times SCALE): stable rank
    # (1 + 100c²)·H16 / max(1, 10c)², Hill index from the merged list
    by = {(r["run"], r["step"], r["name"]): r for r in result.rows}
    s = np.arange(1, 17) ** -0.5

    def hill(c):
        top = np.sort(np.concatenate([s, 10 * c * s]))[::-1]
        return 1 / np.mean(np.log(top[:-1] / top[-1]))

    for name in ("model.layers.1.self_attn.k_proj.weight", "model.layers.0.self_attn.o_proj.weight"):
        for t in (10, 20, 30):
            lock = by[("lock", t, name)]
            assert lock["sim_to_final"] == pytest.approx(1.0, abs=1e-6)
            assert lock["stable_rank"] == pytest.approx(1.01 * H16, rel=1e-4)
            assert lock["fro_norm"] == pytest.approx(SCALE * (t / 30) * math.sqrt(101 * H16), rel=1e-4)
            assert lock["hill_alpha"] == pytest.approx(hill(1.0), rel=1e-3)
        drift = [by[("drift", t, name)] for t in (10, 20, 30)]
        for d, c in zip(drift, (0.02, 0.8, 3.0)):
            assert d["stable_rank"] == pytest.approx((1 + 100 * c * c) * H16 / max(1.0, 10 * c) ** 2, rel=1e-4)
            assert d["hill_alpha"] == pytest.approx(hill(c), rel=1e-3)
        assert [round(d["sim_to_final"], 4) for d in drift] == [0.0, 1.0, 1.0]
    runs = result.summary["runs"]
    assert runs["lock"]["locking_step"] == 10 and runs["lock"]["locking_progress"] == pytest.approx(100 / 3)
    assert runs["drift"]["locking_step"] == 20
    assert runs["drift"]["by_type"]["q"]["locking_step"] == 20
    # per-step means over the 8 matrices
    mean30 = runs["drift"]["means"][2]
    assert mean30["step"] == 30 and mean30["n_matrices"] == 8
    # a mean of the same eight float64 values: the order of a sum of eight terms moves it by ~8*eps
    assert mean30["stable_rank"] == pytest.approx(
        np.mean([r["stable_rank"] for r in result.rows if r["run"] == "drift" and r["step"] == 30]), rel=1e-12)
    assert runs["drift"]["means"][0]["sim_to_final"] == pytest.approx(0.0, abs=1e-4)


def test_overlap_against_hand_computed_masks(runs, result):
    root, design = runs
    w0 = _weights(root / "origin")
    fa, fb = _weights(root / "lock" / "step-000030"), _weights(root / "drift" / "step-000030")

    def visible(a, b):  # bf16 round-to-nearest-even, then "the two bf16 values differ"
        ta = torch.from_numpy(a).float().to(torch.bfloat16)
        tb = torch.from_numpy(b).float().to(torch.bfloat16)
        return (ta != tb).numpy()

    tot = {"n": 0, "a": 0, "b": 0, "ab": 0, "e": 0.0}
    rows = {(r["scope"], r["key"]): r for r in result.overlap}
    assert all(r["run_a"] == "lock" and r["run_b"] == "drift" for r in result.overlap)
    for name in design:
        a, b = visible(w0[name], fa[name]), visible(w0[name], fb[name])
        n, na, nb, nab = a.size, a.sum(), b.sum(), (a & b).sum()
        assert 0 < na < n and 0 < nb < n  # partly visible: a non-trivial test
        r = rows[("matrix", name)]
        # Ratios of exact integer counts: the only error is one float64 division on each side.
        assert r["overlap_a_in_b"] == pytest.approx(nab / na, rel=1e-12)
        assert r["overlap_b_in_a"] == pytest.approx(nab / nb, rel=1e-12)
        assert r["baseline_a_in_b"] == pytest.approx(nb / n, rel=1e-12)
        assert r["jaccard"] == pytest.approx(nab / (na + nb - nab), rel=1e-12)
        p, q = na / n, nb / n
        assert r["jaccard_baseline"] == pytest.approx(p * q / (p + q - p * q), rel=1e-12)
        for key, val in (("n", n), ("a", na), ("b", nb), ("ab", nab), ("e", na * nb / n)):
            tot[key] += val
    r = rows[("all", "all")]
    assert r["numel"] == tot["n"]
    assert r["overlap_a_in_b"] == pytest.approx(tot["ab"] / tot["a"], rel=1e-12)
    assert r["baseline_a_in_b"] == pytest.approx(tot["e"] / tot["a"], rel=1e-12)
    assert r["jaccard"] == pytest.approx(tot["ab"] / (tot["a"] + tot["b"] - tot["ab"]), rel=1e-12)
    assert {("type", t) for t in "qkvo"} | {("layer", "0"), ("layer", "1")} <= set(rows)


def test_cli_writes_outputs_equal_to_api(runs, result, tmp_path):
    from opdgeo.cli.main import cli

    root, _ = runs
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["trajectory", "--run", f"lock={root / 'lock'}", "--run", f"drift={root / 'drift'}",
                                   "--origin", str(root / "origin"), "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "lock: locks at step 10" in res.output and "drift: locks at step 20" in res.output
    with open(out / "trajectory.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        rows = list(reader)
    assert len(rows) == len(result.rows)
    for got, want in zip(rows, result.rows):
        assert (got["run"], int(got["step"]), got["name"]) == (want["run"], want["step"], want["name"])
        # CLI uses the default oversample (exact path on these small matrices): contract tolerances
        assert float(got["stable_rank"]) == pytest.approx(want["stable_rank"], rel=1e-6)
        assert float(got["sim_to_final"]) == pytest.approx(want["sim_to_final"], abs=1e-3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs"]["drift"]["locking_step"] == 20
    assert summary["settings"]["sim_k"] == 16 and summary["settings"]["k_hill"] == 32
    with open(out / "overlap.csv", newline="") as f:
        assert tuple(csv.DictReader(f).fieldnames) == OVERLAP_COLUMNS
    for stem in ("stable_rank", "fro_norm", "hill_alpha", "sim_to_final"):
        assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"<svg" in (out / f"{stem}.svg").read_bytes()[:2000]


def test_positional_run_list_and_matrix_regex(runs):
    root, _ = runs
    ckpts = [root / "drift" / f"step-{t:06d}" for t in (10, 20, 30)]
    res = trajectory({"d": ckpts}, {"d": root / "origin"}, matrices=r"layers\.0\..*k_proj", k_hill=8, sim_k=4)
    assert {r["name"] for r in res.rows} == {"model.layers.0.self_attn.k_proj.weight"}
    assert [r["step"] for r in res.rows] == [10, 20, 30]
    assert res.overlap == []
    spec = resolve_run("x", [root / "origin", root / "lock" / "step-000030"], root / "origin")
    assert spec.steps == (1, 2) and spec.progress == (50.0, 100.0)


def _cli(args):
    from opdgeo.cli.main import main

    try:
        main(args)
    except SystemExit as e:
        return e.code
    return 0


def test_bad_input_one_line_errors(runs, tmp_path, capsys):
    root, _ = runs
    # a run folder with no checkpoints
    (tmp_path / "empty").mkdir()
    assert _cli(["trajectory", "--origin", str(root / "origin"), str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("opdgeo: error:") and "has no checkpoints (step-N" in err and "\n" not in err
    # steps that cannot be ordered: duplicates and unparsable names
    dup = tmp_path / "dup"
    (dup / "step-10").mkdir(parents=True)
    (dup / "step-010").mkdir()
    with pytest.raises(CheckpointError, match="both step 10"):
        resolve_run("dup", dup, root / "origin")
    bad = tmp_path / "bad"
    (bad / "step-final").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no step number"):
        resolve_run("bad", bad, root / "origin")
    with pytest.raises(CheckpointError, match="cannot be ordered"):
        resolve_run("rev", [root / "lock" / "step-000020", root / "lock" / "step-000010"], root / "origin")
    # checkpoints of different architectures in one run; an origin that does not match
    mixed = tmp_path / "mixed"
    save_tiny_qwen3(mixed / "step-000001", seed=0, dtype=torch.float32, num_hidden_layers=LAYERS)
    save_tiny_qwen3(mixed / "step-000002", seed=0, dtype=torch.float32, num_hidden_layers=3)
    capsys.readouterr()
    assert _cli(["trajectory", "--origin", str(root / "origin"), str(mixed)]) == 2
    err = capsys.readouterr().err.strip()
    assert "different architectures" in err and "model.layers.2" in err and "\n" not in err
    other_origin = save_tiny_qwen3(tmp_path / "origin3", seed=0, dtype=torch.float32, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match="does not match run lock"):
        trajectory({"lock": root / "lock"}, other_origin)
    # options validated before any weight is read, all problems at once
    with pytest.raises(ConfigError, match="^k_hill must be .*; sim_k must be"):  # the library names fields
        trajectory({"lock": root / "lock"}, root / "origin", k_hill=1, sim_k=0)
    capsys.readouterr()
    assert _cli(["trajectory", "--origin", str(root / "origin"), str(root / "lock"), "--k-hill", "1",
                 "--lock-threshold", "2"]) == 2
    err = capsys.readouterr().err  # ... and the CLI its flags
    assert "--k-hill must be an integer >= 2; got 1" in err and "--lock-threshold must be in [0, 1]" in err
    with pytest.raises(ConfigError, match="no matrix"):
        trajectory({"lock": root / "lock"}, root / "origin", matrices="nothing_matches")
    assert _cli(["trajectory", "--run", f"lock={root / 'lock'}", "--origin", f"lokc={root / 'origin'}"]) == 2
    assert "lokc is not a run" in capsys.readouterr().err


def test_torchrun_two_gloo_ranks_equal_one_process(runs, result, tmp_path):
    """`torchrun --nproc-per-node 2 -m opdgeo -- trajectory`: matrices shared by 2 gloo ranks.

    (``--`` keeps torchrun's argparse from reading ``--run`` as its own ``--run-path``.)
    """
    import os
    import subprocess
    import sys

    root, _ = runs
    out = tmp_path / "dist"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "opdgeo",
         "--", "trajectory", "--run", f"lock={root / 'lock'}", "--run", f"drift={root / 'drift'}",
         "--origin", str(root / "origin"), "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("locks at step") == 2  # rank 0 prints, rank 1 does not
    with open(out / "trajectory.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    single = trajectory({"lock": root / "lock", "drift": root / "drift"}, root / "origin", workers=2)  # threads too
    assert len(rows) == len(single.rows)
    for got, want in zip(rows, single.rows):
        assert (got["run"], int(got["step"]), got["name"]) == (want["run"], want["step"], want["name"])
        for m in ("stable_rank", "fro_norm", "hill_alpha", "sim_to_final"):
            # Both runs compute each matrix's metrics with the same float64 routine on the same input; the CSV
            # stores repr(), so they agree to the last bit unless LAPACK is non-deterministic across threads.
            assert float(got[m]) == pytest.approx(want[m], rel=1e-12, abs=1e-15)
    with open(out / "overlap.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(single.overlap)
