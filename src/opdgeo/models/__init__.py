"""Models and tokenizers: tiny Qwen3 factory, char tokenizer, local loading, SmolLM2 export."""

from opdgeo.models.factory import PRESETS, Qwen3Preset, build_model, num_parameters, tiny_qwen3_config
from opdgeo.models.loading import (
    check_same_tokenizer,
    export_smollm2,
    load_model,
    load_tokenizer,
    model_and_tokenizer,
    resolve_source,
    smollm2_gguf_path,
)
from opdgeo.models.tokenizer import CHAR_VOCAB, SPECIAL_TOKENS, char_tokenizer

__all__ = [
    "CHAR_VOCAB", "PRESETS", "Qwen3Preset", "SPECIAL_TOKENS", "build_model", "char_tokenizer",
    "check_same_tokenizer", "export_smollm2", "load_model", "load_tokenizer", "model_and_tokenizer", "num_parameters",
    "resolve_source", "smollm2_gguf_path", "tiny_qwen3_config",
]
