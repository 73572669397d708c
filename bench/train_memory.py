"""Memory and step time of the distributed strategies and of activation checkpointing, on
SmolLM2-135M, measured in one run (ratios, not absolute claims); ``bench/train.py`` runs it
and prints its lines with the throughput benchmark's:

    python bench/train_memory.py [--model smollm2] [--seq 256] [--rows 2] [--steps 3]

Peak memory per rank *during training*: each worker builds the model, wraps it, takes one
warm-up step (gradients and AdamW's moments now exist), returns freed heap to the system
(``malloc_trim``), resets the kernel's resident high-water mark (``/proc/self/clear_refs``
= 5) and takes the measured steps; the peak is ``VmHWM`` over those steps minus the
resident memory before the model was built: the imports, including the model's modeling
code, which transformers imports only on a model's first load, so each worker first builds
the model on the meta device (SmolLM2's Llama code: about 165 MiB of Python objects; the
per-row lines also print the peak with it counted, "with the model code"). Loading is
excluded: it is not training, and every rank loads the whole model on the CPU before
``fully_shard``. Workers
run with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc serves large buffers from mmap and
returns them when freed: with its default, adaptive threshold the buffers FSDP gathers
and frees layer by layer stay resident as heap fragments (about 0.35 GB more in the FSDP
forward on this model), which would measure glibc, not the training.

- ``fsdp_vs_ddp_state_mem``: per-rank bytes of parameters + gradients + AdamW state held by
  rank 0 after a step, FSDP2 over 2 processes / DDP over 2 processes (gloo, CPU);
- ``fsdp_vs_ddp_peak_mem``: the same ratio of the peak during training (above);
- ``fsdp_vs_ddp_step_time``: median step time (forward + backward + AdamW) ratio;
- ``ckpt_act_saved_mem``: bytes autograd saves for backward with activation checkpointing on
  / off (one process, one micro-batch of ``rows`` sequences of ``seq`` tokens);
- ``ckpt_act_peak_mem``: the peak during training, on / off (one process each);
- ``ckpt_act_peak_mem_fsdp``: the same under FSDP2 over 2 processes;
- ``fsdp_vs_ddp_tensor_peak``, ``ckpt_act_tensor_peak``: the two peak ratios again from
  the peak of live tensor bytes in one more, profiled step (``_tensor_peak``): a
  cross-check that no base, allocator behaviour or imported code enters
  (``--no-tensor-peak`` skips it).

Every worker runs the same forward as training (``sequence_logprobs`` through
``opdgeo.distributed.wrap_model``) at the precision training would use: ``--precision
auto`` (default) resolves like ``optim.bf16_autocast: auto`` (bf16 where the device computes
bf16 natively, fp32 elsewhere); ``bf16`` is what training does then: the forward under bf16
autocast and, under ``fsdp``, FSDP2's ``MixedPrecisionPolicy`` (bf16 parameters in compute,
fp32 gradient reduction, fp32 master weights and AdamW state either way), without
autocast's weight-cast cache, as the loss stage runs it; the optimizer is training's fused
AdamW (``training.policies.adamw``). The last lines are ``name: value`` pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import torch


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    """Return freed heap to the system, then restart the resident high-water mark here."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _state_bytes(model, optimizer) -> int:
    def local(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    total = sum(local(p) + (local(p.grad) if p.grad is not None else 0) for p in model.parameters())
    for st in optimizer.state.values():
        total += sum(local(v) for v in st.values() if isinstance(v, torch.Tensor))
    return total


def _tensor_peak(step, held: int) -> int:
    """Peak bytes of live tensors during one more ``step()``: ``held`` (the tensors alive
    when it starts: parameters, gradients, AdamW's moments) plus the most the step's own
    allocations, net of their frees, reach in the profiler's allocation events
    (``total_allocated`` counts the allocations made while profiling). The CPU counterpart
    of ``torch.cuda.max_memory_allocated``: a cross-check of the resident-memory peak that
    no base, allocator behaviour or imported code enters."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    top, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if type(node.extra_fields).__name__ == "_ExtraFields_Allocation":
            top = max(top, node.extra_fields.total_allocated)
    return held + top


def _import_model_code(source: str) -> None:
    """Import the code that loading ``source`` runs (transformers imports a model's
    modeling module on its first load) by building the model on the meta device: no
    weights are read or allocated."""
    from opdgeo.sources import ModelSource

    src = ModelSource.parse(source)
    with torch.device("meta"):
        if src.kind == "tiny":
            from opdgeo.models import model_and_tokenizer

            model_and_tokenizer(source)
        else:
            from transformers import AutoConfig, AutoModelForCausalLM

            from opdgeo.models.loading import resolve_source

            AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_source(source), local_files_only=True))


def worker(args) -> dict:
    """One measurement in this process (a torchrun worker or a plain process)."""
    from opdgeo import distributed
    from opdgeo.training.config import OptimConfig
    from opdgeo.training.loop import activation_checkpointing_, load_policy
    from opdgeo.training.policies import adamw
    from opdgeo.training.precision import autocast_context
    from opdgeo.training.rollout import sequence_logprobs

    torch.manual_seed(0)
    start_kib = _status_kib("VmRSS")
    _import_model_code(args.model)
    _reset_peak()
    base_kib = _status_kib("VmRSS")
    ctx = distributed.init(single_process_group=args.strategy == "fsdp")
    model, _ = load_policy(args.model)
    model = model.float().eval()
    if args.ckpt:
        activation_checkpointing_(model)
    bf16 = args.precision == "bf16"
    wrapped = distributed.wrap_model(model, args.strategy, ctx, bf16_compute=bf16)
    opt = adamw([p for p in model.parameters() if p.requires_grad], OptimConfig(lr=1e-5))  # training's AdamW
    g = torch.Generator().manual_seed(ctx.rank)
    ids = torch.randint(0, min(model.config.vocab_size, 1000), (args.rows, args.seq), generator=g)
    att = torch.ones_like(ids)
    resp = torch.ones(args.rows, args.seq // 2, dtype=torch.bool)
    times, setup_kib = [], 0

    def train_step() -> tuple[int, int]:
        seen: dict[int, int] = {}

        def pack(t, seen=seen):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast_context(bf16, ctx.device, cache=False):
            lp = sequence_logprobs(wrapped, ids, att, resp)
        (-lp.sum() / lp.numel()).backward()
        del lp
        opt.step()
        held = _state_bytes(model, opt)  # parameters, gradients and AdamW's moments held here
        opt.zero_grad(set_to_none=False)
        return sum(seen.values()), held

    for step in range(args.mem_steps):
        if step == 1:  # after the warm-up step: the peak of the training steps from here
            setup_kib = _status_kib("VmHWM")  # loading, wrapping and the warm-up step (clear_refs resets it)
            _reset_peak()
        distributed.barrier()
        t0 = time.perf_counter()
        saved, state = train_step()
        distributed.barrier()
        times.append(time.perf_counter() - t0)
    peak_kib = _status_kib("VmHWM")
    tensor_peak = _tensor_peak(train_step, state) if args.tensor_peak else 0
    out = {"state_bytes": state, "saved_bytes": saved, "tensor_peak": tensor_peak,
           "peak_above_base": (peak_kib - base_kib) * 1024,
           "model_code": (base_kib - start_kib) * 1024,
           "setup_peak_above_base": (setup_kib - base_kib) * 1024,
           "step_time": statistics.median(times[1:] if len(times) > 1 else times)}
    rows = distributed.gather_to_rank0(out)
    distributed.destroy(ctx)
    return rows[0] if rows else None  # rank 0 reports its own numbers (every rank holds the same share)


def _launch(args, strategy: str, nproc: int, ckpt: bool) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = ["--worker", "--strategy", strategy, "--model", args.model, "--seq", str(args.seq), "--rows", str(args.rows),
             "--mem-steps", str(args.mem_steps), "--precision", args.precision] + (["--ckpt"] if ckpt else []) \
        + ([] if args.tensor_peak else ["--no-tensor-peak"])
    head = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(port)] \
        if nproc > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([*head, __file__, *flags], env=env, capture_output=True, text=True, timeout=3000)
    if proc.returncode:
        sys.exit(f"worker failed ({strategy}, {nproc}, ckpt={ckpt}):\n{proc.stderr[-3000:]}")
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1].removeprefix("RESULT "))


def resolved_precision(setting: str) -> str:
    """``fp32`` or ``bf16``: ``auto`` as training resolves ``optim.bf16_autocast: auto`` on the CPU."""
    from opdgeo.training.precision import resolve_bf16_autocast

    if setting == "auto":
        return "bf16" if resolve_bf16_autocast("auto", "cpu") else "fp32"
    return setting


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence (the last half are the response)")
    ap.add_argument("--rows", type=int, default=4, help="sequences per micro-batch")
    ap.add_argument("--mem-steps", type=int, default=3, dest="mem_steps",
                    help="optimizer steps per memory measurement (the first is a warm-up)")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                    help="compute precision of the measured steps (auto: as training resolves it here)")
    ap.add_argument("--no-tensor-peak", dest="tensor_peak", action="store_false",
                    help="skip the profiled step that measures the peak of live tensors")


def run_all(args) -> dict[str, float]:
    """Every measurement, each in fresh processes; prints one line per measurement and
    returns the ratios."""
    args.precision = resolved_precision(args.precision)
    from opdgeo.sources import ModelSource

    if ModelSource.parse(args.model).kind != "tiny":  # a first SmolLM2 export happens here, not in a measured worker
        from opdgeo.models.loading import resolve_source

        resolve_source(args.model)
    print(f"train_memory: precision {args.precision}, {args.rows} x {args.seq} tokens per rank, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}", file=sys.stderr)
    runs = {"ddp x2": ("ddp", 2, False), "fsdp x2": ("fsdp", 2, False), "ckpt off": ("none", 1, False),
            "ckpt on": ("none", 1, True), "fsdp x2 ckpt on": ("fsdp", 2, True)}
    rows = {name: _launch(args, *spec) for name, spec in runs.items()}
    for name, row in rows.items():
        print(f"{name}: state {row['state_bytes'] / 2**20:.1f} MiB, saved for backward {row['saved_bytes'] / 2**20:.1f} MiB, "
              f"peak in steps {row['peak_above_base'] / 2**20:.1f} MiB "
              f"({(row['peak_above_base'] + row['model_code']) / 2**20:.1f} with the model code; load + warm-up step "
              f"{row['setup_peak_above_base'] / 2**20:.1f} MiB), live tensors at most {row['tensor_peak'] / 2**20:.1f} MiB, "
              f"step {row['step_time']:.2f} s", file=sys.stderr)
    ddp, fsdp, off, on, fsdp_on = (rows[k] for k in runs)
    ratios = {
        "fsdp_vs_ddp_state_mem": fsdp["state_bytes"] / ddp["state_bytes"],
        "fsdp_vs_ddp_peak_mem": fsdp["peak_above_base"] / ddp["peak_above_base"],
        "fsdp_vs_ddp_step_time": fsdp["step_time"] / ddp["step_time"],
        "ckpt_act_saved_mem": on["saved_bytes"] / off["saved_bytes"],
        "ckpt_act_peak_mem": on["peak_above_base"] / off["peak_above_base"],
        "ckpt_act_peak_mem_fsdp": fsdp_on["peak_above_base"] / fsdp["peak_above_base"],
        "ckpt_act_step_time": on["step_time"] / off["step_time"],
    }
    if args.tensor_peak:
        ratios["fsdp_vs_ddp_tensor_peak"] = fsdp["tensor_peak"] / ddp["tensor_peak"]
        ratios["ckpt_act_tensor_peak"] = on["tensor_peak"] / off["tensor_peak"]
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--strategy", default="none", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        row = worker(args)
        if row is not None:
            print("RESULT " + json.dumps(row), flush=True)
        return
    for k, v in run_all(args).items():
        print(f"{k}: {v:.3f}")


if __name__ == "__main__":
    main()
