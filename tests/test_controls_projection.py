"""Subspace-projected training (SPEC §3 Controls): projection math, SGD/AdamW behaviour, I/O."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from opdgeo.errors import CheckpointError, ConfigError
from opdgeo.training.projection import (
    freeze_outside,
    load_subspaces,
    carry_optimizer_state,
    out_of_subspace_fraction,
    project_gradient,
    project_gradients_,
    project_updates_,
    projection_subspaces,
    right_subspace,
    save_subspaces,
    weights_before_step,
)




K = 4


def _tiny_model(seed=0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(cfg).float()


def _setup(seed=0):
    """A model at W_from = W_origin + random rank-6 updates, and the subspaces of ΔW."""
    model = _tiny_model(seed)
    origin = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2 and "layers" in n and "norm" not in n:
                m, k = p.shape
                p.add_(0.01 * torch.randn(m, 6, generator=g) @ torch.randn(6, k, generator=g))
    source = {n: p.detach().clone() for n, p in model.named_parameters()}
    subspaces = projection_subspaces(origin, source, rank=K)
    return model, origin, subspaces


def _backward(model, seed=0):
    g = torch.Generator().manual_seed(100 + seed)
    ids = torch.randint(0, 48, (3, 10), generator=g)
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()


def _residual(x, v):
    """‖X(I − VVᵀ)‖_F / ‖X‖_F in float64."""
    x = x.detach().double()
    v = v.double()
    return float(torch.linalg.norm(x - x @ v @ v.T) / torch.linalg.norm(x))


def test_right_subspace_matches_numpy_svd():
    rng = np.random.default_rng(0)
    d = rng.normal(size=(20, 12)) @ np.diag(np.linspace(3, 0.1, 12))
    v = right_subspace(torch.tensor(d, dtype=torch.float32), 3, name="x")
    assert v.dtype == torch.float64 and v.shape == (12, 3)
    _, _, vt = np.linalg.svd(np.asarray(torch.tensor(d, dtype=torch.float32), dtype=np.float64))
    ref = vt[:3].T
    # same subspace: projector equality (signs are arbitrary)
    # the gap after the third singular value of d is O(1), so the float64 projectors agree to ~eps/gap
    np.testing.assert_allclose(v.numpy() @ v.numpy().T, ref @ ref.T, atol=1e-10)
    with pytest.raises(ConfigError, match=r"<= min\(m, n\) = 12 for layers.0.q; got 13"):
        right_subspace(torch.zeros(20, 12), 13, name="layers.0.q")
    with pytest.raises(ConfigError):
        right_subspace(torch.zeros(20, 12), 0)


def test_projection_subspaces_selects_block_matrices_and_checks_pairs():
    model, origin, subspaces = _setup()
    names = set(subspaces)
    assert len(names) == 2 * 7  # q k v o gate up down in each of 2 layers
    assert all("layers" in n and "norm" not in n for n in names)
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" not in names
    q = "model.layers.0.self_attn.q_proj.weight"
    assert subspaces[q].shape == (32, K)
    bad = dict(origin)
    bad[q] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match="q_proj"):
        projection_subspaces(bad, dict(model.named_parameters()), rank=K)


def test_projected_gradient_lies_in_span_and_energy_is_right():
    model, _, subspaces = _setup()
    params = dict(model.named_parameters())
    _backward(model)
    before = {n: params[n].grad.detach().double().clone() for n in subspaces}
    stats = project_gradients_(params, subspaces)
    kept = tot = 0.0
    for n, v in subspaces.items():
        g = params[n].grad
        assert _residual(g, v) < 1e-6  # float32 rounding of the projection
        ref = before[n] @ v @ v.T  # float64 reference
        # float32 rounding, entry by entry: |fl(G V Vᵀ) − G V Vᵀ| <= γ (|G| |V| |V|ᵀ) with
        # γ ~ (n + k) u (a fixed relative tolerance fails where the entry itself cancels)
        va = v.double().abs()
        bound = (g.shape[1] + v.shape[1]) * torch.finfo(torch.float32).eps * (before[n].abs() @ va @ va.T)
        assert ((g.double() - ref).abs() <= bound).all()
        kept += float(ref.pow(2).sum())
        tot += float(before[n].pow(2).sum())
        assert _residual(before[n], v) > 0.1  # the raw gradient was not in the span
    assert stats.grad_energy_kept == pytest.approx(kept / tot, rel=1e-5)
    assert 0 < stats.grad_energy_kept < 1
    # the functional form agrees with the in-place one
    g = torch.randn(7, 32, dtype=torch.float64)
    v = subspaces["model.layers.1.mlp.up_proj.weight"]
    torch.testing.assert_close(project_gradient(g, v), g @ v @ v.T)


def test_sgd_moves_weights_only_inside_the_subspace():
    model, _, subspaces = _setup()
    frozen = freeze_outside(model, subspaces)
    assert "model.embed_tokens.weight" in frozen and "model.norm.weight" in frozen
    params = dict(model.named_parameters())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    w_before = {n: p.detach().double().clone() for n, p in params.items()}
    for step in range(3):
        _backward(model, seed=step)
        assert all(params[n].grad is None for n in frozen)
        project_gradients_(params, subspaces)
        opt.step()
    for n, p in params.items():
        d = p.detach().double() - w_before[n]
        if n in subspaces:
            assert float(d.abs().max()) > 1e-4  # it did move
            assert _residual(d, subspaces[n]) < 1e-5
        else:
            assert float(d.abs().max()) == 0.0  # frozen


def test_adamw_update_leaves_the_subspace_as_documented():
    model, _, subspaces = _setup()
    freeze_outside(model, subspaces)
    params = dict(model.named_parameters())
    lr, eps, wd = 1e-3, 1e-8, 0.1
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, eps=eps, weight_decay=wd)
    w_before = {n: p.detach().double().clone() for n in subspaces for p in [params[n]]}
    _backward(model)
    project_gradients_(params, subspaces)
    grads = {n: params[n].grad.detach().double().clone() for n in subspaces}
    opt.step()
    fractions = []
    for n, v in subspaces.items():
        d = params[n].detach().double() - w_before[n]
        # first AdamW step: W ← W(1 − lr·wd) − lr·g̃/(|g̃| + ε) (bias-corrected m̂ = g̃, v̂ = g̃²)
        g = grads[n]
        want = -lr * wd * w_before[n] - lr * g / (g.abs() + eps)
        torch.testing.assert_close(d, want, rtol=1e-4, atol=1e-9)
        fractions.append(out_of_subspace_fraction(d, v))
        assert _residual(g, v) < 1e-6  # the gradient itself was in the span
    # the elementwise sign pattern of a rank-4 gradient is far from rank 4: here ~30 % of
    # the step's energy lies outside span(V_K), against ~1e-12 for SGD
    assert min(fractions) > 0.2, fractions
    # without weight decay the update is still outside (Adam's normalization alone)
    d = -lr * grads[n] / (grads[n].abs() + eps)
    assert out_of_subspace_fraction(d, subspaces[n]) > 0.2


def test_projected_adamw_update_stays_in_the_subspace():
    """Projecting AdamW's whole update (weight decay included) keeps W − W_from in span(V_K)
    to float32 rounding, over several steps; the same steps unprojected leave it."""
    def run(project):
        model, _, subspaces = _setup()
        freeze_outside(model, subspaces)
        params = dict(model.named_parameters())
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
        w_from = {n: params[n].detach().double().clone() for n in subspaces}
        stats = []
        for step in range(4):
            _backward(model, seed=step)
            project_gradients_(params, subspaces)
            before = weights_before_step(params, subspaces)
            opt.step()
            stats.append(project_updates_(params, subspaces, before, project=project))
        return params, subspaces, w_from, stats

    params, subspaces, w_from, stats = run(True)
    for n, v in subspaces.items():
        d = params[n].detach().double() - w_from[n]
        assert float(d.abs().max()) > 1e-3  # it moved (several lr-sized steps)
        assert out_of_subspace_fraction(d, v) <= 1e-6, n
    for st in stats:
        assert 0 <= st.out_of_subspace_fraction <= st.out_of_subspace_max <= 1e-6
    # negative control: the same steps unprojected leave the span (0.33, 0.23, 0.19, 0.17 here)
    _, _, _, raw = run(False)
    assert all(st.out_of_subspace_fraction > 0.1 for st in raw)  # Adam's sign pattern + decay
    assert all(st.out_of_subspace_max >= st.out_of_subspace_fraction for st in raw)
    assert set(stats[0].as_metrics()) == {"project/out_of_subspace_fraction", "project/out_of_subspace_max"}


def test_update_stats_known_values():
    """Pooled fraction Σ out / Σ total and the worst matrix, by hand."""
    v = torch.eye(4, dtype=torch.float64)[:, :2].float()
    a = torch.nn.Parameter(torch.zeros(1, 4))
    b = torch.nn.Parameter(torch.zeros(1, 4))
    before = weights_before_step({"a": a, "b": b}, {"a": v, "b": v})
    with torch.no_grad():
        a.copy_(torch.tensor([[3.0, 0.0, 4.0, 0.0]]))  # 16 of 25 outside
        b.copy_(torch.tensor([[0.0, 1.0, 0.0, 0.0]]))  # 0 of 1
    st = project_updates_({"a": a, "b": b}, {"a": v, "b": v}, before, project=False)
    assert st.out_of_subspace_fraction == pytest.approx(16 / 26, abs=1e-12)
    assert st.out_of_subspace_max == pytest.approx(16 / 25, abs=1e-12)
    st = project_updates_({"a": a, "b": b}, {"a": v, "b": v}, before)
    assert a.detach().tolist() == [[3.0, 0.0, 0.0, 0.0]] and st.out_of_subspace_max == 0.0
    unchanged = project_updates_({"a": a}, {"a": v}, weights_before_step({"a": a}, {"a": v}))
    assert math.isnan(unchanged.out_of_subspace_fraction) and math.isnan(unchanged.out_of_subspace_max)


def test_carry_optimizer_state_by_name():
    model = _tiny_model()
    names = [n for n, _ in model.named_parameters()]
    full = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _backward(model)
    full.step()
    saved = full.state_dict()
    keep = [n for n in names if "layers.1" in n]
    params = dict(model.named_parameters())
    sub = torch.optim.AdamW([params[n] for n in keep], lr=1e-3)
    assert carry_optimizer_state(sub, saved, names, keep) == keep
    for n in keep:
        st, ref = sub.state[params[n]], saved["state"][names.index(n)]
        assert torch.equal(st["exp_avg"], ref["exp_avg"]) and torch.equal(st["exp_avg_sq"], ref["exp_avg_sq"])
        assert float(st["step"]) == 1.0
    with pytest.raises(CheckpointError, match=f"holds {len(names)} parameters; the model has {len(names) - 1}"):
        carry_optimizer_state(sub, saved, names[:-1], keep)


def test_out_of_subspace_fraction_known_values():
    v = torch.eye(4, dtype=torch.float64)[:, :2]  # span(e1, e2)
    d = torch.tensor([[3.0, 0.0, 4.0, 0.0]])
    # integers in float64: 16/25 is one rounding
    assert out_of_subspace_fraction(d, v) == pytest.approx(16 / 25, abs=1e-15)
    assert out_of_subspace_fraction(torch.tensor([[1.0, 2.0, 0, 0]]), v) == 0.0
    assert math.isnan(out_of_subspace_fraction(torch.zeros(1, 4), v))


def test_save_and_load_subspaces_roundtrip(tmp_path):
    _, _, subspaces = _setup()
    p = save_subspaces(tmp_path / "run" / "proj.safetensors", subspaces, {"rank": 4, "from": "x/step-000003"})
    back, meta = load_subspaces(p)
    assert meta == {"rank": "4", "from": "x/step-000003"}
    assert set(back) == set(subspaces)
    for n in subspaces:
        assert torch.equal(back[n], subspaces[n])
    assert not list((tmp_path / "run").glob("*.tmp"))
    with pytest.raises(CheckpointError, match="not found"):
        load_subspaces(tmp_path / "nope.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_subspaces(tmp_path / "bad.safetensors")


def test_freeze_outside_rejects_unknown_names():
    model = _tiny_model()
    with pytest.raises(ConfigError, match="not parameters"):
        freeze_outside(model, ["model.layers.9.self_attn.q_proj.weight"])
