"""``opdgeo compare`` through the command line: outputs, and one line + exit 2 for every
bad input."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import opdgeo
from opdgeo.cli.main import main




@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_qwen3_factory):
    root = tmp_path_factory.mktemp("cli")
    q = torch.zeros(64, 64)
    q[2, :9] = 0.1
    perturb = {"model.layers.1.self_attn.q_proj.weight": q}
    base = tiny_qwen3_factory(root / "base")
    tuned = tiny_qwen3_factory(root / "tuned", perturb=perturb)
    sharded = tiny_qwen3_factory(root / "sharded", perturb=perturb, max_shard_size="40KB")
    return root, base, tuned, sharded


def run_cli(args, capsys):
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("opdgeo: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_cli_writes_the_report_and_matches_the_api(ckpts, tmp_path, capsys):
    _, base, tuned, sharded = ckpts
    out = tmp_path / "report"
    code, stdout, err = run_cli(["compare", base, sharded, "--out", out, "--k", "16", "--rank", "8",
                                 "--legacy-atol", "1e-5", "--show-matrices", "--workers", "2"], capsys)
    assert code == 0, err
    assert "Traceback" not in err
    assert "global sparsity" in stdout and "by type" in stdout and "model.layers.1.self_attn.q_proj.weight" in stdout
    api = opdgeo.compare(base, tuned, k=16, rank=8, legacy_atol=1e-5)
    with open(out / "matrices.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == [r["name"] for r in api.matrices]
    for row, ref in zip(rows, api.matrices):
        assert float(row["sparsity"]) == ref["sparsity"]
        assert float(row["legacy_sparsity"]) == ref["legacy_sparsity"]
        if ref["nss"] is None:
            assert row["nss"] == "" and row["angle_left_max_deg"] == ""
        else:
            # The CSV holds repr() of the same float64 the API returns, on the same sharded input: only the
            # process and thread split differ, so agreement is to printing precision, far below 1e-10.
            assert float(row["nss"]) == pytest.approx(ref["nss"], rel=1e-10, abs=1e-14)
            assert float(row["angle_right_max_deg"]) == pytest.approx(ref["angle_right_max_deg"], rel=1e-10, abs=1e-10)
    summary = json.loads((out / "summary.json").read_text())
    numel = sum(r["numel"] for r in api.matrices)
    assert summary["global_sparsity"] == 1.0 - 9 / numel
    assert summary["settings"]["k"] == 16 and summary["settings"]["legacy_atol"] == 1e-5
    assert summary["by_type"]["q"]["sparsity"] == 1.0 - 9 / (2 * 64 * 64)
    assert (out / "summary.md").read_text().startswith("# opdgeo compare")


def test_python_dash_m_sparsity_only(ckpts, tmp_path):
    """The module entry point used by ``torchrun -m opdgeo``."""
    _, base, tuned, _ = ckpts
    proc = subprocess.run([sys.executable, "-m", "opdgeo", "compare", str(base), str(tuned), "--metrics", "sparsity",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["mean_nss"] is None and summary["settings"]["metrics"] == ["sparsity"]
    assert 0.99 < summary["global_sparsity"] < 1.0


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_single(src: Path, dst: Path, edit) -> Path:
    """A copy of a single-file checkpoint with its tensors edited by ``edit(dict)``."""
    dst = _copy(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_bad_inputs_give_one_line_and_exit_2(ckpts, tmp_path, capsys):
    _, base, tuned, sharded = ckpts

    # missing path
    assert_one_line_error(*run_cli(["compare", tmp_path / "missing", tuned], capsys)[::2], "missing")
    # not a checkpoint: an empty folder, a text file
    (tmp_path / "empty").mkdir()
    assert_one_line_error(*run_cli(["compare", base, tmp_path / "empty"], capsys)[::2], "empty")
    (tmp_path / "notes.txt").write_text("hello")
    assert_one_line_error(*run_cli(["compare", tmp_path / "notes.txt", tuned], capsys)[::2], "notes.txt")

    # truncated safetensors
    trunc = _copy(tuned, tmp_path / "trunc")
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_one_line_error(*run_cli(["compare", base, trunc], capsys)[::2], "model.safetensors")
    # corrupt header
    corrupt = _copy(tuned, tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......" + data[100:200])
    assert_one_line_error(*run_cli(["compare", base, corrupt], capsys)[::2], "model.safetensors")

    # index naming a missing shard
    broken = _copy(sharded, tmp_path / "broken")
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.unlink()
    assert_one_line_error(*run_cli(["compare", base, broken], capsys)[::2], shard.name)

    # tensors on one side only, then --ignore-missing
    name = "model.layers.1.mlp.up_proj.weight"
    one_sided = _rewrite_single(tuned, tmp_path / "one_sided", lambda t: t.pop(name))
    assert_one_line_error(*run_cli(["compare", base, one_sided], capsys)[::2], name, "--ignore-missing")
    code, stdout, err = run_cli(["compare", base, one_sided, "--ignore-missing", "--metrics", "sparsity",
                                 "--out", tmp_path / "o1"], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(open(tmp_path / "o1" / "matrices.csv")))
    assert name not in {r["name"] for r in rows} and len(rows) == 23

    # shape mismatch
    wrong = _rewrite_single(tuned, tmp_path / "wrong", lambda t: t.__setitem__(name, t[name][:, :32].contiguous()))
    assert_one_line_error(*run_cli(["compare", base, wrong], capsys)[::2], name, "shape")

    # pickle without the flag, then with it (same numbers as the safetensors copy)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tuned / "config.json", pickled / "config.json")
    state = load_file(str(tuned / "model.safetensors"))
    torch.save(state, pickled / "pytorch_model.bin")
    assert_one_line_error(*run_cli(["compare", base, pickled], capsys)[::2], "--allow-pickle")
    code, _, err = run_cli(["compare", base, pickled, "--allow-pickle", "--metrics", "sparsity",
                            "--out", tmp_path / "o2"], capsys)
    assert code == 0, err
    got = json.loads((tmp_path / "o2" / "summary.json").read_text())["global_sparsity"]
    assert got == opdgeo.compare(base, tuned, metrics="sparsity").summary["global_sparsity"]


def test_bad_options_give_one_line_and_exit_2(ckpts, capsys):
    _, base, tuned, _ = ckpts
    code, _, err = run_cli(["compare", base, tuned, "--rank", "0", "--k", "0"], capsys)
    assert_one_line_error(code, err, "--k must be an integer >= 1; got 0", "--rank must be an integer >= 1; got 0")
    code, _, err = run_cli(["compare", base, tuned, "--metrics", "sparsity,foo", "--alpha", "1.5"], capsys)
    assert_one_line_error(code, err, "'foo'", "--alpha")
    if not torch.cuda.is_available():
        code, _, err = run_cli(["compare", base, tuned, "--device", "cuda"], capsys)
        assert_one_line_error(code, err, "CUDA is not available")
    code, _, err = run_cli(["compare", base, tuned, "--precision", "fp16"], capsys)
    assert code == 2 and "fp16" in err and "Traceback" not in err  # click's own usage error
    code, _, err = run_cli(["compare", base, tuned, "--workers", "0"], capsys)
    assert_one_line_error(code, err, "--workers")
    code, _, err = run_cli(["compare", base, tuned, "--save-angles"], capsys)
    assert_one_line_error(code, err, "--save-angles needs --out")
