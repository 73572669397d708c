"""Compute precision of forward passes: bf16 autocast where the device computes bf16
natively, fp32 elsewhere.

A CPU without native bf16 (AVX2-only x86, most laptops) emulates bf16 matmuls, and
autocast there is many times *slower* than fp32 (measured: 13x for a 3.4M-parameter
Qwen3 step on an AVX2 EPYC), while a CPU with AVX-512-BF16 or AMX runs it about 2x
faster. So the setting ``optim.bf16_autocast`` is ``"auto"`` by default and is resolved
once per run by ``resolve_bf16_autocast``; checkpoints are bf16 either way (the study's
precision gate is the saved dtype, not the compute dtype).

``OPDGEO_AUTOCAST=bf16|fp32`` forces what ``"auto"`` resolves to (tests and CI use it to
run one precision path on any machine); explicit ``true``/``false`` settings are never
overridden.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch

from opdgeo.errors import ConfigError

__all__ = ["AUTOCAST_ENV", "native_bf16", "resolve_bf16_autocast", "autocast_context", "precision_name"]

AUTOCAST_ENV = "OPDGEO_AUTOCAST"
_FORCED = {"bf16": True, "fp32": False}


def native_bf16(device: torch.device | str) -> bool:
    """True when ``device`` computes bf16 matmuls in hardware.

    CUDA: ``torch.cuda.is_bf16_supported()`` (Ampere and newer). CPU: oneDNN's own check
    (``torch.ops.mkldnn._is_mkldnn_bf16_supported``: AVX-512-BF16, AMX or ARM BF16), the
    same test PyTorch uses to pick its bf16 kernels.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(check is not None and torch.backends.mkldnn.is_available() and check())
    return False


def resolve_bf16_autocast(setting: bool | str, device: torch.device | str) -> bool:
    """Whether forward passes run under bf16 autocast on ``device``.

    Args:
        setting: ``True``/``False`` (used as given) or ``"auto"`` (``native_bf16(device)``,
            unless ``$OPDGEO_AUTOCAST`` is ``bf16`` or ``fp32``).
        device: where the forward passes run.

    Raises:
        ConfigError: ``setting`` is another string, or ``$OPDGEO_AUTOCAST`` is set to
            something other than ``bf16`` / ``fp32``.
    """
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise ConfigError(f"optim.bf16_autocast: must be true, false or 'auto'; got {setting!r}")
    forced = os.environ.get(AUTOCAST_ENV, "").strip().lower()
    if forced:
        if forced not in _FORCED:
            raise ConfigError(f"${AUTOCAST_ENV}: must be 'bf16' or 'fp32'; got {forced!r}")
        return _FORCED[forced]
    return native_bf16(device)


def autocast_context(enabled: bool, device: torch.device | str, *, cache: bool = True):
    """``torch.autocast(bfloat16)`` on ``device`` when ``enabled``, else a no-op context;
    ``cache``: autocast's cache of bf16 casts of weights, kept until the context exits
    (it saves recasting in the many forwards of a ``generate``; a single differentiable
    forward gains nothing from it)."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache) if enabled else nullcontext()


def precision_name(enabled: bool) -> str:
    """``"bf16-autocast"`` or ``"fp32"``: how a run's precision is shown in logs and reports."""
    return "bf16-autocast" if enabled else "fp32"
