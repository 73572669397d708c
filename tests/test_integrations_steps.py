"""Other trainers' step folders: checkpoint-N (transformers/TRL), global_step_N/actor/huggingface (verl),
iter_N; the step from the name, one origin for every run."""

from __future__ import annotations

import csv
import shutil

import pytest
import torch

from opdgeo.analysis.trajectory import trajectory
from opdgeo.checkpoints import checkpoint_step_of, list_checkpoint_dirs, step_of
from opdgeo.cli.main import main
from opdgeo.errors import CheckpointError


def test_names_and_listing(tmp_path):
    for name, step in (("checkpoint-500", 500), ("iter_0000100", 100), ("global_step_20", 20), ("step-7", 7),
                       ("global_step_20/actor/huggingface", 20), ("checkpoint-final", None), ("iter-5", None),
                       ("global_step_3/critic/huggingface", None), (".tmp-checkpoint-5-1-ab", None),
                       ("huggingface", None)):
        assert checkpoint_step_of(tmp_path / name) == step, name
    assert step_of(tmp_path / "checkpoint-5") is None  # opdgeo's own resume reads only its step folders
    for name in ("checkpoint-20", "checkpoint-3", "global_step_10/actor/huggingface", "global_step_15/actor",
                 "iter_0000040", "runs", ".tmp-checkpoint-9-1-00"):
        (tmp_path / name).mkdir(parents=True)
    assert list_checkpoint_dirs(tmp_path) == [
        (3, tmp_path / "checkpoint-3"), (10, tmp_path / "global_step_10" / "actor" / "huggingface"),
        (20, tmp_path / "checkpoint-20"), (40, tmp_path / "iter_0000040")]  # global_step_15 has no HF export
    assert list_checkpoint_dirs(tmp_path / "absent") == []


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, tiny_qwen3_factory):
    """One run saved in four layouts: step-N, checkpoint-N, verl and iter_N (the same bytes)."""
    root = tmp_path_factory.mktemp("layouts")
    tiny_qwen3_factory(root / "origin", seed=0)
    g = torch.Generator().manual_seed(3)
    steps = (5, 10, 20)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"]
    acc = {n: torch.zeros(64, 64) if "q_proj" in n else torch.zeros(32, 64) for n in names}
    for s in steps:
        for n in names:
            acc[n] += 0.05 * torch.randn(acc[n].shape, generator=g)
        src = tiny_qwen3_factory(root / "step" / f"step-{s:06d}", seed=0, perturb={n: d.clone() for n, d in acc.items()})
        for folder in (f"checkpoint-{s}", f"global_step_{s}/actor/huggingface", f"iter_{s:07d}"):
            kind = folder.split("-")[0].split("_")[0]
            shutil.copytree(src, root / kind / folder)
    return root, steps


def _plain(rows):
    return [{k: repr(v) for k, v in r.items() if k != "run"} for r in rows]  # NaN == NaN as text


def test_trajectory_reads_every_layout_with_steps_from_names(layouts, tmp_path, capsys):
    root, steps = layouts
    ref = trajectory(root / "step", root / "origin", overlap=False)
    for kind in ("checkpoint", "global", "iter"):
        res = trajectory(root / kind, root / "origin", overlap=False)
        assert res.summary["runs"][kind]["steps"] == list(steps)
        assert _plain(res.rows) == _plain(ref.rows) and len(ref.rows) == 24
    # the CLI: several runs, the origin given once for all
    out = tmp_path / "out"
    try:
        main(["trajectory", "--origin", str(root / "origin"), "--run", f"trl={root / 'checkpoint'}",
              "--run", f"verl={root / 'global'}", "--run", f"nemo={root / 'iter'}", "--out", str(out), "--no-overlap"])
    except SystemExit as e:
        assert e.code in (0, None)
    with open(out / "trajectory.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["run"] for r in rows} == {"trl", "verl", "nemo"} and {int(r["step"]) for r in rows} == set(steps)
    # explicit lists of verl exports: steps from the global_step_N above each
    lst = trajectory([root / "global" / f"global_step_{s}" / "actor" / "huggingface" for s in steps], root / "origin",
                     overlap=False)
    assert list(lst.summary["runs"].values())[0]["steps"] == list(steps)


def test_a_run_folder_without_checkpoints_names_the_conventions(tmp_path):
    (tmp_path / "run" / "global_step_5" / "actor").mkdir(parents=True)  # no HF export
    with pytest.raises(CheckpointError, match="no checkpoints \\(step-N, checkpoint-N, global_step_N/actor/"):
        trajectory(tmp_path / "run", tmp_path, overlap=False)
