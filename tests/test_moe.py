"""Mixture-of-experts checkpoints: names, fused expert tensors split per expert, and
``opdgeo compare`` / ``opdgeo trajectory`` per expert against an independent float64
numpy reference.

The checkpoints are tiny Qwen3-MoE models built with transformers' ``Qwen3MoeConfig``,
saved in the two layouts that exist on disk:

- **per-expert** (``save_pretrained``): ``mlp.experts.<e>.gate_proj.weight`` etc.;
- **fused** (``save_file(model.state_dict())``, the transformers ≥ 5 in-memory layout):
  ``mlp.experts.gate_up_proj`` [E, 2I, H] and ``mlp.experts.down_proj`` [E, H, I];

plus gpt-oss's interleaved fused layout ([E, H, 2I], gate = columns 0::2). The reference
reads the files with ``safetensors`` directly, slices the fused tensors with numpy as the
model's forward does, and computes every metric with numpy/scipy in float64.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import opdgeo
from opdgeo.checkpoints import open_checkpoint, parse_tensor_name
from opdgeo.errors import CheckpointError

E, INTER, HIDDEN, LAYERS = 4, 24, 32, 2
K, RANK = 8, 8  # principal-angle k and principal-mask rank (below every min(m, n): see the rank test)


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize("name,layer,typ,expert", [
    ("model.layers.3.mlp.experts.12.gate_proj.weight", 3, "gate", 12),
    ("model.layers.3.mlp.experts.12.up_proj.weight", 3, "up", 12),
    ("model.layers.3.mlp.experts.0.down_proj.weight", 3, "down", 0),
    ("model.layers.0.block_sparse_moe.experts.3.w2.weight", 0, "down", 3),  # Mixtral
    ("model.layers.3.mlp.gate.weight", 3, "router", None),  # Qwen/DeepSeek router
    ("model.layers.0.block_sparse_moe.gate.weight", 0, "router", None),  # Mixtral router
    ("model.layers.0.mlp.router.weight", 0, "router", None),  # gpt-oss router
    ("model.layers.0.mlp.gate.e_score_correction_bias", 0, "router", None),  # DeepSeek-V3
    ("model.layers.0.mlp.shared_expert.up_proj.weight", 0, "up", "shared"),  # Qwen2-MoE
    ("model.layers.0.mlp.shared_experts.down_proj.weight", 0, "down", "shared"),  # DeepSeek
    ("model.layers.0.mlp.shared_expert_gate.weight", 0, "router", "shared"),
    ("model.layers.1.mlp.gate_proj.weight", 1, "gate", None),  # dense MLP: unchanged
])
def test_expert_and_router_names(name, layer, typ, expert):
    parsed = parse_tensor_name(name)
    assert (parsed.layer, parsed.type, parsed.expert) == (layer, typ, expert)


# --------------------------------------------------------------------------- fixtures


def _qwen3_moe(seed: int = 0):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=64, moe_intermediate_size=INTER,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         num_experts=E, num_experts_per_tok=2, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(cfg)


def _perturb(model) -> None:
    """Known updates on the in-memory (fused) tensors: layer 0 expert 2 rotated in a few
    rows; layer 1 expert 0 changed everywhere a little (the densest update); layer 1 expert
    3 only in its down projection; the layer-1 router."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        gu0 = model.model.layers[0].mlp.experts.gate_up_proj  # [E, 2I, H]
        gu0[2, :3] += 0.1 * torch.randn(3, HIDDEN, generator=g)  # gate rows of expert 2
        gu0[2, INTER + 5] += 0.1  # one up row of expert 2
        gu1 = model.model.layers[1].mlp.experts.gate_up_proj
        gu1[0] += 1e-2 * torch.randn(2 * INTER, HIDDEN, generator=g)
        model.model.layers[1].mlp.experts.down_proj[0] += 1e-2 * torch.randn(HIDDEN, INTER, generator=g)
        model.model.layers[1].mlp.experts.down_proj[3][:, :4] += 0.05
        model.model.layers[1].mlp.gate.weight[1] += 0.1


def _save_both(model, root: Path, name: str) -> tuple[Path, Path]:
    """The per-expert layout (``save_pretrained``) and the fused one (the state dict as is)."""
    model = model.to(torch.bfloat16)
    per_expert = root / f"{name}-per-expert"
    model.save_pretrained(per_expert)
    fused = root / f"{name}-fused"
    fused.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    save_file(state, str(fused / "model.safetensors"))
    shutil.copy(per_expert / "config.json", fused / "config.json")
    return per_expert, fused


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    base = _qwen3_moe()
    base_pe, base_fused = _save_both(base, root, "base")
    tuned = _qwen3_moe()
    _perturb(tuned)
    tuned_pe, tuned_fused = _save_both(tuned, root, "tuned")
    return {"base": base_pe, "tuned": tuned_pe, "base_fused": base_fused, "tuned_fused": tuned_fused}


# --------------------------------------------------------------------------- reference


def _raw(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({k: v.double().numpy() for k, v in load_file(str(f)).items()})
    return out


def _per_expert_from_fused(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The logical per-expert matrices of a fused Qwen3-MoE state dict, by numpy slicing as
    the model's forward uses them (``gate, up = (x @ gate_up[e].T).chunk(2)``)."""
    out = {}
    for name, w in raw.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            for e in range(w.shape[0]):
                out[f"{name[:-len('gate_up_proj')]}{e}.gate_proj.weight"] = w[e, :INTER]
                out[f"{name[:-len('gate_up_proj')]}{e}.up_proj.weight"] = w[e, INTER:]
        elif name.endswith("mlp.experts.down_proj"):
            for e in range(w.shape[0]):
                out[f"{name[:-len('down_proj')]}{e}.down_proj.weight"] = w[e]
        else:
            out[name] = w
    return out


def _sine_cosine_deg(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Principal angles (ascending, degrees): arcsin of the singular values of B − A AᵀB
    where cos² ≥ 1/2, else arccos of those of AᵀB (Knyazev & Argentati 2002)."""
    cos = np.clip(np.linalg.svd(A.T @ B, compute_uv=False), 0, 1)
    sin = np.clip(np.sort(np.linalg.svd(B - A @ (A.T @ B), compute_uv=False)), 0, 1)
    return np.degrees(np.sort(np.where(cos**2 >= 0.5, np.arcsin(sin), np.arccos(cos))))


def _top_mask(score: np.ndarray, n: int) -> np.ndarray:
    order = np.argsort(-score.reshape(-1), kind="stable")[:n]  # ties to the lower flat index
    mask = np.zeros(score.size, dtype=bool)
    mask[order] = True
    return mask.reshape(score.shape)


def _reference(w0: np.ndarray, w1: np.ndarray, k: int, rank: int, alpha: float = 0.3) -> dict:
    p = min(w0.shape)
    k, rank = min(k, p), min(rank, p)
    U0, S0, V0t = np.linalg.svd(w0, full_matrices=False)
    U1, S1, V1t = np.linalg.svd(w1, full_matrices=False)
    left, right = _sine_cosine_deg(U0[:, :k], U1[:, :k]), _sine_cosine_deg(V0t[:k].T, V1t[:k].T)
    update = np.abs(w1 - w0) > 1e-3 * np.maximum(np.abs(w0), np.abs(w1))
    n_sel = math.floor(alpha * w0.size + 0.5)
    principal = _top_mask(np.abs((U0[:, :rank] * S0[:rank]) @ V0t[:rank]), n_sel)
    low = _top_mask(-np.abs(w0), n_sel)
    n_upd = update.sum()
    return {"sparsity": 1.0 - n_upd / w0.size, "density": n_upd / w0.size,
            "angle_left_max_deg": left.max(), "angle_left_mean_deg": left.mean(),
            "angle_right_max_deg": right.max(), "angle_right_mean_deg": right.mean(),
            "nss": np.linalg.norm(S1 - S0) / np.linalg.norm(S0),
            "principal_overlap": (principal & update).sum() / n_upd if n_upd else math.nan,
            "low_magnitude_overlap": (low & update).sum() / n_upd if n_upd else math.nan,
            "fro_norm": np.linalg.norm(w1 - w0), "rel_fro_norm": np.linalg.norm(w1 - w0) / np.linalg.norm(w0),
            "rank": rank}


# Both sides are float64 SVDs and sums of the same per-expert matrices (tiny, well-conditioned: gaps
# are O(1e-2) of sigma_1), so singular values and angles agree to ~eps/gap ~ 1e-13; 1e-8 leaves room
# for any LAPACK's ordering of the reductions.
def _close(got, want, what, tol=1e-8):
    if isinstance(want, float) and math.isnan(want):
        assert got is None or math.isnan(got), (what, got)
    else:
        assert got == pytest.approx(want, rel=tol, abs=tol), (what, got, want)


METRIC_COLUMNS = ("sparsity", "density", "angle_left_max_deg", "angle_left_mean_deg", "angle_right_max_deg",
                  "angle_right_mean_deg", "nss", "principal_overlap", "low_magnitude_overlap", "fro_norm",
                  "rel_fro_norm", "rank")


# --------------------------------------------------------------------------- reader


def test_fused_layout_reads_as_the_per_expert_layout(moe):
    a, b = open_checkpoint(moe["base"]), open_checkpoint(moe["base_fused"])
    assert a.names() == b.names()
    experts = [n for n in a.names() if ".experts." in n]
    assert len(experts) == LAYERS * E * 3
    for name in a.names():
        assert torch.equal(a.load(name), b.load(name)), name
    # one expert's part of the fused tensor is a byte range of one matrix: memory is one matrix
    part = b._sources["model.layers.1.mlp.experts.3.up_proj.weight"]
    assert part.stored.nbytes == INTER * HIDDEN * 2 and not part.stored.whole
    assert part.stored.key == "model.layers.1.mlp.experts.gate_up_proj"


def test_fused_layout_that_the_config_contradicts_is_refused(moe, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(moe["base_fused"], bad)
    config = json.loads((bad / "config.json").read_text())
    config["moe_intermediate_size"] = INTER + 1
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"experts\.down_proj: cannot split the fused experts: shape \[4, 32, 24\].*intermediate 25.*\[4, 32, 25\]"):
        open_checkpoint(bad)
    del config["moe_intermediate_size"], config["intermediate_size"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="cannot split fused tensor .*intermediate_size"):
        open_checkpoint(bad)


# --------------------------------------------------------------------------- compare


@pytest.fixture(scope="module")
def result(moe):
    return opdgeo.compare(moe["base"], moe["tuned"], k=K, rank=RANK)


def test_per_expert_geometry_matches_float64_reference_in_both_layouts(moe, result):
    r0, r1 = _raw(moe["base"]), _raw(moe["tuned"])
    f0, f1 = _per_expert_from_fused(_raw(moe["base_fused"])), _per_expert_from_fused(_raw(moe["tuned_fused"]))
    fused = opdgeo.compare(moe["base_fused"], moe["tuned_fused"], k=K, rank=RANK, workers=2)
    mixed = opdgeo.compare(moe["base"], moe["tuned_fused"], k=K, rank=RANK)
    assert [r["name"] for r in fused.matrices] == [r["name"] for r in result.matrices]
    checked = 0
    for row, frow, mrow in zip(result.matrices, fused.matrices, mixed.matrices):
        name = row["name"]
        parsed = parse_tensor_name(name)
        assert row["expert"] == parsed.expert and row["type"] == parsed.type
        if ".experts." not in name or not name.endswith(".weight"):
            continue
        assert row["expert"] in range(E)
        for ref in (_reference(r0[name], r1[name], K, RANK), _reference(f0[name], f1[name], K, RANK)):
            for column in METRIC_COLUMNS:
                for got in (row, frow, mrow):
                    _close(got[column], ref[column], f"{name} {column}")
        checked += 1
    assert checked == LAYERS * E * 3
    rows = {r["name"]: r for r in result.matrices}
    assert rows["model.layers.0.mlp.experts.0.gate_proj.weight"]["nss"] == 0.0  # untouched expert
    assert rows["model.layers.0.mlp.experts.2.gate_proj.weight"]["angle_left_max_deg"] > 1.0
    router = rows["model.layers.1.mlp.gate.weight"]
    assert router["type"] == "router" and router["expert"] is None and router["nss"] is None  # not geometry
    assert router["density"] == pytest.approx(HIDDEN / (E * HIDDEN)) and router["fro_norm"] > 0
    assert result.summary["by_type"]["router"]["n_matrices"] == 0


def test_rank_is_capped_per_matrix_and_reported(moe):
    """The default rank 64 exceeds every min(m, n) here: each matrix uses min(64, m, n),
    reported in its ``rank`` column, and its row is exactly that of a run asking for it."""
    res = opdgeo.compare(moe["base"], moe["tuned"], k=K)  # rank 64: formerly an error
    rows = {r["name"]: r for r in res.matrices}
    assert rows["model.layers.0.mlp.experts.1.down_proj.weight"]["rank"] == INTER  # 32x24
    assert rows["model.layers.0.self_attn.k_proj.weight"]["rank"] == 16  # 16x32
    assert rows["model.embed_tokens.weight"]["rank"] is None  # not a geometry matrix
    geometry = [r for r in res.matrices if r["rank"] is not None]
    assert res.summary["n_rank_capped"] == len(geometry) == LAYERS * (4 + 3 * E)
    for rank in (16, INTER, 32):
        explicit = {r["name"]: r for r in opdgeo.compare(moe["base"], moe["tuned"], k=K, rank=rank).matrices}
        same = [r for r in geometry if r["rank"] == rank]
        assert same and all(r == explicit[r["name"]] or _nan_equal(r, explicit[r["name"]]) for r in same)


def _nan_equal(a: dict, b: dict) -> bool:
    return [repr(a[c]) for c in a] == [repr(b[c]) for c in a]


def test_expert_summary_says_which_experts_moved_most(moe, result):
    r0, r1 = _raw(moe["base"]), _raw(moe["tuned"])
    by_expert = {(e["layer"], e["expert"]): e for e in result.summary["by_expert"]}
    assert sorted(by_expert) == [(layer, e) for layer in range(LAYERS) for e in range(E)]
    for (layer, e), got in by_expert.items():
        names = [f"model.layers.{layer}.mlp.experts.{e}.{m}_proj.weight" for m in ("gate", "up", "down")]
        refs = [_reference(r0[n], r1[n], K, RANK) for n in names]
        numel = sum(r0[n].size for n in names)
        assert got["n_matrices"] == 3 and got["n_params"] == numel
        assert got["sparsity"] == pytest.approx(sum(r["sparsity"] * r0[n].size for r, n in zip(refs, names)) / numel)
        # means of three float64 values and a root of summed squares: order-dependent rounding only
        assert got["density"] == pytest.approx(np.mean([r["density"] for r in refs]), rel=1e-12)
        assert got["nss"] == pytest.approx(np.mean([r["nss"] for r in refs]), rel=1e-8, abs=1e-15)
        want_fro = math.sqrt(sum(np.linalg.norm(r1[n] - r0[n]) ** 2 for n in names))
        assert got["fro_norm"] == pytest.approx(want_fro, rel=1e-12)
    moved = result.summary["experts_moved_most"]
    assert [(e["layer"], e["expert"]) for e in moved["density"]][:1] == [(1, 0)]  # changed everywhere
    for metric in ("density", "nss", "fro_norm"):
        values = [e[metric] for e in moved[metric]]
        assert values == sorted(values, reverse=True)
        moved_keys = {(e["layer"], e["expert"]) for e in moved[metric]}
        assert {(0, 2), (1, 0), (1, 3)} <= moved_keys
        want = sorted((v[metric] for v in by_expert.values()), reverse=True)
        assert values == want[:len(values)]


def test_out_writes_the_expert_heatmap_and_summary(result, tmp_path):
    paths = result.write(tmp_path / "out")
    assert [p.name for p in paths] == ["matrices.csv", "summary.json", "summary.md", "expert_density.png",
                                       "expert_density.svg"]
    assert (tmp_path / "out" / "expert_density.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header = (tmp_path / "out" / "matrices.csv").read_text().splitlines()[0].split(",")
    assert header[14:20] == ["legacy_sparsity", "note", "expert", "fro_norm", "rel_fro_norm", "rank"]  # then appended ones
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    keys = list(summary)
    at = keys.index("by_expert")
    assert len(summary["by_expert"]) == LAYERS * E and keys[at:at + 3] == ["by_expert", "experts_moved_most",
                                                                           "n_rank_capped"]
    assert "Experts that moved most" in (tmp_path / "out" / "summary.md").read_text()


def test_dense_model_has_empty_expert_summary(tiny_qwen3_factory, tmp_path):
    base = tiny_qwen3_factory(tmp_path / "a")
    res = opdgeo.compare(base, base, k=K, rank=8)
    assert res.summary["by_expert"] == [] and res.summary["n_rank_capped"] == 0
    assert all(r["expert"] is None for r in res.matrices)
    assert [p.name for p in res.write(tmp_path / "out")] == ["matrices.csv", "summary.json", "summary.md"]


def test_gpt_oss_interleaved_fused_layout_matches_reference(tmp_path):
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = GptOssConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=E,
                       num_experts_per_tok=2, tie_word_embeddings=False, layer_types=["full_attention"])
    torch.manual_seed(0)
    model = GptOssForCausalLM(cfg)
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        model.model.layers[0].mlp.experts.gate_up_proj[1, :, 0::2] += 0.05  # expert 1's gate only
        model.model.layers[0].mlp.experts.down_proj[3] *= 1.01
    model.save_pretrained(tmp_path / "tuned")
    r0, r1 = _raw(tmp_path / "base"), _raw(tmp_path / "tuned")
    assert r0["model.layers.0.mlp.experts.gate_up_proj"].shape == (E, HIDDEN, 2 * INTER)  # stored fused on disk
    # the forward: gate_up = x @ W[e] + b[e]; gate = gate_up[..., ::2], up = gate_up[..., 1::2]; out = h @ W_down[e]
    refs = {}
    for side, raw in ((0, r0), (1, r1)):
        gu, down = raw["model.layers.0.mlp.experts.gate_up_proj"], raw["model.layers.0.mlp.experts.down_proj"]
        for e in range(E):
            prefix = f"model.layers.0.mlp.experts.{e}"
            refs.setdefault(f"{prefix}.gate_proj.weight", []).append(gu[e][:, 0::2].T)
            refs.setdefault(f"{prefix}.up_proj.weight", []).append(gu[e][:, 1::2].T)
            refs.setdefault(f"{prefix}.down_proj.weight", []).append(down[e].T)
    res = opdgeo.compare(tmp_path / "base", tmp_path / "tuned", k=K, rank=RANK)
    rows = {r["name"]: r for r in res.matrices}
    for name, (w0, w1) in refs.items():
        ref = _reference(w0, w1, K, RANK)
        assert rows[name]["shape"] == "x".join(map(str, w0.shape))
        for column in METRIC_COLUMNS:
            _close(rows[name][column], ref[column], f"{name} {column}")
    assert rows["model.layers.0.mlp.experts.1.up_proj.weight"]["density"] == 0.0
    assert rows["model.layers.0.mlp.experts.1.gate_proj.weight"]["density"] > 0.5
    assert rows["model.layers.0.mlp.experts.1.gate_proj.bias"]["type"] == "gate"
    assert rows["model.layers.0.mlp.router.weight"]["type"] == "router"
    moved = res.summary["experts_moved_most"]["fro_norm"]
    assert {(m["layer"], m["expert"]) for m in moved[:2]} == {(0, 1), (0, 3)}


def test_shared_expert_is_marked_shared(tmp_path):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=64, moe_intermediate_size=INTER,
                         shared_expert_intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=E, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(cfg)
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        model.model.layers[0].mlp.shared_expert.up_proj.weight[:2] += 0.1
    model.save_pretrained(tmp_path / "tuned")
    res = opdgeo.compare(tmp_path / "base", tmp_path / "tuned", k=K)
    rows = {r["name"]: r for r in res.matrices}
    assert rows["model.layers.0.mlp.shared_expert.up_proj.weight"]["expert"] == "shared"
    assert rows["model.layers.0.mlp.shared_expert_gate.weight"]["type"] == "router"
    shared = [e for e in res.summary["by_expert"] if e["expert"] == "shared"]
    assert len(shared) == 1 and shared[0]["n_matrices"] == 3 and shared[0]["density"] > 0
    assert all(e["expert"] != "shared" for ranked in res.summary["experts_moved_most"].values() for e in ranked)


# --------------------------------------------------------------------------- trajectory on an MoE run


def test_trajectory_on_an_moe_training_run(tmp_path):
    """`opdgeo train` (SFT, 3 steps) of a tiny Qwen3-MoE student, then `opdgeo trajectory
    --matrices all` with a fused-layout origin: every expert matrix's stable rank, ‖ΔW‖_F
    and Sim_16 to the final update equal float64 numpy on the saved files."""
    from opdgeo.cli.main import main
    from opdgeo.models import char_tokenizer

    tok = char_tokenizer()
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=64, moe_intermediate_size=INTER,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         num_experts=E, num_experts_per_tok=2, tie_word_embeddings=True, max_position_embeddings=256,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    student = Qwen3MoeForCausalLM(cfg)
    student.save_pretrained(tmp_path / "student")
    tok.save_pretrained(tmp_path / "student")
    origin = tmp_path / "origin-fused"  # the same weights in the fused layout
    origin.mkdir()
    save_file({k: v.contiguous() for k, v in student.state_dict().items() if k != "lm_head.weight"},
              str(origin / "model.safetensors"))
    shutil.copy(tmp_path / "student" / "config.json", origin / "config.json")
    run = tmp_path / "run"
    args = ["train", str(Path(__file__).parents[1] / "recipes" / "tiny-sft.yaml"), "--set", f"model.student={tmp_path / 'student'}",
            "--set", f"run.out_dir={run}", "--set", "optim.steps=3", "--set", "checkpoint.every=1", "--set",
            "optim.warmup_steps=0", "--set", "optim.batch_size=8", "--set", "optim.micro_batch_size=8",
            "--set", "optim.lr=1e-2", "--set", "run.progress=false", "--set", "task.num_problems=32"]
    try:
        main(args)
    except SystemExit as e:
        assert e.code in (0, None)
    out = tmp_path / "traj"
    try:
        main(["trajectory", "--origin", str(origin), str(run), "--matrices", "all", "--sim-k", "4", "--k-hill", "4",
              "--exact-svd", "--out", str(out)])
    except SystemExit as e:
        assert e.code in (0, None)
    import csv

    with open(out / "trajectory.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    w0 = _raw(tmp_path / "student")
    ckpts = {s: _raw(run / f"step-{s:06d}") for s in (1, 2, 3)}
    final = {}
    experts = [r for r in rows if r["expert"] != ""]
    assert len(experts) == 3 * LAYERS * E * 3 and {r["type"] for r in experts} == {"gate", "up", "down"}
    for r in sorted(experts, key=lambda r: -int(r["step"])):  # final first: Sim's reference
        d = ckpts[int(r["step"])][r["name"]] - w0[r["name"]]
        _, s, vt = np.linalg.svd(d, full_matrices=False)
        fro = np.linalg.norm(d)
        # norms are float64 sums (order only); the stable rank and Sim use float64 SVDs of the same update,
        # whose leading singular values/vectors are accurate to ~eps*sigma_1/gap, far below these tolerances
        assert float(r["fro_norm"]) == pytest.approx(fro, rel=1e-12), r["name"]
        assert float(r["rel_fro_norm"]) == pytest.approx(fro / np.linalg.norm(w0[r["name"]]), rel=1e-12)
        if fro == 0:
            assert r["stable_rank"] == ""
            continue
        assert float(r["stable_rank"]) == pytest.approx(fro**2 / s[0] ** 2, rel=1e-10)
        v4 = vt[:4].T
        final.setdefault(r["name"], v4)
        if s[3] > 1e-6 * s[0]:
            want = np.linalg.norm(v4.T @ final[r["name"]]) ** 2 / 4
            assert float(r["sim_to_final"]) == pytest.approx(want, abs=1e-8), r["name"]
    assert any(float(r["fro_norm"]) > 0 for r in experts)  # the experts did train
