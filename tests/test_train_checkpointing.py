"""Atomic checkpoints, trainer state round trip, metrics truncation."""

import json
import random

import numpy as np
import pytest
import torch

from opdgeo.errors import CheckpointError
from opdgeo.training import checkpointing as ckpt


@pytest.fixture(scope="module")
def tiny():
    from opdgeo.models import build_model, char_tokenizer, tiny_qwen3_config

    tok = char_tokenizer()
    return build_model(tiny_qwen3_config("quick", len(tok)), seed=0), tok


def _state(model, step):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.zero_grad()
    sum(p.sum() for p in model.parameters()).backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    return ckpt.TrainerState(step=step, data_position=step * 4, master=model.state_dict(), optimizer=opt.state_dict(),
                             scheduler=sched.state_dict(), rng=ckpt.rng_state(), extra={"objective": "sft"})


def test_save_layout_bf16_and_exact_trainer_state(tmp_path, tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = tiny
    state = _state(model, 3)
    path = ckpt.save_checkpoint(tmp_path, 3, model, tok, dtype="bfloat16", trainer_state=state)
    assert path.name == "step-000003"
    assert {"config.json", "model.safetensors", "tokenizer.json", "trainer_state"} <= {p.name for p in path.iterdir()}
    assert model.dtype == torch.float32  # the live model is untouched
    loaded = AutoModelForCausalLM.from_pretrained(path)
    w = dict(model.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    torch.testing.assert_close(loaded.model.layers[0].mlp.up_proj.weight.float(), w.detach().to(torch.bfloat16).float(), rtol=0, atol=0)
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoTokenizer.from_pretrained(path).get_vocab() == tok.get_vocab()
    back = ckpt.load_trainer_state(path)
    assert back.step == 3 and back.data_position == 12 and back.extra["objective"] == "sft"
    for k, v in model.state_dict().items():  # fp32 master weights, bit for bit
        assert torch.equal(back.master[k], v), k
    s0 = state.optimizer["state"][0]
    assert torch.equal(back.optimizer["state"][0]["exp_avg_sq"], s0["exp_avg_sq"])
    assert back.optimizer["param_groups"][0]["betas"] == state.optimizer["param_groups"][0]["betas"]


def test_rng_state_round_trip():
    saved = ckpt.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.set_rng_state(saved)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_killed_save_leaves_no_half_checkpoint_and_resume_picks_last_complete(tmp_path, tiny, monkeypatch):
    model, tok = tiny
    import safetensors.torch

    ckpt.save_checkpoint(tmp_path, 2, model, tok, trainer_state=_state(model, 2))
    real = safetensors.torch.save_file

    def dying_save(tensors, path, *a, **k):  # the process "dies" after DCP wrote the trainer state's shards
        if "rng-rank" in str(path):
            raise KeyboardInterrupt("killed")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 4, model, tok, trainer_state=_state(model, 4))
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert not (tmp_path / "step-000004").exists()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2]
    assert ckpt.latest_resumable(tmp_path) == tmp_path / "step-000002"


def test_leftover_temp_folder_is_ignored_and_removed(tmp_path, tiny):
    model, tok = tiny
    ckpt.save_checkpoint(tmp_path, 1, model, tok, trainer_state=_state(model, 1))
    half = tmp_path / ".tmp-step-000002-999"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"trunc")
    assert ckpt.latest_resumable(tmp_path) == tmp_path / "step-000001"
    assert ckpt.remove_partial(tmp_path) == [half] and not half.exists()


def test_folder_without_trainer_state_is_not_resumable_and_bad_state_is_named(tmp_path, tiny):
    model, tok = tiny
    ckpt.save_checkpoint(tmp_path, 1, model, tok, trainer_state=_state(model, 1))
    ckpt.save_checkpoint(tmp_path, 2, model, tok, trainer_state=None)
    assert ckpt.latest_resumable(tmp_path) == tmp_path / "step-000001"
    (tmp_path / "step-000001" / "trainer_state" / "dcp" / ".metadata").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="step-000001"):
        ckpt.load_trainer_state(tmp_path / "step-000001")


def test_metrics_truncation_skips_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for s in (1, 2, 3):
        ckpt.append_metrics(path, {"step": s, "train/loss": float(s)})
    with open(path, "a") as fh:
        fh.write('{"step": 4, "train/lo')  # killed mid-write
    assert [r["step"] for r in ckpt.read_metrics(path)] == [1, 2, 3]
    ckpt.truncate_metrics(path, 2)
    assert [r["step"] for r in ckpt.read_metrics(path)] == [1, 2]


# ------------------------------------------------------------- keep_trainer_state: last


def _sft_config(out, *extra):
    from opdgeo.training.config import load_config

    return load_config(None, ["model.student=tiny:quick", "task.spec=arithmetic:difficulty=1,ops=+",
                              "task.num_problems=32", "run.progress=false", f"run.out_dir={out}", "objective=sft",
                              "optim.steps=6", "optim.batch_size=2", "optim.micro_batch_size=1", "optim.lr=1e-2",
                              "checkpoint.every=2", *extra])


def _states(run_dir):
    return [s for s, p in ckpt.list_checkpoints(run_dir) if (p / "trainer_state").exists()]


def test_keep_last_prunes_earlier_states_keeps_listed_steps_and_resumes_exactly(tmp_path):
    from opdgeo.training.loop import Hooks, train

    train(_sft_config(tmp_path / "all"))
    assert _states(tmp_path / "all") == [2, 4, 6]  # the default keeps every state

    keep = ["checkpoint.keep_trainer_state=last", "checkpoint.keep_trainer_state_steps=[2]"]

    class Killed(Exception):
        pass

    def die_at_step_5(ctx):
        if ctx.step == 5:
            raise Killed

    with pytest.raises(Killed):
        train(_sft_config(tmp_path / "last", *keep), hooks=Hooks(after_backward=die_at_step_5))
    assert _states(tmp_path / "last") == [2, 4]  # step 2 listed, step 4 the last
    resumed = train(_sft_config(tmp_path / "last", *keep), resume=True)
    assert resumed.resumed_from == tmp_path / "last" / "step-000004"
    assert _states(tmp_path / "last") == [2, 6]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "last")] == [2, 4, 6]  # every step keeps its weights
    assert all((p / "model.safetensors").is_file() for _, p in ckpt.list_checkpoints(tmp_path / "last"))
    assert not [p for p in (tmp_path / "last").iterdir() if p.name.startswith(".tmp")]
    for step in (2, 6):  # what is kept is what the uninterrupted run wrote, bit for bit
        a = ckpt.load_trainer_state(tmp_path / "all" / f"step-{step:06d}")
        b = ckpt.load_trainer_state(tmp_path / "last" / f"step-{step:06d}")
        for k, v in a.master.items():
            assert torch.equal(b.master[k], v), (step, k)
    # without listed steps only the last state stays
    train(_sft_config(tmp_path / "one", "checkpoint.keep_trainer_state=last"))
    assert _states(tmp_path / "one") == [6]


def test_prune_killed_midway_leaves_whole_states_or_a_temporary(tmp_path, tiny, monkeypatch):
    import shutil

    model, tok = tiny
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, model, tok, trainer_state=_state(model, step))
    real = shutil.rmtree

    def killed_rmtree(path, *a, **k):  # the process dies after the rename, before the deletion
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        ckpt.prune_trainer_states(tmp_path, {3})
    monkeypatch.setattr(shutil, "rmtree", real)
    assert _states(tmp_path) == [2, 3]  # step 1's state went aside whole; step 2's is untouched
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-trainer_state-step-000001")]
    assert len(aside) == 1 and (aside[0] / "state.json").is_file()
    assert ckpt.latest_resumable(tmp_path) == tmp_path / "step-000003"
    assert ckpt.remove_partial(tmp_path) == aside and not aside[0].exists()
    assert ckpt.prune_trainer_states(tmp_path, {3}) == [tmp_path / "step-000002"]
    assert _states(tmp_path) == [3]
    ckpt.load_trainer_state(tmp_path / "step-000003")  # the kept state still reads


def _tensor_bytes(path):
    """Bytes of tensor data in a safetensors file (its size less the header) and its tensor count."""
    import struct

    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
    return path.stat().st_size - 8 - n, len([k for k in header if k != "__metadata__"])


def test_disk_plan_matches_the_bytes_a_run_writes(tmp_path):
    from opdgeo.training.loop import train
    from opdgeo.training.memory_plan import arch_of_source, plan_disk

    train(_sft_config(tmp_path / "run", "checkpoint.keep_trainer_state=last", "checkpoint.keep_trainer_state_steps=[4]"))
    arch = arch_of_source("tiny:quick")
    assert arch.tie_word_embeddings  # the tied embedding's second master copy is part of the formula
    plan = plan_disk(arch, steps=6, every=2, keep="last", keep_steps=(4,))
    assert (plan.checkpoints, plan.kept_states) == (3, 2)
    weights = states = tensors = 0
    for _, path in ckpt.list_checkpoints(tmp_path / "run"):
        weights += _tensor_bytes(path / "model.safetensors")[0]
        for f in (path / "trainer_state" / "dcp").glob("*.safetensors") if (path / "trainer_state").exists() else ():
            b, n = _tensor_bytes(f)
            states, tensors = states + b, tensors + n
    assert weights == plan.checkpoints * plan.weights  # bf16: 2 bytes a parameter, the tied matrix once
    # fp32 master (the tied matrix twice) + two AdamW moments; AdamW's step adds 4 bytes per parameter tensor
    assert 0 <= states - plan.kept_states * plan.trainer_state <= 4 * tensors
    assert plan.peak == plan.run + plan.trainer_state
    assert plan_disk(arch, steps=6, every=2).kept_states == 3
    assert plan_disk(arch, steps=6, every=2, save_trainer_state=False).run == 3 * plan.weights
