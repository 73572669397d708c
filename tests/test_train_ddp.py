"""Two CPU processes under `accelerate launch` take the same step as one process."""

import os
import shutil
import socket
import subprocess

import pytest
import torch

from opdgeo.training import checkpointing as ckpt
from opdgeo.training.config import load_config
from opdgeo.training.loop import load_policy, train

CONFIG = """\
objective: opd
model: {{student: "tiny:quick", teacher: "{teacher}"}}
task: {{spec: "arithmetic:difficulty=1,ops=+", num_problems: 32}}
rollout: {{group_size: 2, max_new_tokens: 8}}
optim: {{steps: 2, batch_size: 4, micro_batch_size: 1, lr: 1.0e-2, schedule: cosine, warmup_steps: 1}}
checkpoint: {{dtype: float32}}
run: {{progress: false, seed: 5}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="needs the accelerate launcher")
@pytest.mark.skipif(torch.cuda.is_available(), reason="compares CPU processes (gloo); the GPU path is not this test")
def test_two_processes_take_the_same_step_as_one(tmp_path):
    from opdgeo.models import build_model, char_tokenizer, tiny_qwen3_config

    tok = char_tokenizer()
    teacher = tmp_path / "teacher"
    build_model(tiny_qwen3_config("quick", len(tok)), seed=1).save_pretrained(teacher)
    tok.save_pretrained(teacher)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(CONFIG.format(teacher=teacher))

    # On a CPU-only host `accelerate launch` starts several processes only through its
    # torchrun-based launcher (`--multi_gpu`); the loop then runs MULTI_CPU with gloo.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "opdgeo", "train", str(cfg_path), "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    train(load_config(cfg_path, [f"run.out_dir={tmp_path / 'one'}"]))

    one = ckpt.load_trainer_state(tmp_path / "one" / "step-000002")
    two = ckpt.load_trainer_state(tmp_path / "two" / "step-000002")
    assert one.extra["world_size"] == 1 and two.extra["world_size"] == 2
    for k, w1 in one.master.items():
        # Two ranks sum float32 gradients in another order than one process: a few ulps of each gradient,
        # which one AdamW step (normalised update, lr-scaled) turns into ~1e-7 absolute on the weights.
        torch.testing.assert_close(two.master[k], w1, rtol=1e-5, atol=1e-6)
    base = load_policy("tiny:quick")[0].state_dict()
    moved = max((one.master[k] - base[k]).abs().max().item() for k in base)
    assert moved > 1e-3  # the step did something (the comparison is not vacuous)
    m1 = ckpt.read_metrics(tmp_path / "one" / "metrics.jsonl")
    m2 = ckpt.read_metrics(tmp_path / "two" / "metrics.jsonl")
    for a, b in zip(m1, m2, strict=True):
        for key in ("train/tokens", "rlvr/reward", "train/loss", "opd/teacher_gap", "train/grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
