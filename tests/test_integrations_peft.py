"""PEFT LoRA adapters as the tuned side: compare and trajectory of an adapter folder equal those of the
merged copy that peft's merge_and_unload + save_pretrained writes (tiny Qwen3, nothing downloaded)."""

from __future__ import annotations

import json

import pytest
import torch

from opdgeo.analysis.trajectory import trajectory
from opdgeo.checkpoints import open_checkpoint
from opdgeo.errors import CheckpointError

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]



def _num(cell: str) -> float:
    return float(cell) if cell else float("nan")  # trajectory.csv writes NaN as an empty cell

def _adapter(base, out, *, seed, scale, dtype=torch.bfloat16, autocast=True, **lora):
    """A random LoRA adapter of ``base`` (B scaled by ``scale``), saved; and its merged copy in ``out/merged``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, **lora)
    pm = peft.get_peft_model(model, cfg, autocast_adapter_dtype=autocast)  # False: bf16 LoRA factors
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(scale)
    pm.save_pretrained(out / "adapter")
    pm.merge_and_unload().save_pretrained(out / "merged")
    return out / "adapter", out / "merged"


def _text(rows):
    return [{k: repr(v) for k, v in r.items()} for r in rows]  # NaN == NaN


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_qwen3_factory):
    return tiny_qwen3_factory(tmp_path_factory.mktemp("peft") / "base", seed=0, dtype=torch.bfloat16)


@pytest.mark.parametrize("variant", [
    {"scale": 1e-3},  # a small update: most bf16 entries unchanged, the bf16 rule decides
    {"scale": 1.0, "use_rslora": True, "alpha_pattern": {"down_proj": 2}},
    {"scale": 1e-2, "autocast": False},
])
def test_adapter_compare_equals_merged_compare(base, tmp_path, variant):
    import opdgeo

    variant = dict(variant)
    adapter, merged = _adapter(base, tmp_path, seed=1, **variant)
    a = opdgeo.compare(base, adapter, k=16, rank=8)
    b = opdgeo.compare(base, merged, k=16, rank=8)
    assert _text(a.matrices) == _text(b.matrices) and len(a.matrices) == 24
    assert a.summary["global_sparsity"] == b.summary["global_sparsity"]
    if variant["scale"] == 1e-3:
        assert 0.2 < a.summary["global_sparsity"] < 1.0  # the rule has work to do
    # the merged tensors themselves are the bytes peft saved
    ad, mg = open_checkpoint(adapter, base=open_checkpoint(base)), open_checkpoint(merged)
    for name in ad.lora_targets():
        assert torch.equal(ad.load(name), mg.load(name)), name
        assert ad.content_key(name) == mg.content_key(name)


def test_trajectory_of_adapter_checkpoints(base, tmp_path):
    run, copies = tmp_path / "run", tmp_path / "copies"
    for step, seed in ((10, 1), (20, 2)):
        adapter, merged = _adapter(base, tmp_path / f"s{step}", seed=seed, scale=0.05 * step / 10)
        run.mkdir(exist_ok=True)
        copies.mkdir(exist_ok=True)
        adapter.rename(run / f"checkpoint-{step}")
        merged.rename(copies / f"checkpoint-{step}")
    a = trajectory(run, base, matrices="all", overlap=False)
    b = trajectory(copies, base, matrices="all", overlap=False)
    assert [{k: v for k, v in r.items() if k != "run"} for r in _text(a.rows)] == \
        [{k: v for k, v in r.items() if k != "run"} for r in _text(b.rows)]
    assert a.summary["runs"]["run"]["steps"] == [10, 20]


def test_unsupported_adapters_are_one_line_errors(base, tmp_path):
    adapter, _ = _adapter(base, tmp_path, seed=1, scale=1.0)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(CheckpointError, match="DoRA"):
        open_checkpoint(adapter, base=base)
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(CheckpointError, match="IA3 is not supported"):
        open_checkpoint(adapter, base=base)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    other = tmp_path / "other"
    from conftest import save_tiny_qwen3

    save_tiny_qwen3(other, num_hidden_layers=1)
    with pytest.raises(CheckpointError, match="adapter target model.layers.1.* is not a tensor of the base"):
        open_checkpoint(adapter, base=other)


def test_monitor_of_a_lora_run_equals_trajectory_of_its_adapter_checkpoints(tmp_path):
    """A Trainer on a peft model: the monitor sees W + s·B·A; its checkpoint-N folders are adapters, which
    the trajectory reads as merged models over the origin: the two tables agree."""
    import csv
    import math

    from transformers import Trainer

    from integrations_tiny import tiny_model, token_rows, training_args
    from opdgeo.integrations.transformers import GeometryMonitor

    model = tiny_model()
    model.save_pretrained(tmp_path / "origin")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    mon = GeometryMonitor(every=2, dtype="float32", matrices="all")
    Trainer(model=pm, args=training_args(tmp_path / "run", steps=4, save_steps=2), train_dataset=token_rows(),
            callbacks=[mon]).train()
    assert (tmp_path / "run" / "checkpoint-4" / "adapter_config.json").is_file()
    ref = trajectory(tmp_path / "run", tmp_path / "origin", matrices="all", overlap=False)
    with open(tmp_path / "run" / "geometry" / "trajectory.csv") as f:
        mine = {(int(r["step"]), r["name"]): r for r in csv.DictReader(f)}
    assert len(mine) == len(ref.rows) == 2 * 14
    for r in ref.rows:
        got = mine[(r["step"], r["name"])]
        for m in ("stable_rank", "fro_norm", "sim_to_final"):
            a, b = _num(got[m]), r[m]
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6), (r["step"], r["name"], m)
    assert all(r["fro_norm"] > 0 for r in ref.rows)
