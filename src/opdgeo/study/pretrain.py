"""Pretraining of the study's base models on raw text (the arithmetic pretraining corpus).

The training core trains on (prompt, response) pairs with the prompt masked; a base model
is built by plain next-token prediction on unstructured documents, which the core does
not take. This is that small loop, read top to bottom: pack documents into blocks →
causal-LM loss on every token → AdamW step. **(our choice: a constant learning rate after
a 10 % linear warmup, blocks of ``block_size`` tokens, documents separated by EOS)**
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["PretrainStats", "pack_documents", "pretrain"]


@dataclass(frozen=True)
class PretrainStats:
    """Outcome of `pretrain`: losses of the first and last steps and the wall time."""

    steps: int
    first_loss: float
    last_loss: float
    seconds: float


def pack_documents(token_ids: Sequence[Sequence[int]], eos_id: int, block_size: int) -> torch.Tensor:
    """Concatenate documents (each followed by EOS) and cut into full blocks.

    Args:
        token_ids: token ids of each document.
        eos_id: id appended after every document.
        block_size: tokens per block (>= 2).

    Returns:
        [n_blocks, block_size] long tensor (the ragged tail is dropped).

    Raises:
        ValueError: block_size < 2 or not enough tokens for one block.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2; got {block_size}")
    flat: list[int] = []
    for ids in token_ids:
        flat.extend(ids)
        flat.append(eos_id)
    n = len(flat) // block_size
    if n == 0:
        raise ValueError(f"corpus has {len(flat)} tokens, fewer than one block of {block_size}")
    return torch.tensor(flat[: n * block_size], dtype=torch.long).view(n, block_size)  # [N, L]


def pretrain(
    model,
    tokenizer,
    documents: Sequence[str],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    block_size: int = 128,
    seed: int = 0,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.98),
    log: Callable[[str], None] | None = None,
) -> PretrainStats:
    """Train ``model`` in place by next-token prediction on ``documents``.

    Loss: mean token cross-entropy of the causal LM over each block (HF ``labels=input_ids``).
    Batches are drawn by a seeded permutation of the blocks, cycling as needed.

    Args:
        model: a causal LM (float32), trained in place.
        tokenizer: its tokenizer (``eos_token_id`` separates documents).
        documents: raw text documents.
        steps: optimizer steps (0: no training).
        lr: peak learning rate (linear warmup over the first 10 % of steps).
        batch_size: blocks per step.
        block_size: tokens per block.
        seed: batch-order seed.
        weight_decay, betas: AdamW settings.
        log: when given, progress is shown (``training.progress.StepProgress``: a bar on a
            terminal, a plain line at least every 30 s in a log).

    Returns:
        `PretrainStats`.
    """
    t0 = time.perf_counter()
    if steps <= 0:
        return PretrainStats(0, math.nan, math.nan, 0.0)
    ids = [tokenizer.encode(d, add_special_tokens=False) for d in documents]
    blocks = pack_documents(ids, tokenizer.eos_token_id, block_size)  # [N, L]
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(blocks), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=betas, fused=True)
    warmup = max(1, steps // 10)
    model.train()
    from opdgeo.training.progress import StepProgress

    with StepProgress("pretrain", steps, enabled=log is not None) as progress:
        first, last = _pretrain_steps(model, blocks, order, gen, opt, steps=steps, lr=lr, warmup=warmup,
                                      batch_size=batch_size, progress=progress)
    model.eval()
    return PretrainStats(steps, first, last, time.perf_counter() - t0)


def _pretrain_steps(model, blocks, order, gen, opt, *, steps, lr, warmup, batch_size, progress):
    """The optimizer steps of ``pretrain``; returns the first and last loss."""
    pos = 0
    first = last = math.nan
    for step in range(steps):
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(blocks), generator=gen), 0
        batch = blocks[order[pos : pos + batch_size]]  # [B, L]
        pos += batch_size
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        last = float(loss.detach())
        if step == 0:
            first = last
        progress.update(step + 1, {"train/loss": last})
    return first, last
