"""Resuming FSDP2 runs (CPU, gloo): a save killed midway leaves the last complete checkpoint,
and resuming from it equals the uninterrupted run; a 2-process fsdp checkpoint resumes in
one process (DCP reshards the parameters and AdamW state)."""

import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from opdgeo.training import checkpointing as ckpt

CONFIG = """\
objective: opd
model: {{student: "tiny:quick", teacher: "{teacher}"}}
task: {{spec: "arithmetic:difficulty=1,ops=+", num_problems: 32}}
rollout: {{group_size: 2, max_new_tokens: 8}}
optim: {{steps: 2, batch_size: 4, micro_batch_size: 1, lr: 1.0e-2, schedule: constant, bf16_autocast: false}}
checkpoint: {{dtype: float32, every: 1}}
distributed: {{strategy: fsdp}}
run: {{progress: false, seed: 5}}
"""
# the wrapped CLI: the process dies (as a kill would) after the step-2 trainer state's shards are written,
# before the folder is complete and renamed into place
DYING = """\
import os, sys
from opdgeo.training import sharded
real = sharded.save_state
def dying(folder, *, meta, **kw):
    real(folder, meta=meta, **kw)
    if meta["step"] == 2:
        os._exit(137)
sharded.save_state = dying
from opdgeo.cli.main import main
main(sys.argv[1:])
"""
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="compares CPU processes (gloo)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(nproc: int, script: list[str], *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    head = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                                                str(nproc), "--master-port", str(_free_port())]
    proc = subprocess.run([*head, *script, *args], env=env, capture_output=True, text=True, timeout=900)
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from opdgeo.models import build_model, char_tokenizer, tiny_qwen3_config

    root = tmp_path_factory.mktemp("fsdp-resume")
    tok = char_tokenizer()
    build_model(tiny_qwen3_config("quick", len(tok)), seed=1).save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    cfg = root / "cfg.yaml"
    cfg.write_text(CONFIG.format(teacher=root / "teacher"))
    (root / "dying.py").write_text(DYING)
    cli = ["-m", "opdgeo", "train", str(cfg)]
    _run(2, cli, "--out", str(root / "full"))
    killed = _run(2, [str(root / "dying.py"), "train", str(cfg)], "--out", str(root / "cut"), ok=False)
    assert killed.returncode != 0
    shutil.copytree(root / "cut", root / "cut-1proc")
    return root, cli


def _same(a, b, *, exact: bool) -> None:
    for k, v in a.master.items():
        if exact:
            assert torch.equal(b.master[k], v), k
        else:  # another reduction order (one process sums what two ranks reduce-scatter)
            torch.testing.assert_close(b.master[k], v, rtol=1e-5, atol=1e-6)
    for pid, entry in a.optimizer["state"].items():
        for key, v in entry.items():
            if exact:
                assert torch.equal(b.optimizer["state"][pid][key], v), (pid, key)


def test_killed_fsdp_save_leaves_the_last_complete_checkpoint_and_resume_equals_the_full_run(runs):
    root, cli = runs
    cut = root / "cut"
    assert not (cut / "step-000002").exists()  # the killed save left no half folder under the final name
    assert [s for s, _ in ckpt.list_checkpoints(cut)] == [1]
    assert ckpt.latest_resumable(cut) == cut / "step-000001"
    state = ckpt.load_trainer_state(cut / "step-000001")  # loadable: the complete step-1 checkpoint
    assert state.step == 1 and state.extra["world_size"] == 2 and state.extra["strategy"] == "fsdp"
    _run(2, cli, "--out", str(cut), "--resume")
    assert not [p for p in cut.iterdir() if p.name.startswith(".tmp-")]  # the killed save's leftovers are gone
    _same(ckpt.load_trainer_state(root / "full" / "step-000002"), ckpt.load_trainer_state(cut / "step-000002"),
          exact=True)  # bit for bit: gloo on CPU is deterministic


def test_two_process_fsdp_checkpoint_resumes_in_one_process(runs):
    """DCP reshards: the 2-rank shards of step 1 load into one process (fsdp over a group of
    one), which then takes step 2 as the 2-process run did, to the reduction order's rounding."""
    root, cli = runs
    _run(1, cli, "--out", str(root / "cut-1proc"), "--resume")
    one = ckpt.load_trainer_state(root / "cut-1proc" / "step-000002")
    assert one.extra["world_size"] == 1 and one.extra["strategy"] == "fsdp"
    _same(ckpt.load_trainer_state(root / "full" / "step-000002"), one, exact=False)
