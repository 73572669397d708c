"""The examples run (TRL GRPOTrainer and GKDTrainer with opdgeo's callbacks on the tiny model), and the
monitor's table equals `opdgeo trajectory` on the checkpoints they saved."""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import pytest

from opdgeo.analysis.trajectory import trajectory

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"



def _num(cell: str) -> float:
    return float(cell) if cell else float("nan")  # trajectory.csv writes NaN as an empty cell

def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["trl_grpo", "trl_gkd"])
def test_example_runs_and_its_table_equals_trajectory(name, tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "run"
    _load(name).main(["--out", str(out), "--steps", "6"])
    with open(out / "geometry" / "trajectory.csv") as f:
        mine = {(int(r["step"]), r["name"]): r for r in csv.DictReader(f)}
    assert {s for s, _ in mine} == {2, 4, 6}
    ref = trajectory(out, out / "origin", overlap=False)
    assert ref.summary["runs"]["run"]["steps"] == [2, 4, 6]
    for r in ref.rows:
        got = mine[(r["step"], r["name"])]
        for m in ("stable_rank", "fro_norm", "sim_to_final"):
            a, b = _num(got[m]), r[m]
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-9), (r["step"], r["name"], m)
    assert ref.summary["runs"]["run"]["means"][-1]["fro_norm"] > 0  # it trained
