"""``torchrun --nproc-per-node 2 -m opdgeo compare`` (2 CPU processes, gloo) gives the same
report as one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import opdgeo


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_gloo_processes_equal_one(tmp_path, tiny_qwen3_factory):
    q = torch.zeros(64, 64)
    q[:, 7] = 0.1
    up = torch.zeros(128, 64)
    up[3:9, :4] = -0.1
    base = tiny_qwen3_factory(tmp_path / "base")
    tuned = tiny_qwen3_factory(tmp_path / "tuned", max_shard_size="40KB", perturb={
        "model.layers.0.self_attn.q_proj.weight": q, "model.layers.1.mlp.up_proj.weight": up})
    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "opdgeo", "compare", str(base), str(tuned), "--out", str(out),
           "--k", "16", "--rank", "8", "--cache", str(tmp_path / "cache")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("global sparsity") == 1  # only rank 0 reports

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the same BLAS threading as the torchrun workers
    try:
        single = opdgeo.compare(base, tuned, k=16, rank=8)
    finally:
        torch.set_num_threads(before)
    # identical numbers: the CSV text (full repr precision) and the summary
    assert (out / "matrices.csv").read_text() == single.to_csv()
    got = json.loads((out / "summary.json").read_text())
    want = json.loads(json.dumps(single.summary))
    got["settings"].pop("base"), want["settings"].pop("base")
    assert got == want
    numel = sum(r["numel"] for r in single.matrices)
    assert got["global_sparsity"] == 1.0 - (64 + 24) / numel
    # both ranks filled the shared base-SVD cache: one entry per geometry matrix
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 14
