"""Memory and step time of the distributed strategies and of activation checkpointing, on
SmolLM2-135M, measured in one run (ratios, not absolute claims):

    python bench/train_memory.py [--model smollm2] [--seq 256] [--rows 4]

- ``fsdp_vs_ddp_state_mem``: per-rank bytes of parameters + gradients + AdamW state held by
  rank 0 after one optimizer step, FSDP2 over 2 processes / DDP over 2 processes (gloo, CPU);
- ``fsdp_vs_ddp_peak_mem``: the same ratio of peak resident memory (``ru_maxrss``) above
  each process's resident memory before the model was built;
- ``fsdp_vs_ddp_step_time``: median step time (forward + backward + AdamW) ratio;
- ``ckpt_act_saved_mem``: bytes autograd saves for backward with activation checkpointing on
  / off (one process, one micro-batch of ``rows`` sequences of ``seq`` tokens);
- ``ckpt_act_peak_mem``: peak resident memory above the pre-step level, on / off (each in
  its own fresh process).

Every worker runs the same forward as training (``sequence_logprobs`` through
``opdgeo.distributed.wrap_model``). The last lines are ``name: value`` pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time

import torch


def _rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _state_bytes(model, optimizer) -> int:
    def local(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    total = sum(local(p) + (local(p.grad) if p.grad is not None else 0) for p in model.parameters())
    for st in optimizer.state.values():
        total += sum(local(v) for v in st.values() if isinstance(v, torch.Tensor))
    return total


def worker(args) -> dict:
    """One measurement in this process (a torchrun worker or a plain process)."""
    from opdgeo import distributed
    from opdgeo.training.loop import activation_checkpointing_, load_policy
    from opdgeo.training.rollout import sequence_logprobs

    torch.manual_seed(0)
    base_kib = _rss_kib()
    ctx = distributed.init(single_process_group=args.strategy == "fsdp")
    model, _ = load_policy(args.model)
    model = model.float().eval()
    if args.ckpt:
        activation_checkpointing_(model)
    wrapped = distributed.wrap_model(model, args.strategy, ctx)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    g = torch.Generator().manual_seed(ctx.rank)
    ids = torch.randint(0, min(model.config.vocab_size, 1000), (args.rows, args.seq), generator=g)
    att = torch.ones_like(ids)
    resp = torch.ones(args.rows, args.seq // 2, dtype=torch.bool)
    times, saved, state = [], 0, 0
    for step in range(args.steps):
        distributed.barrier()
        t0 = time.perf_counter()
        seen: dict[int, int] = {}

        def pack(t, seen=seen):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lp = sequence_logprobs(wrapped, ids, att, resp)
        saved = sum(seen.values())
        (-lp.sum() / lp.numel()).backward()
        opt.step()
        state = _state_bytes(model, opt)  # parameters, gradients and AdamW's moments held here
        opt.zero_grad(set_to_none=False)
        distributed.barrier()
        times.append(time.perf_counter() - t0)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"state_bytes": state, "saved_bytes": saved, "peak_above_base": (peak_kib - base_kib) * 1024,
           "step_time": statistics.median(times[1:] if len(times) > 1 else times)}
    rows = distributed.gather_to_rank0(out)
    distributed.destroy(ctx)
    return rows[0] if rows else None  # rank 0 reports its own numbers (every rank holds the same share)


def _launch(args, strategy: str, nproc: int, ckpt: bool) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = ["--worker", "--strategy", strategy, "--model", args.model, "--seq", str(args.seq), "--rows", str(args.rows),
             "--steps", str(args.steps)] + (["--ckpt"] if ckpt else [])
    head = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(port)] \
        if nproc > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([*head, __file__, *flags], env=env, capture_output=True, text=True, timeout=3000)
    if proc.returncode:
        sys.exit(f"worker failed ({strategy}, {nproc}, ckpt={ckpt}):\n{proc.stderr[-3000:]}")
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1].removeprefix("RESULT "))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence (the last half are the response)")
    ap.add_argument("--rows", type=int, default=4, help="sequences per micro-batch")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per measurement (the first is a warm-up)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--strategy", default="none", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        row = worker(args)
        if row is not None:
            print("RESULT " + json.dumps(row), flush=True)
        return
    ddp = _launch(args, "ddp", 2, False)
    fsdp = _launch(args, "fsdp", 2, False)
    off = _launch(args, "none", 1, False)
    on = _launch(args, "none", 1, True)
    for name, row in (("ddp x2", ddp), ("fsdp x2", fsdp), ("ckpt off", off), ("ckpt on", on)):
        print(f"{name}: state {row['state_bytes'] / 2**20:.1f} MiB, saved for backward {row['saved_bytes'] / 2**20:.1f} MiB, "
              f"peak above base {row['peak_above_base'] / 2**20:.1f} MiB, step {row['step_time']:.2f} s")
    print(f"fsdp_vs_ddp_state_mem: {fsdp['state_bytes'] / ddp['state_bytes']:.3f}")
    print(f"fsdp_vs_ddp_peak_mem: {fsdp['peak_above_base'] / ddp['peak_above_base']:.3f}")
    print(f"fsdp_vs_ddp_step_time: {fsdp['step_time'] / ddp['step_time']:.3f}")
    print(f"ckpt_act_saved_mem: {on['saved_bytes'] / off['saved_bytes']:.3f}")
    print(f"ckpt_act_peak_mem: {on['peak_above_base'] / off['peak_above_base']:.3f}")
    print(f"ckpt_act_step_time: {on['step_time'] / off['step_time']:.3f}")


if __name__ == "__main__":
    main()
