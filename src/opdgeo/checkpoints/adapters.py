"""PEFT LoRA adapters as the tuned side: the merged model, one tensor at a time, never built.

A folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (what
``PeftModel.save_pretrained`` writes, and what a transformers/TRL ``checkpoint-N`` of a
LoRA run holds) opens as an ``AdapterCheckpoint`` over its base ``Checkpoint``: the same
names and shapes as the base, and ``load(name)`` returns the weight that
``merge_and_unload()`` followed by ``save_pretrained`` would store:

    W_merged = W_base + s · B A,      s = α / r   (``use_rslora``: α / √r)

for every LoRA target (``...lora_A.weight`` [r, n], ``...lora_B.weight`` [m, r]; r read
from A, α from ``lora_alpha`` or ``alpha_pattern``; ``fan_in_fan_out`` transposes B A),
computed as peft merges on CPU: B A in float32 when the adapter is stored in bf16/fp16
(then rounded back to that dtype), scaled, and added to W in their promoted dtype, the sum
stored in the base weight's dtype. Tensors the adapter stores whole (``modules_to_save``)
replace the base's; every other tensor is the base's own. So compare and trajectory read
an adapter exactly as they read the merged copy — the bf16 rule applies to the merged
weights — while memory stays one matrix and its two factors.

Not supported (``CheckpointError``): other PEFT methods than LoRA, DoRA
(``use_dora``: its magnitude vector changes the merge), embedding / convolution LoRA.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import torch

from opdgeo.checkpoints.reader import read_json_object
from opdgeo.errors import CheckpointError

__all__ = ["ADAPTER_CONFIG", "AdapterCheckpoint", "is_adapter", "open_adapter"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def is_adapter(path) -> bool:
    """True for a folder holding a PEFT adapter (``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _config(folder: Path) -> dict:
    path = folder / ADAPTER_CONFIG
    config = read_json_object(path)
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise CheckpointError(f"{path}: peft_type {kind} is not supported (LoRA adapters only)")
    if config.get("use_dora"):
        raise CheckpointError(f"{path}: DoRA adapters (use_dora) are not supported")
    return config


def _alpha(config: dict, module: str) -> float:
    """``lora_alpha``, or the ``alpha_pattern`` entry whose key matches the module name (as peft)."""
    for key, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(value)
    return float(config.get("lora_alpha", 8))


class AdapterCheckpoint:
    """The merged model of a LoRA adapter over its base (module docstring); a ``Checkpoint``
    for every reader (``names``, ``info``, ``load``, ``content_key``)."""

    def __init__(self, folder: Path, base, config: dict, tensors: dict[str, object]):
        self.path = folder
        self.base = base
        self.config = base.config
        self.aliases = dict(base.aliases)
        self.adapter_config = config
        self._stored = tensors  # adapter name -> StoredTensor
        self._lora: dict[str, tuple[str, str]] = {}  # base name -> (A key, B key)
        self._whole: dict[str, str] = {}  # base name -> adapter key (modules_to_save)
        self._keys: dict[str, str] = {}
        for key in tensors:
            name = key.removeprefix(_PREFIX)
            if ".lora_A." in name:
                target = name.replace(".lora_A.", ".")
                self._lora[target] = (key, key.replace(".lora_A.", ".lora_B."))
            elif ".lora_B." in name:
                continue
            elif "lora_embedding" in name or "lora_magnitude" in name:
                raise CheckpointError(f"{folder}: {key}: embedding LoRA and DoRA are not supported")
            else:
                self._whole[name.replace(".modules_to_save.default.", ".").replace(".original_module.", ".")] = key
        for target, (a, b) in self._lora.items():
            if b not in tensors:
                raise CheckpointError(f"{folder}: {a} has no {b}")
            if target not in base:
                raise CheckpointError(f"{folder}: adapter target {target} is not a tensor of the base {base.path}")
            m, n = base.info(target).shape
            (r, n_a), (m_b, r_b) = tuple(tensors[a].shape), tuple(tensors[b].shape)
            if config.get("fan_in_fan_out"):
                m, n = n, m
            if r != r_b or n_a != n or m_b != m:
                raise CheckpointError(f"{folder}: LoRA factors of {target} have shapes [{r}, {n_a}] and "
                                      f"[{m_b}, {r_b}]; the base matrix is {list(base.info(target).shape)}")
        for name in self._whole:
            if name not in base:
                raise CheckpointError(f"{folder}: saved module {name} is not a tensor of the base {base.path}")

    def __repr__(self) -> str:
        return f"AdapterCheckpoint({str(self.path)!r} over {self.base.path}, {len(self._lora)} LoRA targets)"

    def names(self) -> list[str]:
        return self.base.names()

    def __contains__(self, name: object) -> bool:
        return name in self.base

    def __len__(self) -> int:
        return len(self.base)

    def info(self, name: str):
        return self.base.info(name)

    def lora_targets(self) -> list[str]:
        """Base tensor names the adapter's LoRA factors change."""
        return list(self._lora)

    def delta(self, name: str) -> torch.Tensor:
        """s · B A of a LoRA target, as peft's ``get_delta_weight`` computes it on CPU."""
        a_key, b_key = self._lora[name]
        a, b = self._stored[a_key].load(), self._stored[b_key].load()  # [r, n], [m, r]
        low = b.dtype in (torch.float16, torch.bfloat16)
        r = a.shape[0]
        module = name.removesuffix(".weight")
        alpha = _alpha(self.adapter_config, module)
        scale = alpha / math.sqrt(r) if self.adapter_config.get("use_rslora") else alpha / r
        d = (b.float() @ a.float()) if low else (b @ a)  # [m, n]
        if self.adapter_config.get("fan_in_fan_out"):
            d = d.T
        d = d * scale
        return d.to(b.dtype) if low else d

    def load(self, name: str) -> torch.Tensor:
        """The merged model's tensor ``name`` in the base's dtype (module docstring)."""
        if name in self._whole:
            return self._stored[self._whole[name]].load().to(self.base.info(name).dtype)
        w = self.base.load(name)
        if name not in self._lora:
            return w
        d = self.delta(name)
        common = torch.promote_types(w.dtype, d.dtype)
        return (w.to(common) + d.to(common)).to(w.dtype).contiguous()

    def content_key(self, name: str) -> str:
        """blake2b-128 of dtype, shape and bytes of the merged tensor (the key the merged
        checkpoint's ``Checkpoint.content_key`` gives)."""
        if name not in self._lora and name not in self._whole:
            return self.base.content_key(name)
        if name not in self._keys:
            t = self.load(name)
            h = hashlib.blake2b(digest_size=16)
            h.update(f"{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|".encode())
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
            self._keys[name] = h.hexdigest()
        return self._keys[name]


def open_adapter(folder, base) -> AdapterCheckpoint:
    """Open a LoRA adapter folder over ``base`` (a ``Checkpoint``, or any source
    ``open_checkpoint`` takes; default: the adapter's ``base_model_name_or_path``).

    Raises:
        CheckpointError: no or corrupt adapter files, an unsupported adapter, factors that
            do not fit the base.
    """
    from opdgeo.checkpoints.reader import open_checkpoint
    from opdgeo.checkpoints.safetensors_file import read_header
    from opdgeo.checkpoints.tensors import StoredSource

    folder = Path(folder)
    config = _config(folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{folder}: no {ADAPTER_WEIGHTS} (adapter_model.bin is not read)")
    if base is None:
        base = config.get("base_model_name_or_path")
        if not base:
            raise CheckpointError(f"{folder / ADAPTER_CONFIG}: no base_model_name_or_path; give the base checkpoint")
    if not hasattr(base, "load"):
        base = open_checkpoint(base)
    tensors = {key: StoredSource(st) for key, st in read_header(weights).items()}
    return AdapterCheckpoint(folder, base, config, tensors)
