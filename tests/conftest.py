"""Shared fixtures: tiny Qwen3 checkpoints saved by transformers itself."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests use tiny tensors: one intra-op thread avoids OpenMP spin overhead (and, on a shared
# 2-core box, 50x slowdowns from oversubscription). Subprocesses inherit it via the env.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def save_tiny_qwen3(
    path: Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str | None = None,
    perturb: dict[str, torch.Tensor] | None = None,
    tie_word_embeddings: bool = True,
    num_hidden_layers: int = 2,
) -> Path:
    """Build a tiny random Qwen3ForCausalLM and save it with ``save_pretrained``.

    ``perturb`` maps parameter names to tensors added to them before saving, so a test
    knows exactly which entries differ from the unperturbed checkpoint of the same seed.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    if perturb:
        state = model.state_dict()
        with torch.no_grad():
            for name, delta in perturb.items():
                state[name].add_(delta.to(state[name].dtype))
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return Path(path)


@pytest.fixture(scope="session")
def tiny_qwen3_factory():
    return save_tiny_qwen3


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """A different tiny model (seed 1) with the same character tokenizer, saved as a HF folder:
    the teacher of the training tests."""
    from opdgeo.models import build_model, char_tokenizer, tiny_qwen3_config

    tok = char_tokenizer()
    path = tmp_path_factory.mktemp("teacher")
    build_model(tiny_qwen3_config("quick", len(tok)), seed=1).save_pretrained(path)
    tok.save_pretrained(path)
    return path
