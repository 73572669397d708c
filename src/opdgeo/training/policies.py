"""The networks of a run: loading a policy, the teacher and behaviour policy as scoring-only
models, activation checkpointing, AdamW, and where the student starts (the run's origin
W0, a restart from a step folder).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from opdgeo import distributed
from opdgeo.errors import CheckpointError
from opdgeo.training import checkpointing as ckpt
from opdgeo.training.config import OptimConfig, TrainConfig
from opdgeo.training.precision import native_bf16
from opdgeo.training.projection import carry_optimizer_state

__all__ = [
    "load_policy",
    "behaviour_policy",
    "teacher_dtype",
    "inference_model",
    "activation_checkpointing_",
    "origin_matrices",
    "rounded_matrices",
    "checkpoint_matrices",
    "start_from_checkpoint",
    "adamw",
    "restart_optimizer_state",
]


def load_policy(source: str, *, init_seed: int = 0):
    """``(model, tokenizer)`` for a model source (``opdgeo.models.model_and_tokenizer``)."""
    from opdgeo.models import model_and_tokenizer

    return model_and_tokenizer(source, seed=init_seed)


def behaviour_policy(config: TrainConfig, student, tokenizer, teacher, *, device: torch.device):
    """The model that generates the rollouts (``rollout.policy``): the student (on-policy),
    the teacher, or another model sharing the student's tokenizer (no gradient)."""
    from opdgeo.models import check_same_tokenizer

    policy = config.rollout.policy
    if policy == "student":
        return student
    if policy == "teacher":
        return teacher
    model, tok = load_policy(policy, init_seed=config.model.init_seed)
    check_same_tokenizer(tokenizer, tok, names=("student", "rollout.policy"))
    return inference_model(model, config, device)


def teacher_dtype(setting: str, device: torch.device) -> torch.dtype:
    """``model.teacher_dtype``: ``auto`` is bf16 where ``device`` computes bf16 natively, else fp32."""
    if setting == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return ckpt.DTYPES[setting]


def inference_model(model, config: TrainConfig, device: torch.device):
    """A scoring-only model: on ``device`` in ``model.teacher_dtype``, eval mode, no gradients
    (its log-probs enter the loss as constants, under ``torch.no_grad``). Under ``fsdp`` it
    is sharded like the student (``distributed.shard_for_inference``: 1/world per rank)."""
    dtype = teacher_dtype(config.model.teacher_dtype, device)
    if config.distributed.strategy == "fsdp":  # cast on the CPU; fully_shard moves each layer's shard to the device
        return distributed.shard_for_inference(model.to(dtype=dtype).eval().requires_grad_(False))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def activation_checkpointing_(model: torch.nn.Module) -> None:
    """Recompute every decoder layer's activations in backward (``torch.utils.checkpoint``,
    non-reentrant) instead of saving them: a layer keeps only its input for backward.
    In place; forwards without gradient (generation, scoring) run the layer as is. The
    recomputation is the same computation, so gradients are unchanged (tested)."""
    from torch.utils.checkpoint import checkpoint

    for layer in distributed.decoder_layers(model):
        inner = layer.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = forward


def _checkpoint_dtype(config: TrainConfig) -> torch.dtype:
    return ckpt.DTYPES[config.checkpoint.dtype]


def rounded_matrices(weights: Mapping[str, torch.Tensor], names, config: TrainConfig) -> dict[str, torch.Tensor]:
    """The named matrices as the checkpoints hold them: CPU, rounded to the checkpoint dtype."""
    dtype = _checkpoint_dtype(config)
    # copy=True: a float32 run's origin must not alias the live parameters it is compared with
    return {n: weights[n].detach().to(device="cpu", dtype=dtype, copy=True) for n in names}


def checkpoint_matrices(source: str, names, config: TrainConfig) -> dict[str, torch.Tensor]:
    """The named matrices of a checkpoint folder, rounded to the checkpoint dtype."""
    from opdgeo.checkpoints import open_checkpoint

    ck = open_checkpoint(source)
    missing = [n for n in names if n not in ck]
    if missing:
        raise CheckpointError(f"{source}: no tensor {missing[0]!r} (the student has it)")
    dtype = _checkpoint_dtype(config)
    return {n: ck.load(n).to(dtype) for n in names}


def origin_matrices(config: TrainConfig, student) -> dict[str, torch.Tensor]:
    """W0 of every 2-D block weight, in the checkpoint dtype: the geometry monitor's and the
    projection's origin. ``project.origin`` when set, else the student as loaded (before any
    resume or restart), i.e. ``model.student`` (SPEC §2: the run's origin)."""
    from opdgeo.checkpoints import is_geometry_matrix

    params = dict(student.named_parameters())
    names = [n for n, p in params.items() if is_geometry_matrix(n, tuple(p.shape))]
    source = config.project.origin
    if source is None or source == config.model.student:
        return rounded_matrices(params, names, config)
    if Path(source).expanduser().is_dir():
        return checkpoint_matrices(source, names, config)
    model, _ = load_policy(source, init_seed=config.model.init_seed)
    return rounded_matrices(dict(model.named_parameters()), names, config)


def start_from_checkpoint(student, source: str) -> int:
    """Load a step folder into the student (the fp32 master weights of its ``trainer_state/``
    when present, else its weights) and return its step (from ``trainer_state`` or the folder name).

    Raises:
        CheckpointError: unreadable weights, or tensors that do not fit the student.
    """
    from opdgeo.checkpoints import open_checkpoint

    folder = Path(source)
    if (folder / "trainer_state" / "state.json").is_file():
        state = ckpt.load_trainer_state(folder)
        weights, step = dict(state.master), state.step
    else:
        ck = open_checkpoint(folder)
        weights = {n: ck.load(n) for n in ck.names()}
        m = ckpt.STEP_RE.match(folder.name)
        step = int(m.group(1)) if m else 0
    own = student.state_dict()
    tied = {"lm_head.weight"} if getattr(student.config, "tie_word_embeddings", False) else set()
    problems = sorted(set(own) - set(weights) - tied)[:3] + sorted(set(weights) - set(own))[:3]
    problems += [n for n in weights if n in own and tuple(weights[n].shape) != tuple(own[n].shape)][:3]
    if problems:
        raise CheckpointError(f"{folder}: weights do not fit the student (e.g. {', '.join(problems)})")
    with torch.no_grad():
        for n, w in weights.items():
            own[n].copy_(w.to(own[n].dtype))
    return step


def adamw(params, o: OptimConfig) -> torch.optim.AdamW:
    """AdamW of ``optim`` over ``params``, fused (one kernel per parameter) on CPU and CUDA:
    the multi-tensor (foreach) update of a 135M-parameter model took 5-8x longer on CPU."""
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                for p in params)
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.adam_eps, weight_decay=o.weight_decay,
                             fused=fused or None)


def restart_optimizer_state(optimizer, student, folder: str) -> None:
    """A projected restart continues with the AdamW state its checkpoint saved for the
    matrices it trains (``projection.carry_optimizer_state``); fresh without ``trainer_state/``."""
    if not (Path(folder) / "trainer_state" / "state.json").is_file():
        return
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    carry_optimizer_state(optimizer, ckpt.load_trainer_state(folder).optimizer,
                          [n for n, _ in student.named_parameters()], names)


