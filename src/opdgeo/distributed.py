"""The package's one owner of ``torch.distributed``: process group, rank, device, collectives
and the data-parallel wrappers (PyTorch's own DDP and FSDP2).

- ``init`` / ``destroy`` / ``context`` — the process group from the launcher's environment
  (``torchrun`` and ``accelerate launch`` both set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``, ``MASTER_PORT``): ``gloo`` on CPU, ``nccl`` on CUDA, the device
  ``cuda:LOCAL_RANK`` or ``cpu``. A plain process is rank 0 of 1 and needs no group.
- ``resolve_strategy`` — ``distributed.strategy``: ``auto`` is ``none`` in one process and
  ``ddp`` under a launcher with several processes.
- ``wrap_model`` — ``DistributedDataParallel`` or FSDP2 ``fully_shard`` (per decoder layer,
  then the root), both made to SUM gradients over ranks (not average: the loss is already
  divided by the global token count, so the sum over ranks is the gradient of the
  token-level mean over the global batch, exactly as in one process).
- ``shard_for_inference`` — the teacher under ``fsdp``: FSDP2 shards, no optimizer.
- ``all_reduce_sum``, ``all_reduce_max``, ``barrier``, ``broadcast_object``,
  ``gather_to_rank0``, ``all_gather`` — identities in one process.

Nothing here knows about configs, checkpoints or metrics.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from opdgeo.errors import ConfigError

__all__ = [
    "Context",
    "STRATEGIES",
    "launched_world",
    "init",
    "destroy",
    "context",
    "dist_context",
    "is_distributed",
    "rank",
    "barrier",
    "all_reduce_sum",
    "all_reduce_max",
    "broadcast_object",
    "gather_to_rank0",
    "all_gather",
    "resolve_strategy",
    "wrap_model",
    "shard_for_inference",
    "unwrap",
    "decoder_layers",
    "is_sharded",
    "no_sync",
]

STRATEGIES = ("auto", "none", "ddp", "fsdp")


@dataclass(frozen=True)
class Context:
    """Where this process stands: ``rank`` of ``world``, its ``device``; ``owned`` when
    ``init`` created the process group (and ``destroy`` should end it)."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    owned: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    """This process's rank in the initialized process group (0 without one)."""
    dist = _dist()
    return dist.get_rank() if dist is not None else 0


def is_distributed() -> bool:
    """True when ``torch.distributed`` is initialized with more than one process."""
    dist = _dist()
    return dist is not None and dist.get_world_size() > 1


def _env_ranks() -> tuple[int, int, int] | None:
    """``(rank, world, local_rank)`` from the launcher's variables; None in a plain process."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as err:
        raise ConfigError(f"launcher environment: RANK/WORLD_SIZE/LOCAL_RANK must be integers ({err})") from None
    if not 0 <= rank < world:
        raise ConfigError(f"launcher environment: RANK={rank} not in [0, WORLD_SIZE={world})")
    return rank, world, local


def launched_world() -> int:
    """The world size the launcher announces (1 in a plain process), without initializing anything."""
    dist = _dist()
    if dist is not None:
        return dist.get_world_size()
    env = _env_ranks()
    return env[1] if env else 1


def init(*, use_cuda: bool | None = None, single_process_group: bool = False) -> Context:
    """Set up this process: the process group (under a launcher), the device.

    Args:
        use_cuda: run on CUDA (default: when it is available).
        single_process_group: also create a group of one in a plain process (FSDP2 and
            ``torch.distributed.checkpoint`` of sharded tensors need one).

    Raises:
        ConfigError: inconsistent launcher variables, or no ``torch.distributed``.
    """
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
    if _dist() is not None:
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return Context(rank, world, local, _device(use_cuda, local))
    env = _env_ranks()
    if env is None and not single_process_group:
        return Context(0, 1, 0, _device(use_cuda, 0))
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed (needed under a launcher)")
    rank, world, local = env or (0, 1, 0)
    if use_cuda:
        torch.cuda.set_device(local)
    backend = "nccl" if use_cuda else "gloo"
    if env is None:  # a group of one needs no rendezvous
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group(backend, rank=rank, world_size=world)
    return Context(rank, world, local, _device(use_cuda, local), owned=True)


def _device(use_cuda: bool, local: int) -> torch.device:
    return torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")


def destroy(ctx: Context) -> None:
    """End the process group if ``init`` created it (after a barrier: no rank tears its
    end down while another still talks to it)."""
    if ctx.owned and _dist() is not None:
        barrier()
        _dist().destroy_process_group()


@contextlib.contextmanager
def context(**kwargs: Any) -> Iterator[Context]:
    """``init(**kwargs)`` for the duration of a ``with`` block, then ``destroy``."""
    ctx = init(**kwargs)
    try:
        yield ctx
    finally:
        destroy(ctx)


@contextlib.contextmanager
def dist_context(device: str = "cpu", backend: str | None = None) -> Iterator[tuple[int, int]]:
    """``(rank, world)`` inside a process group set up from the launcher's environment
    (``gloo`` for CPU work, ``nccl`` for CUDA); a plain process or a world of one yields
    ``(0, 1)``; a group the caller created is used and left alone."""
    dist = _dist()
    if dist is not None:
        yield dist.get_rank(), dist.get_world_size()
        return
    env = _env_ranks()
    if env is None or env[1] == 1:
        yield 0, 1
        return
    import torch.distributed as tdist

    use_cuda = str(device).startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(env[2])
    tdist.init_process_group(backend=backend or ("nccl" if use_cuda else "gloo"), rank=env[0], world_size=env[1])
    try:
        yield env[0], env[1]
    finally:
        tdist.destroy_process_group()


# --------------------------------------------------------------------- collectives


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_distributed():
        _dist().barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (a copy; identity in one process). Pass float64 for exact counts."""
    if is_distributed():
        values = values.clone()
        _dist().all_reduce(values, op=_dist().ReduceOp.SUM)
    return values


def all_reduce_max(value: float) -> float:
    """Maximum of a float over ranks (identity in one process)."""
    if is_distributed():
        t = torch.tensor([value], dtype=torch.float64)
        _dist().all_reduce(t, op=_dist().ReduceOp.MAX)
        return float(t[0])
    return value


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable values: names, numbers)."""
    if not is_distributed():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=src)
    return box[0]


def gather_to_rank0(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0, as a list indexed by rank; ``None`` on other ranks.

    ``[obj]`` without a multi-process group. ``gather_object`` on gloo, ``all_gather_object``
    otherwise (nccl's object collectives need every rank's device).
    """
    if not is_distributed():
        return [obj]
    dist = _dist()
    out: list[Any] = [None] * dist.get_world_size()
    if dist.get_backend() == "gloo":
        dist.gather_object(obj, out if dist.get_rank() == 0 else None, dst=0)
    else:
        dist.all_gather_object(out, obj)
    return out if dist.get_rank() == 0 else None


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` on every rank (``[obj]`` without a multi-process group); used to
    share a per-rank error so that all ranks fail together."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * _dist().get_world_size()
    _dist().all_gather_object(out, obj)
    return out


# ------------------------------------------------------------------ data parallel


def resolve_strategy(setting: str, world: int) -> str:
    """``distributed.strategy`` for this launch: ``auto`` → ``none`` (one process) or ``ddp``.

    Raises:
        ConfigError: an unknown strategy.
    """
    if setting not in STRATEGIES:
        raise ConfigError(f"distributed.strategy: must be one of {', '.join(STRATEGIES)}; got {setting!r}")
    if setting == "auto":
        return "ddp" if world > 1 else "none"
    return setting


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a HF causal LM (``model.model.layers``; GPT-2's ``transformer.h``)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        node: Any = model
        for part in path.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if isinstance(node, torch.nn.ModuleList):
            return list(node)
    raise ConfigError(f"{type(model).__name__}: no decoder layers found to shard or checkpoint")


def _sum_hook(_state, bucket):
    """DDP communication hook: all-reduce SUM (DDP's default divides by the world size)."""
    import torch.distributed as dist

    fut = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def wrap_model(model: torch.nn.Module, strategy: str, ctx: Context, *, bf16_compute: bool = False,
               cpu_offload: bool = False) -> torch.nn.Module:
    """The student wrapped for ``strategy`` (``none`` returns it as is).

    ``ddp``: ``DistributedDataParallel`` with a SUM communication hook and
    ``gradient_as_bucket_view`` (the gradients live in its all-reduce buckets; a world of
    one without a process group is left unwrapped: nothing to reduce). ``fsdp``: FSDP2
    ``fully_shard`` on every decoder layer and at the root; parameters (the fp32 masters)
    and hence AdamW's state are sharded over ranks; ``bf16_compute`` sets a
    ``MixedPrecisionPolicy`` (bf16 parameters in forward/backward, fp32 gradient
    reduction); ``cpu_offload`` keeps shards on the CPU (``CPUOffloadPolicy``). Gradients are
    SUMMED over ranks (divide factor 1). Trainable parameters must be fixed before wrapping.
    """
    if strategy == "none":
        return model
    if strategy == "ddp":
        if not is_distributed():
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        # the gradients are views of DDP's flat buckets: no second copy of them (4 bytes a parameter)
        ddp = DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
        ddp.register_comm_hook(None, _sum_hook)
        return ddp
    if strategy == "fsdp":
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        if _dist() is None:
            raise ConfigError("distributed.strategy: fsdp needs a process group (init(single_process_group=True))")
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_compute \
            else MixedPrecisionPolicy()
        kw = dict(mp_policy=mp, offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
        for layer in decoder_layers(model):
            fully_shard(layer, **kw)
        fully_shard(model, **kw)
        for m in model.modules():
            if hasattr(m, "set_gradient_divide_factor"):
                m.set_gradient_divide_factor(1.0)  # a sum over ranks, not a mean
                m.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
        model._is_fsdp_managed_module = True  # transformers' mark: generate() then keeps ranks in step (synced_gpus)
        return model
    raise ConfigError(f"distributed.strategy: must be one of {', '.join(STRATEGIES)}; got {strategy!r}")


def shard_for_inference(model: torch.nn.Module) -> torch.nn.Module:
    """A no-gradient model (the teacher) sharded like the student under ``fsdp``: FSDP2
    ``fully_shard`` per decoder layer and at the root, in its own dtype (no mixed-precision
    cast), each layer gathered for its forward and freed after it. Every rank then holds
    1/world of the weights plus the layers in flight. ``fully_shard`` moves each layer's
    shard to the device as it goes, so pass the model on the CPU: the whole model never
    reaches the device. Marked as FSDP-managed so that ``generate`` keeps the ranks in step.

    Raises:
        ConfigError: no process group.
    """
    from torch.distributed.fsdp import fully_shard

    if _dist() is None:
        raise ConfigError("distributed.strategy: fsdp needs a process group (init(single_process_group=True))")
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=True)
    model._is_fsdp_managed_module = True
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under a DDP wrapper (FSDP2 shards in place: the model itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def is_sharded(model: torch.nn.Module) -> bool:
    """True for a model whose parameters are FSDP2 shards (DTensors)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(unwrap(model), FSDPModule)


@contextlib.contextmanager
def no_sync(model: torch.nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient reduction of this backward unless ``sync`` (the last micro-batch):
    DDP's ``no_sync()``; FSDP2's ``set_requires_gradient_sync`` (gradients then accumulate
    unsharded locally and are reduce-scattered at the last micro-batch)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        with (contextlib.nullcontext() if sync else model.no_sync()):
            yield
        return
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    yield
