"""GeometryMonitor inside transformers.Trainer and TRL: its numbers are `opdgeo trajectory`'s on
the same saved checkpoints (one process, 2-process DDP, FSDP2 gathering one matrix at a time)."""

from __future__ import annotations

import csv
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from integrations_tiny import run_trainer, tiny_model, token_rows, training_args
from opdgeo.analysis.trajectory import COLUMNS, METRICS, trajectory
from opdgeo.errors import ConfigError
from opdgeo.integrations.transformers import GeometryMonitor

HERE = Path(__file__).parent



def _num(cell: str) -> float:
    return float(cell) if cell else float("nan")  # trajectory.csv writes NaN as an empty cell

def table(path: Path) -> dict:
    with open(path) as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        return {(int(r["step"]), r["name"]): r for r in reader}


def assert_rows_equal(mine: dict, ref_rows: list[dict], *, rtol: float) -> None:
    ref = {(int(r["step"]), r["name"]): r for r in ref_rows}
    assert set(mine) == set(ref)
    for key, row in mine.items():
        for m in METRICS:
            a, b = _num(row[m]), float(ref[key][m])
            assert math.isnan(a) == math.isnan(b), (key, m)
            if not math.isnan(b):
                assert abs(a - b) <= rtol * abs(b) + 1e-12, (key, m, a, b)
        assert row["type"] == ref[key]["type"] and float(row["progress"]) == pytest.approx(ref[key]["progress"])


def _geometry_logs(trainer) -> dict[int, dict]:
    return {h["step"]: h for h in trainer.state.log_history if "geometry/stable_rank" in h}


def test_monitor_equals_trajectory_on_the_trainers_checkpoints(tmp_path):
    mon = GeometryMonitor(every=2, dtype="float32", matrices="all")
    trainer = run_trainer(tmp_path / "run", [mon], origin=tmp_path / "origin")
    mine = table(tmp_path / "run" / "geometry" / "trajectory.csv")
    assert {s for s, _ in mine} == {2, 4, 6}
    ref = trajectory(tmp_path / "run", tmp_path / "origin", matrices="all", overlap=False)  # checkpoint-N folders
    assert ref.summary["runs"]["run"]["steps"] == [2, 4, 6]
    # the same function on the same weights: equal to round-off (randomized SVD with the same seed)
    assert_rows_equal(mine, ref.rows, rtol=1e-9)
    # logged through the trainer (log_history, so every report_to integration): the per-step means
    logs = _geometry_logs(trainer)
    assert sorted(logs) == [2, 4, 6] and "geometry/sim_prev" not in logs[2] and "geometry/sim_prev" in logs[4]
    for m in ref.summary["runs"]["run"]["means"]:
        assert logs[m["step"]]["geometry/stable_rank"] == pytest.approx(m["stable_rank"], rel=1e-9)
        assert logs[m["step"]]["geometry/fro_norm"] == pytest.approx(m["fro_norm"], rel=1e-9)
    # Sim_16 to the previous probe = trajectory's Sim to the final of the two-checkpoint run
    pair = trajectory([tmp_path / "run" / "checkpoint-2", tmp_path / "run" / "checkpoint-4"], tmp_path / "origin",
                      matrices="all", overlap=False)
    assert logs[4]["geometry/sim_prev"] == pytest.approx(pair.summary["runs"]["run"]["means"][0]["sim_to_final"],
                                                         rel=1e-9)


def test_bf16_monitor_equals_trajectory_on_bf16_checkpoints_and_origin_from_a_checkpoint(tmp_path):
    """The default rounds to bf16 (as opdgeo train saves): it equals the trajectory of bf16 copies of the
    checkpoints, and not that of the fp32 ones (a negative control); origin= reads W0 from disk instead."""
    from transformers import AutoModelForCausalLM

    live = GeometryMonitor(every=3)
    trainer = run_trainer(tmp_path / "run", [live], steps=6, save_steps=3, origin=tmp_path / "origin")
    bf16 = tmp_path / "bf16"
    for src in [tmp_path / "origin", *(tmp_path / "run" / f"checkpoint-{s}" for s in (3, 6))]:
        AutoModelForCausalLM.from_pretrained(src).to(torch.bfloat16).save_pretrained(bf16 / src.name)
    runs = bf16 / "runs"
    runs.mkdir()
    for s in (3, 6):
        (bf16 / f"checkpoint-{s}").rename(runs / f"checkpoint-{s}")
    ref = trajectory({"run": runs}, bf16 / "origin", overlap=False)
    mine = table(tmp_path / "run" / "geometry" / "trajectory.csv")
    assert_rows_equal(mine, ref.rows, rtol=1e-9)
    fp32 = trajectory({"run": tmp_path / "run"}, tmp_path / "origin", overlap=False)
    with pytest.raises(AssertionError):
        assert_rows_equal(mine, fp32.rows, rtol=1e-6)
    logs = _geometry_logs(trainer)
    # the same run with W0 read from the origin checkpoint (no copy kept) logs the same numbers
    from_disk = GeometryMonitor(every=3, origin=tmp_path / "origin", out=tmp_path / "disk")
    again = run_trainer(tmp_path / "run2", [from_disk], steps=6, save_steps=None)
    for step, rec in _geometry_logs(again).items():
        for key in ("geometry/stable_rank", "geometry/fro_norm", "geometry/density", "geometry/sim_prev"):
            if key in rec:
                assert rec[key] == pytest.approx(logs[step][key], rel=1e-9), (step, key)
    assert table(tmp_path / "disk" / "trajectory.csv").keys() == mine.keys()


def test_final_step_is_probed_once_and_bad_arguments(tmp_path):
    mon = GeometryMonitor(every=4, dtype="float32", out=False)
    trainer = run_trainer(tmp_path / "run", [mon], steps=6, save_steps=None)
    assert sorted(_geometry_logs(trainer)) == [4, 6] and [s for s, _ in mon.history] == [4, 6]
    assert not (tmp_path / "run" / "geometry").exists()
    for bad in ({"every": 0}, {"matrices": "mlp"}, {"dtype": "int8"}, {"k": 0}):
        with pytest.raises(ConfigError, match="GeometryMonitor"):
            GeometryMonitor(**bad)
    with pytest.raises(Exception, match="no tensor"):
        tiny_model().save_pretrained(tmp_path / "o")
        from safetensors.torch import load_file, save_file

        w = load_file(tmp_path / "o" / "model.safetensors")
        w.pop("model.layers.0.self_attn.q_proj.weight")
        save_file(w, tmp_path / "o" / "model.safetensors", metadata={"format": "pt"})
        run_trainer(tmp_path / "run3", [GeometryMonitor(every=2, origin=tmp_path / "o")], steps=2, save_steps=None)


def test_trl_sft_trainer(tmp_path):
    """TRL's SFTTrainer (a tiny Qwen3 from a config, pre-tokenized data: nothing downloaded)."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    model = tiny_model()
    model.save_pretrained(tmp_path / "origin")
    data = Dataset.from_list([{"input_ids": r["input_ids"].tolist()} for r in token_rows(32)])
    from opdgeo.models import char_tokenizer

    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=4, per_device_train_batch_size=4,
                         learning_rate=1e-2, save_strategy="steps", save_steps=2, logging_steps=1, report_to=[],
                         use_cpu=True, save_only_model=True, disable_tqdm=True, packing=False, max_length=32,
                         dataset_kwargs={"skip_prepare_dataset": False})
    mon = GeometryMonitor(every=2, dtype="float32")
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=char_tokenizer(),
                             callbacks=[mon])
    trainer.train()
    assert sorted(_geometry_logs(trainer)) == [2, 4]
    ref = trajectory(tmp_path / "sft", tmp_path / "origin", overlap=False)
    assert_rows_equal(table(tmp_path / "sft" / "geometry" / "trajectory.csv"), ref.rows, rtol=1e-9)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(mode: str, out: Path, **extra_env) -> None:
    env = {**os.environ, **extra_env, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           str(HERE / "integrations_tiny.py"), mode, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="compares CPU processes (gloo)")
def test_two_process_ddp_rank0_equals_trajectory(tmp_path):
    torchrun("ddp", tmp_path / "run")
    mine = table(tmp_path / "run" / "geometry" / "trajectory.csv")
    ref = trajectory(tmp_path / "run", tmp_path / "origin", overlap=False)
    assert_rows_equal(mine, ref.rows, rtol=1e-9)
    state = json.loads((tmp_path / "run" / "checkpoint-6" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "geometry/stable_rank" in h] == [2, 4, 6]


@pytest.mark.skipif(torch.cuda.is_available(), reason="compares CPU processes (gloo)")
def test_fsdp2_gathers_one_matrix_at_a_time_and_equals_unsharded(tmp_path):
    torchrun("fsdp", tmp_path)
    res = json.loads((tmp_path / "fsdp.json").read_text())
    assert set(res["fsdp"]) == set(res["ref"]) and len(res["ref"]) == 14
    for name, (sr, fro, dens) in res["ref"].items():
        got = res["fsdp"][name]
        assert got[0] == pytest.approx(sr, rel=1e-4) and got[1] == pytest.approx(fro, rel=1e-4), name
        assert got[2] == pytest.approx(dens, abs=2e-3), name
    # every rank gathered each of the 14 matrices once for the origin and once for the probe, and no gathered
    # matrix was alive when the next gather began: one matrix at a time, never the whole model
    for rank in (0, 1):
        assert json.loads((tmp_path / f"gathers-{rank}.json").read_text()) == {"calls": 28, "max_alive": 0}, rank

