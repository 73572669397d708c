"""Fused tensors split into logical per-matrix tensors, by the model's ``config.json``.

==============================================  ==============================================
stored (weight, and bias where there is one)    split into
==============================================  ==============================================
Phi-3 ``self_attn.qkv_proj``                    ``q_proj``, ``k_proj``, ``v_proj``: rows
                                                [q; k; v], q = heads·head_dim, k = v =
                                                kv_heads·head_dim
Phi-3 ``mlp.gate_up_proj``                      ``gate_proj``, ``up_proj``: row halves
                                                [gate; up] (``chunk(2)`` in the model)
GPT-NeoX ``attention.query_key_value``          ``q_proj``, ``k_proj``, ``v_proj``: rows
                                                interleaved per head [h, (q,k,v), head_dim]
GPT-2 ``attn.c_attn`` (Conv1D, [in, 3n])        ``q_proj``, ``k_proj``, ``v_proj``: column
                                                thirds, kept in Conv1D orientation [in, n]
``mlp.experts.gate_up_proj`` [E, ·, ·]          ``mlp.experts.<e>.gate_proj.weight`` and
                                                ``…up_proj.weight``, e = 0..E−1
``mlp.experts.down_proj`` [E, ·, ·]             ``mlp.experts.<e>.down_proj.weight``
``…gate_up_proj_bias`` / ``…down_proj_bias``    ``…<e>.gate_proj.bias`` etc.
==============================================  ==============================================

Fused experts are how transformers ≥ 5 holds a mixture-of-experts layer in memory (and
how some original checkpoints store it, e.g. gpt-oss). The split gives every expert the
names and the ``[out, in]`` orientation of the per-expert layout that ``save_pretrained``
writes (``mlp.experts.<e>.gate_proj.weight``), so both layouts of one model give the same
logical tensors. The layout is chosen by ``config["model_type"]`` (``EXPERT_LAYOUTS``):

- ``"concatenated"`` (the default: Qwen2/Qwen3-MoE, Mixtral, DeepSeek, OLMoE… in
  transformers ≥ 5): ``gate_up_proj`` [E, 2I, H], expert e's gate = rows ``[:I]`` and up =
  rows ``[I:]`` of ``gate_up_proj[e]``; ``down_proj`` [E, H, I];
- ``"interleaved"`` (gpt-oss): ``gate_up_proj`` [E, H, 2I] in ``x @ W`` orientation, gate
  = columns ``0::2`` and up = columns ``1::2``, transposed to [I, H]; ``down_proj``
  [E, I, H], transposed to [H, I].

E, I and H come from the config (``num_experts`` | ``num_local_experts`` |
``n_routed_experts``; ``moe_intermediate_size`` | ``intermediate_size``; ``hidden_size``)
and must match the tensor's shape. Each expert's part reads only that expert's slice of
the fused tensor (a byte range of a safetensors file), so memory stays bounded by a few
matrices however many experts there are. A fused tensor whose split the config cannot
determine raises ``CheckpointError``.
"""

from __future__ import annotations

from opdgeo.checkpoints.tensors import DerivedSource, Source, rows
from opdgeo.errors import CheckpointError

__all__ = ["EXPERT_LAYOUTS", "split_fused"]

# model_type -> gate/up layout of fused expert tensors; anything else is "concatenated".
EXPERT_LAYOUTS = {"gpt_oss": "interleaved"}
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
_INTERMEDIATE_KEYS = ("moe_intermediate_size", "intermediate_size")


def _config_int(config: dict, keys: tuple[str, ...], name: str, where: str) -> int:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise CheckpointError(
        f"{where}: cannot split fused tensor {name}: config.json has no valid {' or '.join(map(repr, keys))}"
    )


def _row_parts(source: Source, sizes: list[int]) -> list[Source]:
    """Consecutive dim-0 blocks of ``sizes`` rows (a safetensors source slices its bytes)."""
    parts, start = [], 0
    for n in sizes:
        parts.append(rows(source, start, start + n, source.shape[1:]))
        start += n
    return parts


def _split_qkv(prefix: str, param: str, name: str, source: Source, config: dict) -> dict[str, Source]:
    """Phi-3 ``qkv_proj``: [q; k; v] on dim 0."""
    heads = _config_int(config, ("num_attention_heads",), name, source.where)
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or _config_int(config, ("hidden_size",), name, source.where) // heads
    sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    if sum(sizes) != source.shape[0]:
        raise CheckpointError(
            f"{source.where}: cannot split fused tensor {name}: config gives q/k/v rows "
            f"{sizes} (sum {sum(sizes)}) but the tensor has {source.shape[0]} rows"
        )
    names = [f"{prefix}.{m}.{param}" for m in ("q_proj", "k_proj", "v_proj")]
    return dict(zip(names, _row_parts(source, sizes)))


def _split_gate_up(prefix: str, param: str, name: str, source: Source, config: dict) -> dict[str, Source]:
    """Phi-3 ``gate_up_proj``: [gate; up] on dim 0 (``chunk(2)``)."""
    rows_ = source.shape[0]
    inter = config.get("intermediate_size")
    if rows_ % 2 or (inter is not None and 2 * inter != rows_):
        raise CheckpointError(
            f"{source.where}: cannot split fused tensor {name}: {rows_} rows are not "
            f"2 x intermediate_size ({inter})"
        )
    names = [f"{prefix}.{m}.{param}" for m in ("gate_proj", "up_proj")]
    return dict(zip(names, _row_parts(source, [rows_ // 2, rows_ // 2])))


def _split_neox(prefix: str, param: str, name: str, source: Source, config: dict) -> dict[str, Source]:
    """GPT-NeoX ``query_key_value``: [heads, (q, k, v), head_dim] on dim 0."""
    shape = source.shape
    heads = _config_int(config, ("num_attention_heads",), name, source.where)
    if shape[0] % (3 * heads):
        raise CheckpointError(
            f"{source.where}: cannot split fused tensor {name}: {shape[0]} rows are not "
            f"3 x num_attention_heads ({heads}) x head_dim"
        )
    head_dim = shape[0] // (3 * heads)
    out = {}
    for j, module in enumerate(("q_proj", "k_proj", "v_proj")):
        fn = lambda t, j=j: t.reshape(heads, 3, head_dim, *t.shape[1:])[:, j].reshape(heads * head_dim, *t.shape[1:])
        out[f"{prefix}.{module}.{param}"] = DerivedSource(source, (heads * head_dim,) + shape[1:], fn, "qkv"[j] + " part")
    return out


def _split_c_attn(prefix: str, param: str, name: str, source: Source, config: dict) -> dict[str, Source]:
    """GPT-2 Conv1D ``c_attn``: [in, 3n], ``split(n, dim=-1)``."""
    shape = source.shape
    if shape[-1] % 3:
        raise CheckpointError(f"{source.where}: cannot split fused tensor {name}: last dim {shape[-1]} is not 3 x n_embd")
    n = shape[-1] // 3
    out = {}
    for j, module in enumerate(("q_proj", "k_proj", "v_proj")):
        fn = lambda t, j=j: t[..., j * n:(j + 1) * n]
        out[f"{prefix}.{module}.{param}"] = DerivedSource(source, shape[:-1] + (n,), fn, "qkv"[j] + " part")
    return out


def _expert_sizes(name: str, source: Source, config: dict) -> tuple[int, int, int, str]:
    where = source.where
    E = _config_int(config, _EXPERT_KEYS, name, where)
    inter = _config_int(config, _INTERMEDIATE_KEYS, name, where)
    hidden = _config_int(config, ("hidden_size",), name, where)
    return E, inter, hidden, EXPERT_LAYOUTS.get(config.get("model_type"), "concatenated")


def _expected_shape(fused: str, is_bias: bool, E: int, inter: int, hidden: int, layout: str) -> tuple[int, ...]:
    if is_bias:
        return (E, 2 * inter) if fused == "gate_up_proj" else (E, hidden)
    if fused == "gate_up_proj":
        return (E, 2 * inter, hidden) if layout == "concatenated" else (E, hidden, 2 * inter)
    return (E, hidden, inter) if layout == "concatenated" else (E, inter, hidden)


def _expert_parts(fused: str, is_bias: bool, expert: Source, inter: int, layout: str) -> dict[str, Source]:
    """One expert's logical tensors from its slice ``expert`` of the fused tensor."""
    if fused == "down_proj":
        if layout == "concatenated" or is_bias:
            return {"down_proj": expert}
        return {"down_proj": DerivedSource(expert, expert.shape[::-1], lambda t: t.T, "transposed")}
    if layout == "concatenated":  # [2I, H] (or [2I] bias): gate rows first, then up
        gate, up = _row_parts(expert, [inter, inter])
        return {"gate_proj": gate, "up_proj": up}
    out = {}
    for j, module in enumerate(("gate_proj", "up_proj")):  # gate = [..., 0::2], up = [..., 1::2]
        if is_bias:
            out[module] = DerivedSource(expert, (inter,), lambda t, j=j: t[j::2], f"{module} entries {j}::2")
        else:
            out[module] = DerivedSource(expert, (inter, expert.shape[0]), lambda t, j=j: t[:, j::2].T,
                                        f"{module} columns {j}::2, transposed")
    return out


def _split_experts(prefix: str, fused: str, is_bias: bool, name: str, source: Source, config: dict) -> dict[str, Source]:
    """``experts.gate_up_proj`` / ``experts.down_proj`` (and ``_bias``): one part per expert."""
    E, inter, hidden, layout = _expert_sizes(name, source, config)
    want = _expected_shape(fused, is_bias, E, inter, hidden, layout)
    if tuple(source.shape) != want:
        raise CheckpointError(
            f"{source.where}: cannot split the fused experts: shape {list(source.shape)}, but config.json "
            f"({layout} layout, {E} experts, intermediate {inter}, hidden {hidden}) gives {list(want)}"
        )
    param = "bias" if is_bias else "weight"
    out = {}
    per_expert = want[1]  # rows of [E * want[1], *want[2:]] that hold one expert
    for e in range(E):
        expert = rows(source, e * per_expert, (e + 1) * per_expert, want[2:])  # [*want[1:]], its bytes only
        for module, part in _expert_parts(fused, is_bias, expert, inter, layout).items():
            out[f"{prefix}.{e}.{module}.{param}"] = part
    return out


def split_fused(name: str, source: Source, config: dict) -> dict[str, Source] | None:
    """``{logical name: source}`` if ``name`` is a supported fused tensor, else None."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in ("gate_up_proj", "down_proj") and len(source.shape) == 3:
        parts = parts[:-1]  # experts.gate_up_proj.weight: the same fused tensor
    if len(parts) >= 2 and parts[-2] == "experts":
        fused = parts[-1].removesuffix("_bias")
        is_bias = parts[-1].endswith("_bias")
        if fused in ("gate_up_proj", "down_proj") and len(source.shape) == (2 if is_bias else 3):
            return _split_experts(".".join(parts[:-1]), fused, is_bias, name, source, config)
    if len(parts) < 3 or parts[-1] not in ("weight", "bias"):
        return None
    module, parent, param = parts[-2], parts[-3], parts[-1]
    prefix = ".".join(parts[:-2])
    if module == "qkv_proj":
        return _split_qkv(prefix, param, name, source, config)
    if module == "gate_up_proj":
        return _split_gate_up(prefix, param, name, source, config)
    if module == "query_key_value":
        return _split_neox(prefix, param, name, source, config)
    if module == "c_attn" and parent == "attn":
        return _split_c_attn(prefix, param, name, source, config)
    return None
