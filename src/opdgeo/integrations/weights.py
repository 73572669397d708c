"""A training model's weights by checkpoint name, one full matrix at a time.

Callbacks of other trainers see the model as the trainer holds it: plain, wrapped by DDP
(``module.``), compiled (``_orig_mod.``), checkpoint-wrapped, or sharded. ``named_matrices``
maps each parameter to the name ``save_pretrained`` writes (the wrapper prefixes
stripped), and ``full_matrix`` returns the whole tensor of one parameter:

- a plain or DDP-replicated parameter: itself (detached), no communication;
- an FSDP2 (``fully_shard``) parameter, a ``DTensor``: ``full_tensor()``, an all-gather
  of that one parameter — a collective, so every rank must call it, in the same order;
- a DeepSpeed ZeRO-3 parameter (it carries ``ds_id``): gathered with
  ``deepspeed.zero.GatheredParameters`` for the duration of the copy — also collective.

So the memory held beyond the model's own shards is one matrix, never the whole model.

A PEFT LoRA model (``get_peft_model``) is seen as its merged model: each LoRA layer's
matrix is W + s·B·A (``LoraMatrix``, peft's own ``get_delta_weight`` of the active
adapter) under the base's checkpoint name (``base_model.model.`` and ``.base_layer``
removed), the LoRA factors themselves are not matrices of the model — what
``merge_and_unload`` would save, and what ``opdgeo trajectory`` reads from the run's
adapter checkpoints.
FSDP1's flattened parameters are not supported (they are not addressable by name): the
callbacks raise ``ConfigError`` and ask for FSDP2 (``fsdp_version: 2`` in accelerate).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from opdgeo.errors import ConfigError

__all__ = ["WRAPPER_PREFIXES", "LiveWeights", "LoraMatrix", "checkpoint_name", "full_matrix", "is_sharded",
           "matrix_shape", "named_matrices"]

WRAPPER_PREFIXES = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
"""Name parts that wrappers insert anywhere and ``save_pretrained`` does not write (plus
DDP's leading ``module``)."""


def checkpoint_name(name: str) -> str:
    """``name`` without wrapper parts (``module.model.layers.0...`` → ``model.layers.0...``;
    PEFT's ``base_model.model.`` and ``.base_layer`` too)."""
    parts = [p for p in name.split(".") if p not in WRAPPER_PREFIXES and p != "base_layer"]
    while parts and parts[0] == "module":  # DistributedDataParallel / DataParallel
        parts = parts[1:]
    if parts[:2] == ["base_model", "model"]:  # a PeftModel
        parts = parts[2:]
    return ".".join(parts)


class LoraMatrix:
    """The merged weight W + s·B·A of one peft LoRA layer, computed when read."""

    def __init__(self, layer):
        self.layer = layer
        self.shape = torch.Size(matrix_shape(layer.base_layer.weight))

    def dim(self) -> int:
        return 2

    @torch.no_grad()
    def value(self) -> torch.Tensor:
        w = self.layer.base_layer.weight.detach()
        for adapter in self.layer.active_adapters:
            if adapter in self.layer.lora_A:
                d = self.layer.get_delta_weight(adapter)
                w = (w.to(torch.promote_types(w.dtype, d.dtype)) + d).to(w.dtype)
        return w


def matrix_shape(p) -> tuple[int, ...]:
    """The full (logical) shape of a parameter: a ZeRO-3 parameter's own ``shape`` is that of
    its local flat partition (empty outside a gather), its full shape is ``ds_shape``."""
    return tuple(p.ds_shape) if hasattr(p, "ds_id") else tuple(p.shape)


def named_matrices(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Checkpoint name -> parameter of every 2-D parameter of ``model`` (tied ones once).

    Raises:
        ConfigError: an FSDP1 flat parameter (not addressable by name).
    """
    out = {}
    lora = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):
            lora[checkpoint_name(f"{name}.weight")] = LoraMatrix(module)
    for name, p in model.named_parameters():
        if type(p).__name__ == "FlatParameter" or "_flat_param" in name:
            raise ConfigError("the model is wrapped by FSDP1 (flat parameters); opdgeo's callbacks need FSDP2 "
                              "(accelerate fsdp_version: 2) or DeepSpeed ZeRO-3")
        if len(matrix_shape(p)) == 2 and ".lora_" not in name:
            out[checkpoint_name(name)] = p
    out.update(lora)
    return out


def is_sharded(p: torch.Tensor) -> bool:
    """True for a parameter whose full value needs a collective (FSDP2 DTensor, ZeRO-3)."""
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor) or hasattr(p, "ds_id")


@torch.no_grad()
def full_matrix(p: torch.Tensor) -> torch.Tensor:
    """The whole value of one parameter, detached, on its device (module docstring).

    Collective for a sharded parameter: every rank calls it, in the same order.
    """
    from torch.distributed.tensor import DTensor

    if isinstance(p, LoraMatrix):
        return p.value()
    if isinstance(p, DTensor):
        return p.full_tensor().detach()
    if hasattr(p, "ds_id"):
        import deepspeed  # only reachable when DeepSpeed created the parameter

        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            return p.detach().clone()
    return p.detach()


class LiveWeights(Mapping):
    """name -> full tensor of a parameter, gathered when read (``full_matrix``).

    What ``opdgeo.training.monitor.probe`` reads: each matrix is gathered, rounded and
    dropped before the next one is read.
    """

    def __init__(self, params: Mapping[str, torch.Tensor]):
        self._params = dict(params)

    def __getitem__(self, name: str) -> torch.Tensor:
        return full_matrix(self._params[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)
