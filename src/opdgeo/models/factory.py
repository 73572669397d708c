"""Small Qwen3-architecture models for CPU studies.

``tiny_qwen3_config`` returns a ``transformers.Qwen3Config`` from a named preset;
``build_model`` instantiates it with a fixed seed. The resulting checkpoints are plain
Hugging Face Qwen3 models: ``save_pretrained`` + ``AutoModelForCausalLM.from_pretrained``
round-trip them and every diagnostic reads them like a real Qwen3 checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

from opdgeo.errors import ConfigError


@dataclass(frozen=True)
class Qwen3Preset:
    """Shape of a tiny Qwen3 model. Parameter counts below are for the 99-token char vocab."""

    hidden_size: int
    """Residual width."""
    num_hidden_layers: int
    """Transformer blocks."""
    intermediate_size: int
    """SwiGLU MLP width (gate/up are hidden×intermediate, down is intermediate×hidden)."""
    num_attention_heads: int
    """Query heads."""
    num_key_value_heads: int
    """Key/value heads (grouped-query attention)."""
    head_dim: int
    """Per-head width (q is hidden × heads·head_dim)."""
    max_position_embeddings: int = 256
    """Longest sequence (prompt + response) the RoPE tables are sized for."""


PRESETS: dict[str, Qwen3Preset] = {
    # ~22k parameters: CI smoke tests.
    "quick": Qwen3Preset(hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16),
    # ~0.45M parameters: the study's student.
    "student": Qwen3Preset(hidden_size=128, num_hidden_layers=3, intermediate_size=256,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    # ~1.3M parameters: the study's teacher (wider and deeper than the student).
    "teacher": Qwen3Preset(hidden_size=192, num_hidden_layers=4, intermediate_size=384,
                           num_attention_heads=6, num_key_value_heads=2, head_dim=32),
}


def tiny_qwen3_config(preset: str, vocab_size: int, *, pad_token_id: int = 0, eos_token_id: int = 1,
                      tie_word_embeddings: bool = True):
    """Return a ``Qwen3Config`` for a named preset.

    Args:
        preset: one of ``PRESETS`` ("quick", "student", "teacher").
        vocab_size: number of token ids (``len(tokenizer)``).
        pad_token_id, eos_token_id: written into the config (and the generation config
            by ``build_model``); defaults match ``char_tokenizer()``.
        tie_word_embeddings: share the embedding and lm_head matrices (default True, as
            in the small Qwen3 models).

    Returns:
        ``transformers.Qwen3Config`` (float32, RoPE θ = 10000, RMSNorm ε = 1e-6).

    Raises:
        ConfigError: unknown preset or non-positive vocab_size.
    """
    from transformers import Qwen3Config

    if preset not in PRESETS:
        raise ConfigError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ConfigError(f"vocab_size must be a positive integer; got {vocab_size!r}")
    p = PRESETS[preset]
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_hidden_layers,
        num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.num_key_value_heads,
        head_dim=p.head_dim,
        max_position_embeddings=p.max_position_embeddings,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
    )


def build_model(config, *, seed: int):
    """Instantiate a causal LM from ``config`` with weights drawn under ``seed``.

    The global torch RNG is left untouched (the draw happens inside ``fork_rng``), so the
    same (config, seed) always gives bit-identical weights. The generation config gets the
    config's pad/eos ids. Returned in float32, eval mode.
    """
    import torch
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    return model.eval()


def num_parameters(model) -> int:
    """Number of distinct parameters (tied tensors counted once)."""
    return sum(p.numel() for p in model.parameters())
