"""Benchmark of ``opdgeo trajectory`` on a synthetic 5-checkpoint run of one decoder layer.

Shapes: the Qwen3-1.7B layer of ``bench/compare.py`` (q, o 2048x2048; k, v 1024x2048;
gate, up 6144x2048; down 2048x6144), ``--qwen3-8b`` for the 8B layer. bf16 HF folders in
a temporary directory: an origin W0 (0.02·G plus a rank-32 principal part) and five
checkpoints (steps 63, 127, 191, 255, 299, as the paper's OPD run) with realistic
cumulative updates, low rank plus noise:

    ΔW_t = (t/T)·C + √(t/T)·F_t + N_t
    C   = U diag(s) Vᵀ, rank 64, s_i = i^-0.3        (the locked core)
    F_t = fresh rank-32 part, 0.5·i^-0.3 per checkpoint (drifting directions)
    N_t = Gaussian noise whose bulk edge sits at ~0.1 σ1 (√(t/T)-scaled)

scaled to a per-entry RMS of ~1e-3 (well above the bf16 rounding of W0 + ΔW_t).
Stable ranks come out ~20-30, as the paper's OPD.

Measured (each side in its own child process, so peak RSS is its own):

1. the trajectory with the default randomized top-k SVD vs the same trajectory with
   full float64 SVDs (``exact_svd=True``): time ratio (target <= 0.1);
2. accuracy against the full float64 SVDs, max over checkpoints and matrices: σ1
   relative error (<= 1e-4), top-32 singular values relative error (<= 1e-3), Sim_16
   absolute error (<= 1e-3);
3. peak RSS of the randomized side (MiB).

The last lines are ``name: value`` pairs. Usage::

    python bench/trajectory.py [--qwen3-8b] [--workers N] [--matrices all|attention]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import multiprocessing as mp
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

STEPS = (63, 127, 191, 255, 299)


def _layer_shapes():
    """SHAPES and MODULE of bench/compare.py (one definition of the benchmark layer)."""
    spec = importlib.util.spec_from_file_location("_bench_compare", Path(__file__).with_name("compare.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.SHAPES, mod.MODULE


def _orth(rows: int, cols: int, g):
    import torch

    return torch.linalg.qr(torch.randn(rows, cols, generator=g))[0]


def synthetic_run(root: Path, shapes: dict, module: dict, *, seed: int = 0) -> tuple[Path, Path]:
    """Write ``root/origin`` and ``root/run/step-*`` (bf16 ``model.safetensors`` + ``config.json``)."""
    import json

    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    origin: dict = {}
    ckpts: dict = {s: {} for s in STEPS}
    for t, (m, n) in shapes.items():
        name = f"model.layers.0.{module[t]}.weight"
        strength = torch.logspace(0, -1.5, 32) * 0.5 / math.sqrt(max(m, n))
        w0 = 0.02 * torch.randn(m, n, generator=g)
        w0 += (torch.randn(m, 32, generator=g) * strength) @ torch.randn(32, n, generator=g)
        origin[name] = w0.to(torch.bfloat16).contiguous()
        w0 = origin[name].float()
        i = torch.arange(1, 65, dtype=torch.float32)
        core = (_orth(m, 64, g) * i**-0.3) @ _orth(n, 64, g).T  # σ1 = 1
        edge = 0.1 / (math.sqrt(m) + math.sqrt(n))  # noise bulk edge ≈ 0.1
        rms = 1e-3 / math.sqrt(float((core**2).mean()))  # per-entry RMS of the core ~ 1e-3
        for s in STEPS:
            f = s / STEPS[-1]
            fresh = (_orth(m, 32, g) * (0.5 * i[:32] ** -0.3)) @ _orth(n, 32, g).T
            noise = edge * torch.randn(m, n, generator=g)
            delta = f * core + math.sqrt(f) * (fresh + noise)
            ckpts[s][name] = (w0 + rms * delta).to(torch.bfloat16).contiguous()
    config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "num_hidden_layers": 1}
    for folder, tensors in [(root / "origin", origin)] + [(root / "run" / f"step-{s:06d}", ckpts[s]) for s in STEPS]:
        folder.mkdir(parents=True)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config))
    return root / "origin", root / "run"


def _side(origin: str, run: str, exact: bool, matrices: str, workers: int, threads: int, queue) -> None:
    import torch

    from opdgeo.analysis.trajectory import trajectory

    torch.set_num_threads(threads)

    t0 = time.perf_counter()
    res = trajectory({"run": run}, origin, matrices=matrices, exact_svd=exact, workers=workers, keep_spectra=True,
                     overlap=False)
    elapsed = time.perf_counter() - t0
    queue.put({
        "elapsed_s": elapsed,
        "rows": res.rows,
        "spectra": {k: v.tolist() for k, v in res.spectra.items()},
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    })


def _run_side(*args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_side, args=(*args, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qwen3-8b", action="store_true", help="Qwen3-8B layer shapes instead of Qwen3-1.7B.")
    parser.add_argument("--workers", type=int, default=1, help="trajectory worker threads (both sides).")
    parser.add_argument("--matrices", default="all", help="matrix set (default: the whole layer).")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads on both sides (default: torch's default).")
    parser.add_argument("--shrink", type=int, default=1, help="divide every dimension by this (smoke runs).")
    parser.add_argument("--keep", action="store_true", help="keep the temporary checkpoints.")
    args = parser.parse_args()
    shapes_all, module = _layer_shapes()
    shapes = {t: (m // args.shrink, n // args.shrink)
              for t, (m, n) in shapes_all["qwen3-8b" if args.qwen3_8b else "qwen3-1.7b"].items()}

    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    print(f"# opdgeo trajectory benchmark ({'Qwen3-8B' if args.qwen3_8b else 'Qwen3-1.7B'} layer, "
          f"{len(STEPS)} checkpoints, matrices={args.matrices})")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, workers={args.workers}, load average {os.getloadavg()[0]:.1f}")
    root = Path(tempfile.mkdtemp(prefix="opdgeo-bench-traj-"))
    try:
        t0 = time.perf_counter()
        # in a child: the sides are forked from this process, and a fork starts with its
        # parent's peak RSS, so the parent must never hold the generated tensors
        ctx = mp.get_context("spawn")
        gen = ctx.Process(target=synthetic_run, args=(root, shapes, module))
        gen.start()
        gen.join()
        if gen.exitcode != 0:
            raise SystemExit(f"generating the checkpoints failed (exit code {gen.exitcode})")
        origin, run = root / "origin", root / "run"
        print(f"# wrote origin + {len(STEPS)} bf16 checkpoints in {time.perf_counter() - t0:.1f} s")
        threads = torch.get_num_threads()
        fast = _run_side(str(origin), str(run), False, args.matrices, args.workers, threads)
        print(f"randomized top-k SVD trajectory: {fast['elapsed_s']:.1f} s")
        full = _run_side(str(origin), str(run), True, args.matrices, args.workers, threads)
        print(f"full float64 SVD trajectory:     {full['elapsed_s']:.1f} s")

        s1_err = top_err = sim_err = 0.0
        for key, s_fast in fast["spectra"].items():
            s_full = full["spectra"][key]
            s1_err = max(s1_err, abs(s_fast[0] - s_full[0]) / s_full[0])
            top_err = max(top_err, max(abs(a - b) / b for a, b in zip(s_fast[:32], s_full[:32])))
        for a, b in zip(fast["rows"], full["rows"]):
            assert (a["step"], a["name"]) == (b["step"], b["name"])
            sim_err = max(sim_err, abs(a["sim_to_final"] - b["sim_to_final"]))
        srank = [r["stable_rank"] for r in full["rows"]]
        print(f"# stable rank of the updates: {min(srank):.1f} .. {max(srank):.1f}")
        print(f"# full-SVD side peak RSS: {full['peak_rss_mib']:.0f} MiB")
        print(f"time_vs_full_svd: {fast['elapsed_s'] / full['elapsed_s']:.4f}")
        print(f"sigma1_rel_err: {s1_err:.3e}")
        print(f"top32_rel_err: {top_err:.3e}")
        print(f"sim16_abs_err: {sim_err:.3e}")
        print(f"peak_rss_mib: {fast['peak_rss_mib']:.0f}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"# kept {root}")


if __name__ == "__main__":
    main()
