"""Tensor-name parsing: which layer and which module type a checkpoint tensor belongs to.

Covers the naming of Llama, Mistral, Qwen2/Qwen3, SmolLM (Llama naming), Phi-3, Meta's
original Llama (``wq``/``w1``...), GPT-NeoX/Pythia and GPT-2, and the mixture-of-experts
layers of Qwen2/Qwen3-MoE, Mixtral, DeepSeek and gpt-oss. Anything not recognised is type
``"other"``.

Mixture of experts:

- an expert's matrices keep their type (``gate``, ``up``, ``down``) and carry the
  expert: ``…mlp.experts.<e>.gate_proj.weight`` (Mixtral ``block_sparse_moe.experts.<e>.w1``)
  has ``expert = e``;
- a *shared* expert (Qwen2-MoE ``mlp.shared_expert.*``, DeepSeek ``mlp.shared_experts.*``),
  which every token passes through, is marked ``expert = "shared"``;
- the router, which scores the experts for each token, is type ``"router"``: Qwen/DeepSeek
  ``mlp.gate.weight``, Mixtral ``block_sparse_moe.gate.weight``, gpt-oss
  ``mlp.router.weight``, Qwen2-MoE's ``mlp.shared_expert_gate.weight`` (the shared
  expert's gate, marked ``"shared"``) and DeepSeek's ``mlp.gate.e_score_correction_bias``.
  Routers are not in the geometry matrix set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TYPES = ("q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head", "norm", "other", "router")
GEOMETRY_TYPES = ("q", "k", "v", "o", "gate", "up", "down")
ATTENTION_TYPES = ("q", "k", "v", "o")

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_EXPERT_RE = re.compile(r"(?:^|\.)experts\.(\d+)(?:\.|$)")
_SHARED_RE = re.compile(r"(?:^|\.)(?:shared_experts?|shared_expert_gate)(?:\.|$)")
_MOE_PARENTS = {"mlp", "block_sparse_moe", "moe", "feed_forward", "ffn"}
_PARAM_SUFFIXES = ("weight", "bias", "scale")

# Module name (the component before ``.weight``/``.bias``) -> type, regardless of parent.
_MODULE_TYPES = {
    "q_proj": "q", "wq": "q", "query": "q", "q": "q",
    "k_proj": "k", "wk": "k", "key": "k", "k": "k",
    "v_proj": "v", "wv": "v", "value": "v", "v": "v",
    "o_proj": "o", "wo": "o", "out_proj": "o",
    "gate_proj": "gate", "w1": "gate",
    "up_proj": "up", "w3": "up", "dense_h_to_4h": "up", "c_fc": "up", "fc1": "up",
    "down_proj": "down", "w2": "down", "dense_4h_to_h": "down", "fc2": "down",
    "embed_tokens": "embed", "wte": "embed", "wpe": "embed", "embed_in": "embed",
    "tok_embeddings": "embed", "word_embeddings": "embed",
    "lm_head": "lm_head", "embed_out": "lm_head",
}
# Modules whose type depends on the parent: attention output vs MLP output projection.
_ATTENTION_PARENTS = {"self_attn", "attn", "attention", "self_attention"}


@dataclass(frozen=True)
class TensorName:
    """What a tensor name says about the tensor.

    Attributes:
        layer: index of the transformer block (``model.layers.<layer>``), ``None`` outside
            the blocks (embeddings, final norm, lm_head).
        type: one of ``TYPES``.
        expert: the routed expert's index (``…experts.<e>.…``), ``"shared"`` for a shared
            expert (and its gate), ``None`` outside the experts.
    """

    layer: int | None
    type: str
    expert: int | str | None = None


def parse_tensor_name(name: str) -> TensorName:
    """Parse a checkpoint tensor name into its block index and module type.

    Rules, in order: any module component containing ``norm`` or starting with ``ln``
    is ``"norm"`` (so Qwen3's ``q_norm`` is a norm, not ``q``); the module name before
    ``.weight``/``.bias`` is looked up in a table (``q_proj``, ``wq``, ``query``, ...);
    ``dense``/``c_proj`` are ``"o"`` under an attention module and ``"down"`` under an MLP;
    Meta-Llama's top-level ``output.weight`` is ``"lm_head"``; a mixture-of-experts router
    is ``"router"`` (module docstring); everything else ``"other"`` (including fused
    ``qkv_proj``/``query_key_value``/``c_attn``/``gate_up_proj`` that were not split, and
    buffers such as ``rotary_emb.inv_freq``). ``expert`` is read from ``experts.<e>`` and
    ``shared_expert(s)`` components.

    Args:
        name: a tensor name such as ``model.layers.3.self_attn.q_proj.weight``.

    Returns:
        ``TensorName(layer, type, expert)``.
    """
    match = _LAYER_RE.search(name)
    layer = int(match.group(1)) if match else None
    expert_match = _EXPERT_RE.search(name)
    expert = int(expert_match.group(1)) if expert_match else ("shared" if _SHARED_RE.search(name) else None)
    parts = name.split(".")
    if len(parts) > 1 and parts[-1] in _PARAM_SUFFIXES:
        parts = parts[:-1]
    module = parts[-1] if parts else ""
    parent = parts[-2] if len(parts) > 1 else ""
    return TensorName(layer, _module_type(module, parent, layer, len(parts), expert), expert)


def _module_type(module: str, parent: str, layer: int | None, depth: int, expert) -> str:
    if "norm" in module or module.startswith("ln_") or module == "ln":
        return "norm"
    if module in _MODULE_TYPES:
        return _MODULE_TYPES[module]
    if module in ("dense", "c_proj"):
        return "o" if parent in _ATTENTION_PARENTS else "down"
    if module == "output" and layer is None and depth == 1:
        return "lm_head"
    if expert is None and ((module == "gate" and parent in _MOE_PARENTS) or (module == "router" and parent in _MOE_PARENTS)):
        return "router"
    if module == "shared_expert_gate" or (module == "e_score_correction_bias" and parent == "gate"):
        return "router"
    return "other"


def is_geometry_matrix(name: str, shape: tuple) -> bool:
    """True iff the tensor is a 2-D weight of a transformer block (SPEC §1 geometry set).

    The geometry set is every 2-D weight of types q, k, v, o, gate, up, down (a fused qkv
    is split into q, k, v by the reader first). Embeddings and lm_head are excluded.

    Args:
        name: tensor name.
        shape: the tensor's shape.
    """
    return len(tuple(shape)) == 2 and parse_tensor_name(name).type in GEOMETRY_TYPES
