"""SubspaceProjection in transformers.Trainer: with AdamW (weight decay on), the change after the
projection point lies in span(V_K) of every projected matrix to 1e-6, V_K computed independently
(numpy float64 SVD of the saved checkpoints); the other parameters stay frozen; without the callback
the same run leaves the subspace (negative control)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from integrations_tiny import run_trainer
from opdgeo.checkpoints import is_geometry_matrix, parse_tensor_name
from opdgeo.errors import ConfigError
from opdgeo.geometry.rowspace import out_of_span_energy, project_change, project_rows
from opdgeo.integrations.transformers import SubspaceProjection

K = 4


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def _v_k(w_from, w0, k):
    d = w_from.double().numpy() - w0.double().numpy()
    _, _, vt = np.linalg.svd(d, full_matrices=False)
    return vt[:k].T  # [n, K]


def _worst_fraction(w_end, w_from, w0, k=K):
    """Worst matrix's ‖D − D V Vᵀ‖² / ‖D‖² for D = W_end − W_from, V from numpy's SVD of W_from − W0."""
    worst = 0.0
    for name, w in w_end.items():
        if not is_geometry_matrix(name, tuple(w.shape)):
            continue
        v = _v_k(w_from[name], w0[name], k)
        d = w.double().numpy() - w_from[name].double().numpy()
        out = d - (d @ v) @ v.T
        worst = max(worst, float((out ** 2).sum() / (d ** 2).sum()))
    return worst


def test_projection_keeps_the_adamw_change_in_span(tmp_path):
    proj = SubspaceProjection(rank=K, start=2)
    trainer = run_trainer(tmp_path / "run", [proj], steps=6, save_steps=2, origin=tmp_path / "origin",
                          weight_decay=0.1)
    w0, w2, w6 = (_weights(p) for p in (tmp_path / "origin", tmp_path / "run" / "checkpoint-2",
                                           tmp_path / "run" / "checkpoint-6"))
    assert len(proj.subspaces) == 14
    assert _worst_fraction(w6, w2, w0) <= 1e-6
    moved = [n for n in w6 if is_geometry_matrix(n, tuple(w6[n].shape)) and not torch.equal(w6[n], w2[n])]
    assert len(moved) == 14  # it trains inside the subspace
    for name, w in w6.items():  # everything else frozen: embeddings and norms unchanged since step 2
        if not is_geometry_matrix(name, tuple(w.shape)):
            assert torch.equal(w, w2[name]), name
    logged = [h for h in trainer.state.log_history if "project/out_of_subspace_fraction" in h]
    assert [h["step"] for h in logged] == [3, 4, 5, 6]
    # logged as opdgeo train logs it: the stored change of each step is in span(V_K) (rounding only) ...
    assert all(h["project/out_of_subspace_fraction"] <= h["project/out_of_subspace_max"] <= 1e-6 for h in logged)
    # ... while AdamW's own step left it (sign-like updates): the projection removed a real share
    assert all(0.05 < h["project/removed_fraction"] < 1 for h in logged)

    # negative control: the same run without the callback leaves span(V_K)
    run_trainer(tmp_path / "free", [], steps=6, save_steps=2, weight_decay=0.1)
    free6 = _weights(tmp_path / "free" / "checkpoint-6")
    assert _worst_fraction(free6, _weights(tmp_path / "free" / "checkpoint-2"), w0) > 0.1


def test_projection_from_a_checkpoint(tmp_path):
    """start = a checkpoint, origin = the checkpoint its update is measured from; projecting from step 1."""
    run_trainer(tmp_path / "first", [], steps=2, save_steps=2, origin=tmp_path / "origin")
    start = tmp_path / "first" / "checkpoint-2"
    from transformers import AutoModelForCausalLM, Trainer

    from integrations_tiny import token_rows, training_args

    model = AutoModelForCausalLM.from_pretrained(start)
    proj = SubspaceProjection(rank=K, start=start, origin=tmp_path / "origin", matrices="attention")
    Trainer(model=model, args=training_args(tmp_path / "second", steps=3, save_steps=3, optim="sgd", lr=0.1),
            train_dataset=token_rows(), callbacks=[proj]).train()
    w0, w_from, w_end = (_weights(p) for p in (tmp_path / "origin", start, tmp_path / "second" / "checkpoint-3"))
    attention = {n: w for n, w in w_end.items() if parse_tensor_name(n).type in ("q", "k", "v", "o")}
    assert len(proj.subspaces) == 8 and _worst_fraction(attention, w_from, w0) <= 1e-6
    for name, w in w_end.items():
        if name not in attention:  # gate/up/down too: only the attention is projected
            assert torch.equal(w, w_from[name]), name


def test_rowspace_functions_against_numpy():
    g = torch.Generator().manual_seed(0)
    v = torch.linalg.qr(torch.randn(12, 3, generator=g, dtype=torch.float64))[0]
    w_from = torch.randn(5, 12, generator=g, dtype=torch.float64)
    inside = torch.randn(5, 3, generator=g, dtype=torch.float64) @ v.T
    outside = torch.randn(5, 12, generator=g, dtype=torch.float64)
    outside -= (outside @ v) @ v.T
    w = w_from + inside + outside
    new, coeff, out_e = project_change(w, w_from, v)
    assert torch.allclose(new, w_from + inside, atol=1e-12) and torch.allclose(coeff @ v.T, inside, atol=1e-12)
    assert out_e == pytest.approx(float((outside ** 2).sum()), rel=1e-10)
    p = v.numpy() @ v.numpy().T
    assert np.allclose(project_rows(outside + inside, v).numpy(), (outside + inside).numpy() @ p, atol=1e-12)
    assert out_of_span_energy(inside, v)[0] < 1e-24
    with pytest.raises(ValueError):
        project_rows(w, v[:5])


def test_bad_arguments(tmp_path):
    for bad in ({"rank": 0}, {"start": 0}, {"start": None}, {"matrices": "mlp", "start": 1},
                {"start": str(tmp_path)}):
        with pytest.raises(ConfigError, match="SubspaceProjection"):
            SubspaceProjection(**bad)
    with pytest.raises(ConfigError, match="min\\(m, n\\) = 32"):
        run_trainer(tmp_path / "r", [SubspaceProjection(rank=40, start=1)], steps=1, save_steps=None)
