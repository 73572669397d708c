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
