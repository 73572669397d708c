"""What each step trains on, as pure functions of the run's seed: the learning rate, the
prompts of a step, the seeds of its micro-batches, which micro-batches a rank takes, and
the PPO mini-batches of each inner pass.

Everything here depends only on its arguments (never on the rank or on state), so a
resumed run sees the same data as an uninterrupted one, and the union over ranks is the
single-process batch. ``demonstration_batch`` tokenizes SFT pairs into the rollout layout.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import torch

from opdgeo.errors import ConfigError
from opdgeo.training.config import OptimConfig

__all__ = [
    "learning_rate",
    "step_prompts",
    "micro_batch_seed",
    "generation_units",
    "micro_batches_per_call",
    "sparsify_seed",
    "rank_micro_batches",
    "num_mini_batches",
    "mini_batch_share",
    "mini_batch_order",
    "demonstration_batch",
]


def _derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (sha256; stable across processes and runs)."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


def learning_rate(step: int, *, lr: float, steps: int, schedule: str, warmup_steps: int, min_lr: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Warmup: ``lr·(step+1)/warmup_steps`` for ``step < warmup_steps``. Then ``constant``:
    ``lr``; ``cosine``: ``min_lr + (lr-min_lr)·(1+cos(π·p))/2`` with
    ``p = (step-warmup_steps)/(steps-warmup_steps-1)`` (so the last step uses ``min_lr``).
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    span = steps - warmup_steps - 1
    p = 1.0 if span <= 0 else min(1.0, (step - warmup_steps) / span)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))


def step_prompts(num_problems: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Problem indices of step ``step`` (0-based): epochs of seeded permutations, concatenated.

    Position ``step·batch_size + i`` of the stream is element ``(pos mod n)`` of the
    permutation of epoch ``pos // n`` (seeded by (seed, epoch)). A pure function of its
    arguments, so a resumed run sees the same data as an uninterrupted one.
    """
    out = []
    cache: dict[int, list[int]] = {}
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, num_problems)
        if epoch not in cache:
            g = torch.Generator().manual_seed(_derive_seed("epoch", seed, epoch))
            cache[epoch] = torch.randperm(num_problems, generator=g).tolist()
        out.append(cache[epoch][i])
    return out


def micro_batch_seed(seed: int, step: int, index: int) -> int:
    """Generation seed of micro-batch ``index`` of step ``step`` (independent of the rank)."""
    return _derive_seed("rollout", seed, step, index) % (2**31 - 1)


def sparsify_seed(seed: int, step: int, index: int) -> int:
    """Seed of the random token mask of micro-batch ``index`` of step ``step`` (rank-independent)."""
    return _derive_seed("token_keep", seed, step, index)


def rank_micro_batches(num_micro_batches: int, rank: int, world: int) -> range:
    """The micro-batches (indices in the global batch) that rank ``rank`` of ``world`` takes."""
    if num_micro_batches % world:
        raise ConfigError(
            f"optim.batch_size / optim.micro_batch_size = {num_micro_batches} micro-batches cannot be split "
            f"evenly over {world} processes"
        )
    k = num_micro_batches // world
    return range(rank * k, (rank + 1) * k)


def micro_batches_per_call(rollout_micro_batch_size: int | None, optim: OptimConfig, *, demonstrations: bool) -> int:
    """Micro-batches one ``generate`` call samples (1 for demonstrations)."""
    if demonstrations or not rollout_micro_batch_size:
        return 1
    return rollout_micro_batch_size // optim.micro_batch_size


def generation_units(positions: range, per_unit: int, world: int) -> list[range]:
    """This rank's micro-batches (``positions``) grouped into generation calls of
    ``per_unit`` consecutive micro-batches (``rollout.micro_batch_size / optim.micro_batch_size``),
    each starting at a multiple of ``per_unit``, so every call is the same on any number of
    processes.

    Raises:
        ConfigError: a rank's micro-batches do not split into whole calls.
    """
    if len(positions) % per_unit or positions.start % per_unit:
        raise ConfigError(
            f"rollout.micro_batch_size: {per_unit} micro-batches per generate call do not divide the "
            f"{len(positions)} micro-batches of each of {world} processes"
        )
    return [range(c, c + per_unit) for c in positions[::per_unit]]


def num_mini_batches(optim: OptimConfig) -> int:
    """Optimizer steps per pass over a rollout batch: ``batch_size / ppo_mini_batch_size`` (1 by default)."""
    return optim.batch_size // (optim.ppo_mini_batch_size or optim.batch_size)


def mini_batch_share(num_micro_batches: int, optim: OptimConfig, world: int) -> int:
    """Micro-batches of one mini-batch that each of ``world`` ranks takes.

    Raises:
        ConfigError: a mini-batch's micro-batches do not split evenly over the processes.
    """
    per_mini = num_micro_batches // num_mini_batches(optim)
    if per_mini % world:
        raise ConfigError(f"optim.ppo_mini_batch_size / optim.micro_batch_size = {per_mini} micro-batches per "
                          f"mini-batch cannot be split evenly over {world} processes")
    return per_mini // world


def mini_batch_order(num_micro_batches: int, num_mini: int, *, seed: int, step: int, epoch: int) -> list[tuple[int, ...]]:
    """The mini-batches of inner pass ``epoch`` of step ``step``, in the order they are
    stepped: each a tuple of global micro-batch positions (ascending).

    One mini-batch is every micro-batch in order (today's single step). Otherwise the
    positions are cut into consecutive blocks of ``num_mini`` and a permutation σ_b of each
    block, drawn from a generator seeded by (run seed, step, epoch), sends the block's i-th
    micro-batch to mini-batch σ_b[i]. Every mini-batch thus holds one micro-batch of each
    block, so on any number of ranks over which a mini-batch splits evenly (each rank's
    micro-batches are a run of whole blocks) every rank holds the same share of every
    mini-batch, and 2 ranks step through the same mini-batches as 1 process. A pure function
    of its arguments: a resumed run takes the same steps.
    """
    if num_mini == 1:
        return [tuple(range(num_micro_batches))]
    g = torch.Generator().manual_seed(_derive_seed("mini_batch", seed, step, epoch))
    members: list[list[int]] = [[] for _ in range(num_mini)]
    for block in range(0, num_micro_batches, num_mini):
        for i, j in enumerate(torch.randperm(num_mini, generator=g).tolist()):
            members[j].append(block + i)
    return [tuple(m) for m in members]


def demonstration_batch(tokenizer, prompts: Sequence[str], responses: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokenize SFT pairs into the rollout layout: ``(input_ids, attention_mask, response_mask)``.

    Prompts are left-padded to the longest prompt ``P``, responses (with ``eos_token``
    appended) right-padded to the longest response ``T``: ``input_ids [n, P+T]``,
    ``response_mask [n, T]`` True on response tokens (EOS included).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token or ""
    p_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    r_ids = [tokenizer(r + eos, add_special_tokens=False)["input_ids"] for r in responses]
    P, T = max(map(len, p_ids)), max(map(len, r_ids))
    n = len(p_ids)
    input_ids = torch.full((n, P + T), pad, dtype=torch.long)
    attention = torch.zeros((n, P + T), dtype=torch.long)
    response_mask = torch.zeros((n, T), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(p_ids, r_ids)):
        input_ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        input_ids[i, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
        attention[i, P - len(p):P + len(r)] = 1
        response_mask[i, :len(r)] = True
    return input_ids, attention, response_mask


