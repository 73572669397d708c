"""Subspace-projected training: the paper's functional-sufficiency test (SPEC §3 Controls).

From a chosen checkpoint W_from, take for every 2-D block weight (the geometry matrix
set: q, k, v, o, gate, up, down) the top-K right singular vectors V_K [n, K] of its
cumulative update ΔW = W_from − W_origin, and from then on replace that matrix's gradient
g [m, n] by its projection onto the row space span(V_K):

    g ← g V_K V_Kᵀ

before the optimizer. Every other parameter (embeddings, norms, lm_head) is frozen
(``requires_grad = False``) while projecting **(our choice)**.

Where in the step (for the loop): after the last micro-batch's ``accelerator.backward``
(under DDP the gradient all-reduce happens inside that backward, so every rank projects
the same averaged gradient — projection is linear, so projecting before or after the
average would agree, but doing it once after is cheaper) and before gradient clipping and
``optimizer.step()``; clipping then sees the projected norm.

Projecting the gradient alone does not keep the weights in the subspace under AdamW:
Adam divides each entry by its own √v̂ (an elementwise rescaling that does not commute with
the projection) and decoupled weight decay moves W along −λW. At the first step
(m̂ = g̃, v̂ = g̃²) the update is −lr·g̃/(|g̃| + ε) − lr·λ·W ≈ −lr·sign(g̃) − lr·λ·W, a sign
pattern far from low rank (~30 % of its energy outside span(V_K) on the test model). So
the loop also projects the **update** the optimizer applied: around every optimizer step,

    D = W_after − W_before          (AdamW's whole update, weight decay included)
    W ← W_before + D V_K V_Kᵀ       (``project_updates_``)

so that every change of a projected matrix after the projection point lies in span(V_K)
row-wise; float32 rounding of the stored weights is the only error left. Adam's moments
are kept as AdamW computes them (m is a combination of projected gradients, so already in
the span; v is elementwise). ``UpdateStats`` reports, per step,
``project/out_of_subspace_fraction`` = Σ‖D − D V Vᵀ‖² / Σ‖D‖² over the projected
matrices (D the change actually applied) and ``project/out_of_subspace_max``, the worst
matrix's own fraction; ``project.mode: freeze`` (same restart, same frozen parameters, no
projection) logs the same two numbers for its unprojected update.

Under data parallelism every rank holds the same averaged gradient and the same AdamW
state, so every rank applies the same projected update (no communication needed).

Pure torch and safetensors I/O for the saved subspace; the loop does the config and the
checkpoint reading (``projection_subspaces`` accepts any name -> tensor mapping or a
``Checkpoint``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from opdgeo.checkpoints import is_geometry_matrix
from opdgeo.errors import CheckpointError, ConfigError
from opdgeo.geometry.spectrum import top_singular_subspaces
from opdgeo.files import atomic_write

__all__ = [
    "SUBSPACE_FILE",
    "right_subspace",
    "projection_subspaces",
    "project_gradient",
    "ProjectionStats",
    "project_gradients_",
    "freeze_outside",
    "out_of_subspace_fraction",
    "UpdateStats",
    "weights_before_step",
    "project_updates_",
    "carry_optimizer_state",
    "save_subspaces",
    "load_subspaces",
]

SUBSPACE_FILE = "projection_subspace.safetensors"
"""File name of the saved subspace inside a run folder."""


def right_subspace(delta: torch.Tensor, rank: int, *, name: str = "matrix") -> torch.Tensor:
    """Top-K right singular vectors of an update: V_K with ΔW = U diag(σ) Vᵀ.

    Args:
        delta: [m, n] ΔW = W_from − W_origin, any floating dtype (computed in float64).
        rank: K, 1 ≤ K ≤ min(m, n).
        name: the tensor's name, for the error message.

    Returns:
        [n, K] float64 with orthonormal columns (signs arbitrary). If ΔW has rank < K (e.g.
        ΔW = 0), the trailing columns are still orthonormal but arbitrary directions of
        the null space (whatever the SVD returns): the subspace is then only as meaningful
        as the update that defines it.

    Raises:
        ConfigError: K < 1 or K > min(m, n) (the message names the tensor), non-finite ΔW.

    Source: SPEC §3 "Subspace projection" (Shen et al. 2026, functional sufficiency; V_K as
    in the trajectory similarity Sim_K of SPEC §2). Uses ``geometry.top_singular_subspaces``.
    """
    if delta.dim() != 2:
        raise ConfigError(f"projection needs a 2-D matrix; {name} has shape {tuple(delta.shape)}")
    m, n = delta.shape
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"project.rank (--rank) must be an integer >= 1; got {rank!r}")
    if rank > min(m, n):
        raise ConfigError(f"project.rank (--rank) must be <= min(m, n) = {min(m, n)} for {name}; got {rank}")
    if not torch.isfinite(delta).all():
        raise ConfigError(f"the update of {name} has non-finite entries; cannot take its subspace")
    return top_singular_subspaces(delta, rank, dtype=torch.float64).V  # [n, K]


def projection_subspaces(
    origin,
    source,
    *,
    rank: int,
    names: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """V_K of ΔW = W_source − W_origin for every geometry matrix (2-D q/k/v/o/gate/up/down).

    Args:
        origin: a ``Checkpoint`` or a mapping name -> tensor (W_origin; e.g. the SFT anchor).
        source: a ``Checkpoint`` or a mapping name -> tensor (W_from; e.g. ``step-000063``).
        rank: K.
        names: restrict to these names (default: every geometry matrix of ``source``).

    Returns:
        name -> [n, K] float64 V_K, in ``source``'s name order.

    Raises:
        ConfigError: no geometry matrix, a rank too large for some matrix.
        CheckpointError: a matrix missing in ``origin`` or with a different shape.
    """
    src_names = source.names() if hasattr(source, "names") else list(source)
    if names is None:
        names = [nm for nm in src_names if is_geometry_matrix(nm, _shape(source, nm))]
    names = list(names)
    if not names:
        raise ConfigError(f"no 2-D block weight (q/k/v/o/gate/up/down) to project in {_where(source)}")
    out: dict[str, torch.Tensor] = {}
    for nm in names:
        if nm not in origin:
            raise CheckpointError(f"{_where(origin)}: no tensor {nm!r} (needed as the projection origin)")
        w1 = _load(source, nm)
        w0 = _load(origin, nm)
        if w0.shape != w1.shape:
            raise CheckpointError(
                f"{nm}: shape {tuple(w1.shape)} in {_where(source)} but {tuple(w0.shape)} in {_where(origin)}"
            )
        delta = w1.to(torch.float64) - w0.to(torch.float64)  # [m, n]
        out[nm] = right_subspace(delta, rank, name=nm)
    return out


def _shape(store, name: str) -> tuple:
    return tuple(store.info(name).shape) if hasattr(store, "info") else tuple(store[name].shape)


def _load(store, name: str) -> torch.Tensor:
    return store.load(name) if hasattr(store, "load") else store[name].detach()


def _where(store) -> str:
    return str(getattr(store, "path", "the given weights"))


def project_gradient(grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Projection of a gradient onto the row space span(V): g V Vᵀ.

    Args:
        grad: [m, n] gradient g.
        basis: [n, K] V with orthonormal columns.

    Returns:
        [m, n] g V Vᵀ in ``grad``'s dtype (computed as (g V) Vᵀ: 2·m·n·K flops, never the
        n×n projector).
    """
    v = basis.to(device=grad.device, dtype=grad.dtype)
    return (grad @ v) @ v.T  # [m, K] @ [K, n]


@dataclass(frozen=True)
class ProjectionStats:
    """Gradient energy kept by one projection pass.

    Attributes:
        grad_energy_kept: Σ_matrices ‖g V Vᵀ‖_F² / Σ_matrices ‖g‖_F² (pooled over the
            projected matrices, i.e. weighted by their gradient energy); NaN when every
            gradient is zero or missing.
    """

    grad_energy_kept: float

    def as_metrics(self) -> dict[str, float]:
        return {"project/grad_energy_kept": self.grad_energy_kept}


@torch.no_grad()
def project_gradients_(
    parameters: Mapping[str, torch.nn.Parameter],
    subspaces: Mapping[str, torch.Tensor],
) -> ProjectionStats:
    """Replace, in place, the ``.grad`` of each named matrix by g V_K V_Kᵀ.

    ‖g V Vᵀ‖² = ‖g V‖² for orthonormal V, so the kept energy costs nothing extra.

    Args:
        parameters: name -> parameter (e.g. ``dict(model.named_parameters())``); names in
            ``subspaces`` must be present. A parameter with ``grad is None`` is skipped.
        subspaces: name -> [n, K] V_K (any float dtype; cast to the gradient's).

    Returns:
        ``ProjectionStats``.

    Raises:
        KeyError: a subspace names a parameter that does not exist (internal: the loop
            checks the names when projection starts).
    """
    missing = [name for name in subspaces if name not in parameters]
    if missing:
        raise KeyError(f"no parameter named {missing[0]!r}")
    kept = 0.0
    total = 0.0
    # in the parameters' order, whatever the order of ``subspaces`` (a file read back sorts
    # its names), so the pooled energy sums in the same order in a resumed run
    for name in (n for n in parameters if n in subspaces):
        basis = subspaces[name]
        p = parameters[name]
        if p.grad is None:
            continue
        g = p.grad
        v = basis.to(device=g.device, dtype=g.dtype)
        coeff = g @ v  # [m, K]
        total += float(g.pow(2).sum(dtype=torch.float64))
        kept += float(coeff.pow(2).sum(dtype=torch.float64))
        torch.matmul(coeff, v.T, out=g)  # [m, n], in place
    return ProjectionStats(grad_energy_kept=kept / total if total > 0 else float("nan"))


def freeze_outside(model: torch.nn.Module, names: Iterable[str]) -> list[str]:
    """Set ``requires_grad = False`` on every parameter not in ``names``; return those frozen.

    Args:
        model: the policy.
        names: parameter names that keep training (the projected matrices).

    Raises:
        ConfigError: a name that is not a parameter of the model (e.g. a subspace saved
            for another architecture).
    """
    keep = set(names)
    params = dict(model.named_parameters())
    missing = sorted(keep - set(params))
    if missing:
        raise ConfigError(f"projection subspace names {missing[:3]} are not parameters of the model")
    frozen = []
    for name, p in params.items():
        if name not in keep:
            p.requires_grad_(False)
            frozen.append(name)
        else:
            p.requires_grad_(True)
    return frozen


def out_of_subspace_fraction(update: torch.Tensor, basis: torch.Tensor) -> float:
    """Share of an update's energy outside the row space span(V): ‖D(I − VVᵀ)‖_F² / ‖D‖_F².

    Args:
        update: [m, n] D (e.g. W_after − W_before of one optimizer step).
        basis: [n, K] orthonormal V.

    Returns:
        float in [0, 1], computed in float64 as ‖D − (D V) Vᵀ‖² / ‖D‖²; NaN for D = 0.
    """
    d = update.to(torch.float64)
    v = basis.to(device=d.device, dtype=torch.float64)
    total = float(d.pow(2).sum())
    if total == 0:
        return float("nan")
    return float((d - (d @ v) @ v.T).pow(2).sum()) / total


@dataclass(frozen=True)
class UpdateStats:
    """Where one optimizer step's change of the projected matrices lies.

    Attributes:
        out_of_subspace_fraction: Σ_matrices ‖D − D V Vᵀ‖_F² / Σ_matrices ‖D‖_F², D the
            change of the step as applied (after ``project_updates_`` when projecting);
            NaN when no projected matrix changed.
        out_of_subspace_max: the largest per-matrix ‖D − D V Vᵀ‖² / ‖D‖² (NaN as above).
    """

    out_of_subspace_fraction: float
    out_of_subspace_max: float

    def as_metrics(self) -> dict[str, float]:
        return {"project/out_of_subspace_fraction": self.out_of_subspace_fraction,
                "project/out_of_subspace_max": self.out_of_subspace_max}


@torch.no_grad()
def weights_before_step(parameters: Mapping[str, torch.nn.Parameter],
                        subspaces: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of the projected matrices, taken just before ``optimizer.step()``."""
    return {name: parameters[name].detach().clone() for name in parameters if name in subspaces}


@torch.no_grad()
def project_updates_(
    parameters: Mapping[str, torch.nn.Parameter],
    subspaces: Mapping[str, torch.Tensor],
    before: Mapping[str, torch.Tensor],
    *,
    project: bool = True,
) -> UpdateStats:
    """Keep only the in-subspace part of the optimizer's update: W ← W_b + (W − W_b) V Vᵀ.

    D = W − W_b is the whole update of the step (AdamW's normalized moment and its
    decoupled weight decay); D V Vᵀ is computed in the weights' dtype as (D V) Vᵀ. The
    fractions are then measured in float64 on the change actually stored,
    fl(W_b + D V Vᵀ) − W_b, so they include the float32 rounding of the weights.

    Args:
        parameters: name -> parameter (after ``optimizer.step()``).
        subspaces: name -> [n, K] orthonormal V_K.
        before: ``weights_before_step`` of the same step.
        project: False measures the update without changing it (``project.mode: freeze``).

    Returns:
        ``UpdateStats`` (pooled and worst-matrix fractions).
    """
    outside = total = 0.0
    worst = float("nan")
    for name, w_b in before.items():
        p = parameters[name]
        v = subspaces[name].to(device=p.device, dtype=p.dtype)
        if project:
            d = p.detach() - w_b  # [m, n]
            p.copy_(w_b + (d @ v) @ v.T)  # [m, K] @ [K, n]
        d64 = p.detach().double() - w_b.double()
        v64 = subspaces[name].to(device=p.device, dtype=torch.float64)
        tot = float(d64.pow(2).sum())
        if tot == 0:
            continue
        out = float((d64 - (d64 @ v64) @ v64.T).pow(2).sum())
        outside += out
        total += tot
        worst = out / tot if math.isnan(worst) else max(worst, out / tot)
    return UpdateStats(out_of_subspace_fraction=outside / total if total > 0 else float("nan"),
                       out_of_subspace_max=worst)


def carry_optimizer_state(optimizer: torch.optim.Optimizer, saved: Mapping, saved_names: Sequence[str],
                          names: Sequence[str]) -> list[str]:
    """Copy a saved AdamW state into an optimizer over a subset of the same parameters.

    A projected restart trains only the block matrices, while the run it restarts from
    trained every parameter; its ``optimizer.state_dict()`` indexes the state by position in
    that run's parameter list. The state of each parameter the new optimizer holds
    (``exp_avg``, ``exp_avg_sq``, ``step``) is copied by name; the hyper-parameters stay the
    new optimizer's (the same config). Parameters without a saved state start fresh.

    Args:
        optimizer: the new optimizer, over the parameters named ``names`` (in its order).
        saved: the saved ``optimizer.state_dict()`` (one param group).
        saved_names: names of the saved run's parameters, in its optimizer's order.
        names: names of the new optimizer's parameters, in its order.

    Returns:
        The names whose state was carried.

    Raises:
        CheckpointError: the saved state does not match ``saved_names`` (count or shapes).
    """
    groups = saved.get("param_groups", [])
    saved_ids = [i for g in groups for i in g["params"]]
    if len(saved_ids) != len(saved_names):
        raise CheckpointError(f"the saved optimizer holds {len(saved_ids)} parameters; the model has {len(saved_names)}")
    by_name = {nm: saved.get("state", {}).get(i) for nm, i in zip(saved_names, saved_ids)}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state, carried = {}, []
    for i, (nm, p) in enumerate(zip(names, params)):
        st = by_name.get(nm)
        if not st:
            continue
        if tuple(st["exp_avg"].shape) != tuple(p.shape):
            raise CheckpointError(f"saved optimizer state of {nm} has shape {tuple(st['exp_avg'].shape)}, "
                                  f"the parameter {tuple(p.shape)}")
        state[i] = dict(st)
        carried.append(nm)
    # through load_state_dict: it places each tensor as this optimizer needs it (device and
    # dtype of the parameter; ``step`` on the device for fused AdamW, on the CPU otherwise)
    own = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": own["param_groups"]})
    return carried


def save_subspaces(path: str | Path, subspaces: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Write the subspaces to a safetensors file (float64 V_K per matrix), atomically.

    Args:
        path: the file to write (a temporary sibling is renamed over it).
        subspaces: name -> [n, K] V_K.
        metadata: string -> string (e.g. ``from``, ``origin``, ``rank``), stored in the header.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: v.detach().to(torch.float64).contiguous().cpu() for name, v in subspaces.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_subspaces(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read subspaces written by ``save_subspaces``: (name -> V_K, metadata).

    Raises:
        CheckpointError: missing or unreadable file, a tensor that is not 2-D.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: projection subspace file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            out = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors raises its own error types on corrupt headers
        raise CheckpointError(f"{path}: cannot read projection subspaces: {str(err).splitlines()[0]}") from None
    for name, v in out.items():
        if v.dim() != 2:
            raise CheckpointError(f"{path}: subspace {name!r} has shape {tuple(v.shape)}, expected [n, K]")
    return out, meta
