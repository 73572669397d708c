"""The study's controls end to end on tiny CPU models (SPEC §3 Controls).

Each run is a few steps of the real loop (``opdgeo.training.loop.train``) with the
``tiny:quick`` student; the OPD teacher is ``tiny:teacher`` (another architecture sharing
the character tokenizer). The arithmetic reward of a random model is always 0, so the
RLVR runs use a deterministic stand-in verifier (reward = parity of the characters' sum)
that gives groups with and without reward variance.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from opdgeo.checkpoints import open_checkpoint
from opdgeo.training import checkpointing as ckpt
from opdgeo.training.config import config_from_dict
from opdgeo.training.controls import rescale_kept, topkl_keep_mask
from opdgeo.training.loop import MicroBatch, train, with_advantages
from opdgeo.training.projection import SUBSPACE_FILE, load_subspaces, right_subspace




@pytest.fixture
def parity_reward(monkeypatch):
    from opdgeo.tasks.arithmetic import ArithmeticTask

    monkeypatch.setattr(ArithmeticTask, "reward", lambda self, response, problem: float(sum(map(ord, response)) % 2))


def _config(out, **sections):
    d = {
        "objective": {"name": "opd"},
        "model": {"student": "tiny:quick", "teacher": "tiny:teacher", "init_seed": 0},
        "task": {"spec": "arithmetic:difficulty=1", "num_problems": 16},
        "rollout": {"group_size": 2, "max_new_tokens": 8},
        "optim": {"steps": 3, "batch_size": 2, "micro_batch_size": 1, "lr": 1e-3},
        "checkpoint": {"every": 1},
        "run": {"out_dir": str(out), "progress": False},
    }
    for name, values in sections.items():
        d.setdefault(name, {}).update(values)
    return config_from_dict(d)


def _master(run, step):
    return dict(ckpt.load_trainer_state(run / ckpt.step_dir_name(step)).master)


def _records(run):
    return ckpt.read_metrics(run / "metrics.jsonl")


def _save_origin(folder):
    """The run's origin (the tiny:quick student as built) as a bf16 checkpoint, step-000000."""
    from opdgeo.training.loop import load_policy

    model, tok = load_policy("tiny:quick", init_seed=0)
    return ckpt.save_checkpoint(folder, 0, model, tok, dtype="bfloat16")


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


# ----------------------------------------------------------------- token sparsification


def test_with_advantages_sparsifies_the_opd_signal_exactly():
    student = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-0.1, -0.2, -0.3, 0.0]])
    teacher = torch.tensor([[-2.0, -1.0, -0.4, -3.5], [-0.2, -0.4, -0.1, 0.0]])
    resp = torch.tensor([[True, True, True, True], [True, True, True, False]])
    mb = MicroBatch(input_ids=torch.zeros(2, 6, dtype=torch.long), attention_mask=torch.ones(2, 6, dtype=torch.long),
                    response_mask=resp, problem_index=torch.zeros(2, dtype=torch.long), old_logprobs=student,
                    student_logprobs=student, teacher_logprobs=teacher)
    cfg = _config("unused", token_keep={"mode": "topkl", "fraction": 0.5})
    out = with_advantages(mb, cfg.objective, group_size=cfg.rollout.group_size, token_keep=cfg.token_keep)
    # r = s - t: row 0 [1, -1, -0.1, 0.5] keeps {0, 3}; row 1 [0.1, 0.2, -0.2] keeps 2 of 3: {0, 1}
    assert torch.nonzero(out.keep_mask).tolist() == [[0, 0], [0, 3], [1, 0], [1, 1]]
    want = torch.tensor([[-2.0, 0.0, 0.0, -1.0], [-0.15, -0.3, 0.0, 0.0]])  # -(T/Σm)·m·r
    torch.testing.assert_close(out.advantages, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.advantages, -rescale_kept(student - teacher, topkl_keep_mask(student - teacher, resp, 0.5), resp))
    assert torch.equal(out.loss_mask, resp)  # dropped tokens stay in the token-mean denominator
    # random mode: seeded by the micro-batch seed
    rnd = _config("unused", token_keep={"mode": "random", "fraction": 0.5})
    a, b, c = (with_advantages(mb, rnd.objective, group_size=2, token_keep=rnd.token_keep, keep_seed=s).keep_mask for s in (1, 1, 2))
    assert torch.equal(a, b) and a.sum(1).tolist() == [2, 2]
    assert any(not torch.equal(with_advantages(mb, rnd.objective, group_size=2, token_keep=rnd.token_keep, keep_seed=s).keep_mask, a) for s in range(2, 12))


def test_topkl_and_random_runs_log_what_they_kept(tmp_path):
    r = train(_config(tmp_path / "topkl", token_keep={"mode": "topkl", "fraction": 0.5},
                      optim={"steps": 2}, checkpoint={"every": 0}))
    for h in r.history:
        v = h.values
        # ceil(T/2) of each of the 4 responses: at least half, at most half + 4 tokens
        # the 1e-12 only absorbs the float64 division of two token counts
        assert 0.5 <= v["sparsify/kept_fraction"] <= 0.5 + 2 / v["train/tokens"] + 1e-12
        # top-KL keeps the largest signed gaps: more than its share of the |gap| mass here
        assert v["sparsify/kept_abs_share"] > v["sparsify/kept_fraction"] - 0.2
    r = train(_config(tmp_path / "random", token_keep={"mode": "random", "fraction": 0.25},
                      optim={"steps": 1}, checkpoint={"every": 0}))
    assert 0.25 <= r.history[0].values["sparsify/kept_fraction"] < 0.25 + 4 / r.history[0].values["train/tokens"]


# ------------------------------------------------------------------------- off-policy


def test_offpolicy_ratio_is_exactly_one_when_the_behaviour_is_the_student(tmp_path):
    # teacher = the same preset and seed as the student: identical weights, so the teacher's
    # recorded behaviour log-probs equal the student's and every ratio is exactly 1 (the
    # teacher in the student's dtype: a bf16 copy, the default on a CPU with native bf16,
    # would round the weights and so move the log-probs)
    r = train(_config(tmp_path / "same", model={"teacher": "tiny:quick", "teacher_dtype": "float32"},
                      rollout={"policy": "teacher"},
                      optim={"steps": 1}, checkpoint={"every": 0}))
    v = r.history[0].values
    assert v["offpolicy/ratio_mean"] == 1.0 and v["offpolicy/ratio_max"] == 1.0 and v["offpolicy/clip_fraction"] == 0.0
    assert v["opd/teacher_gap"] == 0.0


def test_offpolicy_from_a_model_folder_runs_and_logs_ratios(tmp_path, parity_reward):
    # behaviour policy given as a path: an RLVR run whose rollouts come from a saved model
    first = train(_config(tmp_path / "src", objective={"name": "rlvr"}, rollout={"group_size": 4},
                          optim={"steps": 1}, checkpoint={"every": 0}))
    behaviour = first.checkpoints[-1]
    r = train(_config(tmp_path / "off", objective={"name": "rlvr"}, rollout={"policy": str(behaviour), "group_size": 4},
                      optim={"steps": 2}, checkpoint={"every": 0}))
    assert r.history[0].values["train/tokens"] > 0
    for h in r.history:
        v = h.values
        if v["train/tokens"] == 0:  # every group filtered: nothing to report
            assert math.isnan(v["offpolicy/ratio_mean"]) and math.isnan(v["offpolicy/ratio_max"])
            continue
        assert v["offpolicy/ratio_max"] >= v["offpolicy/ratio_mean"] > 0
        assert 0.0 <= v["offpolicy/clip_fraction"] <= 1.0
    assert r.history[0].values["offpolicy/ratio_mean"] != 1.0  # a different policy generated


# ----------------------------------------------------------------------------- mixing


def test_mixing_limits_are_the_pure_runs_bit_for_bit(tmp_path, parity_reward, monkeypatch):
    opd = train(_config(tmp_path / "opd", optim={"steps": 2}, checkpoint={"every": 0}))
    mix1 = train(_config(tmp_path / "mix1", objective={"advantage": {"opd": 1.0, "rlvr": 0.0}},
                         optim={"steps": 2}, checkpoint={"every": 0}))
    _assert_same_weights(_master(tmp_path / "opd", 2), _master(tmp_path / "mix1", 2))
    assert [h.values["train/loss"] for h in opd.history] == [h.values["train/loss"] for h in mix1.history]

    rlvr = train(_config(tmp_path / "rlvr", objective={"name": "rlvr"}, optim={"steps": 2}, checkpoint={"every": 0}))
    mix0 = train(_config(tmp_path / "mix0", objective={"name": "rlvr", "advantage": {"opd": 0.0, "rlvr": 1.0}},
                         optim={"steps": 2}, checkpoint={"every": 0}))
    _assert_same_weights(_master(tmp_path / "rlvr", 2), _master(tmp_path / "mix0", 2))
    assert [h.values["train/loss"] for h in rlvr.history] == [h.values["train/loss"] for h in mix0.history]
    # the runs did learn something (a test of equal no-ops would prove nothing)
    init = _master(tmp_path / "opd", 2)
    assert any(not torch.equal(init[n], _master(tmp_path / "rlvr", 2)[n]) for n in init)
    assert any(h.values["train/grad_norm"] > 0 for h in rlvr.history)
    # with a constant reward every group has zero variance: pure RLVR drops them all, a 0.5 mix keeps
    # every sample (GRPO's filter applies only without OPD) and trains on the OPD half
    from opdgeo.tasks.arithmetic import ArithmeticTask

    monkeypatch.setattr(ArithmeticTask, "reward", lambda self, response, problem: 0.0)
    flat = train(_config(tmp_path / "rlvr-flat", objective={"name": "rlvr"}, optim={"steps": 2},
                         checkpoint={"every": 0}))
    assert [h.values["rlvr/kept_fraction"] for h in flat.history] == [0.0, 0.0]
    mid = train(_config(tmp_path / "mix", objective={"advantage": {"opd": 0.5, "rlvr": 0.5}},
                        optim={"steps": 2}, checkpoint={"every": 0}))
    assert [h.values["rlvr/kept_fraction"] for h in mid.history] == [1.0, 1.0]
    assert all(math.isfinite(h.values["train/loss"]) and h.values["train/grad_norm"] > 0 for h in mid.history)


# ------------------------------------------------------------------------- projection


def _block_matrices(weights):
    from opdgeo.checkpoints import is_geometry_matrix

    return [n for n, w in weights.items() if is_geometry_matrix(n, tuple(w.shape))]


def test_projection_from_a_step_freezes_the_rest_saves_the_subspace_and_resumes_exactly(tmp_path):
    cfg = dict(project={"from": 1, "rank": 4}, run={"monitor_every": 1})
    full = train(_config(tmp_path / "full", **cfg))
    run = tmp_path / "full"
    m1, m3 = _master(run, 1), _master(run, 3)
    blocks = _block_matrices(m1)
    assert len(blocks) == 14
    for n in m1:
        if n in blocks:
            assert not torch.equal(m1[n], m3[n]), n  # the projected matrices still train
        else:
            assert torch.equal(m1[n], m3[n]), n  # embeddings and norms are frozen
    # the saved subspace is V_4 of the step-1 checkpoint's ΔW against the origin
    subspaces, meta = load_subspaces(run / SUBSPACE_FILE)
    assert meta["rank"] == "4" and meta["step"] == "1" and set(subspaces) == set(blocks)
    w0 = open_checkpoint(_save_origin(tmp_path / "origin"))
    w1 = open_checkpoint(run / "step-000001")
    for n in blocks:
        v = subspaces[n].double()
        ref = right_subspace(w1.load(n).double() - w0.load(n).double(), 4, name=n)
        torch.testing.assert_close(v @ v.T, ref @ ref.T, atol=1e-6, rtol=0)
    energy = [h.values.get("project/grad_energy_kept") for h in full.history]
    assert energy[0] is None and all(0.0 < e < 1.0 for e in energy[1:])
    # resume after projection began equals the uninterrupted run, monitor included
    part = tmp_path / "part"
    train(_config(part, **cfg, optim={"steps": 2}))
    train(_config(part, **cfg), resume=True)
    _assert_same_weights(_master(part, 3), m3)
    a, b = _records(run), _records(part)
    for key in ("train/loss", "project/grad_energy_kept", "geometry/stable_rank", "geometry/sim_prev",
                "geometry/density"):
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key


def _out_of_span(delta, v):
    from opdgeo.training.projection import out_of_subspace_fraction

    return out_of_subspace_fraction(delta.double(), v.double())


def test_projected_adamw_stays_in_span_restart_carries_adamw_state_and_freeze_control(tmp_path):
    """With AdamW and weight decay, W − W_from stays in span(V_K) to 1e-6; a restart from the
    step-1 checkpoint continues with its AdamW state (= the run projected from step 1); the
    freeze control restarts the same way, freezes the same parameters and leaves the span."""
    common = dict(optim={"steps": 3, "lr": 1e-2, "weight_decay": 0.1}, checkpoint={"every": 1, "dtype": "float32"})
    run = tmp_path / "step"
    hist = train(_config(run, project={"from": 1, "rank": 4}, **common)).history
    subspaces, _ = load_subspaces(run / SUBSPACE_FILE)
    m1, m3 = _master(run, 1), _master(run, 3)
    for n, v in subspaces.items():
        assert float((m3[n] - m1[n]).abs().max()) > 1e-4, n  # it trained
        assert _out_of_span(m3[n] - m1[n], v) <= 1e-6, n
    assert "project/out_of_subspace_fraction" not in hist[0].values  # projection starts after step 1
    for h in hist[1:]:
        assert 0 <= h.values["project/out_of_subspace_fraction"] <= h.values["project/out_of_subspace_max"] <= 1e-6

    restart = tmp_path / "restart"
    start = str(run / "step-000001")
    train(_config(restart, project={"from": start, "rank": 4}, **common))
    for n, w in _master(restart, 3).items():
        torch.testing.assert_close(w, m3[n], rtol=1e-6, atol=1e-8)
    # negative control: the same restart without trainer_state/ starts a fresh AdamW and differs
    bare = tmp_path / "bare" / "step-000001"
    shutil.copytree(start, bare, ignore=shutil.ignore_patterns("trainer_state"))
    train(_config(tmp_path / "fresh", project={"from": str(bare), "rank": 4}, **common))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert float((_master(tmp_path / "fresh", 3)[q] - m3[q]).abs().max()) > 1e-4

    frozen = tmp_path / "freeze"
    fh = train(_config(frozen, project={"from": start, "rank": 4, "mode": "freeze"}, **common)).history
    f3 = _master(frozen, 3)
    assert set(load_subspaces(frozen / SUBSPACE_FILE)[0]) == set(subspaces)
    for n, w in f3.items():
        assert torch.equal(w, m1[n]) == (n not in subspaces), n  # the same parameters frozen
    assert max(_out_of_span(f3[n] - m1[n], v) for n, v in subspaces.items()) > 0.05
    for h in fh:
        assert "project/grad_energy_kept" not in h.values
        assert h.values["project/out_of_subspace_fraction"] > 0.05  # measured, not enforced


def test_projection_restart_from_a_checkpoint_via_the_cli(tmp_path, capsys):
    import yaml

    from opdgeo.cli.main import main

    base = tmp_path / "opd"
    train(_config(base, optim={"steps": 2}))
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "objective": "opd",
        "model": {"student": "tiny:quick", "teacher": "tiny:teacher"},
        "task": {"spec": "arithmetic:difficulty=1", "num_problems": 16},
        "rollout": {"group_size": 2, "max_new_tokens": 8},
        "optim": {"steps": 3, "batch_size": 2, "micro_batch_size": 1, "lr": 1e-3},
        "run": {"out_dir": str(base), "progress": False},
    }))
    with pytest.raises(SystemExit) as err:
        main(["train", str(cfg_path), "--project-from", str(base / "step-000001"), "--rank", "99"])
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert msg.startswith("opdgeo: error: ") and "project.rank (--rank) must be <= min(m, n)" in msg
    assert "Traceback" not in msg
    main(["train", str(cfg_path), "--project-from", str(base / "step-000001"), "--rank", "2"])
    out = tmp_path / "opd-projected-step-000001-k2"
    assert (out / SUBSPACE_FILE).is_file() and (out / "step-000003").is_dir()
    assert [r["step"] for r in _records(out)] == [2, 3]  # continues after the checkpoint's step
    start, end = _master(base, 1), _master(out, 3)
    blocks = set(_block_matrices(start))
    for n in start:
        assert torch.equal(start[n], end[n]) == (n not in blocks), n
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["project"] == {"from": str(base / "step-000001"), "rank": 2, "origin": None, "mode": "project"}


# ---------------------------------------------------------------------------- monitor


def test_monitor_equals_trajectory_on_the_saved_checkpoints(tmp_path):
    import numpy as np

    from opdgeo.analysis.trajectory import trajectory

    r = train(_config(tmp_path / "mon", run={"monitor_every": 1, "monitor_per_matrix": True}))
    run = tmp_path / "mon"
    origin = _save_origin(tmp_path / "origin")
    w0 = open_checkpoint(origin)
    names = [n for n in w0.names() if any(f".self_attn.{t}_proj." in n for t in "qkvo")]
    assert len(names) == 8
    # `opdgeo trajectory` on the run's checkpoints: the same stable rank and ‖ΔW‖_F, bit for bit
    rows = {(row["step"], row["name"]): row for row in trajectory({"mon": run}, origin, overlap=False).rows}
    for h in r.history:
        for n in names:
            assert h.values[f"geometry/stable_rank/{n}"] == rows[(h.step, n)]["stable_rank"], (h.step, n)
            assert h.values[f"geometry/fro_norm/{n}"] == rows[(h.step, n)]["fro_norm"], (h.step, n)
    # Sim_16 to the previous probe = trajectory's Sim on the run [step s-1, step s]
    for h in r.history[1:]:
        pair = [run / ckpt.step_dir_name(h.step - 1), run / ckpt.step_dir_name(h.step)]
        sims = {row["name"]: row["sim_to_final"] for row in trajectory({"pair": pair}, origin, overlap=False).rows
                if row["step"] == h.step - 1}
        for n in names:
            # the monitor and trajectory run the same float64 routine on the same bf16 checkpoint values; only
            # thread scheduling of LAPACK could differ, which moves Sim (a sum of squared cosines) by ~eps
            assert h.values[f"geometry/sim_prev/{n}"] == pytest.approx(sims[n], abs=1e-12), (h.step, n)
        assert h.values["geometry/sim_prev"] == pytest.approx(np.mean([sims[n] for n in names]), abs=1e-12)
    # density and the means against a float64 numpy reference on the checkpoints
    for h in r.history:
        wt = open_checkpoint(run / ckpt.step_dir_name(h.step))
        ref = {}
        for n in names:
            a, b = w0.load(n), wt.load(n)
            d = b.double().numpy() - a.double().numpy()
            s = np.linalg.svd(d, compute_uv=False)
            ref[n] = {"stable_rank": (d**2).sum() / s[0] ** 2, "fro_norm": np.sqrt((d**2).sum()),
                      "density": float((a != b).double().mean())}
        for metric in ("stable_rank", "fro_norm", "density"):
            for n in names:
                assert h.values[f"geometry/{metric}/{n}"] == pytest.approx(ref[n][metric], rel=1e-5), (metric, n)
            assert h.values[f"geometry/{metric}"] == pytest.approx(np.mean([ref[n][metric] for n in names]), rel=1e-5)
    assert "geometry/sim_prev" not in r.history[0].values
    # metrics.jsonl carries the same values
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["geometry/stable_rank"] == r.history[-1].values["geometry/stable_rank"]


# ------------------------------------------------------------------------- two ranks


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="needs the accelerate launcher")
@pytest.mark.skipif(torch.cuda.is_available(), reason="compares CPU processes (gloo)")
def test_projection_and_monitor_under_two_processes_equal_one(tmp_path):
    """Projection after the gradient all-reduce: 2 ranks take the same projected steps as 1."""
    import os
    import socket
    import subprocess

    import yaml

    cfg = {
        "objective": "opd",
        "model": {"student": "tiny:quick", "teacher": "tiny:teacher"},
        "task": {"spec": "arithmetic:difficulty=1", "num_problems": 16},
        "rollout": {"group_size": 2, "max_new_tokens": 8},
        "optim": {"steps": 3, "batch_size": 2, "micro_batch_size": 1, "lr": 1e-2, "weight_decay": 0.1},
        "project": {"from": 1, "rank": 4},
        "checkpoint": {"dtype": "float32", "every": 1},
        "run": {"progress": False, "monitor_every": 1},
    }
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "-m", "opdgeo", "train", str(cfg_path), "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train(config_from_dict({**cfg, "run": {**cfg["run"], "out_dir": str(tmp_path / "one")}}))
    one, two = _master(tmp_path / "one", 3), _master(tmp_path / "two", 3)
    for n, w in one.items():
        torch.testing.assert_close(two[n], w, rtol=1e-5, atol=1e-6)
    assert not torch.equal(_master(tmp_path / "one", 1)["model.layers.0.self_attn.q_proj.weight"],
                           one["model.layers.0.self_attn.q_proj.weight"])
    for a, b in zip(_records(tmp_path / "one"), _records(tmp_path / "two"), strict=True):
        for key in ("train/loss", "project/grad_energy_kept", "geometry/stable_rank", "geometry/fro_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key
        if a["step"] > 1:  # AdamW with weight decay, projected on every rank: in the span to 1e-6
            assert a["project/out_of_subspace_max"] <= 1e-6 and b["project/out_of_subspace_max"] <= 1e-6
    subspaces, _ = load_subspaces(tmp_path / "two" / SUBSPACE_FILE)
    start = _master(tmp_path / "two", 1)
    for n, v in subspaces.items():
        assert float((two[n] - start[n]).abs().max()) > 1e-4, n
        assert _out_of_span(two[n] - start[n], v) <= 1e-6, n
