"""The analysis driver (analysis/driver.py): plan order, sharding over ranks, gathering, and
errors that every rank re-raises with their type; plus the matrix planner."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from opdgeo.analysis.driver import Progress, execute, plan_matrices
from opdgeo.checkpoints import open_checkpoint
from opdgeo.errors import CheckpointError


def test_one_process_keeps_plan_order_and_raises_the_original(tmp_path):
    items = list(range(17))
    done = execute(items, lambda i: i * i, cost=lambda i: (i * 7) % 5 + 1, workers=3, stats=lambda: {"n": 1})
    assert done.results == [i * i for i in items] and done.world == 1 and done.stats == [{"n": 1}]

    def boom(i):
        if i == 4:
            raise CheckpointError("bad tensor 4")
        return i

    with pytest.raises(CheckpointError, match="bad tensor 4"):
        execute(items, boom, cost=lambda i: 1.0, workers=2, progress=Progress("test"))


def test_plan_matrices_selections(tiny_qwen3_factory, tmp_path):
    ck = open_checkpoint(tiny_qwen3_factory(tmp_path / "m"))
    every = plan_matrices(ck)
    assert [m.name for m in every] == ck.names()  # all floating, checkpoint order
    geometry = plan_matrices(ck, select="all")
    assert {m.type for m in geometry} == set("qkvo") | {"gate", "up", "down"} and all(m.geometry for m in geometry)
    assert {m.type for m in plan_matrices(ck, select="attention")} == set("qkvo")
    picked = plan_matrices(ck, select=r"layers\.1\..*norm")  # a regex keeps 2-D tensors only
    assert picked == []
    k = plan_matrices(ck, select=r"layers\.1\..*k_proj")
    assert [(m.name, m.layer, m.type, m.expert, m.shape) for m in k] == [
        ("model.layers.1.self_attn.k_proj.weight", 1, "k", None, (32, 64))]


_SCRIPT = """
import json, os, sys
import torch.distributed as dist
from opdgeo.analysis.driver import execute
from opdgeo.errors import CheckpointError

dist.init_process_group("gloo")
rank = dist.get_rank()
items = list(range(10))
out = {}
done = execute(items, lambda i: {"item": i, "rank": rank}, cost=lambda i: i + 1, stats=lambda: rank)
out["results"] = [r["item"] for r in done.results]
out["owners"] = sorted({r["rank"] for r in done.results})
out["stats"] = done.stats

def typed(i):
    if i == 9:  # the costliest item: LPT gives it to rank 0
        raise CheckpointError("tensor 9 is corrupt")
    return i

def untyped(i):
    if i == 8:  # the second costliest: rank 1
        raise ZeroDivisionError("division by zero in item 8")
    return i

for key, fn in (("typed", typed), ("untyped", untyped)):
    try:
        execute(items, fn, cost=lambda i: i + 1)
        out[key] = None
    except Exception as err:
        out[key] = [type(err).__name__, str(err)]
json.dump(out, open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w"))
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_ranks_gather_in_plan_order_and_fail_together(tmp_path):
    script = tmp_path / "driver_ranks.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(script), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, out in enumerate(got):
        assert out["results"] == list(range(10)) and out["owners"] == [0, 1] and out["stats"] == [0, 1]
        # a typed error on rank 0: both ranks raise it, with its type and message
        assert out["typed"] == ["CheckpointError", "tensor 9 is corrupt"]
    # an untyped error on rank 1: rank 1 raises the original, rank 0 a RuntimeError naming rank 1
    assert got[1]["untyped"] == ["ZeroDivisionError", "division by zero in item 8"]
    assert got[0]["untyped"] == ["RuntimeError", "rank 1 failed: ZeroDivisionError: division by zero in item 8"]
